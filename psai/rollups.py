"""Rollups: the usage items added up per UTC day, kept by the database
itself, so that reports and budgets read a few rows a day instead of every
call (docs/rollups.md).

A rollup row holds, for one UTC day and one group of items priced alike
(model, agent, connector, provider, price snapshot, the tier applied,
long-context side, tokens priced apart: ``sql.ROLLUP_KEYS``), the sums the
report SQL forms. Triggers on ``ps_model_usage_item`` (``sql.rollup_trigger_sql``)
add each item written to its row, and take off each item deleted or
changed, in the writer's own transaction, whoever the writer is: psai,
PolicySynth's processes, SQL by hand. What a trigger cannot fold (an item
whose time is not one psai stores; on PostgreSQL a fold that failed) it
marks in ``psai_rollup_unfolded``, and reports read it from the items.

Where the triggers are missing (a store from before them, a table made
anew, ``psai init --adopt --no-triggers``), reports read every item: exact,
slower; ``enable`` installs them and rebuilds. Rows split by a model's
current long-context threshold (items without a price snapshot) are read
only while the model still has that threshold.
"""
import contextlib
import datetime
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

from peewee import Database

from ._arguments import as_datetime
from .db import current_db, is_postgres, table_columns, write_transaction
from .errors import NotAdoptedError, RollupsOffError
from .fields import UTC
from .models import PsModelUsageItem, usage_counters
from .pricing import COUNTERS, OUTPUT_COUNTERS
from ._sql import (
    BUDGET_SUMS, CHANGED_ITEMS, COUNTER_TOTALS_STALE, COUNTER_TOTALS_TRIGGERS, COUNTER_TOTAL_SUMS,
    DAY_CHANGES_TABLE, KEY_TOTALS_EMPTY, KEY_TOTALS_TABLE, LEDGER_TABLE, MODEL_ROLLUP_KEYS, MODEL_ROLLUP_TABLE,
    ROLLUP_KEYS, ROLLUP_SUMS, ROLLUP_TABLE, SLOT_KEYS, SLOT_MINUTES, SLOT_TABLE, SUMMARIES, UNFOLDED_TABLE,
    ChangeFold, ItemReader, change_fold_sql, counter_groups_sql, counter_totals_on_sql, counter_totals_rebuild_sql,
    counter_totals_trigger_sql, day_changes_rebuilt_sql, day_changes_sql, day_changes_trigger_sql,
    day_changes_triggers_sql, day_model_changes_sql, drop_counter_totals_triggers_sql,
    drop_day_changes_triggers_sql, drop_ledger_triggers_sql, drop_rollup_triggers_sql, drop_slot_triggers_sql,
    drop_summary_triggers_sql, families_on, foldable_sql, ids_in, item_days_sql, kept_counter_totals_sql,
    key_totals_sql, ledger_groups_sql, ledger_insert_sql, ledger_kinds_sql, ledger_rows_sql,
    ledger_sums_of_items_sql, ledger_sums_sql, ledger_trigger_sql, ledger_triggers_sql, model_thresholds_sql,
    negative_counter_rows_sql, quoted, ranges_clause, rollup_day_list_sql, rollup_days_sql, rollup_groups_sql,
    rollup_insert_sql, rollup_rows_sql, rollup_sums_sql, rollup_thresholds_sql, rollup_trigger_sql,
    rollup_triggers_sql, slot_rebuild_sql, slot_rows_sql, slot_sums_sql, slot_thresholds_sql, slot_trigger_sql,
    slot_triggers_sql, summary_rebuild_sql, summary_trigger_sql, summary_triggers_sql, triggers_named_sql,
    uncovered_keys_sql, window,
)

__all__ = ["has_rollups", "enabled", "enable", "disable", "ReadPlan", "read_plan", "rollup_rows", "scan_where",
           "rebuild", "verify", "status", "unfolded", "DayStatus", "RollupProblem", "ROLLUP_TABLE", "ROLLUP_SUMS",
           "has_ledger", "ledger_enabled", "enable_ledger", "ledger_rows", "ledger_kinds", "has_slots", "slots_enabled",
           "budget_plan", "slot_text", "current_thresholds", "has_summaries", "summaries_enabled", "enable_summaries",
           "key_totals", "kept_counter_totals", "coverage_kept", "uncovered_keys",
           "any_negative_counters", "has_day_changes", "enable_day_changes", "day_changes",
           "TriggersOn", "triggers_on", "day_model_changes"]

ONE_DAY = datetime.timedelta(days=1)
# What verify names each summary (SUMMARIES, by whether it is by day), and what it compares the tables kept
# beside the items with, where it is not the items.
_SUMMARY_NAMES = {True: "rollups without agents", False: "tokens per model, agent and connector"}
_COMPARED = dict.fromkeys(_SUMMARY_NAMES.values(), "rollups") | {"counter totals": "counter rows"}
# Range moment: a datetime, or None for an open end.
Moment = datetime.datetime | None


def has_rollups(db: Database) -> bool:
    """True when the database has psai's rollup table (migration 0012)."""
    return bool(table_columns(db, ROLLUP_TABLE)) and "group_key" in table_columns(db, ROLLUP_TABLE)


def enabled(db: Database) -> bool:
    """True when the triggers keep the rollups: reports read them."""
    if not has_rollups(db):
        return False
    return bool(db.execute_sql(rollup_triggers_sql(is_postgres(db))).fetchone()[0])


def has_ledger(db: Database) -> bool:
    """True when the database has the attribution ledger (migration 0017)."""
    return bool(table_columns(db, LEDGER_TABLE))


def ledger_enabled(db: Database) -> bool:
    """True when triggers keep the attribution ledger beside the rollups:
    reports by user, session and tag read it for the days they read the
    rollups (without its triggers they read the items)."""
    if not has_ledger(db):
        return False
    return bool(db.execute_sql(ledger_triggers_sql(is_postgres(db))).fetchone()[0])


def enable_ledger(db: Database) -> None:
    """In the caller's write transaction, with the rollups on: install the
    ledger's triggers and rebuild it from the items."""
    for statement in ledger_trigger_sql(is_postgres(db)):
        db.execute_sql(statement)
    _rebuild_ledger(db, None, None)


