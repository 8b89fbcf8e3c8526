"""Attribution (docs/capture.md): whose each call was (user, session, trace,
tags, environment) kept in its item's psai part by every way of recording,
checked before anything is written, and reports grouped and filtered by
it, equal to pricing every item on its own, rollups on and off."""
import asyncio
import datetime
import json
from collections import defaultdict
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, cost_report, rollups
from psai.cli import cli
from psai._items import item_price
from psai._responses import ResponseUsage

UTC = datetime.timezone.utc
ATTRIBUTION = {"user": "user-42", "session": "conversation-7", "trace": {"traceId": "4bf92f35", "spanId": "00f067aa"},
               "tags": {"team": "search", "env": "prod"}, "environment": "staging"}


@pytest.fixture
def model(db):
    return PsAiModel.create(name="GPT", configuration=make_configuration())


def kept():
    return [row.data.get("psai", {}) for row in PsModelUsageItem.select().order_by(PsModelUsageItem.id)]


def a_response(number):
    return ResponseUsage(tokens_in=100 * number, tokens_out=10, model="gpt-4", provider="openai",
                         provider_metadata={"responseId": "resp-%d" % number})


def test_every_way_of_recording_keeps_the_attribution(db, model):
    psai.record_usage(model, tokens_in=10, tokens_out=1, **ATTRIBUTION)
    psai.record_response(model, None, a_response(1), **ATTRIBUTION)
    asyncio.run(psai.arecord_response(model, None, a_response(2), **ATTRIBUTION))
    with psai.track(None, model, **ATTRIBUTION) as run:
        run.record(a_response(3))
    for data in kept():
        assert {key: data[key] for key in ATTRIBUTION} == ATTRIBUTION
    assert [data.get("responseId") for data in kept()] == [None, "resp-1", "resp-2", "resp-3"]


def test_a_trace_id_alone_and_only_what_is_given(db, model):
    psai.record_usage(model, tokens_in=10, tokens_out=1, trace="4bf92f3577b34da6", user="u")
    psai.record_usage(model, tokens_in=10, tokens_out=1)
    first, second = kept()
    assert first == {"trace": {"traceId": "4bf92f3577b34da6"}, "user": "u"}
    assert not {"user", "session", "trace", "tags", "environment"} & set(second)


@pytest.mark.parametrize("given, named, says", [
    ({"user": 42}, "user", "Not text (got int)"),
    ({"session": ""}, "session", "Empty"),
    ({"environment": "x" * 256}, "environment", "Too long: 256 characters, at most 255"),
    ({"tags": ["team"]}, "tags", "Give text keys and values"),
    ({"tags": {"team": 1}}, "tags", "Tag 'team': Not text"),
    ({"tags": {"a=b": "c"}}, "tags", "Tag key 'a=b'"),
    ({"tags": {"k%d" % i: "v" for i in range(33)}}, "tags", "33 tags: at most 32"),
    ({"trace": {"traceId": "t", "parent": "p"}}, "trace", "Give the trace id"),
    ({"trace": {"traceId": 5}}, "trace", "traceId: Not text"),
])
def test_bad_attribution_is_refused_naming_the_argument_and_nothing_is_written(db, model, given, named, says):
    for record in (lambda: psai.record_usage(model, tokens_in=10, tokens_out=1, **given),
                   lambda: psai.record_response(model, None, a_response(1), **given),
                   lambda: psai.track(None, model, **given)):
        with pytest.raises(psai.ValidationError) as raised:
            record()
        assert list(raised.value.paths) == [named] and says in str(raised.value)
    assert PsModelUsageItem.select().count() == 0 and PsModelUsage.select().count() == 0


def test_two_bad_arguments_are_both_named(db, model):
    with pytest.raises(psai.ValidationError) as raised:
        psai.record_usage(model, tokens_in=1, user=1, tags={"": "x"})
    assert set(raised.value.paths) == {"user", "tags"}


# -- reports ---------------------------------------------------------------------------------

USERS, SESSIONS, TEAMS = ["alice", "bob", None], ["s1", "s2", "s3", None], ["search", "ads", None]


