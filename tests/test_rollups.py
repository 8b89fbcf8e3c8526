"""Rollups (psai.rollups, docs/rollups.md): kept by triggers, every report
read from them equals the report from a full scan of the items, whoever
wrote the items (psai, PolicySynth, SQL by hand: inserts, edits in place,
deletes), on both backends; a rollup made wrong by hand is found and
repaired."""
import contextlib
import copy
import datetime
import json
import math
import random
import time

import pytest
from click.testing import CliRunner
from peewee import Value

import psai
from psai import PsAgent, PsAiModel, PsModelUsageItem, _budget_ledger, _history, rollups
from psai._check import check
from psai._sql import counter_totals_trigger_sql, drop_counter_totals_triggers_sql, drop_summary_triggers_sql
from psai.models import usage_counters
from psai.db import is_postgres
from psai.cli import cli
from psai.fields import UTC
from psai.reports import REPORT_GROUPINGS, cost_report, cost_reports, daily_costs

from conftest import make_configuration

DAY0 = datetime.datetime(2026, 11, 20, tzinfo=UTC)
DAYS = 6


@contextlib.contextmanager
def full_scan(db):
    """Reports inside read every item: the triggers dropped in a transaction rolled back after."""
    with db.atomic() as transaction:
        rollups.disable(db)
        assert not rollups.enabled(db)
        yield
        transaction.rollback()


def models():
    # Tokens priced apart (audio input, 12-hour cache writes) priced on "plain", unpriced on the others.
    apart_prices = dict(make_configuration()["prices"], costInAudioTokensPerMillion=40,
                        cacheWrite12hInputCostMultiplier=2)
    plain = PsAiModel.create(user_id=1, organization_id=1, name="plain",
                             configuration=make_configuration(prices=apart_prices))
    long_prices = dict(make_configuration()["prices"], longContextTokenThreshold=200_000,
                       longContextCostInTokensPerMillion=60, longContextCostOutTokensPerMillion=120,
                       longContextCostInCachedContextTokensPerMillion=20, cacheWriteInputCostMultiplier=1.25)
    long = PsAiModel.create(user_id=1, organization_id=1, name="long",
                            configuration=make_configuration(provider="anthropic", prices=long_prices))
    euro = PsAiModel.create(user_id=1, organization_id=1, name="euro", configuration=make_configuration(
        prices=dict(make_configuration()["prices"], currency="EUR", flexTokensIn=1, flexTokensOut=2,
                    flexTokensCachedIn=0.5)))
    return [plain, long, euro]


def agents():
    root = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "root"})
    child = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "child"}, parent_agent=root)
    other = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "other"})
    return [root, child, other]


def moment(rng):
    """A time on one of the days, often at the very edges of a day."""
    day = DAY0 + datetime.timedelta(days=rng.randrange(DAYS))
    edge = rng.random()
    if edge < 0.2:
        return day
    if edge < 0.4:
        return day + datetime.timedelta(days=1) - datetime.timedelta(microseconds=1)
    return day + datetime.timedelta(seconds=rng.randrange(86400))


def windows(rng):
    """Report periods: everything, whole days (a date until is inclusive), and times inside days."""
    day = (DAY0 + datetime.timedelta(days=rng.randrange(DAYS))).date()
    start, end = sorted([moment(rng), moment(rng)])
    return [(None, None), (day, day + datetime.timedelta(days=2)), (start, end), (None, end), (start, None),
            (day, None)]


def reports_equal_a_full_scan(db, rng):
    for since, until in windows(rng):
        for by in REPORT_GROUPINGS:
            rolled = cost_report(by, since=since, until=until)
            with full_scan(db):
                scanned = cost_report(by, since=since, until=until)
            assert rolled == scanned, (by, since, until)
        rolled_days = daily_costs(since=since, until=until)
        with full_scan(db):
            assert rolled_days == daily_costs(since=since, until=until), (since, until)
        # The HTML page's one pass gives every grouping's rows, and the days', as they are alone.
        together, days = cost_reports(REPORT_GROUPINGS, since=since, until=until)
        assert days == rolled_days, (since, until)
        for by in REPORT_GROUPINGS:
            assert together[by] == cost_report(by, since=since, until=until), (by, since, until)
    # Every budget's status (its period's spending, read from the rollups) as a full scan gives it.
    rolled_status = psai.budget_status()
    with full_scan(db):
        assert rolled_status == psai.budget_status()


def record(rng, clock, ms, ags):
    clock.set(moment(rng))
    tokens_in = rng.choice([0, 1, 999, 150_000, 200_000, 250_000])
    cached = rng.randrange(tokens_in + 1) if rng.random() < 0.3 else 0
    write = rng.randrange(tokens_in - cached + 1) if rng.random() < 0.2 else 0
    audio_in = rng.randrange(tokens_in - cached - write + 1) if rng.random() < 0.25 else 0
    psai.record_usage(rng.choice(ms), rng.choice(ags + [None]), tokens_in=tokens_in, audio_in_tokens=audio_in,
                      tokens_out=rng.randrange(100, 5000),  # holds the reasoning tokens
                      cached_tokens=cached, cache_write_tokens=write,
                      reasoning_tokens=rng.choice([0, 0, 100]), web_searches=rng.choice([0, 0, 2]),
                      connector_id=rng.choice([None, None, 5]),
                      provider_metadata=rng.choice([None, None, {"appliedServiceTier": "flex"}]))


def raw_item(rng, ms, ags):
    """An item as PolicySynth's own processes write one: no psai involved,
    at any time (backdated too), sometimes without a snapshot or odd."""
    template = rng.choice(list(PsModelUsageItem.select()))
    data = copy.deepcopy(template.data) if isinstance(template.data, dict) else {}
    data["usageNormalized"] = dict(data.get("usageNormalized") or {}, tokensIn=rng.choice([10, 210_000]),
                                   tokensOut=rng.randrange(100))
    shape = rng.random()
    model = rng.choice(ms)
    if shape < 0.2:
        # No snapshot: the model's current prices (and threshold) price it. (Of the model never
        # repriced here: reprice fails on such items, a defect of its own, left to its work.)
        model = ms[2]
        data["pricing"] = {}
    elif shape < 0.3:
        data["usageNormalized"]["tokensIn"] = "many"  # unreadable: unpriced
    elif shape < 0.4:
        data["psai"] = dict(data.get("psai") or {}, providerCost=rng.choice([0.25, 0.5, 1.125]))
    elif shape < 0.5:  # tokens priced apart: 12-hour cache writes (among the writes), audio input
        data["usageNormalized"]["tokensIn"] = 210_000
        data["psai"] = dict(data.get("psai") or {}, cacheWriteTokens=900, cacheWrite12hTokens=rng.choice([300, 900]),
                            audioInTokens=rng.choice([0, 50]))
    elif shape < 0.56:  # a count no call has (written by hand): unusable, the item unpriced
        data["usageNormalized"][rng.choice(["tokensOut", "cachedInTokens", "reasoningTokens"])] = rng.choice(
            [-5, 2**31, 1e300])
    stamp = moment(rng)
    return dict(user_id=1, model_id=model.id, agent_id=rng.choice(ags).id, connector_id=None, created_at=stamp,
                updated_at=stamp, data=data)