def _rebuild_ledger(db: Database, start: Moment, end: Moment) -> None:
    """The ledger of [start, end) (whole days) recomputed from the items."""
    where, params = _day_where(db, start, end)
    db.execute_sql('DELETE FROM "%s" WHERE %s' % (LEDGER_TABLE, " AND ".join(where) or "1 = 1"), params)
    r = ItemReader(is_postgres(db))
    item_params: list = []
    item_where = window(db, "i.created_at", PsModelUsageItem.created_at, start, end, None, item_params) + [
        foldable_sql(r.postgres, "i.created_at")]
    db.execute_sql(ledger_insert_sql(r, ledger_groups_sql(r, item_where)), item_params)


def has_slots(db: Database) -> bool:
    """True when the database has the budgets' 15-minute slots (migration 0016)."""
    return bool(table_columns(db, SLOT_TABLE))


def slots_enabled(db: Database) -> bool:
    """True when triggers keep the 15-minute slots: budgets read their periods' partial days from them."""
    if not has_slots(db):
        return False
    return bool(db.execute_sql(slot_triggers_sql(is_postgres(db))).fetchone()[0])


def has_day_changes(db: Database) -> bool:
    """True when the database has the days' change counters (migration 0025)."""
    return bool(table_columns(db, DAY_CHANGES_TABLE))


def day_changes_enabled(db: Database) -> bool:
    """True when triggers keep the days' change counters."""
    return has_day_changes(db) and bool(db.execute_sql(day_changes_triggers_sql(is_postgres(db))).fetchone()[0])


def enable_day_changes(db: Database) -> None:
    """In the caller's write transaction, with the rollups on: install the
    triggers that bump the days' change counters (a count needs no rebuild)."""
    for statement in day_changes_trigger_sql(is_postgres(db)):
        db.execute_sql(statement)


class TriggersOn(NamedTuple):
    """Which families of rows triggers keep on a database (``triggers_on``)."""

    rollups: bool
    slots: bool
    summaries: bool
    day_changes: bool


def triggers_on(db: Database) -> TriggersOn:
    """Whether triggers keep the rollups, the slots, the summaries and the
    days' change counters: ``enabled``, ``slots_enabled``,
    ``summaries_enabled`` and the counters' in one query (a round trip each
    on PostgreSQL, where a budget check is a few)."""
    postgres = is_postgres(db)
    on = families_on(postgres, db.execute_sql(triggers_named_sql(postgres)).fetchall())
    return TriggersOn(has_rollups(db) and bool(on[0]), has_slots(db) and bool(on[1]),
                      has_summaries(db) and bool(on[2]), has_day_changes(db) and bool(on[3]))


def day_changes(db: Database, first: str, last: str, model_ids: Iterable[int] | None) -> dict[str, Any]:
    """Where triggers keep the days' change counters beside the rollups and
    slots (``triggers_on``): per UTC day of [first, last] (days as text), a
    number that grows with every change of the items of ``model_ids``
    (None: every model) that day, and under DAY_CHANGES_REBUILT the count of
    rebuilds (each rewrites every day). Equal in two reads only when those
    days' rollups and slots are the same (a day not written yet is absent)."""
    params: list = []
    sql = day_changes_sql(db, first, last, model_ids, params)
    return dict(db.execute_sql(sql, params).fetchall())


def day_model_changes(db: Database, days: Iterable[str], model_ids: Iterable[int] | None
                      ) -> dict[str, dict[int, Any]]:
    """``day_changes`` of each of ``days`` model by model: {day: {model id: count}}."""
    found: dict[str, dict[int, Any]] = {}
    params: list = []
    for day, model_id, count in db.execute_sql(day_model_changes_sql(db, list(days), model_ids, params), params):
        found.setdefault(day, {})[model_id] = count
    return found


def has_summaries(db: Database) -> bool:
    """True when the database has the rollups' summaries (migration 0024)."""
    return all(table_columns(db, table) for table in (MODEL_ROLLUP_TABLE, KEY_TOTALS_TABLE))


def summaries_enabled(db: Database) -> bool:
    """True when triggers on the rollups keep their summaries: the rollups
    without agents (reports and budgets that do not keep agents apart read
    them) and the tokens per (model, agent, connector) of every day."""
    if not has_summaries(db):
        return False
    return bool(db.execute_sql(summary_triggers_sql(is_postgres(db))).fetchone()[0])


def _counter_totals_usable(db: Database) -> bool:
    """True when triggers made for the counters ps_model_usage has keep
    the counter totals, and no fold of theirs failed since a rebuild."""
    if not table_columns(db, KEY_TOTALS_TABLE):
        return False
    installed = [row[0] for row in db.execute_sql(counter_totals_on_sql(is_postgres(db)))]
    if len(installed) != (1 if is_postgres(db) else len(COUNTER_TOTALS_TRIGGERS)):
        return False
    present = set(usage_counters(db))
    if any({c for c in COUNTERS if '."%s"' % c in text} != present for text in installed):
        return False
    return db.execute_sql('SELECT 1 FROM %s WHERE "group_key" = %s' % (quoted(KEY_TOTALS_TABLE), db.param),
                          [COUNTER_TOTALS_STALE]).fetchone() is None


def kept_counter_totals(db: Database, model_ids: Iterable[int] | None) -> list[tuple] | None:
    """The counters' input and output tokens per (model, agent, connector)
    (of ``model_ids``) as the triggers keep them: rows (model_id, agent_id,
    connector_id, tokens_in, tokens_out) of the counter rows without a
    negative counter; None when they are not kept (``sql.counter_totals_sql`` adds them up)."""
    if not _counter_totals_usable(db):
        return None
    where: list[str] = []
    params: list = []
    ids_in(db, '"model_id"', model_ids, where, params)
    return db.execute_sql(kept_counter_totals_sql(where), params).fetchall()


def _install(db: Database, statements: list[str], installed: bool) -> None:
    """Run a family's installing ``statements`` in the caller's transaction.
    PostgreSQL: its function made anew, its trigger made only when not
    ``installed`` (dropping or making a trigger locks its table against
    writers, who may hold the other tables a rebuild locks: a deadlock)."""
    if not is_postgres(db):
        for statement in statements:
            db.execute_sql(statement)
        return
    db.execute_sql(statements[0])
    if not installed:
        for statement in statements[1:]:
            db.execute_sql(statement)


