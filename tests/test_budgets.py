"""Budgets (docs/budgets.md): spending limits on a calendar, what they have
spent equal to cost_report's, checks before a call, alerts that fire once."""
import datetime
import itertools
import json
import multiprocessing
import os
import time
import zoneinfo
from decimal import Decimal

import pytest
from click.testing import CliRunner
from playhouse.test_utils import count_queries

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel, record_usage
from psai.budget import period_bounds
from psai.models import Budget
from psai.cli import cli
from psai.reports import cost_report, report_totals

UTC = datetime.timezone.utc
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")

# 30 USD per million in, 60 out: 10,000 in and 1,000 out cost 0.36.
CALL = {"tokens_in": 10_000, "tokens_out": 1_000}
CALL_COST = Decimal("0.36")


def model(name="GPT-4", organization_id=2, provider="openai"):
    return PsAiModel.create(user_id=1, organization_id=organization_id, name=name,
                            configuration=make_configuration(provider=provider))


def agent(name, parent=None):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name}, parent_agent=parent)


def at(clock, text):
    clock.set(datetime.datetime.fromisoformat(text))


def status(name):
    (found,) = psai.budget_status(name)
    return found


def break_prices(m):
    """A model whose row holds no prices (written by hand: psai refuses to write it)."""
    mark = "%s" if psai.db.is_postgres() else "?"
    psai.database.execute_sql('UPDATE "ps_ai_models" SET "configuration" = %s WHERE "id" = %s' % (mark, mark),
                              (json.dumps(dict(m.configuration, prices=None)), m.id))


# -- periods ----------------------------------------------------------------------------

def test_a_month_begins_at_midnight_in_the_budgets_zone(db, clock):
    m = model()
    at(clock, "2026-11-30T23:30:00+00:00")  # 00:30 on 1 December in Berlin
    record_usage(m, None, **CALL)
    at(clock, "2026-12-01T10:00:00+00:00")
    psai.set_budget(name="berlin", amount=10, timezone="Europe/Berlin")
    psai.set_budget(name="utc", amount=10)
    berlin, utc = status("berlin"), status("utc")
    assert berlin["spent"] == CALL_COST and utc["spent"] == 0
    assert berlin["period_start"] == datetime.datetime(2026, 12, 1, tzinfo=BERLIN)
    assert berlin["period_start"].astimezone(UTC) == datetime.datetime(2026, 11, 30, 23, tzinfo=UTC)
    assert utc["period_start"] == datetime.datetime(2026, 12, 1, tzinfo=UTC)
    assert berlin["period_end"] == datetime.datetime(2027, 1, 1, tzinfo=BERLIN)
    # The same month's report, in UTC, has the call in November.
    assert sum(r["cost"] for r in cost_report("model", since="2026-12-01")) == 0


@pytest.mark.parametrize("day, hours", [("2026-03-08", 23), ("2026-11-01", 25), ("2026-06-01", 24)])
def test_a_day_in_new_york_follows_its_clocks(day, hours):
    noon = datetime.datetime.fromisoformat(day + "T12:00:00").replace(tzinfo=NEW_YORK)
    start, end = period_bounds("day", "America/New_York", noon)
    assert start == datetime.datetime.fromisoformat(day).replace(tzinfo=NEW_YORK)
    assert (end.astimezone(UTC) - start.astimezone(UTC)) == datetime.timedelta(hours=hours)


def test_calls_late_on_a_dst_day_count_on_that_day(db, clock):
    m = model()
    psai.set_budget(name="ny", amount=10, period="day", timezone="America/New_York")
    at(clock, "2026-11-01T00:10:00-04:00")  # just after midnight, daylight time
    record_usage(m, None, **CALL)
    at(clock, "2026-11-01T23:50:00-05:00")  # just before midnight, standard time: 25 hours later
    record_usage(m, None, **CALL)
    assert status("ny")["spent"] == 2 * CALL_COST
    at(clock, "2026-11-02T00:05:00-05:00")
    assert status("ny")["spent"] == 0 and status("ny")["state"] == "ok"


def test_an_iso_week_runs_across_the_new_year(db, clock):
    m = model()
    psai.set_budget(name="week", amount=10, period="week")
    at(clock, "2026-12-27T23:59:00+00:00")  # Sunday: the week before
    record_usage(m, None, **CALL)
    at(clock, "2026-12-28T00:00:00+00:00")  # Monday
    record_usage(m, None, **CALL)
    at(clock, "2027-01-03T12:00:00+00:00")  # Sunday, in 2027, same ISO week
    week = status("week")
    assert week["spent"] == CALL_COST
    assert week["period_start"] == datetime.datetime(2026, 12, 28, tzinfo=UTC)
    assert week["period_end"] == datetime.datetime(2027, 1, 4, tzinfo=UTC)