def raw_insert(rng, ms, ags):
    PsModelUsageItem.insert(**raw_item(rng, ms, ags)).execute()


def edit_in_place(rng, items):
    """An item's data changed by hand: other counts, no usage, another snapshot, not an object."""
    item = PsModelUsageItem.get_by_id(rng.choice(items).id)
    data = copy.deepcopy(item.data) if isinstance(item.data, dict) else {}
    shape = rng.random()
    if shape < 0.4:
        data["usageNormalized"] = dict(data.get("usageNormalized") or {}, tokensIn=rng.choice([5, 230_000]))
    elif shape < 0.6:
        data.pop("usageNormalized", None)
    elif shape < 0.7:
        data["psai"] = dict(data.get("psai") or {}, providerCost=0.75)
    elif shape < 0.8:  # 12-hour writes and audio input added, or a count made unusable
        if rng.random() < 0.5:
            data["psai"] = dict(data.get("psai") or {}, cacheWriteTokens=4, cacheWrite12hTokens=4, audioInTokens=1)
        else:
            data["usageNormalized"] = dict(data.get("usageNormalized") or {}, tokensOut=-1)
    else:
        data = [1, 2]
    PsModelUsageItem.update(data=data).where(PsModelUsageItem.id == item.id).execute()


def act(rng, clock, ms, ags, db):
    what = rng.random()
    items = list(PsModelUsageItem.select(PsModelUsageItem.id))
    if what < 0.35 or not items:
        record(rng, clock, ms, ags)
        return "record"
    if what < 0.5:
        raw_insert(rng, ms, ags)
        return "raw insert"
    if what < 0.57:  # backdated, or moved across midnight
        PsModelUsageItem.update(created_at=moment(rng)).where(PsModelUsageItem.id == rng.choice(items).id).execute()
        return "moved"
    if what < 0.62:
        PsModelUsageItem.delete().where(PsModelUsageItem.id == rng.choice(items).id).execute()
        return "deleted"
    if what < 0.68:
        edit_in_place(rng, items)
        return "edited"
    if what < 0.75:  # a day that has calls of the model
        item = PsModelUsageItem.get_by_id(rng.choice(items).id)
        if item.model_id == ms[2].id:
            return "reprice of nothing"
        day = item.created_at.date()
        try:
            result = psai.reprice(item.model_id, {"costInTokensPerMillion": rng.choice([20, 40])}, since=day,
                                  until=day, dry_run=False)
        except psai.ValidationError:  # the day's calls in two currencies (raw items copied from another model)
            return "reprice of nothing"
        return "repriced" if result["applied"] else "reprice of nothing"
    if what < 0.82:  # a new long-context threshold: items without a snapshot split by it anew
        model = ms[2]  # the model of the items without a snapshot
        configuration = copy.deepcopy(model.configuration)
        configuration["prices"]["longContextTokenThreshold"] = rng.choice([5, 100_000, 220_000])
        configuration["prices"].setdefault("longContextCostInTokensPerMillion", 50)
        configuration["prices"].setdefault("longContextCostOutTokensPerMillion", 70)
        model.configuration = configuration
        model.save()
        return "threshold"
    if what < 0.88:
        rollups.rebuild(db)
        return "rebuilt"
    if what < 0.92 and len(ags) > 1:
        ags.pop(rng.randrange(len(ags))).delete_instance()  # its usage is reported without an agent
        return "agent deleted"
    psai.audit(dry_run=False)
    return "audit"


@pytest.mark.parametrize("seed", [1, 2])
def test_randomized_histories_report_as_a_full_scan(db, clock, seed):
    rng = random.Random(seed)
    ms, ags = models(), agents()
    # Budgets over periods that hold some of the days, all of them, or one.
    psai.set_budget(name="all", amount=1000, period="total")
    psai.set_budget(name="day", amount=1, period="day", timezone="America/New_York")
    psai.set_budget(name="plain", amount=5, period="week", model="plain")
    psai.set_budget(name="tree", amount=5, period="month", agent=ags[0], currency="EUR")
    for _ in range(12):
        record(rng, clock, ms, ags)
    assert len(rollups.read_plan(db).days) == len({i.created_at.date() for i in PsModelUsageItem.select()})
    used, done = 0, set()
    for step in range(80):
        done.add(act(rng, clock, ms, ags, db))
        used += len(rollups.read_plan(db).days)
        if step % 5 == 4:
            reports_equal_a_full_scan(db, rng)
            assert rollups.verify(db) == []  # the triggers kept every day exact, with no rebuild
    assert used > 0  # the reports did read rollups
    assert done >= {"record", "raw insert", "moved", "deleted", "edited", "threshold", "rebuilt"}, done
    assert rollups.verify(db) == []
    reports_equal_a_full_scan(db, rng)
    assert any(row["reasoning_tokens"] for row in cost_report("model"))  # the rows compared count some


def test_a_huge_count_adds_exactly_whichever_source_reads_it(db, clock, seed_model):
    """Counts no call has (so the items are unpriced) read from the rollups
    for one day and from the items for a partial one: the two sums
    meet as PostgreSQL numerics (Decimals, which add in 28 digits unless
    made ints first). They used to meet in an order set by hash seeds, and
    the report differed from a full scan by the 48 tokens."""
    data = {"modelType": "text", "usageNormalized": {"tokensIn": 10, "tokensOut": 10**300}}
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=clock(), updated_at=clock(),
                            data=data).execute()
    clock.advance(days=1)
    data = {"modelType": "text", "usageNormalized": {"tokensIn": 10, "tokensOut": 48, "cachedInTokens": -5}}
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=clock(), updated_at=clock(),
                            data=data).execute()
    until = clock() + datetime.timedelta(hours=1)  # a partial day: read from the items
    assert rollups.read_plan(db, None, until).days == ("2026-11-25",)
    rolled = cost_report("model", until=until)
    with full_scan(db):
        scanned = cost_report("model", until=until)
    if is_postgres(db):
        assert rolled == scanned
        assert rolled[0]["tokens_out"] == 10**300 + 48 and rolled[0]["cost"] is None and rolled[0]["calls"] == 2
    else:  # SQLite keeps a number past 2**63 as a float (REAL): its sums are a float's
        assert math.isclose(rolled[0]["tokens_out"], scanned[0]["tokens_out"], rel_tol=1e-15)
        assert rolled[0]["calls"] == scanned[0]["calls"] == 2 and rolled[0]["cost"] is scanned[0]["cost"] is None


