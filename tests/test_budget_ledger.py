"""What a budget has spent (psai._budget_ledger) equals a full scan of the
items, priced one by one, whatever wrote them: in zones whose midnight is
not a UTC hour (+05:45, -03:30), where the period's partial days are read
from the 15-minute slots, after items edited in place, moved and deleted
by hand SQL."""
import datetime
import json
import random
from decimal import Decimal

import pytest
from playhouse.test_utils import count_queries

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel, PsModelUsageItem, record_usage, rollups
from psai import _budget_ledger
from psai._budget_ledger import period_bounds
from psai._items import item_price
from psai._sql import SLOT_TABLE

UTC = datetime.timezone.utc
ZONES = ("UTC", "Asia/Kathmandu", "America/St_Johns")  # +05:45, -03:30 (-02:30 in summer)
NOW = datetime.datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


def mark(db):
    return db.param


def full_scan(db, budget, start, end, agents_covered):
    """(spent, calls, unknown) of ``budget`` in [start, end): every item read and priced by itself."""
    models = {m.id: m for m in PsAiModel.select()}
    spent, calls, unknown = Decimal(0), 0, False
    for item_id, model_id, agent_id, created_at, data in db.execute_sql(
            'SELECT id, model_id, agent_id, created_at, data FROM "ps_model_usage_item"'):
        when = PsModelUsageItem.created_at.python_value(created_at)
        if start is not None and not start <= when < end:
            continue
        model = models.get(model_id)
        if budget.model_name is not None and (model is None or model.name != budget.model_name):
            continue
        if budget.agent_id is not None and agent_id not in agents_covered:
            continue
        data = PsModelUsageItem.data.python_value(data)
        pricing = data.get("pricing") if isinstance(data, dict) else None
        configured = pricing.get("configuredPrices") if isinstance(pricing, dict) else None
        fallback = model.configuration.get("prices") if model is not None and configured is None else None
        cost, _why = item_price(data, fallback)
        currency = (configured or fallback or {}).get("currency")
        calls += 1
        if cost is not None and currency == budget.currency:
            spent += cost
        else:
            unknown = True
    return spent, calls, unknown


def random_moment(rng, edges):
    """A time near one of ``edges`` (within two hours), to the microsecond."""
    edge = rng.choice(edges)
    return edge + datetime.timedelta(seconds=rng.randint(-7200, 7200), microseconds=rng.randint(0, 999_999))


def models_and_agents():
    """Three models (one with a long-context threshold) and an agent with a sub-agent."""
    models = [PsAiModel.create(user_id=1, organization_id=2, name=name, configuration=make_configuration(
        prices={"costInTokensPerMillion": rate, "costOutTokensPerMillion": rate * 3,
                "costInCachedContextTokensPerMillion": rate / 4, "currency": "USD",
                **({"longContextTokenThreshold": 5000, "longContextCostInTokensPerMillion": rate * 2}
                   if rate == 3 else {})}))
              for name, rate in (("small", 1), ("large", 3), ("odd", 7))]
    root = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "root"})
    child = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "child"}, parent_agent=root)
    return models, root, child


