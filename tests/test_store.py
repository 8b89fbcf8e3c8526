"""The store: connect, migrate, PolicySynth's tables, links, eager loading."""
import datetime
import sqlite3
import uuid

import peewee
import pytest
from playhouse.test_utils import count_queries

import psai
from psai import AgentModels, PsAgent, PsAiModel, _base

from psai.db import is_postgres

from conftest import make_configuration


def new_model(name="OpenAI GPT-4 Large", **config_changes):
    return PsAiModel.create(user_id=1, organization_id=2, name=name,
                            configuration=make_configuration(**config_changes))


def new_agent(name="Researcher", parent=None):
    return PsAgent.create(user_id=1, class_id=1, group_id=1,
                          configuration={"name": name}, parent_agent=parent)


# -- connect ------------------------------------------------------------------

def test_connect_defaults_to_psai_db_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PSAI_DATABASE_URL", raising=False)
    db = psai.connect()
    psai.migrate()
    new_model()
    db.close()
    assert (tmp_path / "psai.db").exists()
    rows = sqlite3.connect(tmp_path / "psai.db").execute("select name from ps_ai_models").fetchall()
    assert rows == [("OpenAI GPT-4 Large",)]


def test_connect_reads_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PSAI_DATABASE_URL", "sqlite:///%s" % (tmp_path / "env.db"))
    db = psai.connect()
    assert db.database == str(tmp_path / "env.db")
    assert psai.database.obj is db
    db.close()


def test_sqlite_pragmas(tmp_path):
    db = psai.connect("sqlite:///%s" % (tmp_path / "p.db"))
    assert db.execute_sql("pragma foreign_keys").fetchone() == (1,)
    assert db.execute_sql("pragma journal_mode").fetchone() == ("wal",)
    assert db.execute_sql("pragma busy_timeout").fetchone()[0] >= 5000
    db.close()


@pytest.mark.parametrize("url, fragment", [
    ("mysql://root:hunter2@localhost/db", "unsupported database URL scheme 'mysql'"),
    ("redis://:hunter2@localhost/0", "unsupported database URL scheme 'redis'"),
    ("postgresql://u:hunter2@127.0.0.1:5432", "has no database name"),
])
def test_connect_rejects_unusable_url_without_echoing_password(url, fragment):
    with pytest.raises(psai.DatabaseURLError) as info:
        psai.connect(url)
    assert fragment in str(info.value)
    assert "hunter2" not in str(info.value)


def test_connect_failure_hides_password():
    from conftest import require_postgres
    require_postgres()
    url = "postgresql://nobody:s3cretpw@127.0.0.1:5432/no_such_database_psai"
    with pytest.raises(psai.DatabaseUnavailableError) as info:
        psai.connect(url)
    assert "s3cretpw" not in str(info.value)
    assert "nobody:***@127.0.0.1" in str(info.value)