def test_writes_by_anyone_are_in_the_next_report(db, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=10, tokens_out=1)
    assert rollups.read_plan(db).days == ("2026-11-25",)  # the trigger kept it from the first call
    clock.advance(days=1)
    psai.record_usage(seed_model, None, tokens_in=10, tokens_out=1)
    # PolicySynth writes an item: the trigger folds it, in PolicySynth's own transaction.
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=clock(), updated_at=clock(),
                            data=PsModelUsageItem.get().data).execute()
    plan = rollups.read_plan(db)
    assert plan.days == ("2026-11-25", "2026-11-26") and not plan.reads_items
    assert [(d["items"], d["rolled_up"], d["state"]) for d in rollups.status(db)] == [(1, 1, "current"),
                                                                                      (2, 2, "current")]
    assert cost_report("model")[0]["calls"] == 3
    PsModelUsageItem.delete().where(PsModelUsageItem.id == 1).execute()
    assert cost_report("model")[0]["calls"] == 2 and rollups.read_plan(db).days == ("2026-11-26",)


@pytest.mark.parametrize("how", ["peewee", "sql"])
def test_an_item_edited_in_place_or_deleted_by_hand_shows_in_the_next_report_and_budget(db, backend, clock,
                                                                                       seed_model, how):
    """The issue's case: an item's data edited in place so that its usage
    cannot be priced makes the budget "unknown" at once (it used to stay
    "ok" on the old figures); deleting it takes its cost off."""
    for _ in range(3):
        psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=100)
    psai.set_budget(name="b", amount=10, period="month")
    assert psai.budget_status("b")[0]["state"] == "ok"
    spent = psai.budget_status("b")[0]["spent"]
    item = PsModelUsageItem.select().order_by(PsModelUsageItem.id).first()
    data = dict(item.data, usageNormalized={"tokensIn": "a lot", "tokensOut": 100})
    if how == "peewee":
        PsModelUsageItem.update(data=data).where(PsModelUsageItem.id == item.id).execute()
    else:
        db.execute_sql('UPDATE "ps_model_usage_item" SET "data" = %s WHERE "id" = %s' % (db.param, db.param),
                       (json.dumps(data), item.id))
    status = psai.budget_status("b")[0]
    assert status["state"] == "unknown" and status["spent"] < spent
    with pytest.raises(psai.BudgetExceededError, match="unknown"):
        psai.check_budget()
    with full_scan(db):
        scanned = cost_report("model")
    assert cost_report("model") == scanned
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item.id).execute()
    assert psai.budget_status("b")[0]["state"] == "ok"
    assert psai.budget_status("b")[0]["calls"] == 2 and cost_report("model")[0]["calls"] == 2
    assert rollups.verify(db) == []


def corrupt(db):
    """A rollup row edited by hand."""
    db.execute_sql('UPDATE "psai_usage_rollup" SET "fresh_in" = "fresh_in" + 1000000 WHERE "id" = '
                   '(SELECT MIN("id") FROM "psai_usage_rollup")')


def test_a_rollup_made_wrong_is_found_by_verify_and_check_and_repaired_by_rebuild(db, clock, seed_model):
    for _ in range(3):
        psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    with full_scan(db):
        right = cost_report("model")
    assert rollups.verify(db) == [] and not [p for p in check() if p["table"] == "psai_usage_rollup"]
    corrupt(db)
    assert cost_report("model") != right  # reports trust the rollups
    problems = rollups.verify(db)
    assert [p["day"] for p in problems] == ["2026-11-25"] and "differ" in problems[0]["problem"]
    assert [p["id"] for p in check() if p["table"] == "psai_usage_rollup"] == ["2026-11-25"]
    assert rollups.rebuild(db, since="2026-11-25", until="2026-11-25") == ["2026-11-25"]
    assert rollups.verify(db) == [] and cost_report("model") == right


def test_reports_and_budgets_over_every_agent_read_the_rollups_summaries(db, clock, seed_model):
    for agent in agents() + [None]:
        psai.record_usage(seed_model, agent, tokens_in=1000, tokens_out=10)
    # Counted beyond the items (a counter written by another tool): reports add what no item covers.
    db.execute_sql('UPDATE "ps_model_usage" SET "token_in_count" = "token_in_count" + 5000 WHERE "id" = '
                   '(SELECT MIN("id") FROM "ps_model_usage")')
    psai.set_budget(name="all", amount=1000, period="day")

    def reads():
        return cost_report("model"), cost_report("agent"), psai.budget_status()

    with full_scan(db):
        right = reads()
    assert reads() == right and right[0][0]["calls"] == 4
    # One row for the model's calls of every agent; the tokens per (model, agent, connector).
    assert db.execute_sql('SELECT COUNT(*), SUM("calls") FROM "psai_model_rollup"').fetchone() == (1, 4)
    # (An item without an agent has agent 0, its counter row none: two keys a report adds up as one.)
    assert [int(v) for v in db.execute_sql('SELECT SUM("calls"), SUM("all_in"), SUM("counter_rows") FROM '
                                           '"psai_key_totals"').fetchone()] == [4, 4000, 4]
    # What reads which: a summary made wrong by hand shows where it is read, and verify names it.
    db.execute_sql('UPDATE "psai_model_rollup" SET "fresh_in" = "fresh_in" + 1000000')
    _budget_ledger._KEPT.clear()  # (a check keeps what it read of a day until the day's count moves)
    wrong = reads()
    assert wrong[0] != right[0] and wrong[1] == right[1] and wrong[2] != right[2]
    (problem,) = rollups.verify(db)
    assert problem["day"] == "2026-11-25" and "rollups without agents differ from its rollups" in problem["problem"]
    rollups.rebuild(db, since="2026-11-25", until="2026-11-25")
    assert rollups.verify(db) == [] and reads() == right
    # Items that seem to cover the counters: what they do not is no longer counted.
    db.execute_sql('UPDATE "psai_key_totals" SET "all_in" = "all_in" + 1000000')
    assert cost_report("model")[0]["cost"] < right[0][0]["cost"] and cost_report("agent") != right[1]
    (problem,) = rollups.verify(db)
    assert "tokens per model, agent and connector differ from its rollups" in problem["problem"]
    assert rollups.verify(db, since="2026-11-25") == []  # every day's totals: checked only over every day
    rollups.rebuild(db, since="2026-11-25", until="2026-11-25")
    assert rollups.verify(db) == [] and reads() == right
    # The counter rows' totals, kept by triggers on ps_model_usage: made wrong by hand, the uncounted
    # rest is missed, and verify names them; a fold that failed (PostgreSQL) or triggers made for other
    # counters than the table has are not read.
    kept = 'SELECT SUM("counter_rows"), SUM("counted_in") FROM "psai_key_totals" WHERE "counter_rows" > 0'
    assert [int(v) for v in db.execute_sql(kept).fetchone()] == [4, 9000]
    db.execute_sql('UPDATE "psai_key_totals" SET "counted_in" = 0')
    assert cost_report("model")[0]["cost"] < right[0][0]["cost"]
    (problem,) = rollups.verify(db)
    assert "counter totals differ from its counter rows" in problem["problem"]
    db.execute_sql('INSERT INTO "psai_key_totals" ("group_key", "counter_rows", "counted_in", "counted_out") '
                   "VALUES ('stale', 0, 0, 0)")
    assert reads() == right and [p["problem"].split(" differ")[0] for p in rollups.verify(db)] == [
        "its counter totals"]
    rollups.rebuild(db)
    assert rollups.verify(db) == [] and reads() == right
    present, output = usage_counters(db), {c for c in usage_counters(db) if "_out_" in c}
    for statement in drop_counter_totals_triggers_sql(is_postgres(db)) + counter_totals_trigger_sql(
            is_postgres(db), present[1:], output):
        db.execute_sql(statement)
    db.execute_sql('UPDATE "psai_key_totals" SET "counted_in" = 0')
    assert reads() == right
    rollups.rebuild(db)
    assert rollups.verify(db) == [] and reads() == right
    assert [int(v) for v in db.execute_sql(kept).fetchone()] == [4, 9000]
    # A rollup row changed by hand (or by anything) changes its summaries in the same statement.
    corrupt(db)
    assert [p["problem"].split(" differ")[0] for p in rollups.verify(db)] == ["its rollups"]
    rollups.rebuild(db)
    # Without their triggers the summaries are not read: the rollups are.
    for statement in drop_summary_triggers_sql(is_postgres(db)):
        db.execute_sql(statement)
    assert rollups.enabled(db) and not rollups.summaries_enabled(db)
    db.execute_sql('UPDATE "psai_model_rollup" SET "fresh_in" = "fresh_in" + 1000000')
    db.execute_sql('UPDATE "psai_key_totals" SET "all_in" = "all_in" + 1000000')
    assert reads() == right
    rollups.enable(db)
    assert rollups.summaries_enabled(db) and rollups.verify(db) == [] and reads() == right


