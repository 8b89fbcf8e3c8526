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
