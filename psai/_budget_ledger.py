"""What a budget has spent, and the alerts a recorded call raises: the
budgets' ledger, below recording, which calls it directly in each call's
transaction (``budget_alerts``, then ``fire`` after the commit). The
user-facing functions (``psai.set_budget``, ``check_budget``, ...) are in
``psai.budget``.

What a budget has spent is a lookup: the calls' items in its scope and
period, read from the rollups the triggers keep (whole UTC days from the
daily rollups, the partial days at the period's ends, in a zone other than
UTC, from the 15-minute slots; from the items where neither can be read),
each group of calls priced alike priced once from its own snapshot, as
``cost_report`` prices it. Usage that cannot be priced, or whose counts
cannot be read, is never counted as 0: it makes the state ``unknown``."""
import calendar
import datetime
import decimal
import json
import logging
import time
import weakref
import zoneinfo
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, TypedDict, cast

from peewee import Database

from ._constants import strict_json_dumps
from .db import is_postgres, read_transaction, table_columns, write_transaction
from .errors import ValidationError
from .fields import UTC, utcnow
from ._items import APART, BUCKETS, effective_prices
from .models import Budget, BudgetEvent, PsAgent, PsAiModel, PsModelUsageItem, sub_agent_tree
from .pricing import Pricer, exact_sum
from .rollups import (
    ReadPlan, TriggersOn, budget_plan, current_thresholds, day_changes, day_model_changes, enabled, ledger_enabled,
    read_plan, scan_where, summaries_enabled, triggers_on,
)
from .schemas import BUDGET_FIELDS, validate_budget_values
from ._sql import (
    BUDGET_GROUP, BUDGET_SUMS, DAY_CHANGES_REBUILT, ITEM_VALUES, LEDGER_TABLE, MODEL_ROLLUP_TABLE,
    POSTGRES_STATE_SQL, ROLLUP_SUMS, ROLLUP_TABLE, SLOT_TABLE, ItemReader, attribute_sql, budget_sums_sql,
    compiled_once, ids_in, item_groups_sql, slot, window,
)

__all__ = ["LIMIT", "TOTAL_PERIOD_KEY", "BudgetStatus", "BudgetEventRow", "LISTENERS", "budget_problem", "usable",
           "period_bounds", "spent", "status", "statuses", "kept_statuses", "invalid_status", "covering", "event_row",
           "record_crossings", "fire", "budgets_covering", "forget", "NO_BUDGET_RECHECK", "attribution_of",
           "call_carries", "ledger_snapshot", "Carried", "carrying_write", "CARRIED_MAX", "budget_rows"]

log = logging.getLogger("psai")

# The limit is a threshold of its own, beside the warnings.
LIMIT = Decimal(1)
# The key a "total" budget's crossings are stored under: it has one period, from the start.
TOTAL_PERIOD_KEY = datetime.datetime(1970, 1, 1, tzinfo=UTC)


class BudgetStatus(TypedDict):
    """One budget's state now (``budget_status``)."""

    budget: str  # its name
    currency: str
    limit: Decimal | None  # None when the budget is invalid
    spent: Decimal | None  # priced calls in the scope and period; None when the budget is invalid
    unpriced_tokens: int  # tokens of calls that cannot be priced (or are priced in another currency)
    remaining: Decimal | None  # the limit less what is spent, 0 once exceeded; None when invalid
    period_start: datetime.datetime | None  # in the budget's zone; None for a total budget
    period_end: datetime.datetime | None
    forecast: Decimal | None  # the period's pace carried to its end; None for a total budget
    state: str  # ok, warning, exceeded, unknown; invalid: it holds what psai cannot use (problem says what)
    hard: bool
    calls: int
    problem: str | None  # why an invalid budget cannot be used; None for every other state
    scope: str  # what it covers (scope_of): "agent=7", "model=GPT-4o, user=alice", "all usage, tag team=search",
    # "all usage, session=conv-1"


def scope_of(budget: Budget) -> str:
    """What a budget covers, as ``psai budgets list`` and ``status`` show it:
    its scope (agent, with " (only)" without its sub-agents; model;
    provider; organization; else "all usage") and the user, session or tag it is limited to."""
    scope = next(("%s=%s" % (label, value) for label, value in (
        ("agent", budget.agent_id), ("model", budget.model_name), ("provider", budget.provider),
        ("organization", budget.organization_id)) if value is not None), "all usage")
    if budget.agent_id is not None and not budget.include_sub_agents:
        scope += " (only)"
    if budget.user is not None:
        scope += ", user=%s" % budget.user
    elif budget.session is not None:
        scope += ", session=%s" % budget.session
    elif budget.tag_key is not None:
        scope += ", tag %s=%s" % (budget.tag_key, budget.tag_value)
    return scope


class BudgetEventRow(TypedDict):
    """A threshold crossed (``budget_events``, ``on_budget_event``)."""

    budget: str
    threshold: Decimal  # a fraction of the limit; 1 is the limit itself
    spent: Decimal
    currency: str
    period_start: datetime.datetime | None
    at: datetime.datetime


# What ``psai.on_budget_event`` registered: called after each recorded call that crosses a threshold.
LISTENERS: list[Callable[[BudgetEventRow], Any]] = []


# -- budgets ------------------------------------------------------------------------

# Problems of stored budgets by their values: recording a call asks for each
# budget covering it, and the answer does not change while the row does not.
_PROBLEMS: dict[str, str | None] = {}
_PROBLEMS_MAX = 256