@pytest.mark.parametrize("table, column, named", [("psai_usage_slots", "fresh_in", "15-minute budget slots"),
                                                    ("psai_attribution_ledger", "out", "attribution ledger rows")])
def test_slots_and_ledger_made_wrong_are_found_by_verify_and_repaired_by_rebuild(db, clock, seed_model, table,
                                                                                column, named):
    for _ in range(3):
        psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10, user="ana", tags={"team": "search"})
    assert rollups.verify(db) == []
    db.execute_sql('UPDATE "%s" SET "%s" = "%s" + 7 WHERE "id" = (SELECT MIN("id") FROM "%s")'
                   % (table, column, column, table))
    problems = rollups.verify(db)
    assert [p["day"] for p in problems] == ["2026-11-25"]
    assert named in problems[0]["problem"] and "the sums differ" in problems[0]["problem"]
    db.execute_sql('DELETE FROM "%s"' % table)  # rows missing: named by how many
    (problem,) = rollups.verify(db)
    assert named in problem["problem"] and "groups differ" in problem["problem"]
    rollups.rebuild(db, since="2026-11-25", until="2026-11-25")
    assert rollups.verify(db) == []


def test_what_a_trigger_cannot_fold_is_read_from_the_items_and_named_by_check(db, backend, clock, seed_model):
    """A time psai does not store (SQLite: other text; PostgreSQL: infinity)
    never fails the writer: the item is marked, reports read it from the
    items, ``psai check`` names it, and an edit or delete unmarks it."""
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    item = PsModelUsageItem.get()
    odd = "2026-11-25T10:00:00Z" if backend.kind == "sqlite" else "infinity"
    db.execute_sql('INSERT INTO "ps_model_usage_item" ("user_id", "model_id", "agent_id", "created_at", '
                   '"updated_at", "data") VALUES (1, %s, 0, %s, %s, %s)' % ((db.param,) * 4),
                   (seed_model.id, odd, odd, json.dumps(item.data)))
    odd_id = PsModelUsageItem.select(PsModelUsageItem.id).order_by(PsModelUsageItem.id.desc()).scalar()
    assert [m["item"] for m in rollups.unfolded(db)] == [odd_id]
    assert [p["id"] for p in check() if p["table"] == "ps_model_usage_item"] == [odd_id]  # named once
    assert [day["day"] for day in rollups.status(db)] == ["2026-11-25"]
    plan = rollups.read_plan(db)
    assert plan.days == ("2026-11-25",) and plan.unfolded
    with full_scan(db):
        scanned = cost_report("model")
    assert scanned[0]["calls"] == 2 and cost_report("model") == scanned
    assert rollups.rebuild(db) == ["2026-11-25"] and [m["item"] for m in rollups.unfolded(db)] == [odd_id]
    db.execute_sql('UPDATE "ps_model_usage_item" SET "created_at" = %s WHERE "id" = %s' % (db.param, db.param),
                   (PsModelUsageItem.created_at.db_value(clock()), odd_id))
    assert rollups.unfolded(db) == [] and not rollups.read_plan(db).unfolded
    assert cost_report("model") == scanned and rollups.verify(db) == []


def test_psai_writers_that_change_items_in_place_are_in_the_next_report(db, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=1_000_000, tokens_out=0)
    psai.reprice(seed_model, {"costInTokensPerMillion": 10}, dry_run=False)
    assert rollups.read_plan(db).days == ("2026-11-25",)  # the triggers refolded the items reprice changed
    assert str(cost_report("model")[0]["cost"]) == "10"
    assert rollups.verify(db) == []