def test_year_and_total_periods(db, clock):
    m = model()
    at(clock, "2025-06-01T00:00:00+00:00")
    record_usage(m, None, **CALL)
    at(clock, "2026-06-01T00:00:00+00:00")
    record_usage(m, None, **CALL)
    psai.set_budget(name="year", amount=10, period="year")
    psai.set_budget(name="total", amount=10, period="total")
    assert status("year")["spent"] == CALL_COST and status("total")["spent"] == 2 * CALL_COST
    assert status("total")["period_start"] is None and status("total")["forecast"] is None
    # Half the year gone (151 of 365 days): the pace carried to its end.
    assert status("year")["forecast"] == pytest.approx(CALL_COST * 365 / 151, rel=Decimal("1e-6"))


# -- what is spent is what cost_report says ---------------------------------------------------

def test_each_scope_spends_what_cost_report_says(db, clock):
    root, kid, other = agent("root"), None, agent("other")
    kid = agent("kid", root)
    gpt, gpt_eu = model("GPT-4"), model("GPT-4", organization_id=3)
    claude = PsAiModel.create(user_id=1, organization_id=3, name="Claude", configuration=make_configuration(
        provider="anthropic", model="claude", prices={"costInTokensPerMillion": 3, "costOutTokensPerMillion": 15,
                                                      "costInCachedContextTokensPerMillion": 0.3,
                                                      "currency": "USD"}))
    for i, (m, a) in enumerate([(gpt, root), (gpt, kid), (gpt_eu, kid), (claude, other), (claude, None),
                                (gpt, None), (claude, kid)] * 3):
        record_usage(m, a, tokens_in=1000 + 37 * i, tokens_out=100 + i, cached_tokens=i * 3)
    psai.set_budget(name="tree", amount=100, agent=root)
    psai.set_budget(name="root only", amount=100, agent=root, include_sub_agents=False)
    psai.set_budget(name="gpt", amount=100, model="GPT-4")
    psai.set_budget(name="anthropic", amount=100, provider="anthropic")
    psai.set_budget(name="org 3", amount=100, organization_id=3)
    psai.set_budget(name="all", amount=100)
    month = {"since": "2026-11-01", "until": "2026-11-30"}
    tree = {r["agent_id"]: r["cost"] for r in cost_report("tree", **month)}
    by_agent = {r["agent_id"]: r["cost"] for r in cost_report("agent", **month)}
    by_model = {r["model_id"]: r["cost"] for r in cost_report("model", **month)}
    by_provider = {r["provider"]: r["cost"] for r in cost_report("provider", **month)}
    assert status("tree")["spent"] == tree[root.id]
    assert status("root only")["spent"] == by_agent[root.id]
    assert status("gpt")["spent"] == by_model[gpt.id] + by_model[gpt_eu.id]
    assert status("anthropic")["spent"] == by_provider["anthropic"]
    assert status("org 3")["spent"] == by_model[gpt_eu.id] + by_model[claude.id]
    assert status("all")["spent"] == report_totals(cost_report("model", **month))["USD"]["cost"]
    assert status("all")["calls"] == 21
    assert {s["budget"] for s in psai.budget_status()} == {"tree", "root only", "gpt", "anthropic", "org 3", "all"}


def test_a_model_budget_covers_a_superseded_row(db, clock):
    old = model("GPT-4o")
    record_usage(old, None, **CALL)
    new = psai.add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration(
        prices={"costInTokensPerMillion": 60, "costOutTokensPerMillion": 120,
                "costInCachedContextTokensPerMillion": 20, "currency": "USD"}))
    assert new.id != old.id and not PsAiModel.get_by_id(old.id).configuration["active"]
    record_usage(new, None, **CALL)
    psai.set_budget(name="4o", amount=10, model="GPT-4o")
    assert status("4o")["spent"] == CALL_COST * 3  # the old price once, the doubled one once
    assert psai.check_budget(model=new)[0]["budget"] == "4o"
    assert psai.check_budget(model=old)[0]["budget"] == "4o"


def test_a_price_correction_changes_what_the_budget_has_spent(db, clock):
    m = model()
    record_usage(m, None, **CALL)
    psai.set_budget(name="b", amount="0.5")
    psai.check_budget(model=m, estimate="0.1")
    psai.reprice(m, {"costInTokensPerMillion": 60}, dry_run=False)  # 0.66 now
    assert status("b")["spent"] == Decimal("0.66") and status("b")["state"] == "exceeded"
    with pytest.raises(psai.BudgetExceededError, match=r"'b' \(USD\) is reached: 0.66 spent of 0.50"):
        psai.check_budget(model=m)


# -- checks before a call ------------------------------------------------------------------