def coverage_kept(db: Database) -> bool:
    """True when the database keeps, for all usage, both the items' totals
    per (model, agent, connector) and the counters': the triggers keep the
    rollups and their summaries, nothing is marked unfolded, no rollup row
    is split by a threshold its model no longer has (every item is in the
    rollups as a report reads them), and the counter totals are kept."""
    if not (enabled(db) and summaries_enabled(db) and _counter_totals_usable(db)):
        return False
    if db.execute_sql('SELECT 1 FROM %s LIMIT 1' % quoted(UNFOLDED_TABLE)).fetchone() is not None:
        return False
    return not _stale_threshold_days(db, [], [])


def uncovered_keys(db: Database) -> tuple[bool, list[tuple]]:
    """Where ``coverage_kept``: whether there are items at all, and the keys
    (model, agent: None where it is gone, connector) whose counters hold
    more input or output tokens than their items, each with whether it has
    items. The database names the keys to look at (a few, usually none)."""
    any_items = db.execute_sql('SELECT 1 FROM %s WHERE "calls" > 0 LIMIT 1'
                               % quoted(KEY_TOTALS_TABLE)).fetchone() is not None
    merged: dict[tuple, list] = {}
    for model_id, agent_id, connector_id, agent_exists, *sums in db.execute_sql(uncovered_keys_sql()):
        key = (model_id, agent_id if agent_exists else None, connector_id)
        into = merged.setdefault(key, [0] * len(sums))
        for i, value in enumerate(sums):
            into[i] += _number(value)
    return any_items, [key + (calls > 0,) for key, (calls, items_in, items_out, counted_in, counted_out)
                       in merged.items() if counted_in > items_in or counted_out > items_out]


def any_negative_counters(db: Database) -> bool:
    """Where ``coverage_kept``: whether a counter row has a negative counter."""
    return db.execute_sql(negative_counter_rows_sql()).fetchone() is not None


def _rebuild_counter_totals(db: Database) -> None:
    """In the caller's write transaction: the counter totals recomputed from
    the counter rows, and their triggers made for the counters the table
    has. Writers of counter rows go on (on PostgreSQL: a write the rebuild
    does not see is added to the row it makes, when it commits)."""
    postgres = is_postgres(db)
    if not table_columns(db, "ps_model_usage"):
        return
    present, output = usage_counters(db), OUTPUT_COUNTERS
    if not postgres:  # made again for the counters the table has now
        for statement in drop_counter_totals_triggers_sql(False):
            db.execute_sql(statement)
    table = quoted(KEY_TOTALS_TABLE)
    _zero(db, KEY_TOTALS_TABLE, COUNTER_TOTAL_SUMS)
    db.execute_sql('DELETE FROM %s WHERE "group_key" = %s' % (table, db.param), [COUNTER_TOTALS_STALE])
    db.execute_sql(counter_totals_rebuild_sql(postgres, present, output))
    db.execute_sql('DELETE FROM %s WHERE %s' % (table, KEY_TOTALS_EMPTY))
    _install(db, counter_totals_trigger_sql(postgres, present, output),
             bool(db.execute_sql(counter_totals_on_sql(postgres)).fetchall()))


def _zero(db: Database, table: str, columns: Iterable[str]) -> None:
    """Set ``columns`` to 0 in every row of ``table``: totals a rebuild then adds to (writers' deltas kept)."""
    db.execute_sql('UPDATE %s SET %s' % (quoted(table), ", ".join('"%s" = 0' % c for c in columns)))


def enable_summaries(db: Database) -> None:
    """In the caller's write transaction, with the rollups on: build the
    summaries from the rollups and install their triggers."""
    _rebuild_summaries(db, [], [])


def _rebuild_summaries(db: Database, where: list[str], params: list) -> None:
    """In the caller's write transaction, the rollups of ``where`` (their
    days; every total) just rebuilt: their summaries recomputed from them,
    and the summaries' triggers installed."""
    postgres = is_postgres(db)
    for summary in SUMMARIES:
        if summary.ranged:
            db.execute_sql('DELETE FROM "%s" WHERE %s' % (summary.table, " AND ".join(where) or "1 = 1"), params)
        else:  # every day's; the counter rows' totals beside them stay
            _zero(db, summary.table, summary.sums)
        db.execute_sql(summary_rebuild_sql(postgres, summary, where if summary.ranged else []),
                       params if summary.ranged else [])
    _install(db, summary_trigger_sql(postgres), bool(db.execute_sql(summary_triggers_sql(postgres)).fetchone()[0]))
    _rebuild_counter_totals(db)


def _db(db: Database | None) -> Database:
    return db if db is not None else current_db()


def enable(db: Database | None = None) -> list[str]:
    """Install the triggers and rebuild every day from the items, in one
    transaction. Returns the days that hold rollups."""
    db = _db(db)
    if not has_rollups(db):
        raise NotAdoptedError("this database has no psai rollup table: run `psai init --adopt` (a PolicySynth "
                              "database) or `psai migrate`")
    with write_transaction(db):
        for statement in rollup_trigger_sql(is_postgres(db)) + (
                slot_trigger_sql(is_postgres(db)) if has_slots(db) else []):
            db.execute_sql(statement)
        if has_ledger(db):
            for statement in ledger_trigger_sql(is_postgres(db)):
                db.execute_sql(statement)
        if has_day_changes(db):
            enable_day_changes(db)
        return _rebuild(db, None, None)


def disable(db: Database | None = None) -> None:
    """Remove the triggers: reports read the items (``enable`` to come back)."""
    db = _db(db)
    with write_transaction(db):
        postgres = is_postgres(db)
        for statement in (drop_rollup_triggers_sql(postgres) + drop_ledger_triggers_sql(postgres)
                          + drop_slot_triggers_sql(postgres)
                          + (drop_day_changes_triggers_sql(postgres) if has_day_changes(db) else [])
                          + (drop_summary_triggers_sql(postgres) + drop_counter_totals_triggers_sql(postgres)
                             if has_summaries(db) else [])):
            db.execute_sql(statement)


@dataclass(frozen=True)
class PreparedChange:
    """A change of many items prepared for ``applying_change`` (SQLite):
    each kept family's folds, their groups in temporary tables, and the
    state of what they were computed from besides the items (which families
    triggers keep, the marks of items not folded)."""

    folds: tuple[ChangeFold, ...]
    state: tuple