def test_a_correction_folds_its_items_once_and_keeps_every_trigger(db, backend, clock, seed_model, monkeypatch):
    """reprice --apply changes many items in one UPDATE: on SQLite they are
    folded out and in by whole statements, the row triggers dropped and made
    again in the same transaction. The rollups, slots and attribution
    ledger come out as a rebuild makes them, an item marked unfolded stays
    marked, the triggers are all there after, and a correction that fails
    leaves the triggers and the rollups as they were."""
    other = PsAiModel.create(user_id=1, organization_id=1, name="other", configuration=make_configuration())
    for hours in (0, 7, 30, 49):  # three UTC days; the middle one only partly corrected
        clock.set(datetime.datetime(2026, 11, 23, 3, tzinfo=UTC) + datetime.timedelta(hours=hours))
        psai.record_usage(seed_model, None, tokens_in=1000 + hours, tokens_out=10, user="ann", session="s1",
                          tags={"team": "red"})
        psai.record_usage(seed_model, None, tokens_in=500, tokens_out=5)
        psai.record_usage(other, None, tokens_in=700, tokens_out=7, user="bob")
    item = PsModelUsageItem.get()
    odd = "2026-11-24T10:00:00Z" if backend.kind == "sqlite" else "infinity"
    db.execute_sql('INSERT INTO "ps_model_usage_item" ("user_id", "model_id", "agent_id", "created_at", '
                   '"updated_at", "data") VALUES (1, %s, 0, %s, %s, %s)' % ((db.param,) * 4),
                   (seed_model.id, odd, odd, json.dumps(item.data)))
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, data=[1, 2], created_at=clock(),
                            updated_at=clock()).execute()
    marked = rollups.unfolded(db)
    assert len(marked) == 1

    def kept():
        tables = ("psai_usage_rollup", "psai_usage_slots", "psai_attribution_ledger")
        return [sorted(map(repr, db.execute_sql('SELECT * FROM "%s"' % t).fetchall())) for t in tables]

    def triggers_on():
        return rollups.enabled(db) and rollups.ledger_enabled(db) and rollups.slots_enabled(db)

    before = kept()
    monkeypatch.setattr(_history, "item_reprice_sql", lambda *args: "UPDATE no_such_table SET x = 1")
    with pytest.raises(Exception, match="no_such_table"):
        psai.reprice(seed_model, {"costInTokensPerMillion": 20}, dry_run=False)
    monkeypatch.undo()
    assert triggers_on() and kept() == before  # nothing folded out stays so

    result = psai.reprice(seed_model, {"costInTokensPerMillion": 20}, since="2026-11-24T05:00:00Z", dry_run=False)
    assert result["calls"] == 6 and kept() != before  # 4 recorded, the odd time, the list
    assert triggers_on() and rollups.unfolded(db) == marked
    assert rollups.verify(db) == []  # rollups, slots and ledger as a rebuild makes them
    with full_scan(db):
        scanned = [cost_report("model"), cost_report("user"), cost_report("tag:team")]
    assert [cost_report("model"), cost_report("user"), cost_report("tag:team")] == scanned
    psai.record_usage(seed_model, None, tokens_in=1, tokens_out=1, user="ann")  # the triggers fold again
    assert rollups.verify(db) == []

    if backend.kind == "postgres":  # its triggers fold a statement at once: nothing prepared
        return
    # SQLite: the triggers taken off between the folds' preparing (before the write
    # lock) and the correction: it is prepared again, and corrects without them.
    prepare = _history.prepare_change

    def then_disabled(*args):
        prepared = prepare(*args)
        if rollups.enabled(db):
            rollups.disable(db)
        return prepared
    monkeypatch.setattr(_history, "prepare_change", then_disabled)
    assert psai.reprice(seed_model, {"costInTokensPerMillion": 30}, dry_run=False)["applied"]
    monkeypatch.undo()
    assert not rollups.enabled(db)
    rollups.enable(db)
    assert rollups.unfolded(db) == marked and rollups.verify(db) == []
    with full_scan(db):
        scanned = cost_report("model")
    assert cost_report("model") == scanned


def test_current_thresholds_read_only_the_models_asked_for(db):
    """What tells a rollup row split by a model's threshold still holds:
    the thresholds of those models alone, not a read of every model."""
    plain, long, _euro = models()
    asked = rollups.current_thresholds(db, [long.id, plain.id])
    assert asked == {long.id: 200_000, plain.id: None}
    assert rollups.current_thresholds(db, []) == {}


def test_a_period_reads_the_days_the_rollups_hold_within_it(db, clock, seed_model):
    """``read_plan``'s days are the rollups' days within the period's whole
    days (PostgreSQL finds them one probe of the index a day): none missed
    at the ends, none outside, gaps kept."""
    held = [DAY0 + datetime.timedelta(days=n, hours=n % 5) for n in (0, 1, 2, 5, 9, 10)]
    for moment in held:
        clock.set(moment)
        psai.record_usage(seed_model, tokens_in=100, tokens_out=10)
    days = sorted(moment.date().isoformat() for moment in held)
    assert list(rollups.read_plan(db).days) == days
    for first, last in ((0, 11), (1, 10), (2, 9), (3, 5), (6, 9), (11, 20)):
        since, until = DAY0 + datetime.timedelta(days=first), DAY0 + datetime.timedelta(days=last)
        plan = rollups.read_plan(db, since, until)
        assert list(plan.days) == [day for day in days if since.date().isoformat() <= day < until.date().isoformat()]
        assert plan.scan == ()  # whole days: nothing read from the items


def test_without_triggers_reports_read_the_items_until_enabled(db, backend, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    rollups.disable(db)
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    assert not rollups.enabled(db) and rollups.read_plan(db).scan == ((None, None),)
    assert cost_report("model")[0]["calls"] == 2
    assert [d["state"] for d in rollups.status(db)] == ["items"]
    with pytest.raises(psai.errors.RollupsOffError, match="psai rollup enable"):
        rollups.rebuild(db)
    assert rollups.enable(db) == ["2026-11-25"]
    assert [(d["rolled_up"], d["state"]) for d in rollups.status(db)] == [(2, "current")]
    assert cost_report("model")[0]["calls"] == 2 and rollups.verify(db) == []


def test_the_command_line(db, backend, clock, seed_model):
    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url, "rollup"] + list(args))
        assert result.exit_code == code, result.output
        return result

    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=DAY0, updated_at=DAY0,
                            data=PsModelUsageItem.get().data).execute()
    status = json.loads(run("status", "--json").stdout)
    assert [(d["day"], d["state"]) for d in status] == [("2026-11-20", "current"), ("2026-11-25", "current")]
    assert "kept by triggers" in run("status").stdout
    assert "2026-11-20" in run("rebuild").stdout
    assert "agree" in run("verify").stdout
    corrupt(db)
    assert "2026-11-20" in run("verify", code=1).stdout
    run("rebuild", "--since", "2026-11-20", "--until", "2026-11-20")
    run("verify")
    rollups.disable(db)
    assert "off (no triggers)" in run("status").stdout
    assert "2026-11-25" in run("enable").stdout
    assert "kept by triggers" in run("status").stdout


def test_concurrent_writers_and_rebuilds_leave_the_rollups_exact(db, backend, seed_model):
    """Processes record calls (two on one model and agent) while this one
    rebuilds every day again and again: no call is counted twice or lost."""
    import multiprocessing
    from workers import record_many
    other = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "other"})
    context = multiprocessing.get_context("spawn")
    calls = 150 if backend.kind == "sqlite" else 80
    with context.Pool(4) as pool:
        results = [pool.apply_async(record_many, (backend.url, seed_model.id, agent, calls, seed))
                   for seed, agent in enumerate([None, None, other.id, other.id])]
        rebuilt = 0
        while not all(r.ready() for r in results):
            rebuilt += len(rollups.rebuild(db))
            # SQLite's lock is not fair: a loop that takes it again at once can
            # keep the writers waiting past their busy timeout on a loaded
            # machine. A pause between rebuilds lets them in; rebuilds still
            # run between and beside their calls.
            time.sleep(0.02)
        assert all(r.get(timeout=240) for r in results)
    assert rebuilt > 0
    assert PsModelUsageItem.select().count() == 4 * calls
    assert [d["state"] for d in rollups.status(db)] == ["current"] and rollups.verify(db) == []
    for by in REPORT_GROUPINGS:
        with full_scan(db):
            scanned = cost_report(by)
        assert cost_report(by) == scanned