def budget_problem(budget: Budget) -> str | None:
    """Why a stored budget cannot be used, or None. psai validates what it
    writes; a row written by an older psai (an amount of 1e1000000) or by
    hand (an unknown zone, a text agent id) is read through the same rule,
    so that no value a budget holds can fail a call being recorded."""
    values = {name: budget.__data__.get(name) for name in BUDGET_FIELDS}
    try:
        key = json.dumps(values, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        key = repr(sorted(values.items(), key=lambda item: item[0]))
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    try:
        validate_budget_values(values)
        problem = None
    except ValidationError as error:
        problem = str(error)
    except (RecursionError, TypeError, ValueError, ArithmeticError) as error:  # beyond what the schema expects
        problem = "%s: %s" % (type(error).__name__, error)
    if len(_PROBLEMS) >= _PROBLEMS_MAX:
        _PROBLEMS.clear()
    _PROBLEMS[key] = problem
    return problem


def usable(rows: Iterable[Budget]) -> list[Budget]:
    """The budgets that can be used; each one that cannot is logged, once a
    process, and otherwise left out (``budget_status`` shows it invalid)."""
    usable = []
    for row in rows:
        problem = budget_problem(row)
        if problem is None:
            usable.append(row)
        elif (row.id, problem) not in _logged:
            _logged.add((row.id, problem))
            log.warning("psai budget %r is invalid and is left out: %s (set it again with `psai budgets set`, "
                        "or remove it)", row.name, problem)
    return usable


_logged: set[tuple[Any, str]] = set()

def budget_rows(db: Database, *, ids: list[int] | None = None, order: str = "id", lock: bool = False
                ) -> list[Budget]:
    """The budgets (those of ``ids``; every one without) in ``order`` ("id"
    or "name"); ``lock``: FOR UPDATE, on PostgreSQL. Compiled once a shape
    (``compiled_once``): at every recorded call a budget covers."""
    lock = lock and is_postgres(db)
    slots = None if ids is None else ["id%d" % i for i in range(len(ids))]

    def build() -> Any:
        query = Budget.select().order_by(getattr(Budget, order))
        if slots is not None:
            query = query.where(Budget.id.in_([slot(name) for name in slots]))
        return query.for_update() if lock else query
    statement = compiled_once(db, ("budget_rows", len(ids) if ids is not None else None, order, lock), build)
    return list(Budget.raw(statement.sql, *statement.params(dict(zip(slots or (), ids or ())))).bind(db))


# -- periods ------------------------------------------------------------------------

def _midnight(day: datetime.date, zone: zoneinfo.ZoneInfo) -> datetime.datetime:
    # Midnight as the zone's clocks show it (fold=0: the first of two, when clocks go back then).
    return datetime.datetime(day.year, day.month, day.day, tzinfo=zone)


def period_bounds(period: str, timezone: str, now: datetime.datetime | None = None
                  ) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    """The period holding ``now`` (default: psai's now), as aware datetimes
    in ``timezone``: [start, end). A total budget has (None, None)."""
    if period == "total":
        return None, None
    zone = zoneinfo.ZoneInfo(timezone)
    today = (now or utcnow()).astimezone(zone).date()
    if period == "day":
        first, after = today, today + datetime.timedelta(days=1)
    elif period == "week":
        first = today - datetime.timedelta(days=today.weekday())
        after = first + datetime.timedelta(days=7)
    elif period == "month":
        first = today.replace(day=1)
        after = (first + datetime.timedelta(days=calendar.monthrange(first.year, first.month)[1]))
    elif period == "year":
        first, after = today.replace(month=1, day=1), today.replace(year=today.year + 1, month=1, day=1)
    else:
        raise ValidationError({"period": ["Must be one of: day, week, month, year, total."]})
    return _midnight(first, zone), _midnight(after, zone)


# -- what a budget has spent -----------------------------------------------------------

def _sub_agents(agent_id: int) -> set[int]:
    """The agent and every agent under it (``sub_agent_tree``); a deleted
    agent's calls are reported without one, so it covers none."""
    agent = PsAgent.get_or_none(PsAgent.id == agent_id)
    return {row.id for row in sub_agent_tree(agent)} if agent is not None else {agent_id}


def _scope_model_ids(budget: Budget) -> list[int] | None:
    """The models a model or organization budget covers (None: not limited by model)."""
    if budget.model_name is not None:
        query = PsAiModel.select(PsAiModel.id).where(PsAiModel.name == budget.model_name)
    elif budget.organization_id is not None:
        query = PsAiModel.select(PsAiModel.id).where(PsAiModel.organization_id == budget.organization_id)
    else:
        return None
    ids: Any = query.tuples()
    return sorted(model_id for (model_id,) in ids)


# Where each of BUDGET_SUMS is among the sums of item_groups_sql's rows (GroupSums', ROLLUP_SUMS' order).
_ITEM_SUMS_AT = [ROLLUP_SUMS.index(name) for name in BUDGET_SUMS]


def _groups(db: Database, start: datetime.datetime | None, end: datetime.datetime | None,
            model_ids: list[int] | None, agent_ids: list[int] | None, exact: bool = False) -> list[tuple]:
    """The calls of [start, end) of these models and agents, added up by
    what prices them (rows: BUDGET_GROUP, whether the model's threshold
    split them and that threshold, then BUDGET_SUMS): whole UTC days from the
    daily rollups, partial days from the 15-minute slots, what neither holds
    from the items (``rollups.budget_plan``)."""
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    plan, slots = budget_plan(db, start, end, exact)
    rows: list[tuple] = []
    # Days whose rollups are read whole, the slots of the rest of the day subtracted (budget_plan's).
    days = sorted(plan.days + tuple(day for _first, _last, day in slots if day is not None))
    if days:
        # A budget over every agent reads the rollups' summary without them: the same sums in fewer rows.
        table = MODEL_ROLLUP_TABLE if agent_ids is None and summaries_enabled(db) else ROLLUP_TABLE
        rows += _day_rows(db, table, days, model_ids, agent_ids)
        split = {(row[0], row[len(BUDGET_GROUP) + 1]) for row in rows if row[len(BUDGET_GROUP)] == 1}
        if split and not exact and _thresholds_changed(db, split):  # read as reports read them
            return _groups(db, start, end, model_ids, agent_ids, exact=True)
    subtracted = []
    for first, last, day in slots:
        found = _slot_rows(db, first, last, model_ids, agent_ids)
        if day is None:
            rows += found
        else:
            subtracted += found
    if subtracted:
        width = len(BUDGET_GROUP) + 2
        # SQLite adds fractional counts as floats: a difference of float sums is not the sums' own.
        if any(type(value) is float for row in rows + subtracted for value in row[width:]):
            return _groups(db, start, end, model_ids, agent_ids, exact=True)
        rows += [row[:width] + tuple(None if value is None else -value for value in row[width:])
                 for row in subtracted]
    if plan.reads_items:
        rows += _item_rows(db, plan, model_ids, agent_ids)
    return rows


def _slot_rows(db: Database, first: str, last: str, model_ids: list[int] | None, agent_ids: list[int] | None
               ) -> list[tuple]:
    """The slots [first, last) of these models and agents, in budget_sums_sql's layout."""
    where, params = ['"range_slot" >= %s' % db.param, '"range_slot" < %s' % db.param], [first, last]
    ids_in(db, '"model_id"', model_ids, where, params)
    ids_in(db, '"agent_id"', agent_ids, where, params)
    return db.execute_sql(budget_sums_sql(SLOT_TABLE, where), params).fetchall()


def _day_rows(db: Database, table: str, days: Iterable[str], model_ids: list[int] | None,
              agent_ids: list[int] | None, where: Iterable[str] = (), params: Iterable[Any] = (),
              by_day: bool = False) -> list[tuple]:
    """The rows of ``table`` (the daily rollups or the attribution ledger) of
    ``days`` (consecutive ones as one range), these models and agents and
    ``where``, in budget_sums_sql's layout (``by_day``: each day's apart, the day first)."""
    runs: list[list[str]] = []
    for day in days:
        if runs and _next_day(runs[-1][1]) == day:
            runs[-1][1] = day
        else:
            runs.append([day, day])
    clauses = ["(%s)" % " OR ".join(['("range_day" >= %s AND "range_day" <= %s)' % (db.param, db.param)]
                                    * len(runs))]
    values: list[Any] = [day for run in runs for day in run]
    ids_in(db, '"model_id"', model_ids, clauses, values)
    ids_in(db, '"agent_id"', agent_ids, clauses, values)
    return db.execute_sql(budget_sums_sql(table, clauses + list(where), by_day), values + list(params)).fetchall()


def _item_rows(db: Database, plan: ReadPlan, model_ids: list[int] | None, agent_ids: list[int] | None,
               attribution: tuple[str, str] | None = None, item_id: int | None = None) -> list[tuple]:
    """What ``plan`` reads from the items, of these models and agents (and
    carrying ``attribution``, (kind, value), as text; only the item
    ``item_id`` when given), in budget_sums_sql's layout."""
    r = ItemReader(is_postgres(db))
    params: list[Any] = []
    where = scan_where(db, "i.created_at", plan, params) + window(
        db, "i.created_at", PsModelUsageItem.created_at, None, None, model_ids, params)
    ids_in(db, "i.agent_id", agent_ids, where, params)
    ids_in(db, "i.id", [item_id] if item_id is not None else None, where, params)
    if attribution is not None:
        where.append("%s = %s" % (attribute_sql(r.postgres, "i.data", attribution[0], params), db.param))
        params.append(attribution[1])
    read = r.select([name for name, _path, _kind in ITEM_VALUES], where, model_threshold=True)
    sql, group = item_groups_sql(r, read, ())
    assert tuple(group) == BUDGET_GROUP, group
    width = len(group)
    return [row[:width] + (0, None) + tuple(row[width + at] for at in _ITEM_SUMS_AT)
            for row in db.execute_sql(sql, params).fetchall()]


# -- budgets scoped to whose the calls were (a user, a session, a tag) ---------------------

def attribution_of(budget: Budget) -> tuple[str, str] | None:
    """The attribution a budget is limited to, as the ledger names it:
    ("user", USER), ("session", SESSION) or ("tag:KEY", VALUE); None: every
    call of its scope."""
    if budget.user is not None:
        return "user", budget.user
    if budget.session is not None:
        return "session", budget.session
    if budget.tag_key is not None and budget.tag_value is not None:
        return "tag:" + budget.tag_key, budget.tag_value
    return None


def _attributed_groups(db: Database, start: datetime.datetime | None, end: datetime.datetime | None,
                       model_ids: list[int] | None, agent_ids: list[int] | None,
                       attribution: tuple[str, str]) -> list[tuple]:
    """``_groups`` of the calls carrying ``attribution`` (kind, value): the
    whole UTC days from the attribution ledger where its triggers keep it,
    the rest (the partial days at a period's ends, days marked or split by
    a threshold since changed; everything when the ledger is off) from the
    items (the slots know no attribution)."""
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    if enabled(db) and ledger_enabled(db):
        plan = read_plan(db, start, end)
    else:
        plan = ReadPlan(start, end, (), ((start, end),))
    rows: list[tuple] = []
    if plan.days:
        rows += _day_rows(db, LEDGER_TABLE, plan.days, model_ids, agent_ids,
                          ['"kind" = %s' % db.param, '"value" = %s' % db.param], attribution)
    if plan.reads_items:
        rows += _item_rows(db, plan, model_ids, agent_ids, attribution)
    return rows


def _scoped_groups(db: Database, budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None,
                   model_ids: list[int] | None, agent_ids: list[int] | None, item_id: int | None = None
                   ) -> list[tuple]:
    """The groups of the calls a budget covers in [start, end): its scope's,
    and its attribution's when it has one; of the one item ``item_id``
    when given (read from the items: what the rollups would add up for it)."""
    attribution = attribution_of(budget)
    if item_id is not None:
        if not table_columns(db, PsModelUsageItem._meta.table_name):
            return []
        return _item_rows(db, ReadPlan(start, end, (), ((start, end),)), model_ids, agent_ids, attribution, item_id)
    if attribution is None:
        return _groups(db, start, end, model_ids, agent_ids)
    return _attributed_groups(db, start, end, model_ids, agent_ids, attribution)


def call_carries(budget: Budget, attribution: Mapping[str, Any] | None) -> bool:
    """Whether a call of ``attribution`` (attribution_arg's: ``user``,
    ``session``, ``tags``, ...) is one of those ``budget``'s attribution limits it to
    (a budget without one: every call)."""
    wanted = attribution_of(budget)
    if wanted is None:
        return True
    if not attribution:
        return False
    kind, value = wanted
    if kind in ("user", "session"):
        return attribution.get(kind) == value
    tags = attribution.get("tags")
    return isinstance(tags, Mapping) and tags.get(kind[4:]) == value


def _thresholds_changed(db: Database, split: set[tuple[Any, Any]]) -> bool:
    """Whether a model's long-context threshold is no longer the one rollup
    rows of its items without a snapshot were split by."""
    current = current_thresholds(db, {model_id for model_id, _threshold in split})

    def plain(value: Any) -> Any:
        return exact_sum(value) if value is not None else None
    return any(plain(threshold) != plain(current.get(model_id)) for model_id, threshold in split)


def _next_day(day: str) -> str:
    return (datetime.date.fromisoformat(day) + datetime.timedelta(days=1)).isoformat()


# Resolved prices and their pricer, by what decides them (provider, snapshot text, tier applied, the
# model's prices when the item has none): kept across checks, so a check prices its groups without
# resolving them again.
_RESOLVED: dict[tuple, Pricer | str] = {}  # a pricer, or why the group cannot be priced
_RESOLVED_MAX = 4096
_PARSED: dict[str, Any] = {}
# Groups priced, by their pricer's key and their whole-number sums: (cost, why it is None).
_PRICED: dict[tuple, tuple[Decimal | None, str | None]] = {}
_PRICED_MAX = 65536


def _pricing(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    found = _PARSED.get(text)
    if found is None:
        if len(_PARSED) > _RESOLVED_MAX:
            _PARSED.clear()
        found = _PARSED[text] = json.loads(text)
    return found if isinstance(found, dict) else {}


_SIDES = (("in", 1), ("cached", 2), ("cache_write", 3), ("out", 4))  # bucket, its place among BUDGET_SUMS
_APART_AT = [BUDGET_SUMS.index(name) for name in ("cache_write_1h", "cache_write_12h", "audio_in", "audio_out",
                                                    "image_out")]


# -- what is spent, kept while the data is unchanged ------------------------------------

Spent = tuple[Decimal, int, int, bool]
# Per database: (the connection, the state of the data it saw, {(budget's scope, start, end): (spent's
# answer, the budget)}). A check that sees the data in the same state gets the same answer without
# reading it again.
_SPENT: weakref.WeakKeyDictionary[Database, tuple[Any, Hashable, dict[tuple, tuple[Spent, Budget]]]] = \
    weakref.WeakKeyDictionary()
_SPENT_MAX = 256
# A recording carries at most this many answers over to the data it leaves (each is one read of its item).
CARRIED_MAX = 16
# Past this many significant digits an answer is not carried: a sum of Decimals in the default
# 28-digit context is then not sure to be the sum a fresh read prices.
_CARRIED_DIGITS = 20
# What decides a budget's spending besides its period.
_SCOPE_FIELDS = ("model_name", "organization_id", "agent_id", "include_sub_agents", "provider", "currency", "user",
                 "session", "tag_key", "tag_value")
_SQLITE_STATE_SQL = "SELECT * FROM pragma_data_version(), pragma_schema_version()"
# PostgreSQL, after a transaction's writes: the state its snapshot names, and its own id.
_POSTGRES_CARRY_SQL = "SELECT s.*, pg_current_xact_id()::text FROM (%s) s" % POSTGRES_STATE_SQL


# How many transactions may have ended between two PostgreSQL snapshots for
# them to be compared one by one (``_ended_between``); past it, they are taken as different data.
_ENDED_MAX = 256


def _snapshot(text: str) -> tuple[int, int, frozenset[int]]:
    """PostgreSQL's snapshot text (``xmin:xmax:xip,...``) as (xmin, xmax, the ids in progress)."""
    xmin, xmax, running = text.split(":")
    return int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x)


def _ended_between(before: str, after: str) -> frozenset[int] | None:
    """The transactions a PostgreSQL snapshot ``after`` sees as ended that
    the snapshot ``before`` did not (committed or not: an aborted one is
    counted too, which only ever makes two states differ); None when there
    may be more than ``_ENDED_MAX`` of them, or ``after`` is not later."""
    _xmin, xmax_before, running_before = _snapshot(before)
    _xmin, xmax_after, running_after = _snapshot(after)
    if not 0 <= xmax_after - xmax_before <= _ENDED_MAX:
        return None
    candidates = running_before | set(range(xmax_before, xmax_after))
    return frozenset(x for x in candidates if x < xmax_after and x not in running_after)


def _answers_for(db: Database, state: Hashable) -> dict[tuple, tuple[Spent, Budget]] | None:
    """The answers kept on this connection for the data ``state`` names, or None."""
    kept = _SPENT.get(db)
    if kept is None or kept[0] is not db.connection() or kept[1] != state:
        return None
    return kept[2]


def _data_state(db: Database) -> Hashable:
    """As the first read of a read transaction: what names the data it sees,
    equal in two transactions of one connection only when they see the same
    data. SQLite: its data version (every other connection's commit changes
    it; the read fixes the snapshot it names), the rows this connection has
    changed (its own writes and their triggers', rolled back or not) and the
    schema version. PostgreSQL: the transaction's snapshot (which
    transactions it sees committed: the same ones, the same rows), with the
    role and search path that choose the tables and rows."""
    if is_postgres(db):
        return tuple(db.execute_sql(POSTGRES_STATE_SQL).fetchone())
    return tuple(db.execute_sql(_SQLITE_STATE_SQL).fetchone()) + (db.connection().total_changes,)


@contextmanager
def ledger_snapshot(db: Database) -> Iterator[Hashable | None]:
    """A read transaction for budgets' statuses. Yields the state of the data
    it sees (``statuses``' ``state``) when it is begun here; None inside the
    caller's transaction, whose own writes (to be committed or not) no state names."""
    fresh = not db.in_transaction()
    with read_transaction(db):
        yield _data_state(db) if fresh else None


def spent(db: Database, budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None,
          state: Hashable | None = None) -> tuple[Decimal, int, int, bool]:
    """(spent in the budget's currency, unpriced tokens, calls, whether some
    calls cannot be priced) in [start, end): the calls in the scope, each
    group priced alike priced once, as cost_report prices it. ``state``
    (``ledger_snapshot``'s): the answer found for the same data, if any."""
    if state is None:
        return _spent(db, budget, start, end)
    answers = _answers_for(db, state)
    if answers is None:
        answers = {}
        _SPENT[db] = (db.connection(), state, answers)
    key = _spent_key(budget, start, end)
    found = answers.get(key)
    if found is None:
        if len(answers) >= _SPENT_MAX:
            answers.clear()
        # Inside a recording's transaction (a state no read has) nothing read is kept: its writes may be undone.
        read = _spent(db, budget, start, end, state=None if isinstance(state, _Unread) else state)
        found = answers[key] = (read, budget)
    return found[0]


def _spent_key(budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None) -> tuple:
    """What names one answer of ``spent`` among those kept for one state of the data."""
    return tuple(budget.__data__.get(name) for name in _SCOPE_FIELDS), start, end


def kept_statuses(db: Database, rows: list[Budget], now: datetime.datetime, state: Hashable
                  ) -> list[BudgetStatus] | None:
    """``statuses`` of ``rows`` for the data ``state`` names (``_data_state``'s,
    of a read outside any transaction), from the answers kept for it alone:
    None when one is not kept (nothing is read)."""
    answers = _answers_for(db, state)
    if answers is None:
        return None
    for row in rows:
        if budget_problem(row) is None and _spent_key(row, *period_bounds(row.period, row.timezone, now)) \
                not in answers:
            return None
    return [status(db, row, now, state) if (problem := budget_problem(row)) is None
            else invalid_status(row, problem) for row in rows]


class _Unread:
    """A state no read of the data has: what answers carried over a write are kept under until it settles."""


class Carried:
    """A write transaction's hold on the answers kept for the data it
    began on. ``state``: what to pass ``status`` inside the transaction
    once ``carry`` has run; ``settle`` after the commit makes the answers
    those of the committed data. A transaction rolled back never settles:
    its answers match no state a read can see.

    SQLite: its write transaction holds the database's write lock, so no
    other connection commits until it ends; the state after the commit is
    read at its end, and the answers are kept for it. PostgreSQL: the
    transaction's snapshot after its writes must see no transaction ended
    since the kept answers' state but itself; the answers then serve the
    transaction's own alerts, and are not kept past its commit (the
    committed data's state cannot be told from the transactions ended by
    then: the triggers' subtransactions end with it, under ids of their own)."""

    def __init__(self, db: Database) -> None:
        self.db, self.connection = db, db.connection()
        self.postgres = is_postgres(db)
        self.before = None if self.postgres else _data_state(db)
        self.state: Hashable = _Unread()
        self.after: Hashable | None = None

    def _wrote_on(self, kept: Hashable) -> bool:
        """True when the answers kept for the state ``kept`` are of the
        data this transaction wrote on (before its own writes)."""
        if not self.postgres:
            return kept == self.before
        if isinstance(kept, _Unread):
            return False
        snapshot, role, path, xid = self.db.execute_sql(_POSTGRES_CARRY_SQL).fetchone()
        base = cast(tuple, kept)
        ended = _ended_between(base[0], snapshot) if (role, path) == base[1:] else None
        # Its own transaction may show as ended in its snapshot, or not; any other one is data not kept.
        return ended is not None and not ended - {int(xid)}

    def carry(self, item_id: int | None = None) -> Hashable:
        """After the transaction's writes, which changed nothing a budget
        spends but the new item ``item_id`` (if any): the answers kept for
        the data as it began become this transaction's, each with the item
        added (read back the way the answer's own scope reads items).
        Returns ``state``."""
        kept = _SPENT.get(self.db)
        answers: dict[tuple, tuple[Spent, Budget]] = {}
        if kept is not None and kept[0] is self.connection and len(kept[2]) <= CARRIED_MAX \
                and self._wrote_on(kept[1]):
            for key, (answer, budget) in kept[2].items():
                if item_id is not None:
                    added = _spent(self.db, budget, key[1], key[2], item_id)
                    answer = (answer[0] + added[0], answer[1] + added[1], answer[2] + added[2],
                              answer[3] or added[3])
                if len(answer[0].as_tuple().digits) <= _CARRIED_DIGITS:
                    answers[key] = (answer, budget)
        _SPENT[self.db] = (self.connection, self.state, answers)
        return self.state

    def close(self) -> None:
        """At the end of the transaction, after its last write: on SQLite,
        the state the committed data will have for this connection (its own
        commit changes neither data version nor changed rows)."""
        if not self.postgres:
            self.after = _data_state(self.db)

    def settle(self) -> None:
        """After the commit."""
        kept = _SPENT.get(self.db)
        if self.after is not None and kept is not None and kept[1] is self.state:
            _SPENT[self.db] = (kept[0], self.after, kept[2])


def _carried(db: Database) -> Carried | None:
    """A ``Carried`` for a write transaction just begun on ``db``, or None
    when no answer is kept for this connection."""
    if db.is_closed():
        return None
    kept = _SPENT.get(db)
    if kept is None or kept[0] is not db.connection() or not kept[2]:
        return None
    return Carried(db)


@contextmanager
def carrying_write(db: Database) -> Iterator[Carried | None]:
    """``write_transaction(db)``, yielding the ``Carried`` of the answers
    kept for the data it begins on (None inside a transaction already
    begun, whose commit is the caller's, or with nothing to carry). The
    block calls its ``carry`` after its writes; it is closed at the block's
    end and settled once the transaction has committed."""
    began = not db.in_transaction()
    with write_transaction(db):
        answers = _carried(db) if began else None
        yield answers
        if answers is not None:
            answers.close()
    if answers is not None:
        answers.settle()


def _spent(db: Database, budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None,
           item_id: int | None = None, state: Hashable | None = None) -> Spent:
    """``spent``'s answer read afresh (of the one item ``item_id`` when
    given); with ``state`` (``_data_state``'s, of a read transaction begun
    for the check), from what this connection read before of the days
    whose change counters have not moved, where the database keeps them."""
    model_ids = _scope_model_ids(budget)
    if model_ids == []:
        return Decimal(0), 0, 0, False
    agent_ids = None
    if budget.agent_id is not None:
        agent_ids = sorted(_sub_agents(budget.agent_id) if budget.include_sub_agents else {budget.agent_id})
    if state is not None and item_id is None:
        found = _spent_kept(db, budget, start, end, model_ids, agent_ids, state)
        if found is not None:
            return found
    merged: dict[tuple, list] = {}
    _add_rows(merged, _scoped_groups(db, budget, start, end, model_ids, agent_ids, item_id))
    models = _models_of(merged)
    total, unpriced, calls, unknown = Decimal(0), 0, 0, False
    for key, sums in merged.items():
        found_group = _group_spent(budget, key, sums, models)
        if found_group is None:
            continue
        count, cost, tokens = found_group
        calls += count
        if cost is not None:
            total += cost
        else:
            unpriced += tokens
            unknown = unknown or bool(count) or bool(tokens)
    return total, unpriced, calls, unknown


def _add_rows(merged: dict[tuple, list], rows: Iterable[tuple], sign: int = 1) -> set[tuple]:
    """Add (``sign`` 1) or take off (-1) ``rows`` (budget_sums_sql's layout)
    to their groups in ``merged``: groups priced alike, (model, provider,
    pricing, tier, speed, has_usage, apart) -> [calls, buckets, web, apart
    counts]. Returns the groups changed."""
    width = len(BUDGET_GROUP)
    changed = set()
    for row in rows:
        key = row[:5] + (row[5], row[7])
        changed.add(key)
        into = merged.get(key)
        if into is None:
            into = merged[key] = [0, dict.fromkeys(BUCKETS, 0), 0, {}]
        # Sums as exact numbers (SQLite sums REAL values as floats; PostgreSQL's are numeric); most are 0.
        sums = [value if type(value) is int else exact_sum(value) if value else 0 for value in row[width + 2:]]
        if sign < 0:
            sums = [-value for value in sums]
        into[0] += sums[0]
        prefix = "long_" if row[6] else ""
        for bucket, at in _SIDES:
            into[1][prefix + bucket] += sums[at]
        into[2] += sums[5]
        for name, at in zip(APART, _APART_AT):
            value = sums[at]
            if value:
                into[3][prefix + name] = into[3].get(prefix + name, 0) + value
    return changed


def _needs_model(key: tuple) -> bool:
    """Whether a group's pricing reads its model (no provider of its own, or no price snapshot)."""
    return key[1] is None or "configuredPrices" not in _pricing(key[2])


def _models_of(groups: Iterable[tuple]) -> dict[int, PsAiModel]:
    """The models the pricing of ``groups`` reads, by id."""
    needed = {key[0] for key in groups if _needs_model(key)}
    return {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted(needed)))} if needed else {}