@pytest.mark.parametrize("seed", [1, 2])
def test_what_a_budget_spent_equals_a_full_scan_in_every_zone(db, clock, seed):
    rng = random.Random(seed)
    models, root, child = models_and_agents()
    # Times near every period edge of every zone: their midnights, and the UTC days' around them.
    edges = []
    for zone in ZONES:
        for period in ("day", "week", "month"):
            start, end = period_bounds(period, zone, NOW)
            edges += [start.astimezone(UTC), end.astimezone(UTC)]
    edges += [datetime.datetime(2026, 11, day, tzinfo=UTC) for day in (1, 24, 25)]
    for _ in range(120):
        clock.set(min(random_moment(rng, edges), NOW))
        record_usage(rng.choice(models), rng.choice([None, root, child]), tokens_in=rng.randint(200, 9000),
                     tokens_out=rng.randint(0, 900), cached_tokens=rng.choice([0, 0, 100]),
                     provider_metadata=rng.choice([None, {"appliedServiceTier": "flex"}]))
    # Hand SQL: data edited in place (one count made text: unknown), items moved and deleted.
    p = mark(db)
    ids = [row[0] for row in db.execute_sql('SELECT id FROM "ps_model_usage_item" ORDER BY id')]
    for item_id in rng.sample(ids, 8):
        (data,) = db.execute_sql('SELECT data FROM "ps_model_usage_item" WHERE id = %s' % p, (item_id,)).fetchone()
        data = PsModelUsageItem.data.python_value(data)
        data["usageNormalized"]["tokensIn"] = rng.randint(0, 20000)
        cast = "::jsonb" if psai.db.is_postgres() else ""
        db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (p, cast, p),
                       (json.dumps(data), item_id))
    for item_id in rng.sample(ids, 6):
        moved = min(random_moment(rng, edges), NOW)
        db.execute_sql('UPDATE "ps_model_usage_item" SET created_at = %s WHERE id = %s' % (p, p),
                       (PsModelUsageItem.created_at.db_value(moved), item_id))
    for item_id in rng.sample(ids, 6):
        db.execute_sql('DELETE FROM "ps_model_usage_item" WHERE id = %s' % p, (item_id,))
    clock.set(NOW)
    scopes = [{}, {"model": "large"}, {"agent": root}, {"agent": root, "include_sub_agents": False}]
    for zone in ZONES:
        for period in ("day", "week", "month"):
            start, end = period_bounds(period, zone, NOW)
            if zone != "UTC":  # the partial days at the ends come from the slots
                slots = rollups.budget_plan(db, start, end)[1]
                # The end holding most of its UTC day (Kathmandu's last, St John's first): that day's rollups
                # less the slots of the rest of it.
                longer = end if zone == "Asia/Kathmandu" else start
                assert [day for _first, _last, day in slots if day] == [longer.astimezone(UTC).date().isoformat()]
            for number, scope in enumerate(scopes):
                name = "%s %s %d" % (zone, period, number)
                budget = psai.set_budget(name=name, amount=1000, period=period, timezone=zone,
                                         unpriced="allow", **scope)
                covered = {root.id, child.id} if scope.get("include_sub_agents", True) else {root.id}
                (found,) = psai.budget_status(name)
                spent, calls, unknown = full_scan(db, budget, start, end, covered)
                assert (found["spent"], found["calls"]) == (spent, calls), name
                assert (found["state"] == "unknown") == unknown, name
                psai.remove_budget(name)


def test_the_slots_hold_what_the_items_do_after_hand_sql(db, clock):
    """The slots' triggers keep them as the rollups' keep theirs: a rebuild changes nothing."""
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    for minute in (0, 14, 15, 44, 59):
        clock.set(datetime.datetime(2026, 11, 24, 23, minute, 30, tzinfo=UTC))
        record_usage(m, None, tokens_in=1000 + minute, tokens_out=10)
    p = db.param
    db.execute_sql('UPDATE "ps_model_usage_item" SET created_at = %s WHERE id = (SELECT min(id) FROM '
                   '"ps_model_usage_item")' % p,
                   (PsModelUsageItem.created_at.db_value(datetime.datetime(2026, 11, 25, 3, tzinfo=UTC)),))
    db.execute_sql('DELETE FROM "ps_model_usage_item" WHERE id = (SELECT max(id) FROM "ps_model_usage_item")')
    query = 'SELECT range_slot, calls, fresh_in FROM "%s" ORDER BY range_slot' % SLOT_TABLE
    kept = [tuple(int(v) if not isinstance(v, str) else v for v in row) for row in db.execute_sql(query)]
    # The call at :00 moved to 03:00, the one at :59 deleted; :14 is in the first quarter, :44 in the third.
    assert kept == [("2026-11-24 23:00", 1, 1014), ("2026-11-24 23:15", 1, 1015), ("2026-11-24 23:30", 1, 1044),
                    ("2026-11-25 03:00", 1, 1000)]
    rollups.rebuild(db)
    assert [tuple(int(v) if not isinstance(v, str) else v for v in row) for row in db.execute_sql(query)] == kept