def test_check_budget_refuses_what_would_pass_the_limit(db, clock):
    m, a = model(), agent("a")
    psai.set_budget(name="a", amount=1, agent=a)
    record_usage(m, a, **CALL)
    record_usage(m, a, **CALL)  # 0.72 spent
    assert psai.check_budget(a, m, estimate="0.28")[0]["spent"] == Decimal("0.72")
    with pytest.raises(psai.BudgetExceededError) as refused:
        psai.check_budget(a, m, estimate=CALL)  # 0.36 more would be 1.08
    assert (refused.value.budget, refused.value.spent, refused.value.limit, refused.value.currency) == (
        "a", Decimal("0.72"), Decimal(1), "USD")
    assert refused.value.period_end == datetime.datetime(2026, 12, 1, tzinfo=UTC)
    assert "would be passed by this call: 0.72 spent + 0.36 estimated is more than 1.00" in str(refused.value)
    assert "the period ends 2026-12-01T00:00:00+00:00" in str(refused.value)
    assert psai.check_budget(agent("b"), m, estimate=CALL) == []  # another agent: not covered
    record_usage(m, a, **CALL)  # recording is never refused, even past the limit
    with pytest.raises(psai.BudgetExceededError, match="is reached: 1.08 spent of 1.00"):
        psai.check_budget(a)


def test_a_check_sees_every_write_since_the_one_before(backend, clock):
    """A check answers as the one before it did while the data is unchanged:
    a write of any connection, committed or rolled back, is seen by the next."""
    psai.migrate()
    db = psai.database.obj
    m = model()
    psai.set_budget(name="b", amount=100)
    record_usage(m, None, **CALL)

    def checked():
        (found,) = psai.check_budget(model=m)
        return found["spent"], found["calls"]
    assert checked() == checked() == (CALL_COST, 1)
    other = psai.connect(backend.url, bind=False)
    with psai.using(other):
        record_usage(m, None, **CALL)
    other.close()
    assert checked() == (2 * CALL_COST, 2)
    # Hand SQL on this connection, the rollups' triggers taking the call off.
    db.execute_sql('DELETE FROM "ps_model_usage_item" WHERE id = (SELECT max(id) FROM "ps_model_usage_item")')
    assert checked() == (CALL_COST, 1)
    with db.atomic() as transaction:
        record_usage(m, None, **CALL)
        assert checked() == (2 * CALL_COST, 2)
        transaction.rollback()
    assert checked() == (CALL_COST, 1) and status("b")["spent"] == CALL_COST
    with psai.using(psai.connect(backend.url, bind=False)) as again:  # another connection's first check
        assert checked() == (CALL_COST, 1)
        record_usage(m, None, **CALL)
        again.close()
    assert checked() == (2 * CALL_COST, 2)


def test_an_unchanged_check_is_one_statement_beyond_its_lookups_and_counts_what_is_held(backend, clock):
    """On PostgreSQL, a check of unchanged data reads the state of the data
    and the live reservations in one statement, outside any transaction
    (the statuses kept for that state answer); a reservation another
    connection holds is counted by the next check, on both backends."""
    psai.migrate()
    m = model()
    psai.set_budget(name="b", amount=1)
    record_usage(m, None, **CALL)
    first = psai.check_budget(model=m)
    with count_queries() as counter:
        assert psai.check_budget(model=m) == first
    statements = [str(query.msg[0]) for query in counter.get_queries()]
    if psai.db.is_postgres(psai.database.obj):
        # The budgets, then the state with the reservations (the model is a row given).
        assert len(statements) == 2 and "pg_current_snapshot" in statements[1], statements
        assert "psai_budget_reservations" in statements[1]
    other = psai.connect(backend.url, bind=False)
    with psai.using(other):
        held = psai.check_budget(model=m, estimate="0.5", reserve=True)
    other.close()
    with pytest.raises(psai.BudgetExceededError, match=r"0.36 spent and 0.50 held by reservations \+ 0.36"):
        psai.check_budget(model=m, estimate=CALL)
    (again,) = psai.check_budget(model=m)  # unchanged since: the reservation counted again
    assert again["spent"] == CALL_COST
    with pytest.raises(psai.BudgetExceededError, match="held by reservations"):
        psai.check_budget(model=m, estimate=CALL)
    held.release()
    assert psai.check_budget(model=m, estimate=CALL)[0]["spent"] == CALL_COST


def test_a_soft_budget_never_refuses(db, clock):
    m = model()
    psai.set_budget(name="soft", amount="0.1", hard=False)
    record_usage(m, None, **CALL)
    assert status("soft")["state"] == "exceeded"
    assert psai.check_budget(model=m) == []
    assert [e["threshold"] for e in psai.budget_events()] == [Decimal("0.8"), Decimal(1)]