# The families of rows the triggers keep, by name: whether they are on, and the statements installing them.
_FAMILIES = {"rollups": (enabled, rollup_trigger_sql), "ledger": (ledger_enabled, ledger_trigger_sql),
             "slots": (slots_enabled, slot_trigger_sql), "day_changes": (day_changes_enabled, day_changes_trigger_sql)}


def _families_on(db: Database) -> tuple[str, ...]:
    return tuple(name for name, (kept, _installing) in _FAMILIES.items() if kept(db))


def _change_state(db: Database) -> tuple:
    marks = db.execute_sql('SELECT "item_id", "range_day" FROM %s ORDER BY 1, 2' % quoted(UNFOLDED_TABLE)).fetchall() \
        if has_rollups(db) else []
    return _families_on(db), tuple(marks)


def prepare_change(db: Database, where: list[str], params: list, changed: str, changed_params: list
                   ) -> PreparedChange | None:
    """SQLite, in the caller's transaction (a read transaction will do,
    before the write lock is taken): for a change of the items meeting
    ``where`` (``i``; its parameters ``params``) that keeps their ids and
    times, the groups each kept family's triggers would fold out and in,
    computed into temporary tables; ``changed``: SQL of the items as the
    change leaves them (``sql.repriced_items_sql``, ``sql.audited_items_sql``),
    its parameters ``changed_params``. The caller must check, under the
    write lock, that the items are as they were read (``models.usage_state``)
    and ``is_current``. None on PostgreSQL, whose triggers fold a statement at once."""
    if is_postgres(db):
        return None
    state = _change_state(db)
    folds = tuple(change_fold_sql(name, where) for name in state[0])
    for table in [CHANGED_ITEMS] + [table for fold in folds for table in fold.temporary]:
        db.execute_sql('DROP TABLE IF EXISTS temp."%s"' % table)
    db.execute_sql('CREATE TEMP TABLE "%s" AS %s' % (CHANGED_ITEMS, changed), changed_params)
    for fold in folds:
        for statement, with_params in fold.prepare:
            db.execute_sql(statement, params if with_params else [])
    db.execute_sql('DROP TABLE temp."%s"' % CHANGED_ITEMS)
    return PreparedChange(folds, state)


def is_current(db: Database, prepared: PreparedChange | None) -> bool:
    """Whether what ``prepared`` was computed from besides the items is as it was."""
    return prepared is None or _change_state(db) == prepared.state


@contextlib.contextmanager
def applying_change(db: Database, prepared: PreparedChange | None) -> Iterator[None]:
    """In the caller's write transaction, around the change ``prepared``
    (SQLite): the items folded out of each kept family's rows before it and
    into them after it from the prepared groups, and the families' update
    triggers dropped for it and made again, all in that transaction: no
    other connection sees them missing, and a change that fails leaves
    them as they were."""
    if prepared is None:
        yield
        return
    for fold in prepared.folds:
        for statement in fold.before:
            db.execute_sql(statement)
        db.execute_sql('DROP TRIGGER "%s"' % fold.trigger)
    yield
    for name, fold in zip(prepared.state[0], prepared.folds):
        for statement in fold.after:
            db.execute_sql(statement)
        for statement in _FAMILIES[name][1](False):  # CREATE TRIGGER IF NOT EXISTS: the dropped one again
            db.execute_sql(statement)
        for table in fold.temporary:
            db.execute_sql('DROP TABLE temp."%s"' % table)


# -- days ---------------------------------------------------------------------------------

def _start(day: str) -> datetime.datetime:
    d = datetime.date.fromisoformat(day)
    return datetime.datetime(d.year, d.month, d.day, tzinfo=UTC)


def _after(day: str) -> Moment:
    """The start of the day after ``day``; None (open) after the last day there is."""
    try:
        return _start(day) + ONE_DAY
    except OverflowError:
        return None


def _day(moment: datetime.datetime) -> str:
    moment = moment.astimezone(UTC)
    return "%04d-%02d-%02d" % (moment.year, moment.month, moment.day)


def _floor(moment: datetime.datetime) -> datetime.datetime:
    """The UTC midnight at or before ``moment``."""
    return _start(_day(moment))


def _ceil(moment: datetime.datetime) -> Moment:
    """The UTC midnight at or after ``moment`` (None past the last one)."""
    floor = _floor(moment)
    return floor if floor == moment else _after(_day(moment))


def _number(value: Any) -> Any:
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


# -- what reports read ---------------------------------------------------------------------

@dataclass(frozen=True)
class ReadPlan:
    """How a report reads [since, until): ``days``, the UTC days read from
    the rollups; ``scan``, the ranges of ``created_at`` ([start, end), None:
    open) read from the items; ``unfolded``, whether items the triggers
    could not fold are read from the items too."""

    since: Moment
    until: Moment
    days: tuple[str, ...]
    scan: tuple[tuple[Moment, Moment], ...]
    unfolded: bool = False

    @property
    def reads_items(self) -> bool:
        return bool(self.scan) or self.unfolded


def _day_where(db: Database, first: Moment, last: Moment, column: str = '"range_day"') -> tuple[list[str], list]:
    where, params = [], []
    if first is not None:
        where.append("%s >= %s" % (column, db.param))
        params.append(_day(first))
    if last is not None:
        where.append("%s < %s" % (column, db.param))
        params.append(_day(last))
    return where, params


def _stale_threshold_days(db: Database, where: list[str], params: list) -> set[str]:
    """Days whose rollups of items without a snapshot were split by a
    threshold their model no longer has."""
    rows = db.execute_sql(rollup_thresholds_sql(where), params).fetchall()
    if not rows:
        return set()
    current = current_thresholds(db, {row[1] for row in rows})
    return {day for day, model_id, threshold in rows if _number(threshold) != _number(current.get(model_id))}


def current_thresholds(db: Database, model_ids: Iterable[Any]) -> dict[Any, Any]:
    """The current long-context threshold of the models ``model_ids`` (by
    id; None where unset), read as reports read it: only those models' rows,
    however many models the store holds."""
    ids = sorted(model_ids)
    if not ids:
        return {}
    return dict(db.execute_sql(model_thresholds_sql(ItemReader(is_postgres(db)), len(ids)), ids).fetchall())