def seed(clock):
    """Calls of two models, three days, two agents, every mix of user, session
    and team (some without), some with env=prod; plus counter usage no
    item covers (no attribution) and an item written by hand with odd values."""
    gpt = PsAiModel.create(name="GPT", configuration=make_configuration())
    claude = PsAiModel.create(name="Claude", configuration=make_configuration(provider="anthropic", model="claude"))
    writer = PsAgent.create(configuration={"name": "Writer"})
    number = 0
    for day in (1, 2, 3):
        clock.set(datetime.datetime(2026, 11, day, 9, tzinfo=UTC))
        for user in USERS:
            for session in SESSIONS:
                for team in TEAMS:
                    number += 1
                    tags = {"team": team} if team else {}
                    if number % 3 == 0:
                        tags["env"] = "prod"
                    psai.record_usage(gpt if number % 2 else claude, writer if number % 5 else None,
                                      tokens_in=100 + number, tokens_out=10 + number, cached_tokens=number % 7,
                                      user=user, session=session, tags=tags or None)
    # Counter usage without an item (recorded by an older tool): no attribution.
    PsModelUsage.create(model=gpt, user_id=1, token_in_count=5000, token_out_count=50,
                        created_at=datetime.datetime(2026, 11, 2, 10, tzinfo=UTC))
    # An item edited by hand: a user that is not text counts as none.
    odd = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).first()
    odd.data = dict(odd.data, psai=dict(odd.data["psai"], user=7, tags={"team": ["x"]}))
    odd.save()
    return gpt, claude, writer


def scanned(kind, only=lambda data: True, agent_id=None):
    """Each item priced on its own, added up by its attribution ``kind``."""
    totals = defaultdict(lambda: [0, Decimal(0)])
    for item in PsModelUsageItem.select():
        extras = item.data.get("psai") or {}
        if not only(extras) or agent_id is not None and item.agent_id != agent_id:
            continue
        value = extras.get("tags", {}).get(kind[4:]) if kind.startswith("tag:") else extras.get(kind)
        value = value if isinstance(value, str) else None
        cost, _reason = item_price(item.data)
        totals[value][0] += 1
        totals[value][1] += cost
    return {key: tuple(entry) for key, entry in totals.items()}


def reported(rows, column):
    totals = defaultdict(lambda: [0, Decimal(0)])
    for row in rows:
        totals[row[column]][0] += row["calls"]
        totals[row[column]][1] += row["cost"] or 0
    return {key: tuple(entry) for key, entry in totals.items()}


def counters_alone(model):
    """What the counter row without items costs (no attribution: in the (none) group)."""
    return 5000 * Decimal(30) / 1000000 + 50 * Decimal(60) / 1000000


@pytest.mark.parametrize("rolled_up", [True, False])
def test_reports_by_user_session_and_tag_equal_pricing_every_item(db, clock, rolled_up):
    gpt, claude, writer = seed(clock)
    if not rolled_up:
        rollups.disable(db)
    assert rollups.enabled(db) is rolled_up
    for by, column in (("user", "user"), ("session", "session"), ("tag:team", "tag"), ("tag:env", "tag")):
        expected = scanned(by)
        calls, cost = expected.get(None, (0, Decimal(0)))
        expected[None] = (calls, cost + counters_alone(gpt))  # the counters no item covers have no attribution
        rows = cost_report(by)
        assert reported(rows, column) == expected, by
        assert sum(row["calls"] for row in rows) == PsModelUsageItem.select().count()
        assert rows[-1][column] is None  # the calls without it come last
    # A period: the items of those days only.
    rows = cost_report("user", since="2026-11-02", until="2026-11-02")
    assert sum(row["calls"] for row in rows) == len(USERS) * len(SESSIONS) * len(TEAMS)


@pytest.mark.parametrize("rolled_up", [True, False])
def test_filters_by_user_session_and_tags(db, clock, rolled_up):
    gpt, claude, writer = seed(clock)
    if not rolled_up:
        rollups.disable(db)
    assert reported(cost_report("model", user="alice"), "model_id").keys() == {gpt.id, claude.id}
    alice = scanned("user", lambda extras: extras.get("user") == "alice")
    assert reported(cost_report("user", user="alice"), "user") == alice
    assert sum(row["calls"] for row in cost_report("model", user="alice")) == alice["alice"][0]
    prod_search = scanned("tag:team", lambda e: (e.get("tags") or {}).get("env") == "prod")
    assert reported(cost_report("tag:team", tags={"env": "prod"}), "tag") == prod_search
    both = scanned("session", lambda e: e.get("user") == "bob" and (e.get("tags") or {}).get("team") == "ads")
    assert reported(cost_report("session", user="bob", tags={"team": "ads"}), "session") == both
    # With the agent, model and provider filters too.
    mine = scanned("user", lambda e: e.get("session") == "s2", agent_id=writer.id)
    assert reported(cost_report("user", session="s2", agent="Writer"), "user") == mine
    rows = cost_report("provider", user="alice", model="Claude", provider="anthropic")
    assert [row["provider"] for row in rows] == ["anthropic"]
    assert cost_report("user", user="nobody") == []