@pytest.mark.parametrize("unpriced", ["block", "allow"])
def test_unpriced_usage_makes_the_state_unknown(db, clock, unpriced):
    good, bad = model("good"), model("bad")
    record_usage(good, None, **CALL)
    break_prices(bad)
    record_usage(bad, None, tokens_in=500, tokens_out=20)
    psai.set_budget(name="all", amount=10, unpriced=unpriced)
    found = status("all")
    assert (found["state"], found["spent"], found["unpriced_tokens"]) == ("unknown", CALL_COST, 520)
    if unpriced == "block":
        with pytest.raises(psai.BudgetExceededError, match="is unknown: 520 tokens cannot be priced"):
            psai.check_budget(model=good)
    else:
        assert psai.check_budget(model=good)[0]["state"] == "unknown"


def test_budgets_are_validated_and_nothing_is_written(db):
    m, a = model(), agent("a")
    for bad, path in [({"amount": 0}, "amount"), ({"amount": "ten"}, "amount"), ({"amount": float("nan")}, "amount"),
                      ({"amount": 5, "timezone": "Mars/Olympus"}, "timezone"),
                      ({"amount": 5, "period": "fortnight"}, "period"),
                      ({"amount": 5, "warn_at": (1.2,)}, "warn_at"),
                      ({"amount": 5, "currency": "dollars"}, "currency"),
                      ({"amount": 5, "agent": a, "model": m}, "scope"),
                      ({"amount": 5, "unpriced": "ignore"}, "unpriced")]:
        with pytest.raises(psai.ValidationError) as refused:
            psai.set_budget(**bad)
        assert path in str(refused.value)
    assert Budget.select().count() == 0
    with pytest.raises(psai.NotFoundError):
        psai.remove_budget("nothing")
    with pytest.raises(psai.NotFoundError):
        psai.set_budget(amount=1, agent=12345)


def test_set_budget_changes_the_budget_of_that_name(db, clock):
    m = model()
    psai.set_budget(name="b", amount="0.3")
    record_usage(m, None, **CALL)
    psai.set_budget(name="b", amount="10", warn_at=(0.5, 0.25))
    assert [b.name for b in psai.budgets()] == ["b"] and psai.budgets()[0].warn_at == [0.25, 0.5]
    assert status("b")["state"] == "ok"
    assert len(psai.budget_events()) == 2  # what was crossed before the change stays on record
    psai.remove_budget("b")
    assert psai.budgets() == [] and psai.budget_events() == []


# -- alerts ------------------------------------------------------------------------------

def test_each_threshold_fires_once_a_period_and_a_new_period_starts_clean(db, clock):
    m = model()
    psai.set_budget(name="daily", amount=1, period="day", warn_at=(0.5, 0.8))
    heard = []
    psai.on_budget_event(heard.append)
    try:
        at(clock, "2026-11-25T09:00:00+00:00")
        for _ in range(5):  # 0.36, 0.72, 1.08, 1.44, 1.80
            record_usage(m, None, **CALL)
        at(clock, "2026-11-26T00:00:00+00:00")  # the boundary
        record_usage(m, None, **CALL)
        assert status("daily")["spent"] == CALL_COST and status("daily")["state"] == "ok"
        record_usage(m, None, **CALL)
    finally:
        psai._budget_ledger.LISTENERS.remove(heard.append)
    events = psai.budget_events()
    assert [(e["period_start"].date().isoformat(), e["threshold"], e["spent"]) for e in events] == [
        ("2026-11-25", Decimal("0.5"), Decimal("0.72")), ("2026-11-25", Decimal("0.8"), Decimal("1.08")),
        ("2026-11-25", Decimal(1), Decimal("1.08")), ("2026-11-26", Decimal("0.5"), Decimal("0.72"))]
    assert heard == events
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    assert psai.budget_events(since="2026-11-26") == events[3:]


def test_a_listener_that_fails_does_not_fail_the_call(db, clock, caplog):
    m = model()
    psai.set_budget(name="b", amount="0.1")

    def broken(event):
        raise RuntimeError("listener down")
    psai.on_budget_event(broken)
    try:
        row = record_usage(m, None, **CALL)
    finally:
        psai._budget_ledger.LISTENERS.remove(broken)
    assert row.token_in_count == CALL["tokens_in"] and "listener down" in caplog.text
    assert len(psai.budget_events()) == 2


def test_eight_processes_crossing_a_threshold_fire_each_alert_once(backend):
    psai.migrate()
    from workers import record_until_refused
    workers = 8
    for limit in ("7.2", "12.6", "3.6"):  # rounds, each its own model and budget
        m = model("round %s" % limit)
        name = "limit %s" % limit
        psai.set_budget(name=name, amount=limit, model=m.name, warn_at=(0.5, 0.8))
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            results = [pool.apply_async(record_until_refused, (backend.url, m.id, 200)) for _ in range(workers)]
            made = sum(r.get(timeout=300) for r in results)
        psai.connect(backend.url)
        spent = status(name)["spent"]
        assert spent == made * CALL_COST == {r["model_id"]: r["cost"] for r in cost_report("model")}[m.id]
        # A check is a read: at most the calls in flight (one a worker) land past the limit.
        assert Decimal(limit) - CALL_COST < spent <= Decimal(limit) + (workers - 1) * CALL_COST
        events = [e for e in psai.budget_events() if e["budget"] == name]
        assert sorted(e["threshold"] for e in events) == [Decimal("0.5"), Decimal("0.8"), Decimal(1)]
        for event in events:  # each recorded by the call that crossed it: what was spent then
            assert event["threshold"] * Decimal(limit) <= event["spent"] \
                < event["threshold"] * Decimal(limit) + workers * CALL_COST


