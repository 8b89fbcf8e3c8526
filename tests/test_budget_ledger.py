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
from psai.models import Budget
from psai._budget_ledger import period_bounds
from psai._items import item_price
from psai._sql import SLOT_TABLE, day_changes_triggers_sql, drop_summary_triggers_sql

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
    _budget_ledger._KEPT.clear()  # (a check keeps what it read of a day until the day's count moves)
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
    _budget_ledger._KEPT.clear()
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


def _digits(statuses):
    """Statuses as text: equal only with the same digits."""
    return [tuple(str(value) for value in status) for status in statuses]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_check_reads_again_only_the_days_whose_count_moved(backend, db, clock, seed):
    """A check keeps what it read of each part of a period (a UTC day, an
    end's slots) and reads again only those whose day's change count the
    triggers moved. Every status equals a full scan of the items, and a
    fresh read digit for digit, after each write of another connection (new
    calls, counts edited in place, items moved to another day or model, a
    snapshot removed, deletes), a write rolled back, a price change, a
    correction of many items (``reprice``), a rebuild, and as the periods
    move on; in zones whose ends come from the slots."""
    rng = random.Random(seed)
    models, root, child = models_and_agents()
    budgets = {"all": {}, "large": {"model": "large", "period": "week", "timezone": "Asia/Kathmandu"},
               "root": {"agent": root, "timezone": "America/St_Johns"},
               "day": {"period": "day", "timezone": "Asia/Kathmandu"}}
    for name, scope in budgets.items():
        psai.set_budget(name=name, amount=1000, unpriced="allow", **scope)
    start_of_month = datetime.datetime(2026, 11, 1, tzinfo=UTC)

    def some_time():
        return start_of_month + datetime.timedelta(seconds=rng.randint(0, int((NOW - start_of_month).total_seconds())))

    def a_call(database):
        clock.set(some_time())
        with psai.using(database):
            record_usage(rng.choice(models).id, rng.choice([None, root.id, child.id]),
                         tokens_in=rng.randint(200, 9000), tokens_out=rng.randint(0, 900),
                         cached_tokens=rng.choice([0, 0, 100]))
        clock.set(NOW)

    for _ in range(60):
        a_call(db)
    clock.set(NOW)
    other = psai.connect(backend.url, bind=False)
    p, cast = db.param, "::jsonb" if psai.db.is_postgres(db) else ""

    def an_item():
        ids = [row[0] for row in other.execute_sql('SELECT id FROM "ps_model_usage_item"')]
        return rng.choice(ids)

    def edit_data(change):
        item_id = an_item()
        (data,) = other.execute_sql('SELECT data FROM "ps_model_usage_item" WHERE id = %s' % p, (item_id,)).fetchone()
        data = PsModelUsageItem.data.python_value(data)
        change(data)
        other.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (p, cast, p),
                          (json.dumps(data), item_id))

    kept_used = False
    try:
        for step in range(40):
            change = rng.randrange(10)
            if change == 0:
                a_call(other)
            elif change == 1:  # a count edited in place
                edit_data(lambda data: data["usageNormalized"].update(tokensIn=rng.randint(0, 20000)))
            elif change == 2:  # moved to another day
                other.execute_sql('UPDATE "ps_model_usage_item" SET created_at = %s WHERE id = %s' % (p, p),
                                  (PsModelUsageItem.created_at.db_value(some_time()), an_item()))
            elif change == 3:  # to another model
                other.execute_sql('UPDATE "ps_model_usage_item" SET model_id = %s WHERE id = %s' % (p, p),
                                  (rng.choice(models).id, an_item()))
            elif change == 4:  # priced from its model's prices from now on
                edit_data(lambda data: data.pop("pricing", None))
            elif change == 5:  # ... which change
                models[rng.randrange(3)].update_configuration(
                    {"prices": {"costInTokensPerMillion": rng.randint(1, 9)}})
            elif change == 6:
                other.execute_sql('DELETE FROM "ps_model_usage_item" WHERE id = %s' % p, (an_item(),))
            elif change == 7:  # a write rolled back: its bump goes with it
                with pytest.raises(RuntimeError):
                    with psai.db.write_transaction(other):
                        a_call(other)
                        raise RuntimeError("rolled back")
            elif change == 9:  # a correction of many items (SQLite: folded by statement, not by row triggers)
                psai.reprice(rng.choice(models), {"costInTokensPerMillion": rng.randint(1, 9)}, dry_run=False)
            elif step % 2:
                rollups.rebuild(db)
            else:  # time goes on: the day budget's period moves, the week's ends too
                clock.advance(hours=rng.randint(1, 30))
            kept = _statuses()
            kept_used = kept_used or bool(_budget_ledger._KEPT.get(db, (None, None, {}))[2])
            for status in psai.budget_status():
                budget = Budget.get(Budget.name == status["budget"])
                covered = {root.id, child.id} if budget.agent_id is not None else set()
                start, end = period_bounds(budget.period, budget.timezone, psai.fields.utcnow())
                spent, calls, unknown = full_scan(db, budget, start, end, covered)
                assert (status["spent"], status["calls"], status["state"] == "unknown") == (spent, calls, unknown), \
                    (step, change, status["budget"])
            assert _digits(kept) == _digits(_read_afresh()), (step, change)
    finally:
        other.close()
    assert kept_used


