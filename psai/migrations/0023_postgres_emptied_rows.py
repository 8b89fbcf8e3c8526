"""PostgreSQL: the statement triggers of the rollups, the budgets' slots
and the attribution ledger made again, their functions dropping the rows
left without calls by an array of the statement's ranges looked up in the
range index. As a join, the planner took the emptied rows for one (the
statistics say such rows are rare) and read every range for each of them:
a statement moving 8,000 items to another model took 20 s, 100,000 did not
end. The rows they keep are the same, so nothing is rebuilt. SQLite's row
triggers are unchanged."""
from psai.db import is_postgres
from psai._sql import (
    ledger_trigger_sql, ledger_triggers_sql, rollup_trigger_sql, rollup_triggers_sql, slot_trigger_sql,
    slot_triggers_sql,
)

# Each family: whether its triggers are on, and the statements that install them.
FAMILIES = ((rollup_triggers_sql, rollup_trigger_sql), (slot_triggers_sql, slot_trigger_sql),
            (ledger_triggers_sql, ledger_trigger_sql))


def up(migrator, db):
    if not is_postgres(db):
        return
    for on, installing in FAMILIES:
        if db.execute_sql(on(True)).fetchone()[0]:
            for statement in installing(True):
                db.execute_sql(statement)