# -- track ------------------------------------------------------------------------------

_RESPONSE_IDS = itertools.count(1)


def openai_response(tokens_in=10_000, tokens_out=1_000):
    # Each call its own response id: one recorded twice is one call.
    return {"object": "chat.completion", "model": "gpt-4", "id": "chatcmpl-%d" % next(_RESPONSE_IDS), "choices": [],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                      "total_tokens": tokens_in + tokens_out}}


def test_track_with_a_budget_stops_before_the_call_that_would_pass_it(db, clock):
    m, a = model(), agent("script")
    psai.set_budget(name="script", amount=1, agent=a)
    calls = []
    with pytest.raises(psai.BudgetExceededError):
        with psai.track(a, m, budget=True) as run:
            for _ in range(10):
                run.check(estimate=CALL)  # before the call: what it would cost
                calls.append(openai_response())  # "the call"
                run.record(calls[-1])
    assert run.calls == len(calls) == 2  # a third would make 1.08
    assert status("script")["spent"] == Decimal("0.72")
    record_usage(m, a, **CALL)
    record_usage(m, a, **CALL)
    with pytest.raises(psai.BudgetExceededError):  # on entry
        with psai.track(a, m, budget=True):
            pass


def test_track_records_the_call_that_reaches_the_limit_then_stops(db, clock):
    m, a = model(), agent("script")
    psai.set_budget(name="script", amount="0.7", agent=a)
    with pytest.raises(psai.BudgetExceededError):
        with psai.track(a, m, budget=True) as run:
            for _ in range(10):
                run.record(openai_response())
    assert run.calls == 2 and status("script")["spent"] == Decimal("0.72")  # recorded, then stopped


# -- the command line -------------------------------------------------------------------