def _group_spent(budget: Budget, key: tuple, sums: list, models: Mapping[int, PsAiModel]
                 ) -> tuple[int, Decimal | None, int] | None:
    """What a group of calls priced alike adds to a budget: (calls, cost in
    the budget's currency or None, its tokens); None when it adds nothing
    (no call left in it, or another provider's)."""
    model_id, provider, pricing_text, tier, speed, has_usage, _apart = key
    count, buckets, web, apart = sums
    if not count and not web and not any(buckets.values()) and not any(apart.values()):
        return None  # calls of the rest of a day subtracted from its rollups, none left in the budget's end
    model = models.get(model_id)
    configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
    if budget.provider is not None and (provider if provider is not None
                                        else configuration.get("provider")) != budget.provider:
        return None
    cost, currency = None, None
    if has_usage:
        pricing = _pricing(pricing_text)
        fallback = configuration.get("prices") if pricing.get("configuredPrices") is None else None
        resolved = (provider, pricing_text, tier, speed,
                    strict_json_dumps(fallback, sort_keys=True) if fallback is not None else None)
        if resolved not in _RESOLVED:
            if len(_RESOLVED) > _RESOLVED_MAX:
                _RESOLVED.clear()
            metadata = {k: v for k, v in (("appliedServiceTier", tier), ("appliedSpeed", speed)) if v is not None}
            prices, problem = effective_prices(provider, pricing, metadata, fallback)
            # PolicySynth's item rule, as reports price: a long-context rate of 0 means unset.
            _RESOLVED[resolved] = problem or Pricer(prices, zero_long_rate_is_unset=True)
        pricer = _RESOLVED[resolved]
        if not isinstance(pricer, str):
            cost, _problem = _priced(resolved, pricer, buckets, apart, web)
            currency = None if cost is None else pricer.currency
    # Calls whose counts cannot be read are unknown too, never $0.
    return count, cost if currency == budget.currency else None, sum(buckets.values())