@pytest.mark.parametrize("seed", [3, 4])
def test_a_period_reads_its_counters_as_the_pass_over_every_item_does(db, clock, monkeypatch, seed):
    """A report from ``since`` on may tell from the period's own items alone
    that none of its counter rows is uncovered (reports._newest_rows_covered);
    with counters grown without items, items without counters and items
    without a snapshot, each such report equals the one that compares every
    item with every counter."""
    from psai import reports
    rng = random.Random(seed)
    ms, ags = models(), agents()
    taken = []
    original = reports._newest_rows_covered

    def spy(*args):
        taken.append(original(*args))
        return taken[-1]

    def compare():
        for since, until in windows(rng) + windows(rng):
            if since is None:
                continue
            for by in REPORT_GROUPINGS:
                monkeypatch.setattr(reports, "_newest_rows_covered", spy)
                quick = cost_report(by, since=since, until=until)
                monkeypatch.setattr(reports, "_newest_rows_covered", lambda *args: False)
                assert quick == cost_report(by, since=since, until=until), (by, since, until)

    for _ in range(20):  # calls recorded through psai, in time order: an item beside every counter increment
        clock.advance(minutes=rng.randrange(1, 600))
        psai.record_usage(rng.choice(ms), rng.choice(ags + [None]), tokens_in=rng.choice([10, 250_000]),
                          tokens_out=rng.randrange(100), cached_tokens=rng.choice([0, 5]))
    compare()
    assert True in taken  # the period's items told
    for _ in range(30):
        record(rng, clock, ms, ags)
        what = rng.random()
        if what < 0.25:  # a counter grown by another tool, no item beside it
            row = psai.PsModelUsage.select().order_by(psai.PsModelUsage.id.desc()).first()
            column = rng.choice([psai.PsModelUsage.token_in_count, psai.PsModelUsage.token_out_count,
                                 psai.PsModelUsage.token_in_cached_context_count])
            psai.PsModelUsage.update({column: column + rng.choice([1, 500, 300_000])}).where(
                psai.PsModelUsage.id == row.id).execute()
        elif what < 0.4:
            raw_insert(rng, ms, ags)
        elif what < 0.5:
            rollups.rebuild(db)
    compare()
    assert False in taken  # and where they could not, every item was read


def _without_shortcut(monkeypatch, by, since):
    from psai import reports
    with monkeypatch.context() as full:
        full.setattr(reports, "_newest_rows_covered", lambda *args: False)
        return cost_report(by, since=since)


def test_a_period_adds_up_counter_rows_its_report_names_alike(db, backend, clock, monkeypatch, seed_model):
    """Counter rows without an agent and rows of an agent that is gone (a
    dangling id, where the foreign key was off) are one key to a report:
    the period's items are compared with their sum, not with each alone."""
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    row = psai.PsModelUsage.get()
    # Written by another tool, its foreign key not enforced.
    off, on = (("PRAGMA foreign_keys = OFF", "PRAGMA foreign_keys = ON") if backend.kind == "sqlite" else
               ("SET session_replication_role = replica", "SET session_replication_role = DEFAULT"))
    db.execute_sql(off)
    try:
        psai.PsModelUsage.insert(model=seed_model.id, agent=999, user_id=1, token_in_count=1000,
                                 created_at=row.created_at, updated_at=row.created_at).execute()
    finally:
        db.execute_sql(on)
    since = clock() - datetime.timedelta(hours=1)
    assert cost_report("model")[0]["tokens_in"] == 2000
    assert cost_report("model", since=since) == _without_shortcut(monkeypatch, "model", since)
    assert cost_report("model", since=since)[0]["tokens_in"] == 2000


def test_a_period_reads_counter_rows_whose_time_is_stored_otherwise(db, backend, clock, monkeypatch, seed_model):
    """SQLite keeps a counter row's time as given (a Unix time, psai reads
    it): compared as stored text it would fall outside the period, so such
    a store is read the full way."""
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    psai.PsModelUsage.insert(model=seed_model.id, agent=None, user_id=1, token_in_count=500,
                             created_at=clock(), updated_at=clock()).execute()
    if backend.kind == "sqlite":
        db.execute_sql('UPDATE "ps_model_usage" SET "created_at" = ? WHERE "token_in_count" = 500',
                       (int(clock().timestamp()),))
    since = clock() - datetime.timedelta(hours=1)
    assert cost_report("model", since=since) == _without_shortcut(monkeypatch, "model", since)
    assert cost_report("model", since=since)[0]["tokens_in"] == 1500


def test_times_at_the_edges_of_the_calendar(db, clock, seed_model):
    """Issue 34: items dated 9999-12-31 or before year 1000, and periods
    that end or start there, never end in OverflowError or ValueError; the
    rollups keep them and ``psai check`` names them."""
    assert rollups.status(db, since="0999-01-01") == [] and cost_report("model", since="0999-01-01") == []
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    item = PsModelUsageItem.get()
    stamps = [datetime.datetime(9999, 12, 31, 23, tzinfo=UTC), datetime.datetime(999, 5, 1, tzinfo=UTC),
              datetime.datetime(1, 1, 1, tzinfo=UTC)]
    for stamp in stamps:
        PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=stamp, updated_at=stamp,
                                data=item.data).execute()
    days = ["0001-01-01", "0999-05-01", "2026-11-25", "9999-12-31"]
    end = "9999-12-31T23:59:59+00:00"
    assert [d["day"] for d in rollups.status(db, until=end)] == days
    assert [d["day"] for d in rollups.status(db, since="0999-01-01")] == days[1:]
    assert rollups.rebuild(db, until=end) == days and rollups.rebuild(db, until="9999-12-31") == days
    assert rollups.verify(db, since="0999-01-01", until=end) == [] and rollups.verify(db) == []
    assert cost_report("model")[0]["calls"] == 4 and cost_report("model", since="0999-01-01")[0]["calls"] == 3
    assert cost_report("model", until=end)[0]["calls"] == 4
    assert [r["day"] for r in cost_report("day")] == days
    with full_scan(db):
        assert cost_report("day") == cost_report("day", since=None)
    edge = [p["id"] for p in check() if "edge of the calendar" in p["problem"]]
    assert edge == [item.id + 1, item.id + 2, item.id + 3]


