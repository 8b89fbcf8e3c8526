"""Rollups: the usage items added up per UTC day, so that reports read a
few rows a day instead of every call (docs/rollups.md).

A rollup row holds, for one range day (the items whose ``created_at`` is
in ``[day 00:00, next day 00:00)`` UTC), the sums the report SQL forms
for one group of items priced alike: model, agent, connector, the day as
the reports read it, provider, price snapshot, the tier applied,
long-context side, tokens priced apart (``sql.ROLLUP_KEYS``). Beside the
sums, each row keeps its items' fingerprint: the sum of their ids, and on
PostgreSQL the sum of their offsets into the day.

Whoever writes the items, a report uses a day's rollups only when they
still account for exactly that day's items: the count and the fingerprint
of the day's items, read from the ``created_at`` index alone (SQLite's
holds the ids, PostgreSQL's only the times), must equal those the rollups
hold (``coverage``), and rows split by a model's
current long-context threshold (items without a price snapshot) must have
been split by the threshold the model has now. Any other day, and the
partial days at a period's ends, are scanned from the items. An insert,
a delete or a changed ``created_at`` that psai did not make changes a
day's count or fingerprint; what psai changes in place (reprice, audit,
import, copy) it drops from the rollups in the same transaction
(``invalidate``). ``record_usage`` adds each call to its row in the
call's own transaction (``add_item``, and on PostgreSQL inside the one
round trip). ``rebuild`` recomputes days from their items; ``verify``
recomputes the days reports would use and names those that differ (an
in-place edit of an item's data by hand, or a rollup row edited).
"""
import contextlib
import datetime
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypedDict

from peewee import Database, PostgresqlDatabase

from .arguments import as_datetime
from .db import current_db, is_postgres, table_columns, write_transaction
from .fields import UTC
from .models import PsModelUsageItem
from .sql import (
    ROLLUP_KEYS, ROLLUP_SUMS, ROLLUP_TABLE, ItemReader, item_day_counts_sql, item_days_sql, model_thresholds_sql,
    ranges_clause, rollup_add_sql, rollup_days_sql, rollup_groups_sql, rollup_insert_sql, rollup_rows_sql,
    rollup_sums_sql, rollup_thresholds_sql, window,
)

__all__ = ["full_scan", "one_reading", "invalidate_items", "Coverage", "coverage", "has_rollups", "add_item",
           "round_trip_rollup", "rollup_rows", "invalidate", "rebuild", "verify", "status", "DayStatus",
           "RollupProblem", "ROLLUP_TABLE", "scan_where", "ROLLUP_SUMS"]

ONE_DAY = datetime.timedelta(days=1)
# Range moment: a datetime, or None for an open end.
Moment = datetime.datetime | None


_BYPASS = threading.local()


def has_rollups(db: Database) -> bool:
    """True when the database has psai's rollup table (migration 0006)."""
    return bool(table_columns(db, ROLLUP_TABLE))


@contextlib.contextmanager
def full_scan() -> Iterator[None]:
    """Inside the block, in this thread, reports read every item and no
    rollup: what the rollups are checked against (tests, ``verify``)."""
    before = getattr(_BYPASS, "on", False)
    _BYPASS.on = True
    try:
        yield
    finally:
        _BYPASS.on = before


_READING = threading.local()


@contextlib.contextmanager
def one_reading() -> Iterator[None]:
    """Inside the block, in this thread, ``coverage`` of one period is
    checked once: for a report whose reads are one snapshot, which asks it
    more than once (its items, and what they cover of the counters)."""
    if getattr(_READING, "found", None) is not None:
        yield
        return
    _READING.found = {}
    try:
        yield
    finally:
        _READING.found = None


def _start(day: str) -> datetime.datetime:
    d = datetime.date.fromisoformat(day)
    return datetime.datetime(d.year, d.month, d.day, tzinfo=UTC)


