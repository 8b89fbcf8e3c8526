"""Rollups (psai.rollups, docs/rollups.md): every report read from them
equals the report from a full scan of the items, whoever wrote the items,
on both backends; a rollup made wrong by hand is found and repaired."""
import copy
import datetime
import json
import random

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel, PsModelUsageItem, rollups
from psai.check import check
from psai.cli import cli
from psai.fields import UTC
from psai.reports import REPORT_GROUPINGS, cost_report, cost_reports, daily_costs

from conftest import make_configuration

DAY0 = datetime.datetime(2026, 11, 20, tzinfo=UTC)
DAYS = 6


def models():
    plain = PsAiModel.create(user_id=1, organization_id=1, name="plain", configuration=make_configuration())
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


def reports_equal_a_full_scan(rng):
    for since, until in windows(rng):
        for by in REPORT_GROUPINGS:
            rolled = cost_report(by, since=since, until=until)
            with rollups.full_scan():
                scanned = cost_report(by, since=since, until=until)
            assert rolled == scanned, (by, since, until)
        rolled_days = daily_costs(since=since, until=until)
        with rollups.full_scan():
            assert rolled_days == daily_costs(since=since, until=until), (since, until)
        # The HTML page's one pass gives every grouping's rows, and the days', as they are alone.
        together, days = cost_reports(REPORT_GROUPINGS, since=since, until=until)
        assert days == rolled_days, (since, until)
        for by in REPORT_GROUPINGS:
            assert together[by] == cost_report(by, since=since, until=until), (by, since, until)
    # Every budget's status (its period's spending, read from the rollups) as a full scan gives it.
    rolled_status = psai.budget_status()
    with rollups.full_scan():
        assert rolled_status == psai.budget_status()


def record(rng, clock, ms, ags):
    clock.set(moment(rng))
    tokens_in = rng.choice([0, 1, 999, 150_000, 200_000, 250_000])
    cached = rng.randrange(tokens_in + 1) if rng.random() < 0.3 else 0
    write = rng.randrange(tokens_in - cached + 1) if rng.random() < 0.2 else 0
    psai.record_usage(rng.choice(ms), rng.choice(ags + [None]), tokens_in=tokens_in,
                      tokens_out=rng.randrange(100, 5000),  # holds the reasoning tokens
                      cached_tokens=cached, cache_write_tokens=write,
                      reasoning_tokens=rng.choice([0, 0, 100]), web_searches=rng.choice([0, 0, 2]),
                      connector_id=rng.choice([None, None, 5]),
                      provider_metadata=rng.choice([None, None, {"appliedServiceTier": "flex"}]))


def raw_insert(rng, ms, ags):
    """An item as PolicySynth's own processes write one: no psai involved,
    at any time (backdated too), sometimes without a snapshot or odd."""
    template = rng.choice(list(PsModelUsageItem.select()))
    data = copy.deepcopy(template.data)
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
    stamp = moment(rng)
    PsModelUsageItem.insert(user_id=1, model_id=model.id, agent_id=rng.choice(ags).id, connector_id=None,
                            created_at=stamp, updated_at=stamp, data=data).execute()


def act(rng, clock, ms, ags, db):
    what = rng.random()
    items = list(PsModelUsageItem.select(PsModelUsageItem.id))
    if what < 0.4 or not items:
        record(rng, clock, ms, ags)
        return "record"
    if what < 0.55:
        raw_insert(rng, ms, ags)
        return "raw insert"
    if what < 0.62:  # backdated, or moved across midnight
        PsModelUsageItem.update(created_at=moment(rng)).where(PsModelUsageItem.id == rng.choice(items).id).execute()
        return "moved"
    if what < 0.67:
        PsModelUsageItem.delete().where(PsModelUsageItem.id == rng.choice(items).id).execute()
        return "deleted"
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
    if what < 0.92:
        rollups.rebuild(db, everything=rng.random() < 0.3)
        return "rebuilt"
    if what < 0.95 and len(ags) > 1:
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
    assert rollups.rebuild(db) == []  # record_usage kept every day current
    assert len(rollups.coverage(db).days) == len({i.created_at.date() for i in PsModelUsageItem.select()})
    used, done = 0, set()
    for step in range(80):
        done.add(act(rng, clock, ms, ags, db))
        used += len(rollups.coverage(db).days)
        if step % 5 == 4:
            reports_equal_a_full_scan(rng)
    assert used > 0  # the reports did read rollups
    assert done >= {"record", "raw insert", "moved", "deleted", "repriced", "threshold", "rebuilt"}, done
    rollups.rebuild(db)
    assert rollups.verify(db) == []
    assert all(day["state"] == "current" for day in rollups.status(db))
    reports_equal_a_full_scan(rng)