# -- what is spent, read again only where the days changed ---------------------------------

# A part of a period read at every check: what the items hold (their days are not counted).
_READ_AGAIN = object()
# Sums of costs kept as groups change: exact (a cost taken off may have had more digits than any left).
_EXACT = decimal.Context(prec=200)


class _KeptSpending:
    """What one budget scope's spending in one period was read from, for
    ``_spent_kept``: each part of the period (a whole UTC day, the slots of
    an end, what the items hold) with its day's change count when read, its
    rows (added, and subtracted) and the thresholds its rows were split by;
    the groups they add up to; what each group adds to the budget; the
    models the groups' pricing read, which no day's count follows."""

    def __init__(self, rebuilt: Any) -> None:
        self.rebuilt = rebuilt
        self.parts: dict[tuple, tuple[Any, list[tuple], list[tuple], set[tuple[Any, Any]]]] = {}
        self.merged: dict[tuple, list] = {}
        self.added: dict[tuple, tuple[int, Decimal | None, int]] = {}
        self.needing: dict[int, set[tuple]] = {}  # model id -> the groups whose pricing reads it
        self.configurations: dict[int, Any] = {}
        self.days: dict[str, tuple[dict[int, Any], list[tuple]]] = {}  # day -> (its models' counts, its rows)
        # What the groups add up to, kept as they change: exact, whatever the digits of the costs taken off.
        self.total, self.magnitude = Decimal(0), Decimal(0)
        self.exponents: dict[int, int] = {}  # the costs' exponents: how many of each
        self.calls = self.unpriced = self.unknown = 0

    def account(self, added: tuple[int, Decimal | None, int], sign: int) -> None:
        """Add (``sign`` 1) or take off (-1) what a group adds to the totals."""
        count, cost, tokens = added
        self.calls += sign * count
        if cost is None:
            self.unpriced += sign * tokens
            self.unknown += sign * bool(count or tokens)
            return
        if sign > 0:
            self.total, self.magnitude = _EXACT.add(self.total, cost), _EXACT.add(self.magnitude, abs(cost))
        else:
            self.total, self.magnitude = _EXACT.subtract(self.total, cost), _EXACT.subtract(self.magnitude, abs(cost))
        exponent = cast(int, cost.as_tuple().exponent)
        self.exponents[exponent] = self.exponents.get(exponent, 0) + sign

    def answer(self) -> Spent | None:
        """The totals as a fresh read adds them up (from Decimal(0), in the
        default context): the smallest exponent of the costs there, and the
        same value where none of its partial sums is rounded; else None."""
        exponent = min([0] + [e for e, n in self.exponents.items() if n])
        quantum = Decimal((0, (1,), exponent))
        total, magnitude = _EXACT.quantize(self.total, quantum), _EXACT.quantize(self.magnitude, quantum)
        if len(magnitude.as_tuple().digits) > _CARRIED_DIGITS:
            return None
        return total, self.unpriced, self.calls, bool(self.unknown)


