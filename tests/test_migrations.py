"""Versioned migrations: a database at every earlier version, filled with
rows, upgrades to the latest without losing any; each migration is one
transaction."""
import datetime
import shutil
import uuid

import pytest
from peewee import Table
from playhouse.migrations import Migration, Runner

import psai
from psai.migrations import DIRECTORY, HISTORY_TABLE, runner

from conftest import make_configuration

MIGRATIONS = [m.name for m in Migration.load_directory(DIRECTORY)]
NOW = "2026-11-01 12:00:00.000000+00:00"


def insert(db, table, rows):
    """Rows written straight to a table, as that version's code would have."""
    t = Table(table).bind(db)
    for row in rows:
        t.insert({getattr(t.c, k): v for k, v in row.items()}).execute()


def fill(db, version):
    """Rows for the tables that exist at ``version`` (fresh tables: ids 1, 2, ...)."""
    import json
    applied = MIGRATIONS[:MIGRATIONS.index(version) + 1]
    stamp = NOW if not psai.db.is_postgres(db) else datetime.datetime(2026, 11, 1, 12, tzinfo=datetime.timezone.utc)
    config = {"type": "text", "modelSize": "large", "model": "gpt-4", "provider": "openai", "active": True,
              "prices": {"costInTokensPerMillion": 30, "costOutTokensPerMillion": 60,
                         "costInCachedContextTokensPerMillion": 10, "currency": "USD"},
              "maxTokensOut": 4096, "defaultTemperature": 0.7}
    if "0001_initial" in applied:
        insert(db, "ps_ai_models", [dict(uuid=str(uuid.uuid4()), user_id=1, organization_id=2,
                                         created_at=stamp, updated_at=stamp, name="m%d" % i,
                                         configuration=json.dumps(dict(config, model="m%d" % i)))
                                    for i in (1, 2, 3)])
        insert(db, "ps_agents", [dict(uuid=str(uuid.uuid4()), user_id=1, class_id=1, group_id=1,
                                      created_at=stamp, updated_at=stamp, configuration='{"name": "a"}'),
                                 dict(uuid=str(uuid.uuid4()), user_id=1, class_id=1, group_id=1,
                                      created_at=stamp, updated_at=stamp, configuration='{"name": "b"}',
                                      parent_agent_id=1)])
        insert(db, "AgentModels", [dict(agent_id=1, ai_model_id=1), dict(agent_id=2, ai_model_id=3)])
    if "0002_model_usage" in applied:
        insert(db, "ps_model_usage", [dict(user_id=1, created_at=stamp, updated_at=stamp, model_id=1,
                                           agent_id=1, token_in_count=1000, token_out_count=10)])


def snapshot(db):
    tables = [t for t in ("ps_ai_models", "ps_agents", "AgentModels", "ps_model_usage") if t in db.get_tables()]
    result = {}
    for table in tables:
        columns = [c.name for c in db.get_columns(table)]
        cursor = db.execute_sql('SELECT %s FROM "%s" ORDER BY 1, 2' % (", ".join('"%s"' % c for c in columns), table))
        result[table] = [dict(zip(columns, row)) for row in cursor.fetchall()]
    return result


@pytest.mark.parametrize("version", MIGRATIONS[:-1])
def test_upgrading_from_every_earlier_version_loses_nothing(backend, version):
    db = psai.database.obj
    run = runner()
    assert run.up(target=version) == MIGRATIONS[:MIGRATIONS.index(version) + 1]
    fill(db, version)
    before = snapshot(db)
    assert psai.migrate() == MIGRATIONS[MIGRATIONS.index(version) + 1:]
    after = snapshot(db)
    for table, rows in before.items():
        assert [{k: row[k] for k in rows[0]} for row in after[table]] == rows, table
    # The upgraded database works with today's code.
    model = psai.PsAiModel.get_by_id(1)
    assert model.configuration["model"] == "m1"
    assert [m.id for m in psai.PsAgent.get_by_id(1).ai_models] == [1]
    psai.record_usage(model, 1, tokens_in=10, tokens_out=1)
    assert sum(row["tokens_in"] for row in psai.cost_report("model")) >= 10
    assert [m.name for m in psai.PsAiModel.where_config(model="m2")] == ["m2"]


def test_history_records_every_migration(db):
    history = Table(HISTORY_TABLE).bind(db)
    names = [row["name"] for row in history.select(history.c.name).order_by(history.c.name).dicts()]
    assert names == MIGRATIONS