def _marked_days(db: Database, where: list[str], params: list) -> set[str]:
    """Days whose rollups a trigger could not keep (read from the items)."""
    return {row[0] for row in db.execute_sql('SELECT DISTINCT "range_day" FROM %s WHERE "range_day" IS NOT NULL%s'
                                             % (quoted(UNFOLDED_TABLE), "".join(" AND " + w for w in where)),
                                             params)}


def _any_unfolded_item(db: Database) -> bool:
    return db.execute_sql('SELECT 1 FROM %s WHERE "item_id" IS NOT NULL LIMIT 1'
                          % quoted(UNFOLDED_TABLE)).fetchone() is not None


def read_plan(db: Database, since: Moment = None, until: Moment = None) -> ReadPlan:
    """Which days of [since, until) reports read from the rollups, and what
    they read from the items: everything when the triggers are missing;
    else the partial days at the ends, the days a trigger marked, the days
    split by a threshold their model no longer has, and the unfolded items."""
    everything = ReadPlan(since, until, (), ((since, until),))
    if not enabled(db):
        return everything
    first = None if since is None else _ceil(since)
    last = None if until is None else _floor(until)
    if since is not None and first is None or first is not None and last is not None and first >= last:
        return everything
    where, params = _day_where(db, first, last)
    postgres = is_postgres(db)
    table = MODEL_ROLLUP_TABLE if summaries_enabled(db) else ROLLUP_TABLE  # the same days, fewer rows
    days = {row[0] for row in db.execute_sql(rollup_day_list_sql(postgres, where, table),
                                             params * 2 if postgres else params)}
    left = _marked_days(db, where, params) | (_stale_threshold_days(db, where, params) if days else set())
    read = sorted(days - left)
    scan: list[tuple[Moment, Moment]] = []
    if since is not None and since != first:
        scan.append((since, first))
    scan += [(_start(day), _after(day)) for day in sorted(left)]
    if until is not None and last is not None and until != last:
        scan.append((last, until))
    return ReadPlan(since, until, tuple(read), tuple(scan), _any_unfolded_item(db))


def rollup_rows(db: Database, group: list[str], days: Iterable[str], model_ids: Iterable[int] | None,
                agent_ids: Iterable[int] | None = None, only: Iterable[str] | None = None) -> list[tuple]:
    """The rollups of ``days`` (of ``model_ids``, ``agent_ids``) added up by ``group``: rows
    in the layout of item_groups_sql's (the keys, then GroupSums' columns; ``only``: the
    keys, then just those of ROLLUP_SUMS)."""
    days = list(days)
    if not days:
        return []
    where, params = _days_clause(db, days, model_ids, agent_ids)
    # Without agents or connectors, their summary holds the same sums in fewer rows.
    table = (MODEL_ROLLUP_TABLE if agent_ids is None and set(group) <= set(MODEL_ROLLUP_KEYS)
             and summaries_enabled(db) else ROLLUP_TABLE)
    return db.execute_sql(rollup_sums_sql(group, where, None if only is None else list(only), table),
                          params).fetchall()


def key_totals(db: Database, plan: ReadPlan, model_ids: Iterable[int] | None) -> list[tuple]:
    """The input and output tokens the rollups of ``plan``'s days hold per
    (model, agent, connector), of ``model_ids``: rows (model_id, agent_id,
    connector_id, all_in, all_out). From their summary when ``plan`` reads
    every day from the rollups, which then holds them all."""
    if plan.since is None and plan.until is None and not plan.reads_items and summaries_enabled(db):
        where: list[str] = []
        params: list = []
        ids_in(db, '"model_id"', model_ids, where, params)
        return db.execute_sql(key_totals_sql(where), params).fetchall()
    return rollup_rows(db, ["model_id", "agent_id", "connector_id"], plan.days, model_ids, only=("all_in", "all_out"))


def ledger_rows(db: Database, group: list[str], days: Iterable[str], model_ids: Iterable[int] | None,
                agent_ids: Iterable[int] | None, kind: str, value: str | None) -> list[tuple]:
    """The attribution ledger of ``days`` (of ``model_ids``, ``agent_ids``)
    for ``kind`` (user, session, ``tag:KEY``) and ``value`` (None: every
    value, and the calls without one, ``attribute`` None: the rollups less
    the ledger) added up by ``group`` (``attribute``: the value): rows in
    rollup_rows' layout."""
    days = list(days)
    if not days:
        return []
    common, params = _days_clause(db, days, model_ids, agent_ids)
    attributed = ['"kind" = %s' % db.param] + (['"value" = %s' % db.param] if value is not None else [])
    attributed_params = [kind] + ([value] if value is not None else [])
    every = value is None and "attribute" in group
    all_params = params + attributed_params + (params if every else [])
    return db.execute_sql(ledger_sums_sql(group, common, attributed, every), all_params).fetchall()


def ledger_kinds(db: Database, days: Iterable[str]) -> set[str]:
    """The kinds of attribution (user, session, ``tag:KEY``) the ledger holds for ``days``."""
    days = list(days)
    if not days:
        return set()
    where, params = _days_clause(db, days, None, None)
    return {row[0] for row in db.execute_sql(ledger_kinds_sql(where), params)}


def _days_clause(db: Database, days: list[str], model_ids: Iterable[int] | None,
                 agent_ids: Iterable[int] | None) -> tuple[list[str], list]:
    """WHERE clauses of rollup (and ledger) rows of ``days`` (consecutive ones as one range), models and agents."""
    params: list = []
    runs: list[list[str]] = []
    for day in days:
        if runs and _after(runs[-1][1]) == _start(day):
            runs[-1][1] = day
        else:
            runs.append([day, day])
    clauses = []
    for first, last in runs:
        clauses.append('("range_day" >= %s AND "range_day" <= %s)' % (db.param, db.param))
        params += [first, last]
    where = ["(%s)" % " OR ".join(clauses)]
    ids_in(db, '"model_id"', model_ids, where, params)
    ids_in(db, '"agent_id"', agent_ids, where, params)
    return where, params