# Per database: (the connection, what names its tables (SQLite: the schema version; PostgreSQL: the role and
# search path), {(budget's scope, start, end): what its spending was read from}).
_KEPT: weakref.WeakKeyDictionary[Database, tuple[Any, Hashable, dict[tuple, _KeptSpending]]] = \
    weakref.WeakKeyDictionary()
_KEPT_MAX = 64
_TICK = datetime.timedelta(microseconds=1)


def _fractional(value: Any) -> bool:
    return type(value) is float or type(value) is Decimal and value != value.to_integral_value()


def _utc_day(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


def _spent_kept(db: Database, budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None,
                model_ids: list[int] | None, agent_ids: list[int] | None, state: Hashable) -> Spent | None:
    """``_spent``'s answer, in a read transaction begun for the check (its
    ``state``), from what this connection read before of the parts of the
    period whose day's change count has not moved, the others read again.
    None where the answer cannot be kept so (counters not kept, a budget
    limited to an attribution, an open period, counts SQLite added as
    floats, a long-context threshold changed, a total past exact sums): the
    caller reads it afresh."""
    if start is None or end is None or attribution_of(budget) is not None \
            or not table_columns(db, PsModelUsageItem._meta.table_name):
        return None
    on = triggers_on(db)
    if not (on.rollups and on.slots and on.day_changes):
        return None  # rows that can change unseen
    changes = day_changes(db, _utc_day(start), _utc_day(end - _TICK), model_ids)
    tables = cast(tuple, state)[1:] if is_postgres(db) else cast(tuple, state)[1]
    held = _KEPT.get(db)
    if held is None or held[0] is not db.connection() or held[1] != tables:
        held = _KEPT[db] = (db.connection(), tables, {})
    # The models and agents the scope names now (a model moved to another organization, an agent under
    # another parent: no day's count moves).
    scope = _spent_key(budget, start, end) + (None if model_ids is None else tuple(model_ids),
                                              None if agent_ids is None else tuple(agent_ids))
    kept = held[2].pop(scope, None)
    if kept is None or kept.rebuilt != changes.get(DAY_CHANGES_REBUILT):
        if len(held[2]) >= _KEPT_MAX:
            del held[2][next(iter(held[2]))]  # the one used longest ago
        kept = _KeptSpending(changes.get(DAY_CHANGES_REBUILT))
    # Kept only once brought up to date whole (a read that fails half way leaves it half changed).
    found = _read_again(db, budget, kept, start, end, model_ids, agent_ids, changes, on)
    if found is not None:
        held[2][scope] = kept
    return found


def _days_now(db: Database, kept: _KeptSpending, table: str, days: list[str], model_ids: list[int] | None,
              agent_ids: list[int] | None) -> dict[str, list[tuple]]:
    """The rows of ``days`` in ``table`` (by budget_sums_sql, without the
    day) as they are now, each day's kept in ``kept.days``: of a day read
    before, only the models whose count moved are read again (the rows of
    the others are the same objects)."""
    counts = day_model_changes(db, days, model_ids) if days else {}
    by_day: dict[str, list[tuple]] = {}
    whole: list[str] = []
    for day in days:
        now = counts.get(day, {})
        before = kept.days.get(day)
        if before is None:
            whole.append(day)
            continue
        moved = {model_id for model_id in now.keys() | before[0].keys() if now.get(model_id) != before[0].get(model_id)}
        if 0 in moved:  # items without a model (hand SQL) are counted as model 0: the whole day read
            whole.append(day)
            continue
        rows = [row for row in before[1] if row[0] not in moved]
        if moved:
            rows += _day_rows(db, table, [day], sorted(moved), agent_ids)
        by_day[day] = rows
        kept.days[day] = (now, rows)
    found: dict[str, list[tuple]] = {day: [] for day in whole}
    for row in _day_rows(db, table, whole, model_ids, agent_ids, by_day=True) if whole else ():
        found[row[0]].append(row[1:])
    for day, rows in found.items():
        by_day[day] = rows
        kept.days[day] = (counts.get(day, {}), rows)
    return by_day


def _read_again(db: Database, budget: Budget, kept: _KeptSpending, start: datetime.datetime,
                end: datetime.datetime, model_ids: list[int] | None, agent_ids: list[int] | None,
                changes: Mapping[str, Any], on: TriggersOn) -> Spent | None:
    """``_spent_kept``'s: the parts of [start, end) read again where their
    day's count moved, ``kept`` brought up to date, its answer."""
    plan, slots = budget_plan(db, start, end, on=on)
    counts: dict[tuple, Any] = {("day", day): changes.get(day) for day in plan.days}
    for first, last, day in slots:
        counts[("slots", first, last, day)] = changes.get(day if day is not None else first[:10])
    if plan.reads_items:
        counts[("items",)] = _READ_AGAIN
    stale = [part for part, count in counts.items()
             if count is _READ_AGAIN or part not in kept.parts or kept.parts[part][0] != count]
    gone = [part for part in kept.parts if part not in counts]
    table = MODEL_ROLLUP_TABLE if agent_ids is None and on.summaries else ROLLUP_TABLE
    days = sorted({part[1] for part in stale if part[0] == "day"}
                  | {part[3] for part in stale if part[0] == "slots" and part[3] is not None})
    by_day = _days_now(db, kept, table, days, model_ids, agent_ids)
    width = len(BUDGET_GROUP)
    read: dict[tuple, tuple[list[tuple], list[tuple]]] = {}
    for part in stale:
        if part[0] == "day":
            read[part] = by_day[part[1]], []
        elif part[0] == "slots":
            found = _slot_rows(db, part[1], part[2], model_ids, agent_ids)
            read[part] = (found, []) if part[3] is None else (by_day[part[3]], found)
        else:
            read[part] = _item_rows(db, plan, model_ids, agent_ids), []
    touched: set[tuple] = set()
    for part in gone:
        _count, old_added, old_subtracted, _split = kept.parts.pop(part)
        touched |= _add_rows(kept.merged, old_added, -1) | _add_rows(kept.merged, old_subtracted)
    for part, (added, subtracted) in read.items():
        _count, old_added, old_subtracted, _split = kept.parts.get(part, (None, [], [], set()))
        # Only the rows not read before (a day's rows of the models whose count did not move are the same
        # objects): the day's other groups keep their sums.
        for new_rows, old_rows, sign in ((added, old_added, 1), (subtracted, old_subtracted, -1)):
            new_ids, old_ids = {id(row) for row in new_rows}, {id(row) for row in old_rows}
            brought = [row for row in new_rows if id(row) not in old_ids]
            # Fractional sums (SQLite's floats; PostgreSQL's numeric) taken off again later would leave other
            # digits than the sums' own.
            if any(_fractional(value) for row in brought for value in row[width + 2:]):
                return None
            touched |= _add_rows(kept.merged, brought, sign)
            touched |= _add_rows(kept.merged, [row for row in old_rows if id(row) not in new_ids], -sign)
        split = {(row[0], row[width + 1]) for row in added if row[width] == 1}
        kept.parts[part] = (counts[part], added, subtracted, split)
    used = {part[1] if part[0] == "day" else part[3] for part in counts if part[0] != "items"}
    for day in [day for day in kept.days if day not in used]:
        del kept.days[day]
    split = set().union(*(part[3] for part in kept.parts.values()))
    if split and _thresholds_changed(db, split):
        return None
    for key in touched:
        sums = kept.merged.get(key)
        if sums is not None and not sums[0] and not sums[2] and not any(sums[1].values()) \
                and not any(sums[3].values()):
            del kept.merged[key]  # every call of the group taken off again
            sums = None
        if _needs_model(key):
            needing = kept.needing.setdefault(key[0], set())
            if sums is None:
                needing.discard(key)
            else:
                needing.add(key)
    models: dict[int, PsAiModel] = {}
    ids = sorted(model_id for model_id, groups in kept.needing.items() if groups)
    if ids:
        models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(ids))}
        for model_id in ids:
            # As text: a rate of 1 and one of 1.0 give costs of other digits.
            configuration = json.dumps(models[model_id].configuration, sort_keys=True, default=str) \
                if model_id in models else None
            if model_id not in kept.configurations or kept.configurations[model_id] != configuration:
                kept.configurations[model_id] = configuration
                touched |= kept.needing[model_id]
    for key in touched:
        sums = kept.merged.get(key)
        found_group = None if sums is None else _group_spent(budget, key, sums, models)
        before = kept.added.pop(key, None)
        if before is not None:
            kept.account(before, -1)
        if found_group is not None:
            kept.added[key] = found_group
            kept.account(found_group, 1)
    return kept.answer()