def test_a_failing_migration_is_rolled_back_whole(backend, tmp_path):
    directory = tmp_path / "migrations"
    shutil.copytree(DIRECTORY, directory, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    (directory / "0099_broken.py").write_text(
        "def up(migrator, db):\n"
        "    db.execute_sql('CREATE TABLE half_done (id INTEGER)')\n"
        "    raise RuntimeError('disk full')\n")
    db = psai.database.obj
    run = Runner(db, str(directory), table_name=HISTORY_TABLE)
    with pytest.raises(RuntimeError, match="disk full"):
        run.up()
    assert "half_done" not in db.get_tables()
    applied = {m.name for m in run.status() if m.applied}
    assert applied == set(MIGRATIONS)  # everything before the broken one stayed


def test_ids_of_deleted_agents_and_models_are_never_reused(db):
    """Before, on SQLite (no AUTOINCREMENT), a new agent took the id of the
    newest one deleted, and with it that agent's calls and budget."""
    m = psai.PsAiModel.create(user_id=1, organization_id=1, name="m", configuration=make_configuration())
    agent = psai.PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "old"})
    psai.record_usage(m, agent, tokens_in=1000, tokens_out=10)
    gone = agent.id
    agent.delete_instance()
    newer = psai.PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "new"})
    assert newer.id != gone
    assert newer.id not in {row["agent_id"] for row in psai.cost_report("agent")}  # the old agent's calls stay its
    spare = psai.PsAiModel.create(user_id=1, organization_id=1, name="spare", configuration=make_configuration())
    spare_id = spare.id
    spare.delete_instance()
    assert psai.PsAiModel.create(user_id=1, organization_id=1, name="next", configuration=make_configuration()).id \
        != spare_id


def sqlite_schema(db, table):
    rows = db.execute_sql("SELECT type, name FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
                          "AND type != 'table' ORDER BY name", (table,)).fetchall()
    keys = db.execute_sql('PRAGMA foreign_key_list("%s")' % table).fetchall()
    return rows, sorted(tuple(key[2:]) for key in keys)


def test_a_sqlite_store_made_before_autoincrement_is_migrated_with_its_rows_and_links(tmp_path):
    psai.connect("sqlite:///%s" % (tmp_path / "old.db"))
    db = psai.database.obj
    before_autoincrement = MIGRATIONS[MIGRATIONS.index("0011_sqlite_ids_never_reused") - 1]
    runner().up(target=before_autoincrement)
    fill(db, before_autoincrement)
    # An agent 4, deleted before the upgrade, still named by a call.
    db.execute_sql("INSERT INTO ps_agents (uuid, user_id, class_id, group_id, created_at, updated_at, configuration,"
                   " parent_agent_id) VALUES ('%s', 1, 1, 1, '%s', '%s', '{\"name\": \"c\"}', 2)"
                   % (uuid.uuid4(), NOW, NOW))
    db.execute_sql('INSERT INTO "AgentModels" (agent_id, ai_model_id) VALUES (3, 2)')
    db.execute_sql("INSERT INTO ps_model_usage_item (user_id, model_id, agent_id, data, created_at, updated_at) "
                   "VALUES (1, 2, 4, '{}', '%s', '%s')" % (NOW, NOW))  # an agent 4 deleted long ago
    schemas = {table: sqlite_schema(db, table) for table in ("ps_ai_models", "ps_agents", "AgentModels")}
    before = snapshot(db)
    assert "AUTOINCREMENT" not in db.execute_sql(
        "SELECT sql FROM sqlite_master WHERE name = 'ps_agents'").fetchone()[0]
    psai.migrate()
    assert snapshot(db) == before
    assert {table: sqlite_schema(db, table) for table in schemas} == schemas  # indexes and foreign keys kept
    for table in ("ps_ai_models", "ps_agents"):
        assert "AUTOINCREMENT" in db.execute_sql("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    assert db.execute_sql("PRAGMA foreign_keys").fetchone() == (1,)
    assert db.execute_sql("PRAGMA foreign_key_check").fetchall() == []
    assert db.execute_sql("PRAGMA integrity_check").fetchone() == ("ok",)
    assert psai.PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "d"}).id == 5
    # Foreign keys work on the rebuilt tables: links cascade, sub-agents are freed.
    psai.PsAgent.get_by_id(2).delete_instance()
    assert psai.PsAgent.get_by_id(3).parent_agent_id is None
    assert sorted(r.agent_id for r in psai.AgentModels.select()) == [1, 3]
    assert psai.migrate() == []