def scan_where(db: Database, column: str, plan: ReadPlan, params: list) -> list[str]:
    """WHERE clauses for the items ``plan`` reads from the items (``column``
    their created_at; ``i.id`` their id): one clause, or none for everything."""
    if plan.scan == ((None, None),):
        return []
    if not plan.unfolded:
        if len(plan.scan) == 1:
            return window(db, column, PsModelUsageItem.created_at, plan.scan[0][0], plan.scan[0][1], None, params)
        return [ranges_clause(db, column, PsModelUsageItem.created_at, list(plan.scan), params)]
    ranges = ranges_clause(db, column, PsModelUsageItem.created_at, list(plan.scan), params)
    within = window(db, column, PsModelUsageItem.created_at, plan.since, plan.until, None, params)
    marked = '%s.id IN (SELECT "item_id" FROM %s)' % (column.split(".")[0], quoted(UNFOLDED_TABLE))
    return ["(%s OR (%s))" % (ranges, " AND ".join([marked] + within))]


def slot_text(moment: datetime.datetime) -> str | None:
    """The slot starting at ``moment`` as the slots' ``range_slot`` has it;
    None when ``moment`` is not a slot's start (a zone's midnight before
    offsets were whole quarter hours)."""
    moment = moment.astimezone(UTC)
    if moment.minute % SLOT_MINUTES or moment.second or moment.microsecond:
        return None
    return "%04d-%02d-%02d %02d:%02d" % (moment.year, moment.month, moment.day, moment.hour, moment.minute)


def _slots_usable(db: Database, first: str, last: str) -> bool:
    """Whether the slots [first, last) of one UTC day hold its calls: the day
    is not marked, and no slot row was split by a threshold its model no longer has."""
    if _marked_days(db, ['"range_day" = %s' % db.param], [first[:10]]):
        return False
    rows = db.execute_sql(slot_thresholds_sql(['"range_slot" >= %s' % db.param, '"range_slot" < %s' % db.param]),
                          [first, last]).fetchall()
    if not rows:
        return True
    current = current_thresholds(db, {model_id for model_id, _threshold in rows})
    return all(_number(threshold) == _number(current.get(model_id)) for model_id, threshold in rows)


def budget_plan(db: Database, since: Moment, until: Moment, exact: bool = False, on: TriggersOn | None = None
                ) -> tuple[ReadPlan, tuple[tuple[str, str, str | None], ...]]:
    """How a budget reads [since, until): its whole UTC days from the
    rollups, and the partial days at the ends from the 15-minute slots
    where triggers keep them, the ends fall on a quarter hour (every IANA
    zone's midnight does) and nothing there is marked; the rest from the
    items. While some item could not be folded at all, the ends are read
    from the items (a slot may hold it).

    Each slot read is (first, last, day): the slots [first, last) of
    ``range_slot`` added (``day`` None), or, for an end holding more than
    half its UTC day, that day's rollups less the slots [first, last) of
    the rest of the day (``day`` the day): fewer rows to read, the same
    sums where they are whole numbers (the reader asks again with ``exact``
    where they are not).

    The whole days are every day of the range but the marked ones (a day
    without rollups has nothing to read), without ``read_plan``'s look at
    each day's rollups; the reader checks the long-context thresholds the
    rows it reads were split by, and asks again with ``exact`` (``read_plan``'s
    days, each end read from its own slots) when one is no longer its model's.
    ``on``: ``triggers_on(db)``, when the caller has it."""
    kept = (on.rollups and on.slots) if on is not None else enabled(db) and slots_enabled(db)
    if since is None or until is None or not kept:
        return read_plan(db, since, until), ()
    first, last = _ceil(since), _floor(until)
    if first is None:
        return read_plan(db, since, until), ()
    if first < last and exact:
        whole = read_plan(db, first, last)
        days, scan, edges = whole.days, list(whole.scan), [(since, first), (last, until)]
    elif first < last:
        where, params = _day_where(db, first, last)
        marked = _marked_days(db, where, params)
        every = [_day(first + datetime.timedelta(days=n)) for n in range((last - first).days)]
        days = tuple(day for day in every if day not in marked)
        scan = [(_start(day), _after(day)) for day in sorted(marked)]
        edges = [(since, first), (last, until)]
    elif first == last:
        days, scan, edges = (), [], [(since, first), (last, until)]
    else:  # within one UTC day
        days, scan, edges = (), [], [(since, until)]
    unfolded = _any_unfolded_item(db)
    slots: list[tuple[str, str, str | None]] = []
    for start, end in edges:
        if start >= end:
            continue
        if not unfolded and not exact:
            rest = _rest_of_day(start, end)
            if rest is not None and _slots_usable(db, *rest):
                slots.append(rest + (_day(start),))
                continue
        first_slot = slot_text(start)
        # The end of a day is the next day's first slot.
        last_slot = slot_text(end)
        if not unfolded and first_slot is not None and last_slot is not None and _slots_usable(
                db, first_slot, last_slot):
            slots.append((first_slot, last_slot, None))
        else:
            scan.append((start, end))
    return ReadPlan(since, until, tuple(days), tuple(sorted(scan, key=lambda r: r[0] or since)), unfolded), tuple(slots)


def _rest_of_day(start: datetime.datetime, end: datetime.datetime) -> tuple[str, str] | None:
    """The slots [first, last) of the rest of the UTC day of the end [start,
    end) of a period, when that end holds more than half the day and begins
    or ends it, its other bound on a quarter hour: what a budget subtracts
    from the day's rollups to read that end."""
    day_start, day_end = _floor(start), _after(_day(start))
    if day_end is None or end - start <= ONE_DAY / 2 or end > day_end:
        return None
    rest = (end, day_end) if start == day_start else (day_start, start) if end == day_end else None
    if rest is None:
        return None
    first, last = slot_text(rest[0]), slot_text(rest[1])
    return (first, last) if first is not None and last is not None else None


# -- rebuild, verify, status --------------------------------------------------------------

def _whole_days(since: datetime.date | str | None, until: datetime.date | str | None
                ) -> tuple[Moment, Moment]:
    """[since, until) widened to whole UTC days: what rollups are kept by."""
    start, end = as_datetime(since), as_datetime(until, end=True)
    return (None if start is None else _floor(start)), (None if end is None else _ceil(end))