def test_an_end_holding_most_of_its_day_is_that_days_rollups_less_the_rest(db, clock, monkeypatch):
    """St John's midnight is 03:30 UTC: a day budget's first end holds 20.5
    hours of its UTC day, read as the day's rollups less the slots of the
    3.5 hours before it. It equals a full scan, and the cost the ends'
    own slots give, digit for digit: calls only in the rest of the day
    leave no group behind, and fractional counts there (SQLite adds them as
    floats) are read from the end's own slots."""
    models, root, child = models_and_agents()
    # Rates of nine decimals: a group of no calls would add a cost of 0E-9 and change the sum's digits.
    fine = PsAiModel.create(user_id=1, organization_id=2, name="fine", configuration=make_configuration(
        prices={"costInTokensPerMillion": 0.000000001, "costOutTokensPerMillion": 0.000000003,
                "costInCachedContextTokensPerMillion": 0.000000001, "currency": "USD"}))
    zone = "America/St_Johns"
    start, end = period_bounds("day", zone, NOW)  # [11-25 03:30, 11-26 03:30) UTC
    assert (start.astimezone(UTC).hour, start.astimezone(UTC).minute) == (3, 30)
    for hour, model, agent in ((1, fine, None), (2, models[0], root), (3, models[1], child),
                               (4, models[0], root), (6, models[1], None), (9, models[0], child)):
        clock.set(datetime.datetime(2026, 11, 25, hour, 10, tzinfo=UTC))
        record_usage(model, agent, tokens_in=1000 * hour + 7, tokens_out=100 + hour, cached_tokens=10 * hour)
    clock.set(NOW)
    assert [day for _first, _last, day in rollups.budget_plan(db, start, end)[1]] == ["2026-11-25", None]
    scopes = [{}, {"agent": root}, {"model": "large"}]

    def spent_both_ways(whole_counts=True):
        found = []
        for number, scope in enumerate(scopes):
            budget = psai.set_budget(name="b%d" % number, amount=1000, period="day", timezone=zone,
                                     unpriced="allow", **scope)
            covered = {root.id, child.id} if "agent" in scope else set()
            (status,) = psai.budget_status(budget.name)
            if whole_counts:  # SQLite's float sums of fractional counts are not a Decimal sum of them
                assert (status["spent"], status["calls"]) == full_scan(db, budget, start, end, covered)[:2], scope
            found.append(str(status["spent"]))
        with monkeypatch.context() as patched:  # each end from its own slots
            patched.setattr(rollups, "_rest_of_day", lambda since, until: None)
            _read_afresh()
            assert [str(psai.budget_status("b%d" % number)[0]["spent"]) for number in range(len(scopes))] == found
        _read_afresh()
        return found

    first = spent_both_ways()
    # Fractional counts written by hand in one group, in the rest of the day and in the budget's day.
    for hour, tokens_in in ((2, 20.1), (4, 40.2)):
        (item_id, data), = db.execute_sql(
            'SELECT id, data FROM "ps_model_usage_item" WHERE created_at >= %s AND created_at < %s'
            % (db.param, db.param), [PsModelUsageItem.created_at.db_value(datetime.datetime(
                2026, 11, 25, hour + n, tzinfo=UTC)) for n in (0, 1)]).fetchall()
        data = PsModelUsageItem.data.python_value(data)
        data["usageNormalized"]["tokensIn"] = tokens_in
        db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (
            db.param, "::jsonb" if psai.db.is_postgres() else "", db.param), (json.dumps(data), item_id))
    assert spent_both_ways(whole_counts=False) != first


