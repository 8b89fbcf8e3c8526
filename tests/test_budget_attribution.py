"""Budgets scoped to whose the calls were (a user, a session, a tag): what they have
spent equals their calls' items priced one by one, with the attribution
ledger's triggers on and off, in UTC and in a zone whose midnight is not a
UTC hour; only the calls carrying the attribution cross their thresholds
or are checked against them; bad attributions are refused before any
write; the command line; a store from before the columns."""
import datetime
import json
import random
from decimal import Decimal

import pytest

import psai
from conftest import make_configuration
from psai import BudgetExceededError, PsAgent, PsAiModel, PsModelUsageItem, ValidationError, record_usage, rollups
from psai._budget_ledger import period_bounds
from psai.models import Budget
from psai._items import item_price
from psai.migrations import runner
from psai._sql import LEDGER_TABLE

UTC = datetime.timezone.utc
ZONES = ("UTC", "Asia/Kathmandu")  # +05:45: the period's ends are partial UTC days
NOW = datetime.datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
USERS = (None, "alice", "bob")
TAGS = (None, {"team": "search"}, {"team": "ads"}, {"team": "search", "env": "prod"}, {"env": "search"})


def priced_one_by_one(db, budget, start, end, covered):
    """(spent, calls, unknown) of ``budget`` in [start, end): every item read, its attribution
    compared in Python, and priced by itself."""
    models = {m.id: m for m in PsAiModel.select()}
    spent, calls, unknown = Decimal(0), 0, False
    for model_id, agent_id, created_at, data in db.execute_sql(
            'SELECT model_id, agent_id, created_at, data FROM "ps_model_usage_item"'):
        when = PsModelUsageItem.created_at.python_value(created_at)
        if start is not None and not start <= when < end:
            continue
        model = models.get(model_id)
        if budget.model_name is not None and (model is None or model.name != budget.model_name):
            continue
        if budget.agent_id is not None and agent_id not in covered:
            continue
        data = PsModelUsageItem.data.python_value(data)
        whose = data.get("psai") or {}
        if budget.user is not None and whose.get("user") != budget.user:
            continue
        if budget.session is not None and whose.get("session") != budget.session:
            continue
        if budget.tag_key is not None and (whose.get("tags") or {}).get(budget.tag_key) != budget.tag_value:
            continue
        pricing = data.get("pricing")
        configured = pricing.get("configuredPrices") if isinstance(pricing, dict) else None
        fallback = model.configuration.get("prices") if model is not None and configured is None else None
        cost, _why = item_price(data, fallback)
        calls += 1
        if cost is not None and (configured or fallback or {}).get("currency") == budget.currency:
            spent += cost
        else:
            unknown = True
    return spent, calls, unknown


def seed(clock, rng):
    models = [PsAiModel.create(user_id=1, organization_id=2, name=name, configuration=make_configuration(
        prices={"costInTokensPerMillion": rate, "costOutTokensPerMillion": rate * 3,
                "costInCachedContextTokensPerMillion": rate / 4, "currency": "USD",
                **({"longContextTokenThreshold": 5000, "longContextCostInTokensPerMillion": rate * 2}
                   if rate == 3 else {})}))
              for name, rate in (("small", 1), ("large", 3))]
    root = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "root"})
    child = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "child"}, parent_agent=root)
    edges = []
    for zone in ZONES:
        for period in ("day", "week", "month"):
            start, end = period_bounds(period, zone, NOW)
            edges += [start.astimezone(UTC), end.astimezone(UTC)]
    edges += [datetime.datetime(2026, 11, day, tzinfo=UTC) for day in (1, 20, 24, 25)]
    for _ in range(150):
        edge = rng.choice(edges)
        clock.set(min(edge + datetime.timedelta(seconds=rng.randint(-7200, 7200),
                                                microseconds=rng.randint(0, 999_999)), NOW))
        record_usage(rng.choice(models), rng.choice([None, root, child]), tokens_in=rng.randint(200, 9000),
                     tokens_out=rng.randint(0, 900), cached_tokens=rng.choice([0, 0, 100]),
                     user=rng.choice(USERS), tags=rng.choice(TAGS), session=rng.choice([None, "s1"]))
    clock.set(NOW)
    return root, child