def test_a_day_whose_count_did_not_move_is_not_read_again(backend, db, clock):
    """What shows that a check keeps the days it read: a rollup row changed
    behind the triggers' back (never to be done but here) is not seen until
    a write to its day moves the day's count, or a rebuild puts it right."""
    models, _root, _child = models_and_agents()
    psai.set_budget(name="all", amount=1000)
    days = [datetime.datetime(2026, 11, day, 12, tzinfo=UTC) for day in (3, 4)]
    other = psai.connect(backend.url, bind=False)

    def a_call(when, database):
        clock.set(when)
        with psai.using(database):
            record_usage(models[0].id, tokens_in=1_000_000, tokens_out=0)  # 1 USD
        clock.set(NOW)

    try:
        for when in days:
            a_call(when, db)
        clock.set(NOW)
        assert psai.budget_status("all")[0]["spent"] == 2
        db.execute_sql('UPDATE "psai_usage_rollup" SET "fresh_in" = "fresh_in" + 5000000 WHERE "range_day" = %s'
                       % db.param, ("2026-11-03",))
        assert psai.budget_status("all")[0]["spent"] == 2  # kept: the 3rd's count has not moved
        a_call(days[1], other)
        assert psai.budget_status("all")[0]["spent"] == 3  # the 4th read again, the 3rd kept
        a_call(days[0], other)
        assert psai.budget_status("all")[0]["spent"] == 9  # the 3rd read again, with the hand edit
        rollups.rebuild(db)
        assert psai.budget_status("all")[0]["spent"] == 4
    finally:
        other.close()


def test_what_a_check_keeps_has_the_digits_of_a_fresh_read(backend, db, clock):
    """A cost taken off the kept totals may have had more digits than any
    left: the answer has those a fresh read gives (the costs' smallest
    exponent), not the kept sum's."""
    models, _root, _child = models_and_agents()
    psai.set_budget(name="all", amount=1000)
    other = psai.connect(backend.url, bind=False)
    try:
        clock.set(datetime.datetime(2026, 11, 3, 12, tzinfo=UTC))
        record_usage(models[0], tokens_in=1_000_000, tokens_out=0)
        clock.set(datetime.datetime(2026, 11, 4, 12, tzinfo=UTC))
        record_usage(models[0], tokens_in=3, tokens_out=0, cached_tokens=1)  # a cost of 8 decimals
        clock.set(NOW)
        first = psai.budget_status("all")[0]["spent"]
        assert -first.as_tuple().exponent >= 8
        other.execute_sql('DELETE FROM "ps_model_usage_item" WHERE created_at >= %s' % db.param,
                          (PsModelUsageItem.created_at.db_value(datetime.datetime(2026, 11, 4, tzinfo=UTC)),))
        kept = psai.budget_status("all")[0]["spent"]
        assert _budget_ledger._KEPT[db][2]  # the 3rd was kept, the 4th read again
        assert kept == 1 and str(kept) == str(_read_afresh()[0][1])
        assert -kept.as_tuple().exponent < 8
    finally:
        other.close()