def _priced(key: tuple, pricer: Pricer, buckets: dict[str, Any], apart: dict[str, Any], web: Any
            ) -> tuple[Decimal | None, str | None]:
    """``pricer.price`` of a group's sums, kept by the sums when they are
    whole numbers (another's digits could give the cost other digits):
    after a write a check prices again only the groups whose sums it changed."""
    usage = {**buckets, **apart} if apart else buckets
    counts = (*usage.values(), web)
    if not all(type(count) is int for count in counts):
        return pricer.price(usage, web)
    kept = (key, tuple(usage), counts)
    found = _PRICED.get(kept)
    if found is None:
        if len(_PRICED) >= _PRICED_MAX:
            _PRICED.clear()
        found = _PRICED[kept] = pricer.price(usage, web)
    return found


def _state(budget: Budget, spent: Decimal, unknown: bool) -> str:
    limit = Decimal(budget.amount)
    if spent >= limit:
        return "exceeded"
    if unknown:
        return "unknown"
    if any(spent >= Decimal(repr(fraction)) * limit for fraction in budget.warn_at):
        return "warning"
    return "ok"


def status(db: Database, budget: Budget, now: datetime.datetime, state: Hashable | None = None) -> BudgetStatus:
    """One usable budget's state at ``now`` (``state``: ``spent``'s)."""
    start, end = period_bounds(budget.period, budget.timezone, now)
    used, unpriced, calls, unknown = spent(db, budget, start, end, state)
    limit = Decimal(budget.amount)
    forecast = None
    if start is not None and end is not None:
        elapsed = (now - start).total_seconds()
        length = (end - start).total_seconds()
        forecast = (used * Decimal(repr(length)) / Decimal(repr(elapsed)) if elapsed > 0 else used).quantize(
            Decimal("0.000001"))
    return {"budget": budget.name, "currency": budget.currency, "limit": limit, "spent": used,
            "unpriced_tokens": unpriced, "remaining": max(limit - used, Decimal(0)), "period_start": start,
            "period_end": end, "forecast": forecast, "state": _state(budget, used, unknown), "hard": budget.hard,
            "calls": calls, "problem": None, "scope": scope_of(budget)}