def test_redact_url():
    assert psai.redact_url("postgresql://u:p%40ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert psai.redact_url("sqlite:///x.db") == "sqlite:///x.db"


# -- schema -------------------------------------------------------------------

def test_migrate_is_idempotent(backend):
    assert psai.migrate() == ["0001_initial", "0002_model_usage", "0003_configuration_indexes",
                              "0004_usage_items_and_price_history", "0005_model_provenance",
                              "0006_copied_usage", "0007_budgets", "0008_usage_rollups",
                              "0009_rollup_fingerprint", "0010_response_ids_and_apart_sums",
                              "0011_sqlite_ids_never_reused", "0012_rollup_triggers", "0013_settings",
                              "0014_rollup_triggers_read_every_count", "0015_rollup_reasoning_sum", "0016_budget_slots",
                              "0017_attribution_ledger", "0018_rollup_read_indexes", "0019_budget_attribution",
                              "0020_postgres_statement_triggers", "0021_budget_session",
                              "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    assert psai.migrate() == []
    assert set(psai.database.get_tables()) >= {"ps_ai_models", "ps_agents", "AgentModels"}


EXPECTED_COLUMNS = {
    "ps_ai_models": ["id", "uuid", "user_id", "organization_id", "created_at", "updated_at",
                     "name", "configuration"],
    "ps_agents": ["id", "uuid", "user_id", "created_at", "updated_at", "class_id", "group_id",
                  "configuration", "parent_agent_id"],
    "AgentModels": ["agent_id", "ai_model_id"],
}


@pytest.mark.parametrize("table", sorted(EXPECTED_COLUMNS))
def test_tables_match_policysynth_column_for_column(db, table):
    columns = db.get_columns(table)
    assert [c.name for c in columns] == EXPECTED_COLUMNS[table]
    nullable = {c.name for c in columns if c.null}
    assert nullable == ({"parent_agent_id"} if table == "ps_agents" else set())


def test_postgres_column_types(postgres_db):
    db = postgres_db
    types = dict(db.execute_sql(
        "select table_name || '.' || column_name, "
        "       case when data_type = 'character varying' "
        "            then 'varchar(' || character_maximum_length || ')' else data_type end "
        "from information_schema.columns where table_schema = current_schema()").fetchall())
    assert types["ps_ai_models.configuration"] == "jsonb"
    assert types["ps_agents.configuration"] == "jsonb"
    assert types["ps_ai_models.uuid"] == "uuid"
    assert types["ps_ai_models.name"] == "varchar(255)"
    for table in ("ps_ai_models", "ps_agents"):
        for column in ("created_at", "updated_at"):
            assert types["%s.%s" % (table, column)] == "timestamp with time zone"


def test_indexes(db):
    def indexes(table):
        return {tuple(i.columns): i.unique for i in db.get_indexes(table)}
    models = indexes("ps_ai_models")
    assert models[("uuid",)] is True
    assert models[("user_id",)] is False and models[("organization_id",)] is False
    agents = indexes("ps_agents")
    assert agents[("uuid",)] is True
    for column in ("user_id", "class_id", "group_id", "parent_agent_id"):
        assert agents[(column,)] is False
    links = indexes("AgentModels")
    assert ("agent_id",) in links and ("ai_model_id",) in links
    assert db.get_primary_keys("AgentModels") == ["agent_id", "ai_model_id"]


def test_foreign_keys(db):
    fks = {(fk.column, fk.dest_table, fk.dest_column) for fk in db.get_foreign_keys("AgentModels")}
    assert fks == {("agent_id", "ps_agents", "id"), ("ai_model_id", "ps_ai_models", "id")}
    fks = {(fk.column, fk.dest_table) for fk in db.get_foreign_keys("ps_agents")}
    assert fks == {("parent_agent_id", "ps_agents")}


# -- rows ---------------------------------------------------------------------

def test_create_generates_uuid_v4_and_aware_timestamps(db):
    model = new_model()
    again = PsAiModel.get_by_id(model.id)
    assert isinstance(again.uuid, uuid.UUID) and again.uuid.version == 4
    assert again.uuid == model.uuid
    assert again.configuration == make_configuration()
    for stamp in (again.created_at, again.updated_at):
        assert stamp.tzinfo is not None
        assert abs(stamp - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=5)
    other = new_model("Another")
    assert other.uuid != model.uuid


def test_uuid_is_unique(db):
    model = new_model()
    with pytest.raises(peewee.IntegrityError) as info, db.atomic():
        PsAiModel.create(uuid=model.uuid, user_id=1, organization_id=2, name="Dup",
                         configuration=make_configuration())
    assert "uuid" in str(info.value).lower() or "unique" in str(info.value).lower()
    assert PsAiModel.select().count() == 1


def test_updated_at_refreshed_on_every_save(db):
    model = new_model()
    created, first = model.created_at, model.updated_at
    model.name = "Renamed"
    model.save()
    reread = PsAiModel.get_by_id(model.id)
    assert reread.created_at == created
    assert reread.updated_at > first
    second = reread.updated_at
    reread.save(only=[PsAiModel.name])
    assert PsAiModel.get_by_id(model.id).updated_at > second


def test_rows_read_back_are_whole_objects(db):
    """Rows from a query are built without a descriptor call per field:
    they must be the same objects as ever."""
    parent = new_agent("lead")
    child = new_agent("helper", parent=parent)
    [read] = PsAgent.select().where(PsAgent.id == child.id)
    assert read._dirty == set()
    assert read.parent_agent_id == parent.id and read.parent_agent.configuration == {"name": "lead"}
    assert isinstance(read.uuid, uuid.UUID) and read.created_at.tzinfo is not None
    [extra] = PsAgent.select(PsAgent, (PsAgent.class_id + 1).alias("next_class")).where(PsAgent.id == child.id)
    assert extra.next_class == 2 and extra.class_id == 1
    read.configuration = {"name": "renamed"}
    assert read._dirty == {"configuration"}
    read.save()
    again = PsAgent.get_by_id(child.id)
    assert again.configuration == {"name": "renamed"} and again.parent_agent_id == parent.id


def test_get_by_key_accepts_id_and_uuid(db):
    model = new_model()
    assert PsAiModel.get_by_key(model.id) == model
    assert PsAiModel.get_by_key(str(model.uuid)) == model
    with pytest.raises(psai.NotFoundError, match="does not exist"):
        PsAiModel.get_by_key(model.id + 100)
    with pytest.raises(psai.NotFoundError, match="neither an id nor a uuid"):
        PsAiModel.get_by_key("gpt-4")


# -- links --------------------------------------------------------------------

def test_add_list_remove_clear_links(db):
    gpt, claude, gemini = new_model("gpt"), new_model("claude"), new_model("gemini")
    agent = new_agent()
    agent.ai_models.add([gpt, claude])
    agent.ai_models.add(gemini.id)
    assert sorted(m.name for m in agent.ai_models) == ["claude", "gemini", "gpt"]
    assert [a.id for a in gpt.agents] == [agent.id]
    agent.ai_models.remove(claude)
    assert sorted(m.name for m in agent.ai_models) == ["gemini", "gpt"]
    agent.ai_models.clear()
    assert list(agent.ai_models) == []
    assert AgentModels.select().count() == 0


def test_links_from_the_model_side(db):
    model = new_model()
    first, second = new_agent("a"), new_agent("b")
    model.agents.add([first, second])
    assert sorted(a.id for a in model.agents) == [first.id, second.id]
    assert [m.id for m in first.ai_models] == [model.id]


def test_adding_a_link_twice_is_harmless(db):
    model, agent = new_model(), new_agent()
    agent.ai_models.add(model)
    agent.ai_models.add(model)
    agent.ai_models.add([model, model])
    model.agents.add(agent)
    assert AgentModels.select().count() == 1


def test_linking_to_a_missing_row_is_a_clear_error_and_writes_nothing(db):
    model, agent = new_model(), new_agent()
    with pytest.raises(psai.NotFoundError, match=r"PsAiModel id 9999 does not exist"):
        agent.ai_models.add([model, 9999])
    assert AgentModels.select().count() == 0
    unsaved = PsAiModel(user_id=1, organization_id=2, name="x", configuration=make_configuration())
    with pytest.raises(psai.NotFoundError, match="unsaved"):
        agent.ai_models.add(unsaved)
    with pytest.raises(psai.NotFoundError, match="not saved yet"):
        list(PsAgent(user_id=1, class_id=1, group_id=1, configuration={}).ai_models)


def test_deleting_a_model_or_an_agent_removes_its_links(db):
    gpt, claude = new_model("gpt"), new_model("claude")
    first, second = new_agent("a"), new_agent("b")
    first.ai_models.add([gpt, claude])
    second.ai_models.add([gpt, claude])
    gpt.delete_instance()
    assert AgentModels.select().count() == 2
    first.delete_instance()
    assert [(link.agent_id, link.ai_model_id) for link in AgentModels.select()] == [(second.id, claude.id)]


def test_deleting_a_parent_agent_sets_children_parent_to_null(db):
    parent = new_agent("parent")
    child = new_agent("child", parent=parent)
    assert [a.id for a in parent.sub_agents] == [child.id]
    parent.delete_instance()
    assert PsAgent.get_by_id(child.id).parent_agent_id is None


# -- eager loading ------------------------------------------------------------

@pytest.mark.parametrize("count", [3, 30, 150])  # 150: the ids as a subquery
def test_eager_loading_uses_a_constant_number_of_queries(db, count):
    models = [new_model("m%d" % i) for i in range(count)]
    agents = [new_agent("a%d" % i) for i in range(count)]
    for i, agent in enumerate(agents):
        agent.ai_models.add(models[i:i + 2])
    with count_queries() as counter:
        loaded = PsAiModel.with_agents()
        by_name = {m.name: sorted(a.configuration["name"] for a in m.agents) for m in loaded}
    assert counter.count == 3
    assert by_name["m1"] == ["a0", "a1"]
    assert by_name["m0"] == ["a0"]
    with count_queries() as counter:
        loaded = PsAgent.with_ai_models()
        links = {a.configuration["name"]: sorted(m.name for m in a.ai_models) for a in loaded}
    assert counter.count == 3
    assert links["a0"] == ["m0", "m1"]
    assert links["a%d" % (count - 1)] == ["m%d" % (count - 1)]
    # Links of the agents the query selects only, however many.
    some = PsAgent.with_ai_models(PsAgent.select().order_by(PsAgent.id.desc()).limit(count - 1))
    assert [a.configuration["name"] for a in some][-1] == "a1"
    assert sorted(m.name for a in some for m in a.ai_models) == sorted(
        ["m%d" % i for i in range(1, count)] + ["m%d" % i for i in range(2, count)])


def test_bulk_insert(db):
    rows = [dict(user_id=1, organization_id=2, name="m%d" % i, configuration=make_configuration(model="m%d" % i))
            for i in range(2500)]
    assert PsAiModel.bulk_insert(rows, batch_size=1000) == 2500
    assert PsAiModel.select().count() == 2500
    one = PsAiModel.get(PsAiModel.name == "m1234")
    assert one.configuration["model"] == "m1234" and one.uuid.version == 4 and one.created_at.tzinfo
    assert len({m.uuid for m in PsAiModel.select(PsAiModel.uuid)}) == 2500
    agents = [dict(user_id=1, class_id=1, group_id=1, configuration={"name": "a%d" % i}) for i in range(3)]
    assert PsAgent.bulk_insert(agents, validate=False) == 3
    assert [a.configuration["name"] for a in PsAgent.select().order_by(PsAgent.id)] == ["a0", "a1", "a2"]


def test_bulk_insert_validates_every_row_first(db):
    rows = [dict(user_id=1, organization_id=2, name="ok", configuration=make_configuration())] * 3
    rows = rows + [dict(user_id=1, organization_id=2, name="bad", configuration=make_configuration(active="yes"))]
    with pytest.raises(psai.ValidationError) as info:
        PsAiModel.bulk_insert(rows)
    assert list(info.value.paths) == ["3.configuration.active"]
    assert PsAiModel.select().count() == 0


def test_changing_a_deleted_model_is_not_found_not_silent(db):
    model = new_model()
    PsAiModel.get_by_id(model.id).delete_instance()  # another copy of the row, as another process would
    for change in (lambda: model.update_configuration({"maxTokensOut": 5}), model.deactivate):
        with pytest.raises(psai.NotFoundError, match="PsAiModel %s does not exist" % model.id):
            change()
    assert PsAiModel.select().count() == 0  # not written back as a new row either
    assert model.configuration["active"] is True and "maxTokensOut" in model.configuration  # the object as it was


def _stored_models(db):
    """Every ps_ai_models row as the driver reads it back, without the id."""
    cursor = db.execute_sql('SELECT "uuid", "user_id", "organization_id", "created_at", "updated_at", "name", '
                            '"configuration" FROM "ps_ai_models" ORDER BY "id"')
    return [tuple(str(v) if isinstance(v, uuid.UUID) else v for v in row) for row in cursor.fetchall()]


def test_trusted_bulk_insert_stores_what_peewee_stores(db, clock):
    """bulk_insert(validate=False) builds its rows itself, for speed: what it
    stores is what peewee's own insert of the same rows stores, defaults,
    conversions and all (Field keys, numbers as text, times and uuids as
    the caller gives them; the id of an auto-increment key is dropped)."""
    given = uuid.UUID("12345678-1234-5678-1234-567812345678")
    moment = datetime.datetime(2026, 3, 4, 5, 6, 7, 890123)  # naive: UTC
    rows = [
        dict(user_id=1, organization_id=2, name="plain", configuration=make_configuration(model="a")),
        {PsAiModel.user_id: "7", PsAiModel.organization_id: 2, PsAiModel.name: "fields",
         PsAiModel.configuration: make_configuration(model="b")},
        dict(user_id=True, organization_id=2.0, name=5, configuration="text"),
        dict(user_id=1, organization_id=2, name="given", configuration=[1, "two", {"3": None}], uuid=given,
             created_at=moment, updated_at="2026-01-02T03:04:05+02:00"),
        dict(user_id=1, organization_id=2, name="uuid text", configuration={},
             uuid="12345678-AAAA-4BBB-8CCC-567812345678"),
    ]

    def stored_by(insert):
        PsAiModel.delete().execute()
        with psai.database.atomic():
            for row in rows:
                insert(row)
        stored = []
        for row, (uuid_value, *rest) in zip(rows, _stored_models(psai.database)):
            if "uuid" not in row:  # a new one each time: a version 4 uuid
                assert uuid.UUID(uuid_value).version == 4
                uuid_value = "new"
            stored.append((uuid_value, *rest))
        return stored

    # Each row alone: a batch of rows naming other fields is refused.
    by_peewee = stored_by(lambda row: peewee.Model.insert_many.__func__(PsAiModel, [row]).execute())
    by_bulk_insert = stored_by(lambda row: PsAiModel.bulk_insert([row], validate=False))
    assert by_bulk_insert == by_peewee
    assert len(by_peewee) == len(rows)
    # The id given with a row is dropped: the table numbers it.
    PsAiModel.bulk_insert([dict(id=99, user_id=1, organization_id=2, name="id", configuration={})], validate=False)
    assert PsAiModel.get(PsAiModel.name == "id").id != 99
    # Many rows of the same fields: one time for a batch, a new uuid for each row.
    PsAiModel.delete().execute()
    many = [dict(user_id=i, organization_id=2, name="m%d" % i, configuration={"i": i}) for i in range(5)]
    assert PsAiModel.bulk_insert(many, validate=False, batch_size=2) == 5
    stored = [(m.user_id, m.name, m.configuration, m.created_at, m.updated_at)
              for m in PsAiModel.select().order_by(PsAiModel.id)]
    assert stored == [(i, "m%d" % i, {"i": i}, clock.moment, clock.moment) for i in range(5)]
    assert len({m.uuid for m in PsAiModel.select()}) == 5
    with pytest.raises(ValueError, match="same fields"):
        PsAiModel.bulk_insert([dict(user_id=1, organization_id=2, name="x", configuration={}),
                               dict(user_id=1, organization_id=2, name="y")], validate=False)


def test_rows_read_as_objects_are_peewees_own(db):
    """psai reads a table's rows into objects its own quick way: each is the
    object peewee's own reader makes (``.objects(Model)``), for rows psai
    wrote and rows written by hand, in a list, a loop, ``iterator()`` and
    ``get``, with all columns, some, and more."""
    parent = new_agent("parent")
    new_agent("child", parent=parent)
    new_model("one")
    new_model("two", active=False)
    if not is_postgres(db):  # rows written by hand that only SQLite's types let through
        odd = [("not a time", "1700000000", "0000000000004000800000000000000a", "5"),
               ("2026-11-24 08:00:00.000 +00:00", 1700000000, "{00000000-0000-4000-8000-00000000000b}", "[1, 2]")]
        for created, updated, text_uuid, configuration in odd:
            db.execute_sql('INSERT INTO "ps_ai_models" ("uuid", "user_id", "organization_id", "created_at", '
                           '"updated_at", "name", "configuration") VALUES (?, ?, ?, ?, ?, ?, ?)',
                           [text_uuid, 1, 2, created, updated, "odd", configuration])

    def state(obj):
        return (type(obj), {k: (type(v), v) for k, v in obj.__data__.items()}, set(obj._dirty), dict(obj.__rel__),
                obj.__dict__.get("_psai_database"), {k: v for k, v in obj.__dict__.items() if k not in (
                    "__data__", "_dirty", "__rel__", "_psai_database")})

    queries = [PsAiModel.select().order_by(PsAiModel.id), PsAgent.select().order_by(PsAgent.id),
               PsAiModel.select(PsAiModel.name, PsAiModel.created_at).order_by(PsAiModel.id),
               PsAiModel.select(PsAiModel, PsAiModel.id.alias("number"), peewee.fn.upper(PsAiModel.name).alias("up"))
               .order_by(PsAiModel.id),
               PsAgent.select(PsAgent.id, PsAgent.parent_agent).order_by(PsAgent.id)]
    for query in queries:
        expected = [state(o) for o in query.clone().objects(query.model)]
        assert len(expected) >= 2
        assert [state(o) for o in query.clone()] == expected
        assert [state(o) for o in list(query.clone())] == expected
        assert [state(o) for o in query.clone().iterator()] == expected
        again = query.clone()
        assert [state(again[i]) for i in range(len(expected))] == expected
    assert state(PsAiModel.get(PsAiModel.name == "one")) == state(
        PsAiModel.select().where(PsAiModel.name == "one").objects(PsAiModel).get())
    child = PsAgent.get(PsAgent.parent_agent == parent.id)
    assert child.parent_agent.id == parent.id and child.parent_agent_id == parent.id and not child.is_dirty()


def test_rows_read_as_dicts_and_tuples_are_peewees_own(db, monkeypatch):
    """``.dicts()`` and ``.tuples()`` read a batch of rows a column at a
    time: each row is the one peewee's own readers make, whole or in part,
    joined, with expressions, and more rows than a batch, in a list, a
    loop, ``iterator()`` and by index."""
    parent = new_agent("parent")
    for number in range(300):  # more than a batch (_ColumnRows.BATCH)
        model = new_model("model %d" % number, active=number % 3 != 0)
        if number % 50 == 0:
            parent.ai_models.add(model)
    new_agent("child", parent=parent)
    if not is_postgres(db):  # a time and a uuid written by hand that only SQLite's types let through
        db.execute_sql('INSERT INTO "ps_ai_models" ("uuid", "user_id", "organization_id", "created_at", '
                       '"updated_at", "name", "configuration") VALUES (?, 1, 2, ?, ?, ?, ?)',
                       ["{00000000-0000-4000-8000-00000000000b}", "not a time", 1700000000, "odd", "[1, 2]"])
    queries = [PsAiModel.select().order_by(PsAiModel.id), PsAgent.select().order_by(PsAgent.id),
               PsAiModel.select(PsAiModel.name, PsAiModel.created_at).order_by(PsAiModel.id),
               PsAiModel.select(PsAiModel, PsAiModel.id.alias("number"), peewee.fn.upper(PsAiModel.name).alias("up"))
               .order_by(PsAiModel.id),
               PsAgent.select(PsAgent.id, PsAgent.parent_agent, PsAiModel.name, PsAiModel.configuration)
               .join(AgentModels).join(PsAiModel).order_by(PsAgent.id, PsAiModel.id)]

    def typed(rows):
        return [[(type(v), v) for v in (row.values() if isinstance(row, dict) else row)] + (
                 [sorted(row)] if isinstance(row, dict) else []) for row in rows]
    for query in queries:
        for shape in ("dicts", "tuples"):
            with monkeypatch.context() as patched:  # peewee's own readers
                patched.setattr(_base._ModelSelect, "_get_cursor_wrapper", peewee.ModelSelect._get_cursor_wrapper)
                expected = typed(getattr(query.clone(), shape)())
            assert len(expected) >= 2
            assert typed(getattr(query.clone(), shape)()) == expected
            assert typed(list(getattr(query.clone(), shape)())) == expected
            assert typed(getattr(query.clone(), shape)().iterator()) == expected
            again = getattr(query.clone(), shape)()
            assert typed(again[i] for i in range(len(expected))) == expected
            assert type(getattr(query.clone(), shape)().execute()).__name__ == {"dicts": "_DictRows",
                                                                                 "tuples": "_TupleRows"}[shape]