@pytest.mark.parametrize("seed_number", [1, 2])
def test_a_user_or_tag_budget_spends_what_its_items_cost_one_by_one(db, clock, seed_number):
    rng = random.Random(seed_number)
    root, child = seed(clock, rng)
    # Hand SQL: one item's user changed, one moved a day: the ledger's triggers follow.
    p = db.param
    ids = [row[0] for row in db.execute_sql('SELECT id FROM "ps_model_usage_item" ORDER BY id')]
    (data,) = db.execute_sql('SELECT data FROM "ps_model_usage_item" WHERE id = %s' % p, (ids[3],)).fetchone()
    data = PsModelUsageItem.data.python_value(data)
    data.setdefault("psai", {})["user"] = "alice"
    cast = "::jsonb" if psai.db.is_postgres() else ""
    db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (p, cast, p),
                   (json.dumps(data), ids[3]))
    db.execute_sql('UPDATE "ps_model_usage_item" SET created_at = %s WHERE id = %s' % (p, p),
                   (PsModelUsageItem.created_at.db_value(NOW - datetime.timedelta(days=1)), ids[5]))
    scopes = [{}, {"model": "large"}, {"agent": root}]
    attributions = [{"user": "alice"}, {"user": "carol"}, {"session": "s1"}, {"tags": {"team": "search"}},
                    {"tags": {"env": "prod"}}]
    checked = 0
    for ledger_on in (True, False):
        if not ledger_on:
            rollups.disable(db)
        assert rollups.ledger_enabled(db) == ledger_on
        for zone in ZONES:
            for period in ("day", "week", "month", "total"):
                start, end = period_bounds(period, zone, NOW)
                for number, scope in enumerate(scopes):
                    for attribution in attributions:
                        name = "%s %s %d %s" % (zone, period, number, sorted(attribution.items()))
                        budget = psai.set_budget(name=name, amount=1000, period=period, timezone=zone,
                                                 unpriced="allow", **scope, **attribution)
                        (found,) = psai.budget_status(name)
                        spent, calls, unknown = priced_one_by_one(db, budget, start, end, {root.id, child.id})
                        assert (found["spent"], found["calls"]) == (spent, calls), (name, ledger_on)
                        assert (found["state"] == "unknown") == unknown, name
                        checked += calls
                        psai.remove_budget(name)
    assert checked  # some budgets covered calls


def test_the_whole_days_are_read_from_the_ledger_when_its_triggers_are_on(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    clock.set(NOW - datetime.timedelta(days=3))
    record_usage(m, None, tokens_in=10_000, tokens_out=1_000, user="alice", tags={"team": "search"})
    record_usage(m, None, tokens_in=10_000, tokens_out=1_000)
    clock.set(NOW)
    psai.set_budget(name="alice", amount=100, user="alice")
    psai.set_budget(name="search", amount=100, tags={"team": "search"})
    right = {s["budget"]: (s["spent"], s["calls"]) for s in psai.budget_status()}
    assert right["alice"] == right["search"] and right["alice"][1] == 1
    # A ledger row edited by hand: budgets read it (it is what the triggers keep)...
    db.execute_sql('UPDATE "%s" SET "calls" = "calls" + 5 WHERE "kind" = %s AND "value" = %s'
                   % (LEDGER_TABLE, db.param, db.param), ("user", "alice"))
    assert psai.budget_status("alice")[0]["calls"] == 6
    assert psai.budget_status("search")[0]["calls"] == 1
    # ...and without its triggers, the items.
    rollups.disable(db)
    assert {s["budget"]: (s["spent"], s["calls"]) for s in psai.budget_status()} == right


# -- crossings and checks: only the calls carrying the attribution ---------------------------------

def test_only_calls_carrying_the_attribution_cross_its_thresholds(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    heard = []
    psai.on_budget_event(heard.append)
    try:
        psai.set_budget(name="alice", amount="0.10", user="alice", warn_at=())
        psai.set_budget(name="search", amount="0.10", tags={"team": "search"}, warn_at=())
        # $1.20 each (30 and 60 per million): past both limits, but neither user nor tag.
        record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="bob", tags={"team": "ads"})
        record_usage(m, None, tokens_in=20_000, tokens_out=10_000, tags={"env": "search"})
        assert psai.budget_events() == [] and heard == []
        record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="alice")
        assert [e["budget"] for e in psai.budget_events()] == ["alice"]
        # A response recorded with tags (record_response keeps them in its item's psai part).
        psai.record_response(m, None, {"model": "gpt-4", "object": "chat.completion",
                                       "usage": {"prompt_tokens": 20_000, "completion_tokens": 10_000}},
                             tags={"team": "search", "env": "prod"})
        assert [e["budget"] for e in psai.budget_events()] == ["alice", "search"]
        assert [e["budget"] for e in heard] == ["alice", "search"]
        assert psai.budget_status("alice")[0]["spent"] == Decimal("1.2")
    finally:
        psai.budget.LISTENERS.remove(heard.append)