def test_0014_remakes_the_triggers_that_folded_unusable_counts(backend, monkeypatch):
    """A store whose triggers were made before 12-hour cache writes and
    audio input counted toward an item's being usable (sql.ITEM_COUNTS):
    they folded an item with -5 of them into a priced rollup; the migration
    remakes them and rebuilds, and the rollups agree with the items."""
    import psai._sql
    from psai import rollups
    from psai.usage import cost_report, record_usage
    with monkeypatch.context() as patch:
        patch.setattr(psai._sql, "ITEM_COUNTS",
                      tuple(c for c in psai._sql.ITEM_COUNTS if c not in ("cw12h", "audio_in")))
        assert runner().up(target="0013_settings")[-1] == "0013_settings"
    model = psai.add_model(name="m", configuration=make_configuration())
    record_usage(model, None, tokens_in=1000, tokens_out=10)
    [good] = psai.PsModelUsageItem.select()
    psai.PsModelUsageItem.create(user_id=1, model_id=model.id, agent_id=0, created_at=good.created_at,
                                 data=dict(good.data, psai={"cacheWrite12hTokens": -5}))
    assert rollups.verify() != []  # the old trigger priced it
    assert runner().up(target="0014_rollup_triggers_read_every_count") == ["0014_rollup_triggers_read_every_count"]
    assert rollups.enabled(psai.database.obj) and rollups.verify() == []
    [unpriced] = [row for row in cost_report("day") if row["cost"] is None]
    assert "no usable token counts" in unpriced["unpriced_reason"]


def test_0015_gives_the_rollups_the_reasoning_sum_and_rebuilds_them(backend, clock):
    """A store at 0014 as it was made before 0015 (a rollup table without
    the reasoning sum, its triggers on) with items: after the upgrade the
    reports read the items' reasoning tokens from the rollups, rebuilt, and
    the triggers fold the next call's."""
    from psai import _sql as sql, rollups
    from psai.usage import cost_report, record_usage, report_totals
    db = psai.database.obj
    assert runner().up(target="0014_rollup_triggers_read_every_count")[-1] == "0014_rollup_triggers_read_every_count"
    model = psai.add_model(name="m", configuration=make_configuration())
    record_usage(model, None, tokens_in=1000, tokens_out=100, reasoning_tokens=40)
    record_usage(model, None, tokens_in=10, tokens_out=10, reasoning_tokens=5)
    # The table without the column, the triggers on (0015 makes them anew, and none fires before it).
    rollups.disable(db)
    db.execute_sql('ALTER TABLE "psai_usage_rollup" DROP COLUMN "reasoning_out"')
    for statement in sql.rollup_trigger_sql(psai.db.is_postgres(db)):
        db.execute_sql(statement)
    assert rollups.enabled(db)
    assert psai.migrate() == MIGRATIONS[MIGRATIONS.index("0015_rollup_reasoning_sum"):]
    assert "reasoning_out" in {column.name for column in db.get_columns("psai_usage_rollup")}
    plan = rollups.read_plan(db)
    assert plan.days == ("2026-11-25",) and not plan.reads_items
    assert report_totals(cost_report("model"))["USD"]["reasoning_tokens"] == 45
    record_usage(model, None, tokens_in=10, tokens_out=10, reasoning_tokens=7)
    assert report_totals(cost_report("model"))["USD"]["reasoning_tokens"] == 52
    assert rollups.verify() == [] and psai.migrate() == []


STATEMENT_TRIGGERS = {"psai_%s_%s" % (family, event) for family in ("rollup", "slot", "ledger")
                      for event in ("insert", "update", "delete")}
# Since 0025, the days' change counters' too.
LATEST_TRIGGERS = STATEMENT_TRIGGERS | {"psai_day_changes_%s" % event for event in ("insert", "update", "delete")}


def psai_triggers(db):
    """The names of psai's triggers on the item table."""
    if psai.db.is_postgres(db):
        sql = "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass('\"ps_model_usage_item\"')"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ps_model_usage_item'"
    return {row[0] for row in db.execute_sql(sql) if row[0].startswith("psai_")}