def test_a_fold_that_fails_never_fails_the_writer(db, backend, clock, seed_model):
    """PostgreSQL: a fold that fails (here a constraint added to the rollup
    table by hand) is caught in the trigger's block: the item is written,
    marked, read from the items, and named by check."""
    if backend.kind != "postgres":
        pytest.skip("SQLite's triggers run SQL that cannot fail; PostgreSQL's catch what does")
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    db.execute_sql('ALTER TABLE "psai_usage_rollup" ADD CONSTRAINT "hand_made" CHECK ("calls" < 2)')
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)  # its fold would make calls 2
    item_id = PsModelUsageItem.select(PsModelUsageItem.id).order_by(PsModelUsageItem.id.desc()).scalar()
    assert [m["item"] for m in rollups.unfolded(db)] == [item_id]
    assert [p["id"] for p in check() if "could not fold" in p["problem"]] == [item_id]
    assert cost_report("model")[0]["calls"] == 2
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item_id).execute()  # unmarked, nothing folded out
    assert rollups.unfolded(db) == [] and cost_report("model")[0]["calls"] == 1 and rollups.verify(db) == []


def test_a_counter_totals_fold_that_fails_never_fails_the_writer(db, backend, clock, seed_model):
    """PostgreSQL: a fold of the counter totals that fails (a constraint
    added by hand) is caught: the counter row is written, the totals are
    marked stale and not read (reports add the counter rows up) until a
    rebuild, and verify names them."""
    if backend.kind != "postgres":
        pytest.skip("SQLite's triggers run SQL that cannot fail; PostgreSQL's catch what does")
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    db.execute_sql('ALTER TABLE "psai_key_totals" ADD CONSTRAINT "hand_made" CHECK ("counted_in" < 1500)')
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)  # its fold would make 2000
    # Counted by hand beyond the items: a report that read the stale totals would miss it.
    db.execute_sql('UPDATE "ps_model_usage" SET "token_in_count" = "token_in_count" + 500')
    assert rollups.kept_counter_totals(db, None) is None
    assert cost_report("model")[0]["tokens_in"] == 2500
    assert [p["problem"].split(" differ")[0] for p in rollups.verify(db)] == ["its counter totals"]
    db.execute_sql('ALTER TABLE "psai_key_totals" DROP CONSTRAINT "hand_made"')
    rollups.rebuild(db)
    assert rollups.verify(db) == [] and rollups.kept_counter_totals(db, None) is not None
    assert cost_report("model")[0]["tokens_in"] == 2500


def test_init_without_triggers(db, backend):
    result = CliRunner().invoke(cli, ["--database", backend.url, "init", "--no-triggers"])
    assert result.exit_code == 0, result.output
    assert not rollups.enabled(db)
    result = CliRunner().invoke(cli, ["--database", backend.url, "rollup", "enable"])
    assert result.exit_code == 0, result.output
    assert rollups.enabled(db)


# -- statements of many items (PostgreSQL's statement triggers) -----------------------------

KEPT_TABLES = {"psai_usage_rollup": "range_day", "psai_usage_slots": "range_slot",
               "psai_attribution_ledger": "range_day", "psai_model_rollup": "range_day",
               "psai_key_totals": "model_id"}


def kept_rows(db):
    """What the triggers keep: the rows of the rollups, the budgets' slots
    and the attribution ledger by range and key (their ids aside; a
    provider's cost of no call None, as verify reads it), and the items
    marked unfolded (and days marked: a fold that failed)."""
    kept = {}
    for table, range_column in KEPT_TABLES.items():
        columns = [c.name for c in db.get_columns(table) if c.name != "id"]
        rows = {}
        for values in db.execute_sql('SELECT %s FROM "%s"' % (", ".join('"%s"' % c for c in columns), table)):
            row = {c: rollups._number(v) for c, v in zip(columns, values)}
            if not row.get("cost_calls", 1):
                row["provider_cost"] = None
            rows[row[range_column], row["group_key"]] = row
        kept[table] = rows
    kept["marked"] = sorted(db.execute_sql('SELECT "item_id", "range_day" FROM "psai_rollup_unfolded"').fetchall(),
                            key=repr)
    return kept


def kept_as_rebuilt(db):
    """True when what the triggers kept is what a rebuild makes of the items."""
    kept = kept_rows(db)
    rollups.rebuild(db)
    return kept == kept_rows(db) and rollups.verify(db) == []


def row_versions(db):
    """PostgreSQL: each kept row's id and version (xmin): a row updated has another."""
    return {table: sorted(db.execute_sql('SELECT "id", xmin::text FROM "%s"' % table).fetchall())
            for table in KEPT_TABLES}


def test_statements_of_many_items_keep_what_a_rebuild_makes(db, backend, clock, seed_model):
    """One statement inserting items of the same and other groups, days,
    15-minute slots and attributions (a multi-row INSERT, an INSERT ...
    SELECT), one moving many between groups and days, one of updated_at
    alone (on PostgreSQL it rewrites no kept row), one deleting many: after
    each, the rollups, slots and ledger are what a rebuild makes."""
    other = psai.add_model(name="other", configuration=make_configuration(provider="anthropic"))
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10, user="alice", tags={"team": "a"})
    template = PsModelUsageItem.get()
    start = template.created_at
    rows = []
    for index in range(24):
        data = copy.deepcopy(template.data)
        data["usageNormalized"] = dict(data["usageNormalized"], tokensIn=100 + index, tokensOut=index)
        data["psai"] = dict(data.get("psai") or {}, user=["alice", "bob", "carol"][index % 3],
                            tags={"team": "ab"[index % 2]})
        if index % 5 == 0:
            data["psai"]["providerCost"] = 0.25
        if index % 7 == 0:
            data["psai"].pop("user")
        rows.append(dict(user_id=1, model_id=(seed_model.id, other.id)[index % 2], agent_id=0, connector_id=None,
                         created_at=start + datetime.timedelta(minutes=20 * index, days=index % 3),
                         updated_at=start, data=data))
    PsModelUsageItem.insert_many(rows).execute()
    assert PsModelUsageItem.select().count() == 25 and kept_as_rebuilt(db)
    assert len(rollups.read_plan(db).days) == 3
    fields = [PsModelUsageItem.user_id, PsModelUsageItem.model_id, PsModelUsageItem.agent_id,
              PsModelUsageItem.connector_id, PsModelUsageItem.created_at, PsModelUsageItem.updated_at,
              PsModelUsageItem.data]
    copied = PsModelUsageItem.select(PsModelUsageItem.user_id, Value(other.id), PsModelUsageItem.agent_id,
                                     PsModelUsageItem.connector_id, PsModelUsageItem.created_at,
                                     PsModelUsageItem.updated_at, PsModelUsageItem.data
                                     ).where(PsModelUsageItem.model_id == seed_model.id)
    PsModelUsageItem.insert_from(copied, fields).execute()
    assert PsModelUsageItem.select().count() == 38 and kept_as_rebuilt(db)
    # Moved: to the other model and a day later, or given other data (another group, other attributions).
    moved = [item.id for item in PsModelUsageItem.select(PsModelUsageItem.id).order_by(PsModelUsageItem.id)][::3]
    assert PsModelUsageItem.update(model_id=other.id, created_at=start + datetime.timedelta(days=4, hours=1)).where(
        PsModelUsageItem.id.in_(moved[:6])).execute() == 6
    assert kept_as_rebuilt(db)
    data = dict(template.data, usageNormalized={"tokensIn": 5000, "tokensOut": 7}, psai={"user": "dave"})
    assert PsModelUsageItem.update(data=data).where(PsModelUsageItem.id.in_(moved[6:])).execute() == len(moved) - 6
    assert kept_as_rebuilt(db)
    versions = row_versions(db) if backend.kind == "postgres" else None
    assert PsModelUsageItem.update(updated_at=start + datetime.timedelta(hours=5)).execute() == 38
    if versions is not None:
        assert row_versions(db) == versions  # nothing folded out and in again
    assert kept_as_rebuilt(db)
    assert PsModelUsageItem.delete().where(PsModelUsageItem.model_id == other.id).execute() > 1
    assert kept_as_rebuilt(db)
    PsModelUsageItem.delete().execute()
    kept = kept_rows(db)
    # The counter rows stay, and their totals beside no call.
    assert [(row["calls"], row["counter_rows"]) for row in kept.pop("psai_key_totals").values()] == [(0, 1)]
    assert kept == {table: {} for table in KEPT_TABLES if table != "psai_key_totals"} | {"marked": []}