def _rebuild(db: Database, start: Moment, end: Moment) -> list[str]:
    """In the caller's write transaction: the rollups of [start, end) (whole
    days) recomputed from their items, and the marks of what they hold."""
    postgres = is_postgres(db)
    if postgres:
        # Writers of items wait (their triggers would fold into rows being made).
        db.execute_sql('LOCK TABLE "ps_model_usage_item" IN SHARE MODE')
    where, params = _day_where(db, start, end)
    summaries = has_summaries(db)
    if summaries:  # written from the rebuilt rollups at the end, not row by row by their triggers
        if postgres:
            db.execute_sql("SET LOCAL psai.rebuilding = 'on'")
        else:
            for statement in drop_summary_triggers_sql(False):
                db.execute_sql(statement)
    db.execute_sql('DELETE FROM "%s" WHERE %s' % (ROLLUP_TABLE, " AND ".join(where) or "1 = 1"), params)
    db.execute_sql('DELETE FROM %s WHERE "range_day" IS NOT NULL%s' % (
        quoted(UNFOLDED_TABLE), "".join(" AND " + w for w in where)), params)
    r = ItemReader(postgres)
    item_params: list = []
    foldable = foldable_sql(postgres, "i.created_at")
    item_where = window(db, "i.created_at", PsModelUsageItem.created_at, start, end, None, item_params) + [foldable]
    db.execute_sql(rollup_insert_sql(r, rollup_groups_sql(r, item_where)), item_params)
    if has_slots(db):  # the budgets' slots of the same days
        slot_where = [w.replace('"range_day"', '"range_slot"') for w in where]
        db.execute_sql('DELETE FROM %s WHERE %s' % (quoted(SLOT_TABLE), " AND ".join(slot_where) or "1 = 1"), params)
        db.execute_sql(slot_rebuild_sql(r, item_where), item_params)
    # Items folded now are no longer unfolded; items gone need no mark; every odd time has one.
    marks = quoted(UNFOLDED_TABLE)
    db.execute_sql('DELETE FROM %s WHERE "item_id" IN (SELECT i.id FROM "ps_model_usage_item" i WHERE %s)'
                   % (marks, " AND ".join(item_where)), item_params)
    db.execute_sql('DELETE FROM %s WHERE "item_id" IS NOT NULL AND NOT EXISTS '
                   '(SELECT 1 FROM "ps_model_usage_item" i WHERE i.id = %s."item_id")' % (marks, marks))
    db.execute_sql('INSERT INTO %s ("item_id", "reason") SELECT i.id, %s FROM "ps_model_usage_item" i WHERE NOT %s '
                   'AND NOT EXISTS (SELECT 1 FROM %s u WHERE u."item_id" = i.id)'
                   % (marks, db.param, foldable, marks), ("its created_at is not a time psai folds",))
    if ledger_enabled(db):
        _rebuild_ledger(db, start, end)
    if has_day_changes(db):  # every day read before is read again
        db.execute_sql(day_changes_rebuilt_sql())
    if summaries:
        _rebuild_summaries(db, where, params)
        if postgres:
            db.execute_sql("SET LOCAL psai.rebuilding = 'off'")
    return sorted(row[0] for row in db.execute_sql(rollup_days_sql(where), params))


def rebuild(db: Database | None = None, *, since: datetime.date | str | None = None,
            until: datetime.date | str | None = None) -> list[str]:
    """Recompute the rollups of the days in [since, until) (dates; a date
    ``until`` is inclusive; default every day) from their items, in one
    transaction that writers of items wait for: what repairs a rollup row
    edited by hand, or a day a trigger marked. Returns the days that hold
    rollups. Raises ``RollupsOffError`` when the triggers are missing
    (``enable`` installs them and rebuilds)."""
    db = _db(db)
    if not enabled(db):
        raise RollupsOffError("the rollups are off (no triggers keep them): run `psai rollup enable`")
    start, end = _whole_days(since, until)
    with write_transaction(db):
        return _rebuild(db, start, end)


class RollupProblem(TypedDict):
    """A day whose rollups differ from its items."""

    day: str
    problem: str


def _sums(rows: Iterable[tuple], width: int = len(ROLLUP_KEYS), names: tuple[str, ...] = ROLLUP_SUMS
          ) -> dict[tuple, list]:
    """Rows (their first ``width`` columns the key, then the sums ``names``)
    added up per key; rows of no call left out, a provider's cost of no call None."""
    added: dict[tuple, list] = {}
    for row in rows:
        key = tuple(_number(v) for v in row[:width])
        sums = [_number(v) for v in row[width:width + len(names)]]
        into = added.get(key)
        if into is None:
            added[key] = sums
            continue
        for i, value in enumerate(sums):
            if value is None or into[i] is None:
                into[i] = value if into[i] is None else into[i]
            else:
                into[i] = into[i] + value
    if "provider_cost" in names:
        cost_at, calls_at = names.index("provider_cost"), names.index("cost_calls")
        for sums in added.values():
            if not sums[calls_at]:
                sums[cost_at], sums[calls_at] = None, 0
    return {key: sums for key, sums in added.items() if sums[0]}


def _same(a: list, b: list) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, float) or isinstance(y, float):
            # SQLite adds fractions as floats, in the order it reads them.
            if x is None or y is None or not math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


def _differing_days(expected: dict[tuple, list], stored: dict[tuple, list], day_of: Callable[[tuple], str],
                    days: set[str]) -> dict[str, int]:
    """Of ``days``, those whose rows (by key: ``_sums``') differ between
    ``expected`` and ``stored``, each with how many of its keys one of them lacks."""
    differ: dict[str, int] = {}
    for key in set(expected) | set(stored):
        day = day_of(key)
        if day not in days:
            continue
        if key not in expected or key not in stored:
            differ[day] = differ.get(day, 0) + 1
        elif not _same(expected[key], stored[key]):
            differ.setdefault(day, 0)
    return differ