def test_which_triggers_are_on_is_told_in_one_read(backend, db):
    """``rollups.triggers_on`` says what the families' own checks say, with
    all triggers on, with one of a family's dropped by hand, and with all off."""
    def each():
        on = rollups.triggers_on(db)
        expected = (rollups.enabled(db), rollups.slots_enabled(db), rollups.summaries_enabled(db),
                    bool(db.execute_sql(day_changes_triggers_sql(psai.db.is_postgres(db))).fetchone()[0]))
        assert tuple(on) == expected
        return tuple(on)
    assert each() == (True, True, True, True)
    for trigger in ("psai_day_changes_update", "psai_slot_insert", "psai_rollup_delete", None):
        rollups.enable(db)
        if trigger is None:  # the summaries' triggers
            for statement in drop_summary_triggers_sql(psai.db.is_postgres(db)):
                db.execute_sql(statement)
        else:
            db.execute_sql('DROP TRIGGER "%s"%s' % (trigger, ' ON "ps_model_usage_item"' if psai.db.is_postgres(db)
                                                    else ""))
        assert each() != (True, True, True, True), trigger
    rollups.disable(db)
    assert each() == (False, False, False, False)


def test_without_the_day_counters_triggers_a_check_reads_afresh(backend, db, clock):
    """A write the counters did not see (their trigger dropped) is read: a
    check keeps nothing while the counters are not kept."""
    models, _root, _child = models_and_agents()
    psai.set_budget(name="all", amount=1000)
    clock.set(datetime.datetime(2026, 11, 3, 12, tzinfo=UTC))
    record_usage(models[0], tokens_in=1_000_000, tokens_out=0)
    clock.set(NOW)
    assert psai.budget_status("all")[0]["spent"] == 1
    db.execute_sql('DROP TRIGGER "psai_day_changes_insert"%s'
                   % (' ON "ps_model_usage_item"' if psai.db.is_postgres(db) else ""))
    assert psai.budget_status("all")[0]["spent"] == 1  # (SQLite: read again, in the schema without it)
    other = psai.connect(backend.url, bind=False)
    try:
        clock.set(datetime.datetime(2026, 11, 3, 13, tzinfo=UTC))
        with psai.using(other):
            record_usage(models[0].id, tokens_in=1_000_000, tokens_out=0)
        clock.set(NOW)
    finally:
        other.close()
    assert psai.budget_status("all")[0]["spent"] == 2


