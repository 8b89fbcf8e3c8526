"""PostgreSQL: the triggers of the rollups, the budgets' slots and the
attribution ledger made statement triggers (docs/rollups.md), each
statement's items added up by group, one upsert a group, where a row
trigger upserted once an item (a bulk insert grew quadratic: each row
updated the same few rows again). Each family whose row trigger (named as
its function) is on gets its three statement triggers instead, the row
trigger dropped; the rows they keep are the same, so nothing is rebuilt.
SQLite keeps its row triggers."""
from psai.db import is_postgres
from psai._sql import ledger_trigger_sql, rollup_trigger_sql, slot_trigger_sql

# Each family's row trigger before this migration, and the statements that install its triggers now.
ROW_TRIGGERS = {"psai_rollup_fold": rollup_trigger_sql, "psai_slot_fold": slot_trigger_sql,
                "psai_ledger_fold": ledger_trigger_sql}


def up(migrator, db):
    if not is_postgres(db):
        return
    on = {row[0] for row in db.execute_sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass('\"ps_model_usage_item\"') AND tgenabled <> 'D'")}
    for name, installing in ROW_TRIGGERS.items():
        if name in on:
            for statement in installing(True):
                db.execute_sql(statement)