def statuses(db: Database, rows: list[Budget], now: datetime.datetime, state: Hashable | None = None
             ) -> list[BudgetStatus]:
    """The budgets' statuses from one snapshot (``state``: ``ledger_snapshot``'s, of the caller's)."""
    with read_transaction(db):
        return [status(db, row, now, state) if (problem := budget_problem(row)) is None
                else invalid_status(row, problem) for row in rows]


def invalid_status(budget: Budget, problem: str) -> BudgetStatus:
    """The status of a budget psai cannot use: nothing is measured against it."""
    return {"budget": str(budget.name), "currency": str(budget.currency), "limit": None, "spent": None,
            "unpriced_tokens": 0, "remaining": None, "period_start": None, "period_end": None, "forecast": None,
            "state": "invalid", "hard": bool(budget.hard), "calls": 0, "problem": problem,
            "scope": scope_of(budget)}


# -- which budgets a call counts against ----------------------------------------------

def _ancestors(agent: PsAgent) -> set[int]:
    """The agent and the agents above it (a cycle written by hand ends the walk)."""
    found = {agent.id}
    parent = agent.parent_agent_id
    while parent is not None and parent not in found:
        found.add(parent)
        parent = PsAgent.select(PsAgent.parent_agent).where(PsAgent.id == parent).scalar()
    return found