def test_check_budget_and_reservations_weigh_the_budgets_of_the_calls_attribution(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    psai.set_budget(name="alice", amount=1, user="alice")
    psai.set_budget(name="search", amount=5, tags={"team": "search"})
    record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="alice")  # $1.20: alice's is reached
    assert [s["budget"] for s in psai.check_budget(None, m)] == []
    assert [s["budget"] for s in psai.check_budget(None, m, user="bob", tags={"team": "search"})] == ["search"]
    with pytest.raises(BudgetExceededError) as raised:
        psai.check_budget(None, m, user="alice")
    assert raised.value.budget == "alice"
    with pytest.raises(ValidationError) as bad:
        psai.check_budget(None, m, user="")
    assert "user" in bad.value.messages
    # A reservation holds against the budgets of its call's attribution only.
    held = psai.check_budget(None, m, tags={"team": "search"}, estimate=2, reserve=True)
    assert held.budgets == ("search",)
    assert psai.check_budget(None, m, estimate=2, reserve=True).budgets == ()
    with pytest.raises(BudgetExceededError):
        psai.check_budget(None, m, tags={"team": "search"}, estimate=4, reserve=True)  # 2 held + 4 > 5
    held.release()
    # psai.track checks the budgets of its user and tags.
    with psai.track(None, m, budget=True, user="bob") as run:
        run.check(estimate=1)
    with pytest.raises(BudgetExceededError):
        with psai.track(None, m, budget=True, user="alice"):
            pass


# -- session budgets: one conversation's calls ----------------------------------------------------

@pytest.mark.parametrize("ledger_on", [True, False])
def test_a_session_budget_spends_what_cost_report_gives_the_session_over_its_period(db, clock, ledger_on):
    rng = random.Random(3)
    root, _child = seed(clock, rng)
    if not ledger_on:
        rollups.disable(db)
    checked = 0
    for zone in ZONES:
        for period in ("day", "week", "month", "total"):
            start, end = period_bounds(period, zone, NOW)
            for scope in ({}, {"model": "large"}, {"agent": root}):
                name = "%s %s %s" % (zone, period, sorted(scope))
                psai.set_budget(name=name, amount=1000, period=period, timezone=zone, session="s1", **scope)
                (found,) = psai.budget_status(name)
                if "agent" in scope:  # the tree's row: the agent with its sub-agents
                    rows = [row for row in psai.cost_report("tree", since=start, until=end, session="s1")
                            if row["agent_id"] == root.id]
                else:
                    rows = psai.cost_report("model", since=start, until=end, session="s1", **scope)
                assert all(row["currency"] == "USD" for row in rows)
                assert found["scope"].endswith(", session=s1")
                assert (found["spent"], found["calls"]) == (sum((row["cost"] for row in rows), Decimal(0)),
                                                            sum(row["calls"] for row in rows)), name
                checked += found["calls"]
                psai.remove_budget(name)
    assert checked  # some covered calls


def test_a_hard_session_budget_refuses_that_session_only(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    psai.set_budget(name="conv-1", amount=1, session="conv-1")
    record_usage(m, None, tokens_in=10_000, tokens_out=5_000, session="conv-1")  # $0.60
    assert [s["budget"] for s in psai.check_budget(None, m, session="conv-1")] == ["conv-1"]
    with pytest.raises(BudgetExceededError) as passed:  # 0.60 + 0.50 estimated > 1
        psai.check_budget(None, m, session="conv-1", estimate="0.5")
    assert passed.value.budget == "conv-1"
    record_usage(m, None, tokens_in=20_000, tokens_out=10_000, session="conv-2")  # another conversation's
    record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="conv-1", tags={"session": "conv-1"})  # not it
    assert psai.budget_status("conv-1")[0]["spent"] == Decimal("0.6")
    record_usage(m, None, tokens_in=10_000, tokens_out=5_000, session="conv-1")  # $1.20: reached
    with pytest.raises(BudgetExceededError) as refused:
        psai.check_budget(None, m, session="conv-1", user="alice", tags={"team": "search"})
    assert refused.value.budget == "conv-1" and refused.value.spent == Decimal("1.2")
    assert psai.check_budget(None, m, session="conv-2") == []
    assert psai.check_budget(None, m, user="conv-1") == []
    assert psai.check_budget(None, m) == []
    assert psai.check_budget(None, m, session="conv-2", estimate=5, reserve=True).budgets == ()
    with pytest.raises(BudgetExceededError):
        with psai.track(None, m, budget=True, session="conv-1"):
            pass
    with psai.track(None, m, budget=True, session="conv-2") as run:
        run.check(estimate=1)
    with pytest.raises(ValidationError) as bad:
        psai.check_budget(None, m, session="")
    assert "session" in bad.value.messages