def test_without_the_slots_triggers_budgets_read_the_ends_from_the_items(db, clock):
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    clock.set(datetime.datetime(2026, 11, 24, 20, tzinfo=UTC))  # 01:45 on the 25th in Kathmandu
    record_usage(m, None, tokens_in=10_000, tokens_out=1_000)
    clock.set(NOW)
    psai.set_budget(name="kathmandu", amount=10, period="day", timezone="Asia/Kathmandu")
    assert rollups.slots_enabled(db)
    with_slots = psai.budget_status("kathmandu")[0]["spent"]
    db.execute_sql('DELETE FROM "%s"' % SLOT_TABLE)  # wrong slots are read while their triggers are on
    assert psai.budget_status("kathmandu")[0]["spent"] == 0
    rollups.disable(db)
    assert not rollups.slots_enabled(db)
    assert psai.budget_status("kathmandu")[0]["spent"] == with_slots == Decimal("0.36")
    rollups.enable(db)  # installs both and rebuilds the slots
    assert rollups.slots_enabled(db) and psai.budget_status("kathmandu")[0]["spent"] == with_slots


def test_calls_without_a_price_snapshot_follow_their_models_threshold(db, clock):
    """Rollup rows of items without a snapshot are split by their model's
    current long-context threshold: once it changes, a budget reads them as
    reports do, and still equals a full scan."""
    prices = {"costInTokensPerMillion": 2, "costOutTokensPerMillion": 6, "costInCachedContextTokensPerMillion": 1,
              "currency": "USD", "longContextTokenThreshold": 5000, "longContextCostInTokensPerMillion": 4}
    m = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration(prices=prices))
    for day, tokens_in in ((3, 6000), (10, 1000), (17, 7000), (24, 800)):
        clock.set(datetime.datetime(2026, 11, day, 12, tzinfo=UTC))
        record_usage(m, None, tokens_in=tokens_in, tokens_out=100)
    for item_id, data in list(db.execute_sql('SELECT id, data FROM "ps_model_usage_item"')):
        data = PsModelUsageItem.data.python_value(data)
        del data["pricing"]["configuredPrices"]  # as an item written without one
        db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s WHERE id = %s' % (
            db.param + ("::jsonb" if psai.db.is_postgres() else ""), db.param), (json.dumps(data), item_id))
    clock.set(NOW)
    budget = psai.set_budget(name="month", amount=1000, timezone="Asia/Kathmandu")
    start, end = period_bounds("month", "Asia/Kathmandu", NOW)
    seen = []
    for threshold in (5000, 900):
        m.configuration = dict(m.configuration, prices=dict(prices, longContextTokenThreshold=threshold))
        m.save()
        (found,) = psai.budget_status("month")
        assert (found["spent"], found["calls"]) == full_scan(db, budget, start, end, set())[:2], threshold
        seen.append(found["spent"])
    assert seen[0] != seen[1]  # the call of 1,000 tokens is a long-context one now


def _statuses():
    return [(s["budget"], s["spent"], s["unpriced_tokens"], s["calls"], s["state"]) for s in psai.budget_status()]