def test_a_report_refuses_a_bad_grouping_or_filter(db):
    with pytest.raises(psai.ValidationError, match="by: Must be one of: .*user, session, or tag:KEY"):
        cost_report("team")
    with pytest.raises(psai.ValidationError, match="by: Tag key 'a b'"):
        cost_report("tag:a b")
    with pytest.raises(psai.ValidationError, match="user: Not text"):
        cost_report("model", user=3)
    with pytest.raises(psai.ValidationError, match="tags: Give text keys and values"):
        cost_report("model", tags="env=prod")


def test_spans_and_calls_are_reported_together(db, model):
    """A span's conversation id is a session, as record_usage's session is."""
    from psai._recording import record_response_data
    record_response_data(model, None, a_response(1), None, None, None,
                         kept={"source": "otel", "session": "conversation-7", "tags": {"team": "search"}})
    psai.record_usage(model, tokens_in=10, tokens_out=1, session="conversation-7", tags={"team": "search"})
    [row] = cost_report("session")
    assert (row["session"], row["calls"]) == ("conversation-7", 2)
    [row] = cost_report("tag:team")
    assert (row["tag"], row["calls"]) == ("search", 2)


def test_the_command_line_report_by_tag_with_filters(backend, clock, tmp_path):
    psai.migrate()
    gpt, claude, writer = seed(clock)

    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url, *args], catch_exceptions=False)
        psai.connect(backend.url)
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    rows = json.loads(run("usage", "report", "--by", "tag:team", "--tag", "env=prod", "--json").stdout)
    assert reported([dict(row, cost=Decimal(row["cost"])) for row in rows], "tag") == scanned(
        "tag:team", lambda e: (e.get("tags") or {}).get("env") == "prod")
    rows = json.loads(run("usage", "report", "--by", "user", "--agent", "Writer", "--model", "GPT",
                          "--provider", "openai", "--session", "s1", "--json").stdout)
    assert {row["user"] for row in rows} <= {"alice", "bob", None} and rows
    assert sum(row["calls"] for row in rows) == sum(row["calls"] for row in cost_report(
        "model", agent="Writer", model="GPT", provider="openai", session="s1"))
    table = run("usage", "report", "--by", "user").stdout.splitlines()
    assert table[0].split()[0] == "user" and any(line.startswith("(none)") for line in table)
    assert "give KEY=VALUE" in run("usage", "report", "--tag", "env", code=2).stderr
    assert "give one of model" in run("usage", "report", "--by", "team", code=2).stderr
    # The page takes the grouping and the filters too.
    run("usage", "report", "--by", "user", "--tag", "env=prod", "--html", str(tmp_path / "page.html"))
    page = (tmp_path / "page.html").read_text()
    assert "<h2>By user</h2>" in page and "Only tag env = prod" in page and "<h2>Top users</h2>" in page


# -- the attribution ledger ----------------------------------------------------------------------

def ledger(db):
    return sorted(tuple(row) for row in db.execute_sql(
        'SELECT "range_day", "kind", "value", "model_id", "agent_id", CAST("calls" AS INTEGER), '
        'CAST("fresh_in" AS INTEGER), CAST("out" AS INTEGER) FROM "psai_attribution_ledger" WHERE "calls" <> 0'))


def test_the_ledger_is_kept_by_its_triggers_as_a_rebuild_makes_it(db, clock):
    seed(clock)
    assert rollups.enabled(db) and rollups.ledger_enabled(db)
    first = PsModelUsageItem.select().order_by(PsModelUsageItem.id).first()
    first.data = dict(first.data, psai={"user": "carol", "tags": {"team": "ads", "odd": 5}})  # changed by hand
    first.save()
    PsModelUsageItem.delete().where(PsModelUsageItem.id == first.id + 1).execute()
    kept_by_triggers = ledger(db)
    # The first call: 101 tokens in (1 cached), 11 out.
    assert ("2026-11-01", "user", "carol", first.model_id, first.agent_id, 1, 100, 11) in kept_by_triggers
    assert not [row for row in kept_by_triggers if row[1] == "tag:odd"]  # a value that is not text is none
    rollups.rebuild(db)
    assert ledger(db) == kept_by_triggers
    rollups.disable(db)
    assert not rollups.ledger_enabled(db)
    rollups.enable(db)
    assert rollups.ledger_enabled(db) and ledger(db) == kept_by_triggers