def _day(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _stamp(moment: datetime.datetime) -> Any:
    return PsModelUsageItem.created_at.db_value(moment)


def _number(value: Any) -> Any:
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


# -- maintenance by psai's own writers ---------------------------------------------------

_ADD: dict[bool, tuple[str, str]] = {}


def _add_statements(postgres: bool) -> tuple[str, str]:
    """(update, insert) adding one item (by id, the one parameter) to its rollup row."""
    if postgres not in _ADD:
        r = ItemReader(postgres)
        g, update, insert = rollup_add_sql(r, ["i.id = %s" % ("%s" if postgres else "?")])
        _ADD[postgres] = ("WITH %s %s" % (g, update), "WITH %s %s" % (g, insert))
    return _ADD[postgres]


def add_item(db: Database, item_id: int) -> None:
    """Add the item ``item_id`` (just written, in the caller's transaction) to its rollup row."""
    postgres = is_postgres(db)
    update, insert = _add_statements(postgres)
    if postgres:
        changed = db.execute_sql(update, (item_id,)).rowcount
    else:  # Python's sqlite3 gives no rowcount for a statement that starts WITH
        connection = db.connection()
        before = connection.total_changes
        db.execute_sql(update, (item_id,))
        changed = connection.total_changes - before
    if changed == 0:
        db.execute_sql(insert, (item_id,))


def round_trip_rollup() -> str:
    """PostgreSQL's one-round-trip recording statement's part that adds the
    new item (the CTE ``item``, its RETURNING *) to its rollup row: CTEs to
    follow ``item``'s, no parameters. The model's row is the CTE ``m`` (its
    id and configuration), read already."""
    if True not in _ROUND_TRIP:
        g, update, insert = rollup_add_sql(ItemReader(True), [], source="item", models="m")
        _ROUND_TRIP[True] = (', %s, rolled AS (%s RETURNING t."id"), started AS (%s WHERE NOT EXISTS '
                             '(SELECT 1 FROM rolled))' % (g, update, insert))
    return _ROUND_TRIP[True]


_ROUND_TRIP: dict[bool, str] = {}


def invalidate(db: Database, since: Moment = None, until: Moment = None,
               model_ids: Iterable[int] | None = None) -> int:
    """Drop the rollups of the days that hold [since, until) (of the models
    ``model_ids``; None: all), in the caller's transaction: for a writer
    that changes items in place, which the count check cannot see. Those
    days are read from the items until ``rebuild`` closes them again.
    Returns the rows dropped."""
    if not has_rollups(db):
        return 0
    where, params = _day_window(db, since, until, inclusive_end=True)
    if model_ids is not None:
        ids = sorted(set(model_ids))
        where.append('"model_id" IN (%s)' % (", ".join([db.param] * len(ids)) or "NULL"))
        params += ids
    cursor = db.execute_sql('DELETE FROM "%s" WHERE %s' % (ROLLUP_TABLE, " AND ".join(where) or "1 = 1"), params)
    return cursor.rowcount


def invalidate_items(db: Database, items: Iterable[tuple[datetime.datetime, int]]) -> int:
    """``invalidate`` the days and models of ``items`` ((created_at, model_id)
    of items changed in place). Returns the rows dropped."""
    days: dict[str, set[int]] = {}
    for created_at, model_id in items:
        days.setdefault(_day(created_at), set()).add(model_id)
    dropped = 0
    for day, models in sorted(days.items()):
        start = _start(day)
        dropped += invalidate(db, start, start + ONE_DAY, models)
    return dropped


def _day_window(db: Database, since: Moment, until: Moment, inclusive_end: bool = False) -> tuple[list[str], list]:
    """WHERE clauses on range_day: the whole days in [since, until), or
    (``inclusive_end``) every day that [since, until) touches."""
    where, params = [], []
    if since is not None:
        first = since if inclusive_end or since == _start(_day(since)) else _start(_day(since)) + ONE_DAY
        where.append('"range_day" >= %s' % db.param)
        params.append(_day(first))
    if until is not None:
        last = _start(_day(until))
        if inclusive_end and until > last:
            last += ONE_DAY
        where.append('"range_day" < %s' % db.param)
        params.append(_day(last))
    return where, params


# -- coverage ---------------------------------------------------------------------------

@dataclass
class Coverage:
    """How a period is read: ``days``, the range days read from the rollups;
    ``scan``, the ranges of ``created_at`` ([start, end), None: open) read
    from the items."""

    days: list[str]
    scan: list[tuple[Moment, Moment]]
    # Per day of the period that has items or rollups: (items, their fingerprint, rolled calls, rolled
    # fingerprint, usable).
    detail: dict[str, tuple[int, int, int, int, bool]] = field(default_factory=dict)


def _items_per_day(db: Database, days: list[str]) -> dict[str, tuple[int, int]]:
    """(count, fingerprint) of the items of each range day of ``days`` (``item_day_counts_sql``)."""
    params: list = []
    for day in days:
        start = _start(day)
        params += [day, _stamp(start), _stamp(start + ONE_DAY)]
    counts = {}
    for day, count, ids in (row if len(row) == 3 else (row[0],) + tuple(row[1].split(":"))
                            for row in db.execute_sql(item_day_counts_sql(db, len(days)), params)):
        counts[day] = (int(count), int(ids or 0))
    return counts


def _stale_threshold_days(db: Database, where: list[str], params: list) -> set[str]:
    """Days whose rollups of items without a snapshot were split by a
    threshold their model no longer has."""
    rows = db.execute_sql(rollup_thresholds_sql(where), params).fetchall()
    if not rows:
        return set()
    current = dict(db.execute_sql(model_thresholds_sql(ItemReader(is_postgres(db)))).fetchall())
    return {day for day, model_id, threshold in rows if _number(threshold) != _number(current.get(model_id))}


def coverage(db: Database, since: Moment = None, until: Moment = None) -> Coverage:
    """Which days of [since, until) the rollups cover exactly now, and the
    rest to scan. A day is covered when its items' count and fingerprint
    (each day a range over the created_at index) equal its rollups' and no
    threshold it was split by has changed."""
    everything = Coverage([], [(since, until)])
    if getattr(_BYPASS, "on", False) or not has_rollups(db):
        return everything
    found = getattr(_READING, "found", None)
    if found is None:
        return _coverage(db, since, until, everything)
    key = (db, since, until)
    if key not in found:
        found[key] = _coverage(db, since, until, everything)
    return found[key]


def _coverage(db: Database, since: Moment, until: Moment, everything: Coverage) -> Coverage:
    first = None if since is None else _start(_day(since)) if since == _start(_day(since)) \
        else _start(_day(since)) + ONE_DAY
    last = None if until is None else _start(_day(until))
    if first is not None and last is not None and first >= last:
        return everything
    where, params = _day_window(db, since, until)
    rolled = {day: (int(calls), int(ids or 0)) for day, calls, ids in
              db.execute_sql(rollup_days_sql(is_postgres(db), where), params)}
    if not rolled:
        return everything
    items = _items_per_day(db, sorted(rolled))
    stale = _stale_threshold_days(db, where, params)
    detail = {}
    for day in sorted(rolled):
        count, ids = items.get(day, (0, 0))
        calls, rolled_ids = rolled[day]
        detail[day] = (count, ids, calls, rolled_ids, (count, ids) == (calls, rolled_ids) and day not in stale)
    days = [day for day in sorted(rolled) if detail[day][4]]
    # Scanned: all of [since, until) but the days read from the rollups.
    scan: list[tuple[Moment, Moment]] = []
    at: Moment = since
    for day in days:
        start = _start(day)
        if at is None or at < start:
            scan.append((at, start))
        at = start + ONE_DAY
    if until is None or at is None or at < until:
        scan.append((at, until))
    return Coverage(days, scan, detail)


def rollup_rows(db: Database, group: list[str], days: list[str], model_ids: Iterable[int] | None) -> list[tuple]:
    """The rollups of ``days`` (of ``model_ids``) added up by ``group``: rows
    in the layout of item_groups_sql's (the keys, then GroupSums' columns)."""
    if not days:
        return []
    params: list = []
    runs: list[list[str]] = []
    for day in days:  # consecutive days as one range
        if runs and _day(_start(runs[-1][1]) + ONE_DAY) == day:
            runs[-1][1] = day
        else:
            runs.append([day, day])
    clauses = []
    for first, last in runs:
        clauses.append('("range_day" >= %s AND "range_day" <= %s)' % (db.param, db.param))
        params += [first, last]
    where = ["(%s)" % " OR ".join(clauses)]
    if model_ids is not None:
        ids = list(model_ids)
        where.append('"model_id" IN (%s)' % (", ".join([db.param] * len(ids)) or "NULL"))
        params += ids
    return db.execute_sql(rollup_sums_sql(group, where), params).fetchall()


def scan_where(db: Database, column: str, ranges: list[tuple[Moment, Moment]], params: list) -> list[str]:
    """WHERE clauses for items in ``ranges`` (as ``window``'s: one clause, or none for everything)."""
    if ranges == [(None, None)]:
        return []
    if len(ranges) == 1:
        return window(db, column, PsModelUsageItem.created_at, ranges[0][0], ranges[0][1], None, params)
    return [ranges_clause(db, column, PsModelUsageItem.created_at, ranges, params)]


# -- rebuild, verify, status --------------------------------------------------------------

def _db(db: Database | None) -> Database:
    return db if db is not None else current_db()


def _recompute(db: Database, day: str) -> None:
    start = _start(day)
    params: list = [day]
    where = window(db, "i.created_at", PsModelUsageItem.created_at, start, start + ONE_DAY, None, params)
    db.execute_sql('DELETE FROM "%s" WHERE "range_day" = %s' % (ROLLUP_TABLE, db.param), (day,))
    db.execute_sql(rollup_insert_sql(db, rollup_groups_sql(ItemReader(is_postgres(db)), where)), params)


def _whole_days(since: datetime.date | str | None, until: datetime.date | str | None
                ) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    """[since, until) widened to whole UTC days: what rollups are kept by."""
    start, end = as_datetime(since), as_datetime(until, end=True)
    start = None if start is None else _start(_day(start))
    if end is not None and end != _start(_day(end)):
        end = _start(_day(end)) + ONE_DAY
    return start, end


def rebuild(db: Database | None = None, *, since: datetime.date | str | None = None,
            until: datetime.date | str | None = None, everything: bool = False) -> list[str]:
    """Recompute the rollups of the days in [since, until) from their items
    (dates; a date ``until`` is inclusive): the days the rollups do not
    cover exactly (``everything``: every day with items or rollups). Each
    day in its own transaction; a day being recorded meanwhile waits for
    it. Returns the days rebuilt."""
    db = _db(db)
    if not has_rollups(db):
        return []
    start, end = _whole_days(since, until)
    found = coverage(db, start, end)
    if not found.detail and not found.days:
        # Nothing rolled up yet in the period: every day with items.
        days = sorted(_items_per_day_loose(db, start, end))
    elif everything:
        days = sorted(set(found.detail) | set(_items_per_day_loose(db, start, end)))
    else:
        days = sorted(set(_items_per_day_loose(db, start, end)) - set(found.days)
                      | {d for d, detail in found.detail.items() if not detail[4]})
    for day in days:
        with write_transaction(db):
            if isinstance(db, PostgresqlDatabase):
                # Calls recorded meanwhile wait: none is counted twice, or lost.
                db.execute_sql('LOCK TABLE "%s" IN SHARE ROW EXCLUSIVE MODE' % ROLLUP_TABLE)
            _recompute(db, day)
    return days


def _items_per_day_loose(db: Database, first: Moment, last: Moment) -> set[str]:
    """The days of [first, last) that hold items, whatever their timestamps' text."""
    params: list = []
    where = window(db, "created_at", PsModelUsageItem.created_at, first, last, None, params)
    days = set()
    for row in db.execute_sql(item_days_sql(is_postgres(db), where), params):
        try:
            days.add(_day(_start(row[0])))
        except (TypeError, ValueError):
            continue  # not a day: reports read such items from the items
    return days


class RollupProblem(TypedDict):
    """A day whose rollups, though their count check passes, differ from its items."""

    day: str
    problem: str


def _sums(rows: Iterable[tuple]) -> dict[tuple, list]:
    """Rollup rows (keys, sums) added up per key."""
    added: dict[tuple, list] = {}
    width = len(ROLLUP_KEYS)
    for row in rows:
        key = tuple(_number(v) for v in row[:width])
        sums = [_number(v) for v in row[width:]]
        into = added.get(key)
        if into is None:
            added[key] = sums
            continue
        for i, value in enumerate(sums):
            if value is None or into[i] is None:
                into[i] = value if into[i] is None else into[i]
            else:
                into[i] = into[i] + value
    return added


def _same(a: dict[tuple, list], b: dict[tuple, list]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, sums in a.items():
        for x, y in zip(sums, b[key]):
            if isinstance(x, float) or isinstance(y, float):
                # SQLite adds fractions as floats, in the order it reads them.
                if x is None or y is None or not math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12):
                    return False
            elif x != y:
                return False
    return True


def verify(db: Database | None = None, *, since: datetime.date | str | None = None,
           until: datetime.date | str | None = None) -> list[RollupProblem]:
    """The days reports would read from the rollups whose rollups differ
    from their items recomputed (a full read of those days' items)."""
    db = _db(db)
    if not has_rollups(db):
        return []
    start, end = as_datetime(since), as_datetime(until, end=True)
    problems: list[RollupProblem] = []
    r = ItemReader(is_postgres(db))
    for day in coverage(db, start, end).days:
        day_start = _start(day)
        params: list = []
        where = window(db, "i.created_at", PsModelUsageItem.created_at, day_start, day_start + ONE_DAY, None, params)
        expected = _sums(db.execute_sql(rollup_groups_sql(r, where), params).fetchall())
        stored = _sums(row[1:] for row in db.execute_sql(rollup_rows_sql(['"range_day" = %s' % db.param]), (day,)))
        if not _same(expected, stored):
            differ = sorted(set(expected) ^ set(stored), key=repr)
            problems.append({"day": day, "problem": "its rollups differ from its items (%s): run `psai rollup "
                                                    "rebuild --all --since %s --until %s`" % (
                                                        "%d groups differ" % len(differ) if differ
                                                        else "the sums differ", day, day)})
    return problems


class DayStatus(TypedDict):
    """A day of ``status``: its items, what its rollups hold, and ``state``:
    ``current`` (reports read the rollups), ``stale`` (they read the items)."""

    day: str
    items: int
    rolled_up: int
    state: str


def status(db: Database | None = None, *, since: datetime.date | str | None = None,
           until: datetime.date | str | None = None) -> list[DayStatus]:
    """Every day of [since, until) with items or rollups, oldest first."""
    db = _db(db)
    if not has_rollups(db):
        return []
    start, end = _whole_days(since, until)
    used = set(coverage(db, start, end).days)
    params: list = []
    where = window(db, "created_at", PsModelUsageItem.created_at, start, end, None, params)
    items = {row[0]: int(row[1]) for row in db.execute_sql(item_days_sql(is_postgres(db), where), params)}
    day_where, day_params = _day_window(db, start, end)
    rolled = {day: int(calls) for day, calls, _ids in
              db.execute_sql(rollup_days_sql(is_postgres(db), day_where), day_params)}
    return [{"day": day, "items": items.get(day, 0), "rolled_up": rolled.get(day, 0),
             "state": "current" if day in used else "stale"} for day in sorted(set(items) | set(rolled))]

