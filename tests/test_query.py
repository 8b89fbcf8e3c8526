"""Finding models: configuration filters, selection for agents, superseding,
the sub-agent tree. Every test runs on SQLite and PostgreSQL."""
import peewee
import pytest
from playhouse.test_utils import count_queries

import psai
from psai import PsAgent, PsAiModel
from psai.db import is_postgres
from psai.query import SIZE_FALLBACK, add_model, find_by_provider_model

from conftest import make_configuration


def model(name, **changes):
    return PsAiModel.create(user_id=1, organization_id=changes.pop("org", 2), name=name,
                            configuration=make_configuration(**changes))


def names(query):
    return sorted(m.name for m in query)


@pytest.fixture
def catalog(db):
    model("gpt-large", provider="openai", type="text", modelSize="large", model="gpt-4o")
    model("gpt-small", provider="openai", type="text", modelSize="small", model="gpt-4o-mini")
    model("gpt-old", provider="openai", type="text", modelSize="large", model="gpt-4", active=False)
    model("o3", provider="openai", type="reasoning", modelSize="large", model="o3")
    model("claude", provider="anthropic", type="text", modelSize="medium", model="claude-sonnet-4")
    eur = make_configuration(provider="mistral", model="mistral-large")
    eur["prices"]["currency"] = "EUR"
    PsAiModel.create(user_id=1, organization_id=2, name="mistral", configuration=eur)


# -- where_config ------------------------------------------------------------------

@pytest.mark.parametrize("filters, expected", [
    ({"provider": "openai"}, ["gpt-large", "gpt-old", "gpt-small", "o3"]),
    ({"type": "reasoning"}, ["o3"]),
    ({"modelSize": "small"}, ["gpt-small"]),
    ({"size": "medium"}, ["claude"]),
    ({"model": "gpt-4"}, ["gpt-old"]),
    ({"active": False}, ["gpt-old"]),
    ({"provider": "openai", "type": "text", "modelSize": "large", "active": True}, ["gpt-large"]),
    ({"prices.currency": "EUR"}, ["mistral"]),
    ({"provider": ["anthropic", "mistral"]}, ["claude", "mistral"]),
    ({"maxTokensOut": 4096, "provider": "anthropic"}, ["claude"]),
    ({"defaultTemperature": 0.7, "type": "reasoning"}, ["o3"]),
    ({"active": 1}, []),               # a number is not a boolean, on both backends
    ({"maxTokensOut": "4096"}, []),    # nor is a string a number
    ({"deploymentName": None}, []),    # JSON null, not a missing key
    ({"provider": "nobody"}, []),
])
def test_where_config_filters(catalog, filters, expected):
    assert names(PsAiModel.where_config(filters)) == expected


def test_where_config_keywords_and_chaining(catalog):
    query = PsAiModel.where_config(provider="openai", active=True).where(PsAiModel.name != "o3")
    assert names(query) == ["gpt-large", "gpt-small"]
    assert PsAiModel.where_config().count() == 6


def bound_strings(params):
    """Every string among the bound parameters (psycopg2 wraps JSON in an adapter)."""
    found = []

    def walk(value):
        value = getattr(value, "adapted", value)
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, str):
            found.append(value)
    for param in params:
        walk(param)
    return found


HOSTILE_VALUES = ["o'brien", 'say "hi"', "x'; DROP TABLE ps_ai_models; --", "$.provider", "openai' OR '1'='1",
                  "名前", "🙂", "a\\b", "%s", "?"]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_values_are_bound_parameters(catalog, value):
    query = PsAiModel.where_config(provider=value, model=value)
    sql, params = query.sql()
    assert sql == PsAiModel.where_config(provider="plain", model="plain").sql()[0]
    assert value in bound_strings(params)
    assert list(query) == []
    hostile = model("hostile", provider=value, model=value)
    assert [m.id for m in PsAiModel.where_config(provider=value, model=value)] == [hostile.id]
    assert PsAiModel.select().count() == 7


@pytest.mark.parametrize("key", ["provider'--", 'a"b', "prices..currency", "$.provider", "a b", "type;",
                                 "", "prices.", "ключ", "a[0]"])