def _read_afresh():
    """Every budget's status read from the data, nothing kept from a check before."""
    _budget_ledger._SPENT.clear()
    return _statuses()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_recorded_call_carries_what_budgets_spent_as_a_fresh_read_finds_it(backend, db, clock, seed):
    """On SQLite a call recorded in this process adds itself to the answers
    kept for the data it found (the next check reads no rollup); whatever
    else changes the data (another connection, hand SQL, a price change, a
    call rolled back) makes the next check read afresh. Every status equals
    a fresh read of the data, on both backends."""
    rng = random.Random(seed)
    models, root, child = models_and_agents()
    for name, scope in (("all", {}), ("large", {"model": "large"}), ("root", {"agent": root}),
                        ("alice", {"user": "alice"}), ("team", {"tags": {"team": "search"}}),
                        ("kathmandu day", {"period": "day", "timezone": "Asia/Kathmandu"})):
        psai.set_budget(name=name, amount=rng.choice([1, 1000]), unpriced="allow", **scope)
    p = db.param
    def periods():
        return [period_bounds(period, zone, psai.fields.utcnow())
                for period, zone in (("month", "UTC"), ("day", "Asia/Kathmandu"))]
    for step in range(60):
        before = periods()
        clock.advance(minutes=rng.randint(1, 90))
        same_periods = periods() == before  # else a budget's new period is read
        record_usage(rng.choice(models), rng.choice([None, root, child]), tokens_in=rng.randint(200, 9000),
                     tokens_out=rng.randint(0, 900), cached_tokens=rng.choice([0, 0, 100]),
                     user=rng.choice([None, "alice", "bob"]), tags=rng.choice([None, {"team": "search"}]),
                     provider_metadata=rng.choice([None, {"appliedServiceTier": "flex"}]))
        if step % 3 == 0:
            with count_queries() as counter:
                kept = _statuses()
            read = " ".join(str(q.msg[0]) for q in counter.get_queries())
            if not psai.db.is_postgres(db) and step and same_periods:
                assert "psai_usage_rollup" not in read and "ps_model_usage_item" not in read
            assert kept == _read_afresh(), step
        change = rng.randrange(6)
        if change == 0:  # hand SQL: an item's count edited in place
            (item_id,) = db.execute_sql('SELECT max(id) FROM "ps_model_usage_item"').fetchone()
            (data,) = db.execute_sql('SELECT data FROM "ps_model_usage_item" WHERE id = %s' % p,
                                     (item_id,)).fetchone()
            data = PsModelUsageItem.data.python_value(data)
            data["usageNormalized"]["tokensIn"] += 1000
            cast = "::jsonb" if psai.db.is_postgres(db) else ""
            db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (p, cast, p),
                           (json.dumps(data), item_id))
        elif change == 1:  # a price changed: calls without a snapshot are priced anew
            model = rng.choice(models)
            model.update_configuration({"prices": {"costInTokensPerMillion": rng.randint(1, 9)}})
        elif change == 3:  # another connection records a call
            other = psai.connect(backend.url, bind=False)
            try:
                with psai.using(other):
                    record_usage(rng.choice(models).id, tokens_in=4321, tokens_out=1, user="alice")
            finally:
                other.close()
        elif change == 2:  # a call that fails inside its transaction is not carried
            with pytest.raises(RuntimeError):
                with psai.db.write_transaction(db):
                    record_usage(models[0], root, tokens_in=777, tokens_out=7, user="alice")
                    raise RuntimeError("rolled back")
        assert _statuses() == _read_afresh(), step


def test_the_transactions_ended_between_two_postgresql_snapshots():
    """What tells whether a recorded call's transaction wrote on the data
    the kept answers were found for: the transactions ended in between."""
    ended = _budget_ledger._ended_between
    assert ended("10:10:", "10:10:") == frozenset()
    assert ended("10:12:10", "13:13:") == {10, 12}  # 11 had ended before: not counted again
    assert ended("10:12:10,11", "12:15:14") == {10, 11, 12, 13}  # 14 still running
    assert ended("10:12:", "10:400:") is None  # too many to tell one by one
    assert ended("10:12:", "9:11:") is None  # not later


def test_calls_in_a_row_carry_their_budgets_answers_for_their_alerts(backend, db, clock):
    """Calls recorded one after another, no check between, each weigh the
    budgets' alerts from the answers kept before them plus their own item
    (on PostgreSQL too, when no other transaction ended meanwhile: the
    call reads no rollup); every status then equals a fresh read."""
    models, root, _child = models_and_agents()
    psai.set_budget(name="all", amount=1000, unpriced="allow")
    psai.set_budget(name="root", amount=1000, agent=root, unpriced="allow")
    record_usage(models[0], root, tokens_in=1000, tokens_out=100)
    carried = 0
    for attempt in range(10):
        _statuses()  # answers kept for the data as it is
        for _call in range(3):
            with count_queries() as counter:
                record_usage(models[1], root, tokens_in=2000, tokens_out=200)
            read = " ".join(str(q.msg[0]) for q in counter.get_queries())
            carried += "psai_usage_rollup" not in read and SLOT_TABLE not in read
        assert _statuses() == _read_afresh(), attempt
        if carried:
            break
    assert carried  # a quiet server: the first call of the first attempt