def test_budgets_on_the_command_line(backend, clock):
    psai.migrate()
    m, a = model(), agent("a")

    def run(*args):
        return CliRunner().invoke(cli, ["--database", backend.url, *args])
    made = run("budgets", "set", "--name", "team", "--amount", "0.5", "--agent", str(a.id), "--warn-at", "0.5",
               "--timezone", "Europe/Berlin", "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["scope"] == "agent=%d" % a.id
    assert run("budgets", "set", "--name", "x", "--amount", "1", "--agent", "1", "--model", "GPT-4").exit_code == 2
    assert run("budgets", "status").exit_code == 0
    first = run("usage", "record", str(m.id), "--agent", str(a.id), "--in", "10000", "--out", "1000")
    assert first.exit_code == 0 and "budget team: 50% of its limit reached (0.36 USD spent)" in first.stderr
    second = run("usage", "record", str(m.id), "--agent", str(a.id), "--in", "10000", "--out", "1000")
    assert "budget team: its limit reached (0.72 USD spent)" in second.stderr and "50%" not in second.stderr
    exceeded = run("budgets", "status", "--json")
    assert exceeded.exit_code == 3
    (row,) = json.loads(exceeded.stdout)
    assert (row["state"], row["spent"], row["limit"], row["period_start"]) == (
        "exceeded", "0.72", "0.5", "2026-11-01T00:00:00+01:00")
    events = json.loads(run("budgets", "events", "--json").stdout)
    assert [(e["budget"], e["threshold"]) for e in events] == [("team", "0.5"), ("team", "1")]
    assert "team" in run("budgets", "list").stdout
    assert run("budgets", "remove", "team").exit_code == 0
    assert run("budgets", "remove", "team").exit_code == 1
    assert run("budgets", "status").exit_code == 0


def test_the_html_report_shows_each_budget_against_its_limit(db, clock):
    m = model()
    assert "Budgets this period" not in psai.report.html()
    psai.set_budget(name="<b>team</b>", amount=1, warn_at=(0.5, 0.9))
    psai.set_budget(name="soft", amount="0.5", hard=False, period="total")
    record_usage(m, None, **CALL)
    record_usage(m, None, **CALL)
    page = psai.report.html()
    section = page[page.index("<h2>Budgets this period</h2>"):]
    section = section[:section.index("</section>")]
    assert "&lt;b&gt;team&lt;/b&gt;" in section and "<b>team</b>" not in section
    assert section.count('class="mark"') == 3  # 0.5 and 0.9 of one, 0.8 of the other
    assert 'class="spent warning" style="width:72.0%"' in section
    assert 'class="spent exceeded" style="width:100.0%"' in section and "exceeded (soft)" in section
    assert "0.7200 of 1.00 USD" in section and "2026-11-01 00:00 to 2026-12-01 00:00 UTC" in section


def test_a_budget_set_by_another_process_is_weighed_by_the_calls_after_the_recheck(backend, clock, monkeypatch):
    """SQLite asks for budgets at every call (a statement in the process);
    PostgreSQL asks a database seen without budgets again only
    NO_BUDGET_RECHECK seconds later (a round trip saved on every call). No
    alert is lost: the first call weighed raises every threshold reached."""
    psai.migrate()
    m = model()
    seconds = [1000.0]
    monkeypatch.setattr(psai._budget_ledger.time, "monotonic", lambda: seconds[0])
    record_usage(m, None, **CALL)  # no budget yet: seen so
    made = CliRunner().invoke(cli, ["--database", backend.url, "budgets", "set", "--name", "elsewhere",
                                    "--amount", "0.5", "--warn-at", "0.9"])
    assert made.exit_code == 0, made.output
    psai._budget_ledger._none_seen[psai.database.obj] = seconds[0]  # as this process saw it, before the budget
    heard = []
    psai.on_budget_event(heard.append)
    try:
        record_usage(m, None, **CALL)  # 0.72: past 0.45 and 0.5
        if psai.db.is_postgres():
            assert psai.budget_events() == [] and heard == []  # within the recheck: not weighed yet
            with pytest.raises(psai.BudgetExceededError, match="elsewhere"):
                psai.check_budget(model=m)  # which always reads the budgets
            seconds[0] += psai._budget_ledger.NO_BUDGET_RECHECK
            record_usage(m, None, **CALL)  # 1.08
    finally:
        psai._budget_ledger.LISTENERS.remove(heard.append)
    spent = Decimal("1.08") if psai.db.is_postgres() else Decimal("0.72")
    assert [(e["threshold"], e["spent"]) for e in psai.budget_events()] == [
        (Decimal("0.9"), spent), (Decimal(1), spent)]
    assert heard == psai.budget_events()


# -- usage whose counts cannot be read (issue 34) -------------------------------------------

@pytest.mark.parametrize("data", [
    {"usageNormalized": {"tokensIn": "10000", "tokensOut": "1000"}},  # counts as strings
    {"pricing": {}},  # no usageNormalized
    [1, 2, 3],  # data not an object
    "not json at all",
])
def test_items_whose_counts_cannot_be_read_make_the_budget_unknown(db, clock, data):
    m = model()
    at(clock, "2026-12-03T10:00:00+00:00")
    record_usage(m, None, **CALL)
    psai.set_budget(name="b", amount=10, period="month")
    assert status("b")["state"] == "ok"
    item = psai.PsModelUsageItem.get()
    psai.PsModelUsageItem.insert(user_id=1, model_id=m.id, agent_id=0, created_at=clock(), updated_at=clock(),
                                 data=item.data).execute()
    mark = "%s" if psai.db.is_postgres() else "?"
    stored = json.dumps(data) if not isinstance(data, str) or psai.db.is_postgres() else data
    psai.database.execute_sql('UPDATE "ps_model_usage_item" SET "data" = %s WHERE "id" = %s' % (mark, mark),
                              (stored, item.id))
    found = status("b")
    assert found["state"] == "unknown" and found["spent"] == CALL_COST and found["calls"] == 2
    with pytest.raises(psai.BudgetExceededError, match="unknown"):
        psai.check_budget(None, m)
    with pytest.raises(psai.UnpricedUsageError):
        cost_report("model", strict=True)  # what a strict report refuses, a budget does not count as $0


# -- reservations ----------------------------------------------------------------------------

def test_a_reservation_holds_its_estimate_until_the_call_is_recorded(db, clock):
    m = model()
    at(clock, "2026-12-03T10:00:00+00:00")
    psai.set_budget(name="b", amount=1, period="month")
    first = psai.check_budget(None, m, estimate=CALL, reserve=True)
    assert isinstance(first, psai.Reservation) and first.amount == CALL_COST and first.budgets == ("b",)
    psai.check_budget(None, m, estimate="0.28")  # 0.36 held + 0.28 < 1
    with pytest.raises(psai.BudgetExceededError, match="held by reservations"):
        psai.check_budget(None, m, estimate="0.65")
    second = psai.check_budget(None, m, estimate="0.5", reserve=True)
    with pytest.raises(psai.BudgetExceededError, match="would be passed"):
        psai.check_budget(None, m, estimate="0.2", reserve=True)  # 0.86 held
    second.release()
    second.release()  # idempotent
    record_usage(m, None, reservation=first, **CALL)  # settled: its real cost replaces the estimate
    assert status("b")["spent"] == CALL_COST
    assert psai.models.BudgetReservation.select().count() == 0
    third = psai.check_budget(None, m, estimate="0.6", reserve=True)
    with pytest.raises(psai.BudgetExceededError):
        psai.check_budget(None, m, estimate="0.1", reserve=True)
    clock.advance(minutes=11)  # RESERVATION_TTL: a process that died gives its hold back
    assert psai.check_budget(None, m, estimate="0.6", reserve=True).budgets == ("b",)
    third.release()
    with pytest.raises(psai.ValidationError, match="estimate"):
        psai.check_budget(None, m, reserve=True)


def test_track_with_budget_reserves_each_call(db, clock):
    m = model()
    at(clock, "2026-12-03T10:00:00+00:00")
    psai.set_budget(name="b", amount="0.5", period="month")
    response = {"model": "gpt-4", "usage": {"prompt_tokens": 10_000, "completion_tokens": 1_000}}
    with psai.track(None, m, budget=True) as run:
        run.check(estimate=CALL)
        assert psai.models.BudgetReservation.select().count() == 1
        with pytest.raises(psai.BudgetExceededError):
            psai.check_budget(None, m, estimate=CALL)  # the held call counts
        run.record(response, provider="openai")
        assert psai.models.BudgetReservation.select().count() == 0
        with pytest.raises(psai.BudgetExceededError):
            run.check(estimate=CALL)
    with psai.track(None, m, budget=True) as run:
        run.check(estimate="0.1")
    assert psai.models.BudgetReservation.select().count() == 0  # released at the block's end


def test_concurrent_processes_with_reservations_never_pass_a_hard_limit(db, backend, clock):
    """Four processes reserve, call and record until the budget refuses:
    exactly the calls the limit holds are made (today's docs allowed up to
    N-1 over without reservations)."""
    m = model()
    psai.set_budget(name="b", amount=str(CALL_COST * 10 + Decimal("0.2")), period="total")
    from workers import reserve_and_record
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        made = pool.starmap(reserve_and_record, [(backend.url, m.id, CALL)] * 4)
    assert sum(made) == 10
    assert status("b")["spent"] == CALL_COST * 10 and status("b")["calls"] == 10


# -- budgets that cannot stop a call (docs/reliability.md) --------------------------------------

def test_an_amount_out_of_bounds_is_refused_on_every_write_path(backend):
    psai.migrate()
    for amount in ("1e1000000", "1e-1000000", "1000000000000001", "0.0000000001", "1e999999999"):
        with pytest.raises(psai.ValidationError, match="amount: Must be at most 10\\*\\*15"):
            psai.set_budget(name="b", amount=amount)
        refused = CliRunner().invoke(cli, ["--database", backend.url, "budgets", "set", "--name", "b",
                                           "--amount", str(amount)])
        assert refused.exit_code == 2 and "Must be at most 10**15" in refused.output, refused.output
    assert Budget.select().count() == 0
    assert psai.set_budget(name="b", amount="1000000000000000").amount == "1000000000000000"
    assert psai.set_budget(name="b", amount="0.000000001").amount == "1E-9"


def hand_written(column, value):
    """Store a budget value as an older psai or another tool would (psai refuses it now)."""
    mark = "%s" if psai.db.is_postgres() else "?"
    psai.database.execute_sql('UPDATE "psai_budgets" SET "%s" = %s' % (column, mark), (value,))


@pytest.mark.parametrize("column, value, problem", [
    ("amount", "1e1000000", "amount: Must be at most 10**15"), ("amount", "ten", "amount: Not an amount"),
    ("amount", "-5", "amount: Must be more than 0"), ("timezone", "Mars/Olympus", "timezone: Not an IANA"),
    ("period", "hourly", "period: Must be one of"), ("warn_at", '"0.8"', "warn_at: Not a valid list"),
    ("warn_at", "[1e400]", "warn_at"), ("warn_at", "5", "warn_at"), ("currency", "", "currency")])
def test_nothing_a_stored_budget_holds_stops_a_call_from_being_recorded(backend, clock, column, value, problem):
    psai.migrate()
    m = model()
    psai.set_budget(name="stored", amount="0.1", model=m.name)
    record_usage(m, None, **CALL)  # its alerts while it was sound
    hand_written(column, value)
    for _ in range(2):
        record_usage(m, None, **CALL)
    assert sum(row.token_in_count for row in psai.PsModelUsage.select()) == 3 * CALL["tokens_in"]
    assert [e["threshold"] for e in psai.budget_events()] == [Decimal("0.8"), Decimal(1)]  # none since
    (invalid,) = psai.budget_status()
    assert invalid["state"] == "invalid" and problem in invalid["problem"] and invalid["limit"] is None
    with pytest.raises(psai.BudgetExceededError, match="budget 'stored' .* cannot be used: .*" + problem[:8]):
        psai.check_budget(model=m)
    shown = CliRunner().invoke(cli, ["--database", backend.url, "budgets", "status"])
    assert shown.exit_code == 0 and "invalid" in shown.stdout, shown.output
    for command in ("list", "events"):
        listed = CliRunner().invoke(cli, ["--database", backend.url, "budgets", command])
        assert listed.exit_code == 0 and "stored" in listed.stdout, listed.output
    assert "invalid" in psai.report.html()
    psai.set_budget(name="stored", amount="0.1", model=m.name)  # set again: usable, and it counts what was spent
    assert status("stored")["state"] == "exceeded"


def test_a_budget_removed_while_a_call_records_never_fails_the_call(backend, clock, monkeypatch):
    """The budget goes between the call's read of the budgets covering it
    and the alert it writes: the call is recorded once, no error (before:
    a foreign-key error, the call lost, or, on PostgreSQL's one round trip,
    committed and raised, so a retry counted it twice)."""
    psai.migrate()
    m = model()
    covering = psai._recording.budgets_covering

    def then_removed(db, model_row, agent_row, attribution):
        found = covering(db, model_row, agent_row, attribution)
        if found and psai.budgets():
            psai.remove_budget(found[0].name)  # between the call's read of its budgets and its transaction
        return found
    monkeypatch.setattr(psai._recording, "budgets_covering", then_removed)
    for _ in range(2):
        psai.set_budget(name="going", amount="0.1", model=m.name)
        record_usage(m, None, **CALL)
        assert psai.budgets() == []
    assert psai.PsModelUsageItem.select().count() == 2
    assert sum(row.token_in_count for row in psai.PsModelUsage.select()) == 2 * CALL["tokens_in"]


def test_budgets_set_and_removed_while_processes_record_lose_no_call(backend):
    psai.migrate()
    from workers import record_many
    m = model()
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        results = [pool.apply_async(record_many, (backend.url, m.id, None, 150, seed)) for seed in range(3)]
        psai.connect(backend.url)
        while not all(r.ready() for r in results):
            psai.set_budget(name="flicker", amount="0.000001", model=m.name, warn_at=(0.5,))
            psai.remove_budget("flicker")
        assert all(r.get(timeout=300) for r in results)  # a call that failed fails here
    psai.connect(backend.url)
    assert psai.PsModelUsageItem.select().count() == 450


def test_one_new_budget_set_by_processes_at_once_is_one_budget(backend, tmp_path):
    """Before, on PostgreSQL: both read no budget of that name, then one of
    the two inserts failed on the unique name (an IntegrityError)."""
    psai.migrate()
    from workers import set_new_budgets
    names = ["same %d" % i for i in range(40)]
    barrier = str(tmp_path / "start")
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = [pool.apply_async(set_new_budgets, (backend.url, names, amount, barrier))
                   for amount in ("1", "2", "3", "4")]
        while not all(os.path.exists("%s.ready.%s" % (barrier, amount)) for amount in ("1", "2", "3", "4")):
            time.sleep(0.01)
        open(barrier, "w").close()
        amounts = [r.get(timeout=300) for r in results]  # a duplicate-key error fails here
    psai.connect(backend.url)
    assert [b.name for b in psai.budgets()] == sorted(names)
    assert {b.amount for b in psai.budgets()} <= set(amounts)


def test_budgets_set_refuses_what_it_would_misread(backend):
    psai.migrate()

    def run(*args):
        return CliRunner().invoke(cli, ["--database", backend.url, "budgets", "set", "--name", "b", "--amount", "5",
                                        *args])
    only = run("--agent-only")
    assert only.exit_code == 2 and "--agent-only needs --agent" in only.output, only.output
    for zone in ("localtime", "posixrules", "posix/Europe/Berlin"):
        local = run("--timezone", zone)
        assert local.exit_code == 2 and "timezone: Depends on the host" in local.output, local.output
        with pytest.raises(psai.ValidationError, match="timezone: Depends on the host"):
            psai.set_budget(amount=5, timezone=zone)
    with pytest.raises(psai.ValidationError, match="include_sub_agents: .*an agent"):
        psai.set_budget(amount=5, include_sub_agents=False)
    assert Budget.select().count() == 0


@pytest.mark.parametrize("prices", [None, "30 USD", [30, 60], 5])
def test_track_records_a_call_of_a_model_whose_stored_prices_are_not_an_object(db, clock, prices):
    """Before: the call was recorded, then record() raised AttributeError."""
    m = model()
    mark = "%s" if psai.db.is_postgres() else "?"
    psai.database.execute_sql('UPDATE "ps_ai_models" SET "configuration" = %s WHERE "id" = %s' % (mark, mark),
                              (json.dumps(dict(m.configuration, prices=prices)), m.id))
    with psai.track(None, m.id) as run:
        assert run.record(openai_response()) is None
    assert (run.calls, run.unpriced_calls, run.cost) == (1, 1, {})
    assert psai.PsModelUsageItem.select().count() == 1