def test_unsafe_keys_are_refused(catalog, key):
    with pytest.raises(psai.ValidationError, match="Not a configuration key"):
        PsAiModel.where_config({key: "x"})


@pytest.mark.parametrize("value", [{"a": 1}, [[1]], float("nan"), float("inf"), 2 ** 64, object(), "nul\x00", []])
def test_unusable_values_are_refused(catalog, value):
    with pytest.raises(psai.ValidationError, match="Filter values"):
        PsAiModel.where_config(provider=value)


def test_common_filter_uses_an_index(catalog, db):
    query = PsAiModel.where_config(provider="openai", type="text", modelSize="large", active=True)
    sql, params = query.sql()
    if is_postgres(db):
        with db.atomic() as transaction:
            # A handful of rows never needs an index; ask whether one can serve.
            db.execute_sql("SET LOCAL enable_seqscan = off")
            plan = "\n".join(row[0] for row in db.execute_sql("EXPLAIN " + sql, params))
            transaction.rollback()
        assert "ps_ai_models_configuration_gin" in plan, plan
    else:
        plan = " ".join(row[3] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX ps_ai_models_config_provider" in plan, plan
        sql, params = PsAiModel.where_config(type="text", modelSize="large", active=True).sql()
        plan = " ".join(row[3] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX ps_ai_models_config_type" in plan, plan
        sql, params = PsAiModel.where_config(model="gpt-4o", provider="openai").sql()
        plan = " ".join(row[3] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX ps_ai_models_config_" in plan, plan


def test_postgres_chooses_the_index_on_a_large_table(postgres_db):
    db = postgres_db
    rows = [dict(user_id=1, organization_id=1, name="m%d" % i,
                 configuration=make_configuration(provider="p%d" % (i % 1000), model="m%d" % i))
            for i in range(20000)]
    with db.atomic():
        for start in range(0, len(rows), 1000):
            PsAiModel.insert_many(rows[start:start + 1000], validate=False).execute()
    db.execute_sql("ANALYZE ps_ai_models")
    sql, params = PsAiModel.where_config(provider="p7", type="text", active=True).sql()
    plan = "\n".join(row[0] for row in db.execute_sql("EXPLAIN " + sql, params))
    assert "ps_ai_models_configuration_gin" in plan, plan
    assert PsAiModel.where_config(provider="p7", type="text", active=True).count() == 20


# -- select_model -------------------------------------------------------------------

@pytest.fixture
def agent(db):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a"})


@pytest.mark.parametrize("asked", ["large", "medium", "small"])
@pytest.mark.parametrize("available", [("large",), ("medium",), ("small",), ("large", "small"),
                                       ("medium", "small"), ("large", "medium"), ("large", "medium", "small")])
def test_size_fallback(agent, asked, available):
    for size in available:
        agent.ai_models.add(model("text-" + size, modelSize=size))
    expected = next(size for size in SIZE_FALLBACK[asked] if size in available)
    assert agent.select_model("text", asked).name == "text-" + expected
    assert agent.select_model(psai.PsAiModelType.Text, psai.PsAiModelSize(asked)).name == "text-" + expected


def test_no_size_match_takes_any_model_of_the_type(agent):
    odd = make_configuration(modelSize="xl")
    PsAiModel.insert_many([dict(user_id=1, organization_id=2, name="odd", configuration=odd)],
                          validate=False).execute()
    agent.ai_models.add(PsAiModel.get(PsAiModel.name == "odd"))
    agent.ai_models.add(model("embedder", type="embedding", modelSize="large"))
    assert agent.select_model("text", "small").name == "odd"


def test_no_model_of_the_type_names_the_type(agent):
    agent.ai_models.add(model("embedder", type="embedding"))
    with pytest.raises(psai.NotFoundError, match="no active 'reasoning' model"):
        agent.select_model("reasoning", "large")
    with pytest.raises(psai.ValidationError, match="size"):
        agent.select_model("text", "huge")


def test_inactive_models_are_skipped_unless_asked(agent):
    agent.ai_models.add(model("old-large", modelSize="large", active=False))
    agent.ai_models.add(model("medium", modelSize="medium"))
    assert agent.select_model("text", "large").name == "medium"
    assert agent.select_model("text", "large", include_inactive=True).name == "old-large"
    agent.ai_models.remove(PsAiModel.get(PsAiModel.name == "medium"))
    with pytest.raises(psai.NotFoundError, match="no active 'text' model"):
        agent.select_model("text", "large")


def test_only_the_agents_own_models_count_and_newest_wins(agent):
    model("not-linked", modelSize="large")
    first = model("first", modelSize="large")
    second = model("second", modelSize="large")
    agent.ai_models.add([second, first])
    assert agent.select_model("text", "large").id == second.id


def test_find_by_provider_model_is_deterministic(db):
    model("one", provider="openai", model="gpt-4o")
    newest = model("two", provider="openai", model="gpt-4o")
    model("three", provider="openai", model="gpt-4o", active=False)
    assert find_by_provider_model("openai", "gpt-4o").id == newest.id
    with pytest.raises(psai.NotFoundError, match="no active model 'gpt-5' from provider 'openai'"):
        find_by_provider_model("openai", "gpt-5")
    model("retired", provider="google", model="gemini-1", active=False)
    assert find_by_provider_model("google", "gemini-1", include_inactive=True).name == "retired"


# -- superseding --------------------------------------------------------------------

def test_adding_a_model_supersedes_same_name_rows(db):
    first = add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    other_org = add_model(name="GPT-4o", user_id=1, organization_id=3, configuration=make_configuration())
    cheaper = make_configuration()
    cheaper["prices"]["costInTokensPerMillion"] = 2.5
    second = add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=cheaper)
    assert PsAiModel.get_by_id(first.id).configuration["active"] is False
    assert PsAiModel.get_by_id(first.id).configuration["prices"]["costInTokensPerMillion"] == 30
    assert PsAiModel.get_by_id(second.id).configuration["active"] is True
    assert PsAiModel.get_by_id(other_org.id).configuration["active"] is True
    assert [m.id for m in PsAiModel.history("GPT-4o", organization_id=2)] == [second.id, first.id]
    assert [m.id for m in PsAiModel.history("GPT-4o")] == [second.id, other_org.id, first.id]


def test_superseding_with_a_bad_configuration_changes_nothing(db):
    first = add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    with pytest.raises(psai.ValidationError, match="configuration.modelSize"):
        add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration(modelSize="xl"))
    assert PsAiModel.get_by_id(first.id).configuration["active"] is True
    assert PsAiModel.select().count() == 1


def test_a_failure_midway_rolls_the_deactivation_back(db):
    first = add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    taken = model("someone else")
    new = PsAiModel(uuid=taken.uuid, name="GPT-4o", user_id=1, organization_id=2,
                    configuration=make_configuration())
    # The deactivation runs, then the insert fails on the unique uuid.
    with pytest.raises(peewee.IntegrityError):
        with psai.db.write_transaction():
            for row in PsAiModel.select().where(PsAiModel.name == "GPT-4o"):
                row.configuration = dict(row.configuration, active=False)
                row.save()
            new.save(force_insert=True)
    assert PsAiModel.get_by_id(first.id).configuration["active"] is True
    assert PsAiModel.select().count() == 2


def test_add_model_failure_after_deactivation_is_rolled_back(db, monkeypatch):
    first = add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    original_save = PsAiModel.save

    def failing_save(self, *args, **kwargs):
        if kwargs.get("force_insert"):
            raise peewee.OperationalError("disk full")
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(PsAiModel, "save", failing_save)
    with pytest.raises(peewee.OperationalError):
        add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    monkeypatch.undo()
    assert PsAiModel.get_by_id(first.id).configuration["active"] is True
    assert PsAiModel.select().count() == 1


# -- sub-agent tree -------------------------------------------------------------------

def new_agent(name, parent=None):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name}, parent_agent=parent)