def test_a_statement_of_many_items_with_an_odd_time_succeeds_and_marks_it(db, backend, clock, seed_model):
    """An item whose time psai does not fold (SQLite: other text;
    PostgreSQL: infinity) among others in one statement: the statement
    succeeds, that item is marked, the others are folded; deleting them
    all at once unmarks it and folds the others out."""
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10, user="alice")
    item = PsModelUsageItem.get()
    odd = "2026-11-25T10:00:00Z" if backend.kind == "sqlite" else "infinity"
    good = PsModelUsageItem.created_at.db_value(clock())
    db.execute_sql('INSERT INTO "ps_model_usage_item" ("user_id", "model_id", "agent_id", "created_at", "updated_at", '
                   '"data") VALUES %s' % ", ".join(["(1, %s, 0, %s, %s, %s)" % ((db.param,) * 4)] * 3),
                   [seed_model.id, good, good, json.dumps(item.data), seed_model.id, odd, odd, json.dumps(item.data),
                    seed_model.id, good, good, json.dumps(item.data)])
    odd_id = item.id + 2
    assert [m["item"] for m in rollups.unfolded(db)] == [odd_id]
    assert rollups.read_plan(db).days == ("2026-11-25",)
    with full_scan(db):
        scanned = cost_report("model")
    assert scanned[0]["calls"] == 4 and cost_report("model") == scanned and kept_as_rebuilt(db)
    PsModelUsageItem.delete().where(PsModelUsageItem.id >= odd_id - 1).execute()
    assert rollups.unfolded(db) == [] and cost_report("model")[0]["calls"] == 1 and kept_as_rebuilt(db)


def test_a_fold_of_many_items_that_fails_marks_the_days_it_touched(db, backend, clock, seed_model):
    """PostgreSQL: the ledger's fold of a statement fails (a constraint
    added by hand): the statement succeeds, the rollups and slots fold its
    items, and each day it touched is marked, so reports by user read those
    days from the items."""
    if backend.kind != "postgres":
        pytest.skip("SQLite's triggers run SQL that cannot fail; PostgreSQL's catch what does")
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10, user="alice")
    item = PsModelUsageItem.get()
    db.execute_sql('ALTER TABLE "psai_attribution_ledger" ADD CONSTRAINT "hand_made" CHECK ("calls" < 2)')
    PsModelUsageItem.insert_many([dict(user_id=1, model_id=seed_model.id, agent_id=0, data=item.data,
                                       created_at=item.created_at + datetime.timedelta(days=days),
                                       updated_at=item.created_at) for days in (0, 1, 1)]).execute()
    marks = sorted((m["item"], m["day"]) for m in rollups.unfolded(db))
    assert marks == [(None, "2026-11-25"), (None, "2026-11-26")] and rollups.verify(db) == []
    assert rollups.read_plan(db).days == ()  # the rollups are right, but the ledger not: the days read the items
    with full_scan(db):
        scanned = cost_report("user")
    assert scanned == cost_report("user") and [(r["user"], r["calls"]) for r in scanned] == [("alice", 4)]


@pytest.mark.parametrize("seed", [1, 2])
def test_randomized_statements_of_many_items_keep_what_a_rebuild_makes(db, clock, seed):
    """Random statements each writing many items at once, as bulk writers
    do (items of any shape and attribution inserted, moved across days and
    models, edited, deleted): after each, what the triggers keep is what a
    rebuild makes, and reports and budgets equal a full scan."""
    rng = random.Random(seed)
    ms, ags = models(), agents()
    psai.set_budget(name="day", amount=1, period="day", timezone="America/New_York")
    for _ in range(6):
        record(rng, clock, ms, ags)
    done = set()
    for _step in range(14):
        ids = [item.id for item in PsModelUsageItem.select(PsModelUsageItem.id)]
        some = PsModelUsageItem.id.in_(rng.sample(ids, min(len(ids), rng.randrange(2, 8))))
        what = rng.random()
        if what < 0.35:
            rows = [raw_item(rng, ms, ags) for _ in range(rng.randrange(2, 12))]
            for row in rows:
                usage = row["data"].get("usageNormalized") if isinstance(row["data"], dict) else None
                for key, value in (usage or {}).items():
                    if value == 1e300:  # summed as a float on SQLite, in the order each reads: left to the other test
                        usage[key] = 2**31
                if isinstance(row["data"], dict) and rng.random() < 0.7:
                    row["data"]["psai"] = dict(row["data"].get("psai") or {}, user=rng.choice(["ann", "bo"]),
                                               tags={"team": rng.choice(["x", "y"])})
            PsModelUsageItem.insert_many(rows).execute()
            done.add("inserted")
        elif what < 0.55:
            PsModelUsageItem.update(created_at=moment(rng)).where(some).execute()
            done.add("moved")
        elif what < 0.7:
            PsModelUsageItem.update(model_id=rng.choice(ms).id, agent_id=rng.choice(ags).id).where(some).execute()
            done.add("regrouped")
        elif what < 0.85:
            template = PsModelUsageItem.get_by_id(rng.choice(ids))
            PsModelUsageItem.update(data=template.data).where(some).execute()
            done.add("edited")
        else:
            PsModelUsageItem.delete().where(some).execute()
            done.add("deleted")
        assert kept_as_rebuilt(db), done
    assert done >= {"inserted", "moved", "deleted"}, done
    reports_equal_a_full_scan(db, rng)