def test_reports_read_the_ledger_for_the_rolled_up_days(db, clock):
    seed(clock)
    right = cost_report("user")
    assert cost_report("user", since="2026-11-01") == right
    # A ledger row edited by hand: reports trust the ledger (one kind asked)...
    db.execute_sql('UPDATE "psai_attribution_ledger" SET "calls" = "calls" + 1000 WHERE "kind" = %s AND "value" = %s'
                   % (db.param, db.param), ("user", "alice"))
    assert cost_report("user") != right
    assert sum(r["calls"] for r in cost_report("model", user="alice")) > 1000
    # ...but not when they ask about two kinds (they read the items), and a rebuild repairs it.
    alice_ads = cost_report("user", user="alice", tags={"team": "ads"})
    assert sum(r["calls"] for r in alice_ads) == scanned("user", lambda e: e.get("user") == "alice" and (
        e.get("tags") or {}).get("team") == "ads")["alice"][0]
    rollups.rebuild(db)
    assert cost_report("user") == right


def test_a_store_upgraded_to_the_ledger_fills_it_from_its_items(db, clock):
    seed(clock)
    expected = ledger(db)
    db.execute_sql('DELETE FROM "psai_attribution_ledger"')
    db.execute_sql('DELETE FROM "psai_migrations" WHERE "name" = %s' % db.param, ("0017_attribution_ledger",))
    for statement in psai._sql.drop_ledger_triggers_sql(psai.db.is_postgres(db)):
        db.execute_sql(statement)
    assert psai.migrate() == ["0017_attribution_ledger"]
    assert rollups.ledger_enabled(db) and ledger(db) == expected


# -- cross groupings ------------------------------------------------------------------------------

def scanned_by(key_of):
    """Each item priced on its own, added up by ``key_of(item, its psai part)``."""
    totals = defaultdict(lambda: [0, Decimal(0)])
    for item in PsModelUsageItem.select():
        extras = item.data.get("psai") or {}
        cost, _reason = item_price(item.data)
        entry = totals[key_of(item, extras)]
        entry[0] += 1
        entry[1] += cost
    return {key: tuple(entry) for key, entry in totals.items()}


def reported_by(rows, *columns):
    totals = defaultdict(lambda: [0, Decimal(0)])
    for row in rows:
        entry = totals[tuple(row[column] for column in columns)]
        entry[0] += row["calls"]
        entry[1] += row["cost"] or 0
    return {key: tuple(entry) for key, entry in totals.items()}


def team_of(extras):
    team = (extras.get("tags") or {}).get("team")
    return team if isinstance(team, str) else None