def _covers(budget: Budget, model: PsAiModel | None, agent: PsAgent | None,
            ancestors: Callable[[], set[int]]) -> bool:
    """Whether a call of ``model`` for ``agent`` counts against ``budget``."""
    if budget.agent_id is not None:
        if agent is None:
            return False
        return agent.id == budget.agent_id or budget.include_sub_agents and budget.agent_id in ancestors()
    configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
    if budget.model_name is not None:
        return model is not None and model.name == budget.model_name
    if budget.provider is not None:
        return configuration.get("provider") == budget.provider
    if budget.organization_id is not None:
        return model is not None and model.organization_id == budget.organization_id
    return True


def covering(model: PsAiModel | None, agent: PsAgent | None, rows: list[Budget],
             attribution: Mapping[str, Any] | None = None) -> list[Budget]:
    """The budgets of ``rows`` a call of ``model`` for ``agent``, of
    ``attribution`` (attribution_arg's), counts against."""
    found: set[int] | None = None

    def ancestors() -> set[int]:
        nonlocal found
        if found is None:
            found = _ancestors(agent) if agent is not None else set()
        return found
    return [row for row in rows if call_carries(row, attribution) and _covers(row, model, agent, ancestors)]


# -- alerts -------------------------------------------------------------------------

def _thresholds(budget: Budget) -> list[Decimal]:
    return [Decimal(repr(fraction)) for fraction in budget.warn_at] + [LIMIT]


def event_row(event: BudgetEvent, budget: Budget) -> BudgetEventRow:
    try:
        zone: datetime.tzinfo = zoneinfo.ZoneInfo(budget.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):  # an invalid budget's: the time in UTC
        zone = UTC
    start = None if budget.period == "total" else event.period_start.astimezone(zone)
    return {"budget": budget.name, "threshold": Decimal(event.threshold), "spent": Decimal(event.spent),
            "currency": budget.currency, "period_start": start, "at": event.at}


def record_crossings(db: Database, rows: list[Budget], state: Hashable | None = None) -> list[BudgetEventRow]:
    """In a recording's transaction: each threshold of ``rows`` that what is
    spent has reached and that has no alert in this period yet gets one. The
    budgets are read again first, as they are now (one removed or changed
    since ``rows`` were read is left out, or weighed as it is now), and on
    PostgreSQL locked, so that of two calls crossing at once the second sees
    the first, and a budget cannot be removed under the alert written for it
    (SQLite has one writer at a time). A budget whose status cannot be
    worked out is logged and left out: the call is recorded all the same.
    ``state``: a ``Carried``'s, whose answers the statuses may use."""
    rows = usable(budget_rows(db, ids=[row.id for row in rows], lock=True))
    now = utcnow()
    fired = []
    for row in rows:
        try:
            found = status(db, row, now, state)
        except (ArithmeticError, LookupError, TypeError, ValueError):
            log.exception("psai budget %r: its status could not be worked out; the call is recorded without "
                          "its alerts", row.name)
            continue
        if found["spent"] is None or found["limit"] is None:
            continue
        key = found["period_start"].astimezone(UTC) if found["period_start"] is not None else TOTAL_PERIOD_KEY
        for threshold in _thresholds(row):
            if found["spent"] < threshold * found["limit"]:
                continue
            values = {"budget": row.id, "period_start": key, "threshold": str(threshold),
                      "spent": str(found["spent"]), "at": now}
            # The unique (budget, period, threshold) index makes it once, whoever tries.
            if db.execute(BudgetEvent.insert(**values).on_conflict_ignore()).rowcount:
                fired.append(event_row(BudgetEvent(**values), row))
    return fired


def fire(events: list[BudgetEventRow]) -> None:
    """After the call's commit: each event to every listener (``psai.on_budget_event``)."""
    for event in events:
        for listener in list(LISTENERS):
            try:
                listener(event)
            except Exception:  # the call is recorded; a listener's failure must not look like the call's
                log.exception("psai budget event listener %r failed", listener)


# -- what recording a call does for budgets -------------------------------------------

ANY_BUDGET_SQL = 'SELECT 1 FROM "%s" LIMIT 1' % Budget._meta.table_name
# Most deployments have no budget. Asking costs SQLite a statement in the
# process, asked at every call; it would cost PostgreSQL a round trip, so a
# database seen without budgets is asked again only this many seconds later
# (a budget set in this process is seen at once: ``forget``). The price: a
# budget another process sets is weighed by this process's calls up to this
# long after; no alert is lost, the next call weighed raises the thresholds
# crossed meanwhile (docs/budgets.md). ``check_budget`` always reads them.
NO_BUDGET_RECHECK = 1.0
# The databases seen without a budget, and when (time.monotonic()).
_none_seen: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()


def forget(db: Database) -> None:
    """This process has just set a budget on ``db``: look again at the next call."""
    _none_seen.pop(db, None)


def budgets_covering(db: Database, model: PsAiModel, agent: PsAgent | None,
                     attribution: Mapping[str, Any] | None = None) -> list[Budget]:
    """The usable budgets a call of ``model`` for ``agent``, of
    ``attribution`` (attribution_arg's), counts against: what
    ``record_crossings`` weighs in the call's transaction."""
    if not table_columns(db, Budget._meta.table_name):
        return []
    seen = _none_seen.get(db) if is_postgres(db) else None
    if seen is not None and time.monotonic() - seen < NO_BUDGET_RECHECK:
        return []
    if db.execute_sql(ANY_BUDGET_SQL).fetchone() is None:
        _none_seen[db] = time.monotonic()
        return []
    _none_seen.pop(db, None)
    return covering(model, agent, usable(budget_rows(db)), attribution)