def test_calls_recorded_with_the_session_fire_its_alerts(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    heard = []
    psai.on_budget_event(heard.append)
    try:
        psai.set_budget(name="conv-1", amount="1.50", session="conv-1", warn_at=(0.5,))
        record_usage(m, None, tokens_in=20_000, tokens_out=10_000, session="conv-2", user="alice")  # $1.20
        assert psai.budget_events() == []
        record_usage(m, None, tokens_in=20_000, tokens_out=10_000, session="conv-1")  # $1.20: 80 %
        assert [(e["budget"], e["threshold"]) for e in psai.budget_events()] == [("conv-1", Decimal("0.5"))]
        psai.record_response(m, None, {"model": "gpt-4", "object": "chat.completion",
                                       "usage": {"prompt_tokens": 20_000, "completion_tokens": 10_000}},
                             session="conv-1")  # $2.40: the limit
        assert [(e["budget"], e["threshold"]) for e in heard] == [("conv-1", Decimal("0.5")),
                                                                  ("conv-1", Decimal("1"))]
        assert psai.budget_status("conv-1")[0]["spent"] == Decimal("2.4")
    finally:
        psai.budget.LISTENERS.remove(heard.append)


# -- what set_budget refuses ---------------------------------------------------------------------

@pytest.mark.parametrize("arguments, field, words", [
    ({"tags": {"team": "search", "env": "prod"}}, "tags", "one tag"),
    ({"tags": {}}, "tags", "the one tag"),
    ({"tags": "team=search"}, "tags", "text keys and values"),
    ({"tags": {"team space": "x"}}, "tags", "letters, digits"),
    ({"tags": {"team": ""}}, "tags", "Empty"),
    ({"user": "alice", "tags": {"team": "search"}}, "tags", "not user and tags: set a budget for each"),
    ({"session": "s1", "tags": {"team": "search"}}, "tags", "not session and tags: set a budget for each"),
    ({"user": "alice", "session": "s1"}, "session", "not user and session: set a budget for each"),
    ({"session": ""}, "session", "Empty"),
    ({"session": ["s1"]}, "session", "Not text"),
    ({"session": "x" * 256}, "session", "at most 255"),
    ({"user": ""}, "user", "Empty"),
    ({"user": 42}, "user", "Not text"),
    ({"user": "x" * 256}, "user", "at most 255"),
])
def test_a_bad_attribution_is_refused_and_nothing_is_written(db, arguments, field, words):
    with pytest.raises(ValidationError) as raised:
        psai.set_budget(name="b", amount=1, **arguments)
    assert words in " ".join(raised.value.messages[field])
    assert psai.budgets() == []


def test_a_row_holding_half_a_tag_is_invalid_not_a_crash(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    psai.set_budget(name="half", amount=1, tags={"team": "search"})
    db.execute_sql('UPDATE "psai_budgets" SET "tag_value" = NULL')
    (found,) = psai.budget_status("half")
    assert found["state"] == "invalid" and "team=search" in found["problem"]
    record_usage(m, None, tokens_in=10, tokens_out=1, tags={"team": "search"})  # recorded all the same


def test_a_budget_gets_a_name_saying_whose_calls_it_covers(db):
    assert psai.set_budget(amount=1, user="alice").name == "all usage of user alice per month"
    assert psai.set_budget(amount=1, tags={"team": "search"}, period="day",
                           provider="openai").name == "provider openai tagged team=search per day"
    assert psai.set_budget(amount=1, session="conv-1", period="total").name == "all usage of session conv-1 in total"


# -- the command line --------------------------------------------------------------------------

def test_the_command_line_sets_and_lists_user_and_tag_budgets(run):
    made = json.loads(run("budgets", "set", "--name", "alice", "--amount", "2", "--user", "alice", "--json").stdout)
    assert made["scope"] == "all usage, user=alice"
    run("budgets", "set", "--name", "search", "--amount", "2", "--tag", "team=search", "--provider", "openai")
    listed = {row["name"]: row["scope"] for row in json.loads(run("budgets", "list", "--json").stdout)}
    assert listed == {"alice": "all usage, user=alice", "search": "provider=openai, tag team=search"}
    assert {b.name: (b.user, b.tag_key, b.tag_value) for b in psai.budgets()} == {
        "alice": ("alice", None, None), "search": (None, "team", "search")}
    refused = run("budgets", "set", "--name", "x", "--amount", "1", "--user", "a", "--tag", "team=b", code=2)
    assert "not user and tags" in refused.output
    assert "KEY=VALUE" in run("budgets", "set", "--name", "x", "--amount", "1", "--tag", "team", code=2).output
    statuses = json.loads(run("budgets", "status", "--json").stdout)
    assert {s["budget"]: s["calls"] for s in statuses} == {"alice": 0, "search": 0}
    assert {s["budget"]: s["scope"] for s in statuses} == listed  # what each covers, as the list says
    table = run("budgets", "status").stdout.splitlines()
    assert "scope" in table[0].split() and any("provider=openai, tag team=search" in line for line in table)
    assert {s["budget"]: s["scope"] for s in psai.budget_status()} == listed  # the library's rows carry it


def test_the_command_line_sets_and_shows_a_session_budget(run):
    made = json.loads(run("budgets", "set", "--name", "conv", "--amount", "2", "--session", "conv-1",
                          "--json").stdout)
    assert made["scope"] == "all usage, session=conv-1"
    assert [(b.name, b.session, b.user, b.tag_key) for b in psai.budgets()] == [("conv", "conv-1", None, None)]
    (status,) = json.loads(run("budgets", "status", "--json").stdout)
    assert (status["budget"], status["scope"], status["calls"]) == ("conv", "all usage, session=conv-1", 0)
    assert any("session=conv-1" in line for line in run("budgets", "status").stdout.splitlines()[1:])
    refused = run("budgets", "set", "--name", "x", "--amount", "1", "--user", "a", "--session", "b", code=2)
    assert "not user and session: set a budget for each" in refused.output
    assert [b.name for b in psai.budgets()] == ["conv"]


# -- a store from before the columns --------------------------------------------------------

def test_a_store_with_budgets_upgrades_to_attributed_budgets(backend, clock):
    db = psai.database.obj
    assert runner().up(target="0017_attribution_ledger")[-1] == "0017_attribution_ledger"
    assert "user" not in {c.name for c in db.get_columns("psai_budgets")}
    db.execute_sql('INSERT INTO "psai_budgets" (name, amount, currency, period, timezone, include_sub_agents, '
                   'warn_at, hard, unpriced, created_at) VALUES (%s)' % ", ".join([db.param] * 10),
                   ("old", "5", "USD", "month", "UTC", True, "[0.8]", True, "block",
                    Budget.created_at.db_value(NOW)))
    assert psai.migrate() == ["0018_rollup_read_indexes", "0019_budget_attribution",
                              "0020_postgres_statement_triggers", "0021_budget_session", "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    assert {"user", "tag_key", "tag_value"} <= {c.name for c in db.get_columns("psai_budgets")}
    (old,) = psai.budgets()
    assert (old.user, old.tag_key, old.tag_value) == (None, None, None)
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="alice")
    psai.set_budget(name="alice", amount=1, user="alice")
    assert {s["budget"]: s["spent"] for s in psai.budget_status()} == {"alice": Decimal("1.2"),
                                                                     "old": Decimal("1.2")}
    assert psai.migrate() == []


def test_a_store_at_0020_with_budgets_upgrades_to_session_budgets(backend, clock):
    db = psai.database.obj
    assert runner().up(target="0020_postgres_statement_triggers")[-1] == "0020_postgres_statement_triggers"
    assert "session" not in {c.name for c in db.get_columns("psai_budgets")}
    db.execute_sql('INSERT INTO "psai_budgets" (name, amount, currency, period, timezone, include_sub_agents, '
                   'warn_at, hard, unpriced, created_at, "user") VALUES (%s)' % ", ".join([db.param] * 11),
                   ("alice", "5", "USD", "month", "UTC", True, "[0.8]", True, "block",
                    Budget.created_at.db_value(NOW), "alice"))
    assert psai.migrate() == ["0021_budget_session", "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    assert "session" in {c.name for c in db.get_columns("psai_budgets")}
    (old,) = psai.budgets()
    assert (old.name, old.user, old.session) == ("alice", "alice", None)
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    record_usage(m, None, tokens_in=20_000, tokens_out=10_000, user="alice", session="conv-1")
    psai.set_budget(name="conv-1", amount=1, session="conv-1")
    assert {s["budget"]: (s["spent"], s["scope"]) for s in psai.budget_status()} == {
        "alice": (Decimal("1.2"), "all usage, user=alice"), "conv-1": (Decimal("1.2"), "all usage, session=conv-1")}
    assert psai.migrate() == []