@pytest.mark.parametrize("rolled_up", [True, False])
def test_a_cross_grouping_keys_rows_by_both_and_its_totals_are_every_call(db, clock, rolled_up):
    gpt, claude, writer = seed(clock)
    if not rolled_up:
        rollups.disable(db)
    counters = counters_alone(gpt)  # the counter row: no item, no agent, no attribution
    rows = cost_report("agent,model")
    assert list(rows[0])[:5] == ["agent_id", "agent_name", "model_id", "model_name", "provider"]
    expected = scanned_by(lambda item, extras: (item.agent_id or None, item.model_id))
    calls, cost = expected.get((None, gpt.id), (0, Decimal(0)))
    expected[(None, gpt.id)] = (calls, cost + counters)
    assert reported_by(rows, "agent_id", "model_id") == expected
    assert {row["agent_name"] for row in rows} == {"Writer", None}
    assert {row["model_name"] for row in rows if row["model_id"] == claude.id} == {"Claude"}
    # Ordered by the first grouping, then the second; the rows without an agent last.
    assert [(row["agent_id"] is None, row["agent_id"] or 0, row["model_id"]) for row in rows] == sorted(
        (row["agent_id"] is None, row["agent_id"] or 0, row["model_id"]) for row in rows)
    assert rows[-1]["agent_id"] is None
    by_model = {row["model_id"]: row["cost"] for row in cost_report("model")}
    assert {model_id: sum(row["cost"] for row in rows if row["model_id"] == model_id)
            for model_id in by_model} == by_model
    # An attribution crossed with a model, an agent, a day: the same calls, in either order.
    by_team = scanned_by(lambda item, extras: (team_of(extras), item.model_id))
    calls, cost = by_team.get((None, gpt.id), (0, Decimal(0)))
    by_team[(None, gpt.id)] = (calls, cost + counters)
    team_model = cost_report("tag:team,model")
    assert list(team_model[0])[:4] == ["tag", "model_id", "model_name", "provider"]
    assert reported_by(team_model, "tag", "model_id") == by_team
    model_team = cost_report("model,tag:team")
    assert list(model_team[0])[:4] == ["model_id", "model_name", "provider", "tag"]
    assert reported_by(model_team, "tag", "model_id") == by_team
    assert [row["model_id"] for row in model_team] == sorted(row["model_id"] for row in model_team)
    by_user_day = scanned_by(lambda item, extras: (
        extras.get("user") if isinstance(extras.get("user"), str) else None, item.created_at.strftime("%Y-%m-%d")))
    user_day = reported_by(cost_report("user,day"), "user", "day")
    # The counters' part no item covers is dated by the counter rows it is left of (_uncovered_counters).
    assert {key: value for key, value in user_day.items() if key[0]} == {
        key: value for key, value in by_user_day.items() if key[0]}
    assert sum(cost for (user, _day), (_calls, cost) in user_day.items() if user is None) == sum(
        cost for (user, _day), (_calls, cost) in by_user_day.items() if user is None) + counters
    # With filters: the session s2 of the Writer, by agent and user.
    mine = scanned_by(lambda item, extras: (item.agent_id or None, extras.get("user") if isinstance(
        extras.get("user"), str) else None) if extras.get("session") == "s2" and item.agent_id == writer.id
        else "other")
    mine.pop("other")
    assert reported_by(cost_report("agent,user", session="s2", agent="Writer"), "agent_id", "user") == mine


def test_by_model_and_provider_the_provider_is_the_calls(db, model):
    psai.record_usage(model, tokens_in=10, tokens_out=1)
    psai.record_usage(model, tokens_in=10, tokens_out=1)
    routed = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).first()
    routed.data = dict(routed.data, provider="azure")  # the call went through another provider
    routed.save()
    rows = cost_report("model,provider")
    assert [(row["model_id"], row["provider"], row["calls"]) for row in rows] == [
        (model.id, "azure", 1), (model.id, "openai", 1)]
    assert [(row["provider"], row["model_id"]) for row in cost_report("provider,model")] == [
        ("azure", model.id), ("openai", model.id)]


@pytest.mark.parametrize("by", ["tree,model", "user,session", "tag:a,tag:b", "model,model", "agent,model,day",
                                "agent,team", "model,", "tag:a b,model"])
def test_a_cross_grouping_that_is_not_supported_is_refused_saying_what_is(db, by):
    with pytest.raises(psai.ValidationError) as raised:
        cost_report(by)
    assert list(raised.value.paths) == ["by"]
    if by != "tag:a b,model":
        assert "two different groupings among model, agent, provider, day, user, session and tag:KEY" in str(
            raised.value)
    with pytest.raises(psai.ValidationError):
        psai.reports.cost_reports([by])


def test_the_command_line_report_by_two_groupings(backend, clock):
    psai.migrate()
    gpt, claude, writer = seed(clock)

    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url, *args], catch_exceptions=False)
        psai.connect(backend.url)
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    rows = json.loads(run("usage", "report", "--by", "agent,model", "--json").stdout)
    assert reported_by([dict(row, cost=Decimal(row["cost"])) for row in rows], "agent_id", "model_id") == \
        reported_by(cost_report("agent,model"), "agent_id", "model_id")
    table = run("usage", "report", "--by", "model,tag:team", "--tag", "env=prod").stdout.splitlines()
    assert table[0].split()[:4] == ["model_id", "model_name", "provider", "tag"]
    assert any(line.startswith("TOTAL") for line in table) and any("(none)" in line for line in table)
    refused = run("usage", "report", "--by", "user,session", code=2).stderr
    assert "a cross grouping is two different groupings" in refused
    assert "give one of model" in run("usage", "report", "--by", "agent,team", code=2).stderr