def test_record_usage_keeps_the_day_current(db, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=10, tokens_out=1)
    assert rollups.coverage(db).days == ["2026-11-25"]  # rollups are current from the first call
    assert rollups.rebuild(db) == []
    clock.advance(days=1)
    psai.record_usage(seed_model, None, tokens_in=10, tokens_out=1)
    # PolicySynth writes an item: that day is read from the items until rebuilt.
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=clock(), updated_at=clock(),
                            data=PsModelUsageItem.get().data).execute()
    found = rollups.coverage(db)
    assert found.days == ["2026-11-25"] and found.scan == [(None, datetime.datetime(2026, 11, 25, tzinfo=UTC)),
                                                            (datetime.datetime(2026, 11, 26, tzinfo=UTC), None)]
    assert [d["state"] for d in rollups.status(db)] == ["current", "stale"]
    assert rollups.rebuild(db) == ["2026-11-26"]
    assert len(rollups.coverage(db).days) == 2
    assert cost_report("model")[0]["calls"] == 3


def corrupt(db):
    """A rollup row edited by hand: its count and ids still agree with the items."""
    db.execute_sql('UPDATE "psai_usage_rollup" SET "fresh_in" = "fresh_in" + 1000000 WHERE "id" = '
                   '(SELECT MIN("id") FROM "psai_usage_rollup")')


def test_a_rollup_made_wrong_is_found_by_verify_and_check_and_repaired_by_rebuild(db, clock, seed_model):
    for _ in range(3):
        psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    with rollups.full_scan():
        right = cost_report("model")
    assert rollups.verify(db) == [] and not [p for p in check() if p["table"] == "psai_usage_rollup"]
    corrupt(db)
    assert cost_report("model") != right  # reports trust a day whose count check passes
    problems = rollups.verify(db)
    assert [p["day"] for p in problems] == ["2026-11-25"] and "differ" in problems[0]["problem"]
    assert [p["id"] for p in check() if p["table"] == "psai_usage_rollup"] == ["2026-11-25"]
    assert rollups.rebuild(db) == []  # the count check passes: a stale-only rebuild leaves it
    assert rollups.rebuild(db, since="2026-11-25", until="2026-11-25", everything=True) == ["2026-11-25"]
    assert rollups.verify(db) == [] and cost_report("model") == right


def test_an_item_replaced_at_the_same_moment(db, backend, clock, seed_model):
    """Another item written at the very microsecond of one deleted: SQLite's
    check sees its id; PostgreSQL's, which reads the created_at index alone
    (count and offsets into the day), takes it for an edit in place, which
    verify finds and rebuild repairs (docs/rollups.md)."""
    for _ in range(2):
        psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    item = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).get()
    data = dict(item.data, usageNormalized=dict(item.data["usageNormalized"], tokensIn=5000))
    PsModelUsageItem.insert(user_id=1, model_id=item.model_id, agent_id=item.agent_id, created_at=item.created_at,
                            updated_at=item.created_at, data=data).execute()
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item.id).execute()
    with rollups.full_scan():
        right = cost_report("model")
    assert right[0]["tokens_in"] == 6000
    if backend.kind == "sqlite":
        assert rollups.coverage(db).days == [] and cost_report("model") == right
        assert rollups.verify(db) == []
    else:
        assert rollups.coverage(db).days == ["2026-11-25"] and cost_report("model") != right
        assert [p["day"] for p in rollups.verify(db)] == ["2026-11-25"]
        assert rollups.rebuild(db, since="2026-11-25", until="2026-11-25", everything=True) == ["2026-11-25"]
    assert rollups.verify(db) == [] and cost_report("model") == right


def test_psai_writers_that_change_items_in_place_drop_their_days(db, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=1_000_000, tokens_out=0)
    psai.reprice(seed_model, {"costInTokensPerMillion": 10}, dry_run=False)
    assert rollups.coverage(db).days == []  # dropped in reprice's transaction
    with rollups.full_scan():
        assert cost_report("model") == cost_report("model")
    assert str(cost_report("model")[0]["cost"]) == "10"
    assert rollups.rebuild(db) == ["2026-11-25"] and str(cost_report("model")[0]["cost"]) == "10"


def test_a_database_without_rollups_reads_the_items(db, clock, seed_model):
    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    db.execute_sql('DELETE FROM "psai_usage_rollup"')
    assert rollups.coverage(db).days == [] and cost_report("model")[0]["calls"] == 1


def test_the_command_line(db, backend, clock, seed_model):
    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url, "rollup"] + list(args))
        assert result.exit_code == code, result.output
        return result

    psai.record_usage(seed_model, None, tokens_in=1000, tokens_out=10)
    PsModelUsageItem.insert(user_id=1, model_id=seed_model.id, agent_id=0, created_at=DAY0, updated_at=DAY0,
                            data=PsModelUsageItem.get().data).execute()
    status = json.loads(run("status", "--json").stdout)
    assert [(d["day"], d["state"]) for d in status] == [("2026-11-20", "stale"), ("2026-11-25", "current")]
    assert "2026-11-20" in run("rebuild").stdout
    assert "agree" in run("verify").stdout
    corrupt(db)
    assert "2026-11-25" in run("verify", code=1).stdout
    run("rebuild", "--all")
    run("verify")


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
            rebuilt += len(rollups.rebuild(db, everything=True))
        assert all(r.get(timeout=240) for r in results)
    assert rebuilt > 0
    assert PsModelUsageItem.select().count() == 4 * calls
    assert [d["state"] for d in rollups.status(db)] == ["current"] and rollups.verify(db) == []
    for by in REPORT_GROUPINGS:
        with rollups.full_scan():
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