def test_sub_agent_tree_in_one_query(db):
    root = new_agent("root")
    a, b = new_agent("a", root), new_agent("b", root)
    a1, a2 = new_agent("a1", a), new_agent("a2", a)
    a1x = new_agent("a1x", a1)
    new_agent("unrelated")
    with count_queries() as counter:
        tree = root.sub_agent_tree()
    assert counter.count == 1
    assert [(agent.configuration["name"], agent.level) for agent in tree] == [
        ("root", 0), ("a", 1), ("b", 1), ("a1", 2), ("a2", 2), ("a1x", 3)]
    assert [agent.id for agent in a.sub_agent_tree(include_self=False)] == [a1.id, a2.id, a1x.id]
    assert b.sub_agent_tree(include_self=False) == []


def test_loops_are_refused_and_tolerated_when_already_there(db):
    root = new_agent("root")
    child = new_agent("child", root)
    root.parent_agent = child
    with pytest.raises(psai.ValidationError, match="parent_agent_id"):
        root.save()
    root.parent_agent = root
    with pytest.raises(psai.ValidationError, match="parent_agent_id"):
        root.save()
    # Written by someone else: the walk still ends.
    db.execute_sql('UPDATE "ps_agents" SET "parent_agent_id" = %s WHERE "id" = %s'.replace(
        "%s", "%s" if is_postgres(db) else "?"), (child.id, root.id))
    assert sorted(a.id for a in PsAgent.get_by_id(root.id).sub_agent_tree()) == [root.id, child.id]