def verify(db: Database | None = None, *, since: datetime.date | str | None = None,
           until: datetime.date | str | None = None) -> list[RollupProblem]:
    """The days reports would read from the rollups whose rollups differ
    from their items recomputed (a full read of those days' items), and
    whose budgets' 15-minute slots or attribution ledger do, where triggers
    keep them: one problem a day and table."""
    db = _db(db)
    if not enabled(db):
        return []
    start, end = _whole_days(since, until)
    plan = read_plan(db, start, end)
    if not plan.days:
        return []
    days = set(plan.days)
    first_day = min(days)  # where the totals over every day are named
    r = ItemReader(is_postgres(db))
    params: list = []
    where = window(db, "i.created_at", PsModelUsageItem.created_at, start, end, None, params) + [
        foldable_sql(r.postgres, "i.created_at")]
    day_where, day_params = _day_where(db, start, end)
    at = ROLLUP_KEYS.index("day")
    # Each table kept beside the items: what it should hold, what it holds, the day of a key.
    checks: list[tuple[str, dict[tuple, list], dict[tuple, list], Callable[[tuple], str]]] = [(
        "rollups", _sums(db.execute_sql(rollup_groups_sql(r, where), params).fetchall()),
        _sums(row[1:] for row in db.execute_sql(rollup_rows_sql(day_where), day_params)), lambda key: key[at])]
    if slots_enabled(db):
        width = 1 + len(SLOT_KEYS)
        slot_where, _ = _day_where(db, start, end, '"range_slot"')
        checks.append(("15-minute budget slots",
                       _sums(db.execute_sql(slot_sums_sql(r, where), params).fetchall(), width, BUDGET_SUMS),
                       _sums(db.execute_sql(slot_rows_sql(slot_where), day_params).fetchall(), width, BUDGET_SUMS),
                       lambda key: key[0][:10]))
    if summaries_enabled(db):
        # The rollups as they are, added up as each summary adds them up: a rollup row wrong is the rollups'
        # problem (its summaries follow it). The totals of every day are compared when every day is read, and
        # named under the first (a rebuild of any day remakes them).
        rollups_stored = checks[0][2]
        for summary in SUMMARIES:
            if not summary.ranged and (since is not None or until is not None or plan.reads_items):
                continue
            at_keys = [ROLLUP_KEYS.index(c) for c in summary.keys]
            at_sums = [ROLLUP_SUMS.index(c) for c in summary.sums]
            width = 1 + len(summary.keys)
            expected = _sums((((key[at] if summary.ranged else "",) + tuple(key[i] for i in at_keys)
                               + tuple(sums[i] for i in at_sums)) for key, sums in rollups_stored.items()),
                             width, summary.sums)
            where_of, params_of = (day_where, day_params) if summary.ranged else ([], [])
            rows = db.execute_sql('SELECT %s FROM "%s" WHERE %s' % (summary.columns, summary.table,
                                                                 " AND ".join(where_of) or "1 = 1"), params_of)
            stored = _sums(((row[:-1] if summary.ranged else ("",) + tuple(row[:-1])) for row in rows), width,
                           summary.sums)
            checks.append((_SUMMARY_NAMES[summary.ranged], expected, stored,
                           (lambda key: key[0]) if summary.ranged else (lambda key: first_day)))
    if since is None and until is None and summaries_enabled(db):
        # The counter rows' totals (not by day: checked over every day, named under the first).
        present, output = usage_counters(db), OUTPUT_COUNTERS
        # Each key's rows, with and without a negative counter, first: a key of either is compared.
        names = ("rows",) + COUNTER_TOTAL_SUMS

        def totals(rows):  # (model, agent, connector, COUNTER_TOTAL_SUMS) rows, keyed and added up
            return _sums((("",) + row[:3] + (row[3] + row[6],) + row[3:] for row in rows), 4, names)
        expected = totals(db.execute_sql(counter_groups_sql(present, output)))
        stored = totals(db.execute_sql(
            'SELECT "model_id", "agent_id", "connector_id", %s FROM %s WHERE "group_key" <> %s' % (
                ", ".join(quoted(c) for c in COUNTER_TOTAL_SUMS), quoted(KEY_TOTALS_TABLE), db.param),
            [COUNTER_TOTALS_STALE]))
        if not _counter_totals_usable(db):  # a fold failed, or the triggers are missing or made for other counters
            stored = {}
        checks.append(("counter totals", expected, stored, lambda key: first_day))
    if ledger_enabled(db):
        width = 2 + len(ROLLUP_KEYS)
        checks.append(("attribution ledger rows",
                       _sums(db.execute_sql(ledger_sums_of_items_sql(r, where), params).fetchall(), width),
                       _sums(db.execute_sql(ledger_rows_sql(day_where), day_params).fetchall(), width),
                       lambda key: key[2 + at]))
    problems: list[RollupProblem] = []
    for table, expected, stored, day_of in checks:
        for day, missing in sorted(_differing_days(expected, stored, day_of, days).items()):
            problems.append({"day": day, "problem": "its %s differ from its %s (%s): run `psai rollup rebuild "
                                                    "--since %s --until %s`" % (
                                                        table, _COMPARED.get(table, "items"),
                                                        "%d groups differ" % missing if missing
                                                        else "the sums differ", day, day)})
    return sorted(problems, key=lambda problem: problem["day"])


class DayStatus(TypedDict):
    """A day of ``status``: its items, the calls its rollups hold, and
    ``state``: ``current`` (reports read the rollups) or ``items`` (they
    read the items: the triggers are missing, or one could not keep the day)."""

    day: str
    items: int
    rolled_up: int
    state: str


def status(db: Database | None = None, *, since: datetime.date | str | None = None,
           until: datetime.date | str | None = None) -> list[DayStatus]:
    """Every day of [since, until) with items or rollups, oldest first."""
    db = _db(db)
    start, end = _whole_days(since, until)
    params: list = []
    where = window(db, "created_at", PsModelUsageItem.created_at, start, end, None, params)
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    # An item whose time has no day (PostgreSQL's infinity) is on no day: `psai check` names it.
    items = {row[0]: int(row[1]) for row in db.execute_sql(item_days_sql(is_postgres(db), where), params)
             if row[0] is not None}
    rolled: dict[str, int] = {}
    used: set[str] = set()
    if has_rollups(db):
        day_where, day_params = _day_where(db, start, end)
        rolled = {day: int(calls) for day, calls in db.execute_sql(rollup_days_sql(day_where), day_params)}
        used = set(read_plan(db, start, end).days)
    return [{"day": day, "items": items.get(day, 0), "rolled_up": rolled.get(day, 0),
             "state": "current" if day in used else "items"} for day in sorted(set(items) | set(rolled))]


def unfolded(db: Database | None = None) -> list[dict[str, Any]]:
    """What the triggers could not fold, for ``psai check``: items (``item``,
    read from the items) and days (``day``, read from the items until rebuilt)."""
    db = _db(db)
    if not has_rollups(db):
        return []
    return [{"item": item_id, "day": day, "reason": reason} for item_id, day, reason in db.execute_sql(
        'SELECT "item_id", "range_day", "reason" FROM %s ORDER BY "id"' % quoted(UNFOLDED_TABLE))]