def test_a_check_follows_what_its_scope_names_now(backend, db, clock):
    """What a check keeps is for the models and agents its scope names at
    the check: a model moved to another organization, an agent put under
    another parent (no day's count moves) are read as they are now; so is
    a price written 1.0 where it was 1 (another cost's digits), for calls
    without a price snapshot; and a check that fails half way keeps nothing."""
    models, root, child = models_and_agents()
    stray = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "stray"})
    psai.set_budget(name="org", amount=1000, organization_id=2)
    psai.set_budget(name="root", amount=1000, agent=root)
    psai.set_budget(name="small", amount=1000, model="small")
    clock.set(datetime.datetime(2026, 11, 3, 12, tzinfo=UTC))
    for model, agent, tokens in ((models[0], root, 1_000_000), (models[1], child, 4000), (models[2], stray, 4000)):
        record_usage(model, agent, tokens_in=tokens, tokens_out=0)  # 1, 0.012, 0.028 USD
    clock.set(NOW)

    def statuses():
        kept = _digits(_statuses())
        assert kept == _digits(_read_afresh())
        return {name: Decimal(spent) for name, spent, *_rest in kept}

    assert statuses() == {"org": Decimal("1.040"), "root": Decimal("1.012"), "small": 1}
    p = db.param
    db.execute_sql('UPDATE "ps_ai_models" SET organization_id = 3 WHERE id = %s' % p, (models[0].id,))
    assert statuses()["org"] == Decimal("0.040")
    db.execute_sql('UPDATE "ps_agents" SET parent_agent_id = %s WHERE id = %s' % (p, p), (child.id, stray.id))
    assert statuses()["root"] == Decimal("1.040")
    # Calls without a snapshot are priced from their model's prices: 1, then 1.0 (the same cost, more digits).
    cast = "::jsonb" if psai.db.is_postgres(db) else ""
    data = PsModelUsageItem.get(PsModelUsageItem.model_id == models[0].id).data
    db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE model_id = %s' % (p, cast, p),
                   (json.dumps({k: v for k, v in data.items() if k != "pricing"}), models[0].id))
    small = []
    for rate in (1, 1.0):
        models[0].update_configuration({"prices": {"costInTokensPerMillion": rate,
                                                   "costInCachedContextTokensPerMillion": 1}})  # whole rates
        small.append(str(statuses()["small"]))
    assert Decimal(small[0]) == Decimal(small[1]) and small[0] != small[1], small
    models[1].update_configuration({"prices": {"costInTokensPerMillion": 5}})  # (a snapshot: no change)
    other = psai.connect(backend.url, bind=False)
    try:
        clock.set(datetime.datetime(2026, 11, 3, 13, tzinfo=UTC))
        with psai.using(other):
            record_usage(models[2].id, stray.id, tokens_in=8000, tokens_out=0)  # 0.056 USD
        clock.set(NOW)
    finally:
        other.close()
    real = _budget_ledger._group_spent

    def failing(*args):
        _budget_ledger._group_spent = real  # once
        raise RuntimeError("a read that fails half way")
    _budget_ledger._group_spent = failing
    try:
        with pytest.raises(RuntimeError):
            _statuses()
    finally:
        _budget_ledger._group_spent = real
    assert statuses() == {"org": Decimal("0.096"), "root": Decimal("1.096"), "small": 1}


def test_fractional_counts_are_read_afresh(backend, db, clock):
    """Counts written fractional by hand (SQLite adds them as floats,
    PostgreSQL as numeric): a check after a delete answers as a fresh read,
    digit for digit."""
    models, _root, _child = models_and_agents()
    psai.set_budget(name="small", amount=1000, model="small")
    p, cast = db.param, "::jsonb" if psai.db.is_postgres(db) else ""
    for day, count in ((3, 1.25), (4, 0.75), (5, 3)):
        clock.set(datetime.datetime(2026, 11, day, 12, tzinfo=UTC))
        record_usage(models[0], tokens_in=1000, tokens_out=0)
        item = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).get()
        data = dict(item.data, usageNormalized=dict(item.data["usageNormalized"], tokensIn=count))
        db.execute_sql('UPDATE "ps_model_usage_item" SET data = %s%s WHERE id = %s' % (p, cast, p),
                       (json.dumps(data), item.id))
    clock.set(NOW)
    first = _digits(_statuses())
    other = psai.connect(backend.url, bind=False)
    try:
        other.execute_sql('DELETE FROM "ps_model_usage_item" WHERE created_at < %s' % p,
                          (PsModelUsageItem.created_at.db_value(datetime.datetime(2026, 11, 5, tzinfo=UTC)),))
    finally:
        other.close()
    kept = _digits(_statuses())
    assert kept != first and kept == _digits(_read_afresh())