@pytest.mark.parametrize("filters", [
    {}, {"provider": "openai"}, {"provider": "openai", "type": "text", "modelSize": "large", "active": True},
    {"prices.currency": "EUR"}, {"model": ["gpt-4o", "o3", 7, 1.5, True, None]}, {"maxTokensOut": 1},
    {"maxTokensOut": 1.0}, {"maxTokensOut": True}, {"defaultTemperature": -0.0}, {"defaultTemperature": 0.0},
    {"active": None}, {"provider": ("openai", "anthropic")},
])
def test_where_config_compiled_once_is_the_filters_own_sql(catalog, db, filters):
    """where_config keeps each filter's WHERE as compiled once: the query
    it gives is the one peewee compiles from the filter, first time and
    again, in a query of its own or within another (with its aliases)."""
    from psai._sql import config_filter

    def plain(query):
        sql, params = query.sql()
        return sql, [getattr(p, "adapted", p) for p in params]

    own = PsAiModel.select().where(config_filter(PsAiModel.configuration, filters, is_postgres(db)))
    for _ in range(2):
        assert plain(PsAiModel.where_config(filters)) == plain(own)
        assert names(PsAiModel.where_config(filters)) == names(own)
    joined = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a"})
    joined.ai_models.add(list(PsAiModel.select()))
    within = psai.models.where_config(filters, query=joined.ai_models.where(PsAiModel.name != "o3"))
    assert plain(within) == plain(joined.ai_models.where(PsAiModel.name != "o3").where(
        config_filter(PsAiModel.configuration, filters, is_postgres(db))))
    assert names(within) == sorted(n for n in names(own) if n != "o3")


def test_where_config_tells_values_of_other_types_apart(db):
    # Written by another tool: psai itself would refuse true and 1.5 tokens.
    rows = [dict(user_id=1, organization_id=2, name=name, configuration=make_configuration(maxTokensOut=tokens))
            for name, tokens in (("one", 1), ("true", True), ("float", 1.5))]
    PsAiModel.insert_many(rows, validate=False).execute()
    assert names(PsAiModel.where_config(maxTokensOut=1)) == ["one"]
    assert names(PsAiModel.where_config(maxTokensOut=True)) == ["true"]
    assert names(PsAiModel.where_config(maxTokensOut=1.0)) == ["one"]
    assert names(PsAiModel.where_config(maxTokensOut=[True])) == ["true"]
    assert names(PsAiModel.where_config(maxTokensOut=[1])) == ["one"]
    assert names(PsAiModel.where_config(maxTokensOut=1.5)) == ["float"]