def row_triggers_of_before_0020(db, names):
    """PostgreSQL: psai's triggers as before 0020, one row trigger a family
    named as its function (here a function that folds nothing: nothing is
    written while they are on)."""
    from psai import rollups
    rollups.disable(db)
    db.execute_sql("CREATE FUNCTION psai_test_row_fold() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
    for name in names:
        db.execute_sql('CREATE TRIGGER "%s" AFTER INSERT OR DELETE OR UPDATE ON "ps_model_usage_item" '
                       'FOR EACH ROW EXECUTE PROCEDURE psai_test_row_fold()' % name)


def test_0020_makes_postgres_row_triggers_statement_triggers_and_rebuilds_nothing(backend, clock):
    """A store at 0019 whose triggers are PostgreSQL's row triggers: each
    family reads as on, and the upgrade gives it its statement triggers,
    the row trigger dropped, its rows kept as they are (not rebuilt: the
    same row ids), folding what comes after. SQLite's stay as they were."""
    from psai import rollups
    from psai.usage import cost_report, record_usage
    db = psai.database.obj
    assert runner().up(target="0019_budget_attribution")[-1] == "0019_budget_attribution"
    psai.db.forget_schema(db)  # the runner alone leaves psai's look at the tables as it was
    model = psai.add_model(name="m", configuration=make_configuration())
    record_usage(model, None, tokens_in=1000, tokens_out=100, user="alice")
    assert psai_triggers(db) == STATEMENT_TRIGGERS
    if psai.db.is_postgres(db):
        row_triggers_of_before_0020(db, ["psai_rollup_fold", "psai_slot_fold", "psai_ledger_fold"])
        assert psai_triggers(db) == {"psai_rollup_fold", "psai_slot_fold", "psai_ledger_fold"}
    assert rollups.enabled(db) and rollups.slots_enabled(db) and rollups.ledger_enabled(db)
    rows = [row[0] for row in db.execute_sql('SELECT id FROM "psai_usage_rollup" ORDER BY id')]
    assert psai.migrate() == ["0020_postgres_statement_triggers", "0021_budget_session", "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    assert psai_triggers(db) == LATEST_TRIGGERS
    assert [row[0] for row in db.execute_sql('SELECT id FROM "psai_usage_rollup" ORDER BY id')] == rows
    record_usage(model, None, tokens_in=10, tokens_out=10, user="alice")
    assert rollups.verify() == [] and rollups.read_plan(db).days == ("2026-11-25",)
    assert [(r["user"], r["calls"]) for r in cost_report("user")] == [("alice", 2)]
    assert psai.migrate() == []


def test_migrations_before_0020_see_a_row_trigger_as_on(backend, clock):
    """A store at 0013 whose rollups' trigger is PostgreSQL's row trigger:
    the migrations after it that remake triggers (0014 to 0017) see the
    rollups on, so the slots and the ledger are installed and built too;
    every family ends with its statement triggers."""
    from psai import rollups
    from psai.usage import record_usage
    db = psai.database.obj
    assert runner().up(target="0013_settings")[-1] == "0013_settings"
    model = psai.add_model(name="m", configuration=make_configuration())
    record_usage(model, None, tokens_in=1000, tokens_out=100)
    if psai.db.is_postgres(db):
        row_triggers_of_before_0020(db, ["psai_rollup_fold"])
    assert rollups.enabled(db)
    assert psai.migrate() == MIGRATIONS[MIGRATIONS.index("0014_rollup_triggers_read_every_count"):]
    assert psai_triggers(db) == LATEST_TRIGGERS
    assert rollups.enabled(db) and rollups.slots_enabled(db) and rollups.ledger_enabled(db)
    record_usage(model, None, tokens_in=10, tokens_out=10, user="bob")
    assert rollups.verify() == [] and not rollups.read_plan(db).reads_items


def test_0018_indexes_what_read_plan_reads_and_the_plan_stays_the_same(backend, clock):
    """A store at 0017 with rolled-up calls: the upgrade adds the rollups'
    index of days and the partial one of rows split by a current
    threshold; the read plan and the report are what they were."""
    from psai import rollups
    from psai.usage import cost_report, record_usage, report_totals
    db = psai.database.obj
    assert runner().up(target="0017_attribution_ledger")[-1] == "0017_attribution_ledger"
    model = psai.add_model(name="m", configuration=make_configuration())
    record_usage(model, None, tokens_in=1000, tokens_out=100)
    plan, totals = rollups.read_plan(db), report_totals(cost_report("model"))
    assert plan.days == ("2026-11-25",) and not plan.reads_items
    before = {index.name for index in db.get_indexes("psai_usage_rollup")}
    assert psai.migrate() == ["0018_rollup_read_indexes", "0019_budget_attribution",
                              "0020_postgres_statement_triggers", "0021_budget_session",
                              "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    added = {index.name for index in db.get_indexes("psai_usage_rollup")} - before
    assert added == {"psai_usage_rollup_day", "psai_usage_rollup_model_priced"}
    if psai.db.is_postgres(db):  # room on each page for the folds' new row versions
        assert db.execute_sql("SELECT reloptions FROM pg_class WHERE oid = 'psai_usage_rollup'::regclass"
                              ).fetchone()[0] == ["fillfactor=50"]
    assert rollups.read_plan(db) == plan and report_totals(cost_report("model")) == totals
    record_usage(model, None, tokens_in=10, tokens_out=10)
    assert rollups.read_plan(db) == plan and rollups.verify() == [] and psai.migrate() == []
