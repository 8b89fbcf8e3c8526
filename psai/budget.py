"""Budgets: spending limits over one scope (an agent and its sub-agents, a
model name across its versions, a provider, an organization, or all usage)
and a calendar period in an IANA time zone, checked before a call
(``check_budget``), with threshold alerts recorded once per budget and period
(``budget_events``) in the transaction of the call that crosses them.

What a budget has spent is a lookup: the calls' items in its scope and
period, read from the rollups the triggers keep (the partial days at the
period's ends, in a zone other than UTC, from the items), each call priced
from its own item as ``cost_report`` prices it. Usage that cannot be priced,
or whose counts cannot be read, is never counted as 0: it makes the state
``unknown``."""
import calendar
import datetime
import json
import logging
import uuid
import weakref
import zoneinfo
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, Literal, TypedDict, overload

from peewee import Database

from .arguments import agent_arg, as_datetime, model_arg
from .db import is_postgres, lock, model_db, read_transaction, table_columns, write_transaction
from .errors import BudgetExceededError, NotAdoptedError, NotFoundError, ValidationError
from .fields import UTC, utcnow
from .models import (
    AgentRef, Budget, BudgetEvent, BudgetReservation, ModelRef, PsAgent, PsAiModel, Reservation, find_models,
    sub_agent_tree,
)
from .recording import model_cost
from .reports import item_parts, merge_parts, part_provider, part_tokens, price_parts
from .schemas import BUDGET_FIELDS, BudgetPeriod, BudgetUnpriced, validate_budget_values

__all__ = ["set_budget", "budgets", "remove_budget", "budget_status", "check_budget", "budget_events",
           "on_budget_event", "period_bounds", "RESERVATION_TTL", "Reservation",
           "BudgetStatus", "BudgetEventRow", "BudgetWatcher", "WATCHER", "LIMIT"]

log = logging.getLogger("psai")

# The limit is a threshold of its own, beside the warnings.
LIMIT = Decimal(1)
# The key a "total" budget's crossings are stored under: it has one period, from the start.
TOTAL_PERIOD_KEY = datetime.datetime(1970, 1, 1, tzinfo=UTC)
ANY_BUDGET_SQL = 'SELECT 1 FROM "%s" LIMIT 1' % Budget._meta.table_name
ANY_BUDGET_PROBE = 'EXISTS (SELECT 1 FROM "%s")' % Budget._meta.table_name


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


class BudgetEventRow(TypedDict):
    """A threshold crossed (``budget_events``, ``on_budget_event``)."""

    budget: str
    threshold: Decimal  # a fraction of the limit; 1 is the limit itself
    spent: Decimal
    currency: str
    period_start: datetime.datetime | None
    at: datetime.datetime


_listeners: list[Callable[[BudgetEventRow], Any]] = []


# -- budgets ------------------------------------------------------------------------

def _default_name(values: dict[str, Any]) -> str:
    for column, label in (("agent_id", "agent"), ("model_name", "model"), ("provider", "provider"),
                          ("organization_id", "organization")):
        if values[column] is not None:
            scope = "%s %s" % (label, values[column])
            if column == "agent_id" and not values["include_sub_agents"]:
                scope += " only"
            break
    else:
        scope = "all usage"
    return "%s per %s" % (scope, values["period"]) if values["period"] != "total" else scope + " in total"


def set_budget(*, amount: Decimal | int | float | str, currency: str = "USD", period: BudgetPeriod = "month",
               timezone: str = "UTC", agent: AgentRef | None = None,
               include_sub_agents: bool = True, model: ModelRef | None = None,
               provider: str | None = None, organization_id: int | None = None,
               warn_at: Iterable[float] = (0.8,), hard: bool = True, unpriced: BudgetUnpriced = "block",
               name: str | None = None) -> Budget:
    """Create a budget, or change the one of that ``name`` (its alerts so far
    stay). One scope at most: ``agent`` (with its sub-agent tree unless
    ``include_sub_agents=False``), ``model`` (a model named as everywhere:
    row, id, uuid or name; the budget covers every version of its name), ``provider``,
    ``organization_id``; none: all usage. ``period``: day, week (ISO, from
    Monday), month, year (on the calendar of ``timezone``) or total.
    ``warn_at``: fractions of the limit that raise an alert; the limit is one
    too. ``hard``: ``check_budget`` refuses calls once it is reached.
    ``unpriced="block"``: usage that cannot be priced makes ``check_budget``
    refuse (the state is ``unknown``); ``"allow"`` lets it pass."""
    if include_sub_agents is False and agent is None:  # it would silently cover all usage
        raise ValidationError({"include_sub_agents": ["False limits an agent budget to the agent itself: "
                                                      "give an agent."]})
    agent_row = agent_arg(agent) if agent is not None else None
    if model is not None:  # every version of the model this names: its name
        model = find_models(model)[0].name
    values = {"amount": amount, "currency": currency, "period": period, "timezone": timezone,
              "agent_id": agent_row.id if agent_row is not None else None,
              "include_sub_agents": include_sub_agents, "model_name": model, "provider": provider,
              "organization_id": organization_id,
              "warn_at": list(warn_at) if isinstance(warn_at, (list, tuple, set, frozenset)) else warn_at,
              "hard": hard, "unpriced": unpriced, "name": name}
    if name is None:
        values["name"] = _default_name(values)
    values = validate_budget_values(values)
    db = model_db(Budget)
    if not table_columns(db, Budget._meta.table_name):
        raise NotAdoptedError("this database has no psai_budgets table: run `psai init --adopt` (a PolicySynth "
                              "database; its own tables are not changed) or `psai.migrate()`")
    with write_transaction(db):
        # Two processes setting one new name at once: the second waits, then
        # finds the first's row and changes it (not a duplicate-key error).
        lock(db, ("psai_budgets", values["name"]))
        found = Budget.get_or_none(Budget.name == values["name"])
        row = found if found is not None else Budget()
        for column in BUDGET_FIELDS:
            setattr(row, column, values[column])
        row.save()
    WATCHER.forget(db)
    return row


def budgets() -> list[Budget]:
    """Every budget, by name."""
    if not table_columns(model_db(Budget), Budget._meta.table_name):
        return []
    return list(Budget.select().order_by(Budget.name))


def _budget(budget: Budget | str) -> Budget:
    if isinstance(budget, Budget):
        return budget
    found = Budget.get_or_none(Budget.name == budget) if table_columns(
        model_db(Budget), Budget._meta.table_name) else None
    if found is None:
        raise NotFoundError("no budget named %r" % (budget,))
    return found


def remove_budget(budget: Budget | str) -> None:
    """Remove a budget (by name or row) and its recorded alerts. Calls
    recorded meanwhile are recorded all the same: the alerts of a budget
    gone by the time a call is written are not."""
    found = _budget(budget)
    with write_transaction(model_db(Budget)):
        if not Budget.delete().where(Budget.id == found.id).execute():
            raise NotFoundError("no budget named %r" % (found.name,))


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


def _usable(rows: Iterable[Budget]) -> list[Budget]:
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


def _spent(db: Database, budget: Budget, start: datetime.datetime | None, end: datetime.datetime | None
           ) -> tuple[Decimal, int, int, bool]:
    """(spent in the budget's currency, unpriced tokens, calls, whether some
    calls cannot be priced) in [start, end): the calls' items in the scope,
    read from the rollups (the period's partial days at its ends from the
    items), priced as cost_report prices them."""
    model_ids = _scope_model_ids(budget)
    if model_ids == []:
        return Decimal(0), 0, 0, False
    agent_ids = None
    if budget.agent_id is not None:
        agent_ids = sorted(_sub_agents(budget.agent_id) if budget.include_sub_agents else {budget.agent_id})
    parts = price_parts(merge_parts(item_parts(db, (), start, end, model_ids, agent_ids), ("model_id",)))
    if budget.provider is not None:
        models = {m.id: m for m in PsAiModel.select().where(
            PsAiModel.id.in_(sorted({p.model_id for p in parts if p.provider is None})))}
        parts = [part for part in parts if part_provider(part, models) == budget.provider]
    spent, calls, unknown = Decimal(0), 0, False
    unpriced: Any = 0  # tokens: whole, or exact where SQL summed fractions
    for part in parts:
        calls += part.calls
        if part.cost is not None and part.currency == budget.currency:
            spent += part.cost
        else:
            # Calls whose counts cannot be read are unknown too, never $0.
            unpriced += sum(part_tokens(part))
            unknown = unknown or bool(part.calls) or bool(sum(part_tokens(part)))
    return spent, unpriced, calls, unknown


def _state(budget: Budget, spent: Decimal, unknown: bool) -> str:
    limit = Decimal(budget.amount)
    if spent >= limit:
        return "exceeded"
    if unknown:
        return "unknown"
    if any(spent >= Decimal(repr(fraction)) * limit for fraction in budget.warn_at):
        return "warning"
    return "ok"


def _status(db: Database, budget: Budget, now: datetime.datetime) -> BudgetStatus:
    start, end = period_bounds(budget.period, budget.timezone, now)
    spent, unpriced, calls, unknown = _spent(db, budget, start, end)
    limit = Decimal(budget.amount)
    forecast = None
    if start is not None and end is not None:
        elapsed = (now - start).total_seconds()
        length = (end - start).total_seconds()
        forecast = (spent * Decimal(repr(length)) / Decimal(repr(elapsed)) if elapsed > 0 else spent).quantize(
            Decimal("0.000001"))
    return {"budget": budget.name, "currency": budget.currency, "limit": limit, "spent": spent,
            "unpriced_tokens": unpriced, "remaining": max(limit - spent, Decimal(0)), "period_start": start,
            "period_end": end, "forecast": forecast, "state": _state(budget, spent, unknown), "hard": budget.hard,
            "calls": calls, "problem": None}


def budget_status(budget: Budget | str | None = None) -> list[BudgetStatus]:
    """The state of one budget (by name or row) or of every budget, now:
    the same spending as ``cost_report`` over that scope and period."""
    chosen = [_budget(budget)] if budget is not None else budgets()
    db = model_db(Budget)
    now = utcnow()
    return _statuses(db, chosen, now)


def _statuses(db: Database, rows: list[Budget], now: datetime.datetime) -> list[BudgetStatus]:
    """The budgets' statuses from one snapshot."""
    with read_transaction(db):
        return [_status(db, row, now) if (problem := budget_problem(row)) is None else _invalid(row, problem)
                for row in rows]


def _invalid(budget: Budget, problem: str) -> BudgetStatus:
    """The status of a budget psai cannot use: nothing is measured against it."""
    return {"budget": str(budget.name), "currency": str(budget.currency), "limit": None, "spent": None,
            "unpriced_tokens": 0, "remaining": None, "period_start": None, "period_end": None, "forecast": None,
            "state": "invalid", "hard": bool(budget.hard), "calls": 0, "problem": problem}


# -- before a call ----------------------------------------------------------------------

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


def _covering(model: PsAiModel | None, agent: PsAgent | None, rows: list[Budget]) -> list[Budget]:
    found: set[int] | None = None

    def ancestors() -> set[int]:
        nonlocal found
        if found is None:
            found = _ancestors(agent) if agent is not None else set()
        return found
    return [row for row in rows if _covers(row, model, agent, ancestors)]


def _estimate(estimate: Any, model: PsAiModel | None) -> tuple[Decimal, str | None] | None:
    """An estimate as (cost, currency; None: any currency), or None when none is given."""
    if estimate is None:
        return None
    if isinstance(estimate, dict):
        if model is None:
            raise ValidationError({"estimate": [
                "Counts can only be priced with a model: name it, model=\"GPT-4o\" (a name, id or uuid, as "
                "`psai models list` shows), or give the cost as a number."]})
        cost = model_cost(model, **estimate)
        return Decimal(repr(cost["total"])), cost["currency"]
    if isinstance(estimate, bool) or not isinstance(estimate, (Decimal, int, float, str)):
        raise ValidationError({"estimate": ["Must be a cost (a number) or the counts of the call (a dict)."]})
    try:
        amount = Decimal(estimate if isinstance(estimate, (Decimal, str)) else repr(estimate))
    except ArithmeticError:
        raise ValidationError({"estimate": ["Not a number: %r." % (estimate,)]}) from None
    if not amount.is_finite() or amount < 0:
        raise ValidationError({"estimate": ["Must be a finite cost, 0 or more."]})
    return amount, None


def _money(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.01")) if abs(value) >= Decimal("0.01") else value.normalize(), "f")


# How long a reservation holds its estimate when its call is neither recorded nor released (a process that died).
RESERVATION_TTL = datetime.timedelta(minutes=10)


def _held(db: Database, rows: list[Budget], now: datetime.datetime) -> dict[int, Decimal]:
    """What live reservations hold against each of ``rows``."""
    if not rows or not table_columns(db, BudgetReservation._meta.table_name):
        return {}
    held: dict[int, Decimal] = {}
    query = (BudgetReservation.select(BudgetReservation.budget, BudgetReservation.amount)
             .where(BudgetReservation.budget.in_([row.id for row in rows]) & (BudgetReservation.expires_at > now)))
    rows_held: Any = query.tuples()
    for budget_id, amount in rows_held:
        held[budget_id] = held.get(budget_id, Decimal(0)) + Decimal(amount)
    return held


def _refusal(row: Budget, status: BudgetStatus, held: Decimal, guess: tuple[Decimal, str | None] | None
             ) -> str | None:
    """Why a call is refused by ``row`` (None: it is not)."""
    named = "budget %r (%s)" % (row.name, row.currency)
    spent, limit = status["spent"], status["limit"]
    if spent is None or limit is None:  # invalid: a hard limit that cannot be weighed refuses, like unknown
        return "%s cannot be used: %s (set it again with `psai budgets set`, or remove it)" % (
            named, status["problem"])
    ends = "; the period ends %s" % status["period_end"].isoformat() if status["period_end"] else ""
    holding = " and %s held by reservations" % _money(held) if held else ""
    if status["state"] == "exceeded" or held and spent + held >= limit:
        return "%s is reached: %s spent%s of %s%s" % (named, _money(spent), holding, _money(limit), ends)
    if guess is not None and guess[1] not in (None, row.currency) and row.unpriced == "block":
        return "%s cannot weigh this call: it is priced in %s%s" % (named, guess[1], ends)
    if guess is not None and spent + held + guess[0] > limit and guess[1] in (None, row.currency):
        return "%s would be passed by this call: %s spent%s + %s estimated is more than %s%s" % (
            named, _money(spent), holding, _money(guess[0]), _money(limit), ends)
    if status["state"] == "unknown" and row.unpriced == "block":
        return "%s is unknown: %d tokens cannot be priced, or calls' counts cannot be read (%s spent of %s)%s" % (
            named, status["unpriced_tokens"], _money(spent), _money(limit), ends)
    return None


def _refuse(rows: list[Budget], statuses: list[BudgetStatus], held: dict[int, Decimal],
            guess: tuple[Decimal, str | None] | None) -> None:
    for row, status in zip(rows, statuses):
        reason = _refusal(row, status, held.get(row.id, Decimal(0)), guess)
        if reason is not None:
            raise BudgetExceededError(reason, budget=row.name, spent=status["spent"], limit=status["limit"],
                                      currency=row.currency, period_end=status["period_end"])


@overload
def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: Literal[False] = False) -> list[BudgetStatus]: ...


@overload
def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: Literal[True]) -> Reservation: ...


def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: bool = False) -> list[BudgetStatus] | Reservation:
    """Before a call: raise ``BudgetExceededError`` when a hard budget
    covering this agent and model is reached, would be passed by
    ``estimate`` (a cost in the budget's currency, or the counts of the call,
    priced with the model's prices), or is ``unknown`` and blocks unpriced
    usage. What live reservations hold counts as spent. Returns the
    statuses of the budgets checked.

    ``reserve=True``: the check and a hold of ``estimate`` against every
    covering hard budget are one atomic step (concurrent reservations
    queue), and the ``Reservation`` is returned: record the call with
    ``record_usage(..., reservation=r)`` (its real cost replaces the
    estimate) or ``r.release()`` it; one left alone expires after
    ``RESERVATION_TTL``. So N processes never spend past a hard limit by
    more than their estimates were wrong."""
    agent_row = agent_arg(agent)
    model_row = model_arg(model) if model is not None else None
    if reserve and estimate is None:
        raise ValidationError({"estimate": ["A reservation holds an estimate of the call: give estimate=."]})
    guess = _estimate(estimate, model_row)
    db = model_db(Budget)
    now = utcnow()
    if not table_columns(db, Budget._meta.table_name):
        return Reservation(str(uuid.uuid4()), guess[0] if guess else None, (), now + RESERVATION_TTL) \
            if reserve else []
    rows = _covering(model_row, agent_row, [row for row in Budget.select().order_by(Budget.name) if row.hard])
    if not reserve:
        if not rows:
            return []
        with read_transaction(db):
            statuses = _statuses(db, rows, now)
            held = _held(db, rows, now)
        _refuse(rows, statuses, held, guess)
        return statuses
    assert guess is not None
    token = str(uuid.uuid4())
    with write_transaction(db):
        if rows and is_postgres(db):
            # Reservations and recordings of these budgets queue here (recording locks them for its alerts).
            rows = list(Budget.select().where(Budget.id.in_([row.id for row in rows])).order_by(Budget.id)
                        .for_update())
            rows.sort(key=lambda row: row.name)
        BudgetReservation.delete().where(BudgetReservation.expires_at <= now).execute()
        statuses = _statuses(db, rows, now)
        _refuse(rows, statuses, _held(db, rows, now), guess)
        holding = [row for row in rows if guess[1] in (None, row.currency)]
        if holding:
            BudgetReservation.insert_many([{"token": token, "budget": row.id, "amount": str(guess[0]),
                                            "created_at": now, "expires_at": now + RESERVATION_TTL}
                                           for row in holding]).execute()
    return Reservation(token, guess[0], tuple(row.name for row in holding), now + RESERVATION_TTL)


# -- alerts -------------------------------------------------------------------------

def _thresholds(budget: Budget) -> list[Decimal]:
    return [Decimal(repr(fraction)) for fraction in budget.warn_at] + [LIMIT]


def _event_row(event: BudgetEvent, budget: Budget) -> BudgetEventRow:
    try:
        zone: datetime.tzinfo = zoneinfo.ZoneInfo(budget.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):  # an invalid budget's: the time in UTC
        zone = UTC
    start = None if budget.period == "total" else event.period_start.astimezone(zone)
    return {"budget": budget.name, "threshold": Decimal(event.threshold), "spent": Decimal(event.spent),
            "currency": budget.currency, "period_start": start, "at": event.at}


def _record_crossings(db: Database, rows: list[Budget]) -> list[BudgetEventRow]:
    """In a recording's transaction: each threshold of ``rows`` that what is
    spent has reached and that has no alert in this period yet gets one. The
    budgets are read again first, as they are now (one removed or changed
    since ``rows`` were read is left out, or weighed as it is now), and on
    PostgreSQL locked, so that of two calls crossing at once the second sees
    the first, and a budget cannot be removed under the alert written for it
    (SQLite has one writer at a time). A budget whose status cannot be
    worked out is logged and left out: the call is recorded all the same."""
    query = Budget.select().where(Budget.id.in_([row.id for row in rows])).order_by(Budget.id)
    rows = _usable(query.for_update() if is_postgres(db) else query)
    now = utcnow()
    fired = []
    for row in rows:
        try:
            status = _status(db, row, now)
        except (ArithmeticError, LookupError, TypeError, ValueError):
            log.exception("psai budget %r: its status could not be worked out; the call is recorded without "
                          "its alerts", row.name)
            continue
        if status["spent"] is None or status["limit"] is None:
            continue
        key = status["period_start"].astimezone(UTC) if status["period_start"] is not None else TOTAL_PERIOD_KEY
        for threshold in _thresholds(row):
            if status["spent"] < threshold * status["limit"]:
                continue
            values = {"budget": row.id, "period_start": key, "threshold": str(threshold),
                      "spent": str(status["spent"]), "at": now}
            # The unique (budget, period, threshold) index makes it once, whoever tries.
            if db.execute(BudgetEvent.insert(**values).on_conflict_ignore()).rowcount:
                fired.append(_event_row(BudgetEvent(**values), row))
    return fired


def _fire(events: list[BudgetEventRow]) -> None:
    for event in events:
        for listener in list(_listeners):
            try:
                listener(event)
            except Exception:  # the call is recorded; a listener's failure must not look like the call's
                log.exception("psai budget event listener %r failed", listener)


class BudgetWatcher:
    """What recording a call does for budgets (``models.CallWatcher``): in
    the call's transaction, the crossings of the budgets covering it.

    Most deployments have no budget. On SQLite asking costs a statement in
    the process; on PostgreSQL it would cost a round trip, so once a
    database is seen without budgets, the one-round-trip statement that
    records a call asks for it (``probe_sql``), and a budget set since is
    handled right after that call (``probed``), in a transaction of its own."""

    def __init__(self) -> None:
        # The databases seen with no budget at the last look.
        self._none_seen: weakref.WeakKeyDictionary[Database, bool] = weakref.WeakKeyDictionary()

    def _covering(self, db: Database, model: PsAiModel, agent: PsAgent | None) -> list[Budget]:
        if db.execute_sql(ANY_BUDGET_SQL).fetchone() is None:
            self._none_seen[db] = True
            return []
        self._none_seen.pop(db, None)
        return _covering(model, agent, _usable(Budget.select().order_by(Budget.id)))

    def watch(self, db: Database, model: PsAiModel, agent: PsAgent | None, one_trip: bool
              ) -> Callable[[], Callable[[], None] | None] | None:
        if not table_columns(db, Budget._meta.table_name) or one_trip and self._none_seen.get(db):
            return None
        rows = self._covering(db, model, agent)
        if not rows:
            return None

        def in_transaction() -> Callable[[], None] | None:
            fired = _record_crossings(db, rows)
            return (lambda: _fire(fired)) if fired else None
        return in_transaction

    def forget(self, db: Database) -> None:
        """This process has just set a budget on ``db``: look again."""
        self._none_seen.pop(db, None)

    def probe_sql(self, db: Database) -> str | None:
        return ANY_BUDGET_PROBE if table_columns(db, Budget._meta.table_name) else None

    def probed(self, db: Database, model: PsAiModel, agent: PsAgent | None) -> None:
        """The call is committed: whatever happens to its alerts is logged,
        never raised (a caller retrying a call that raised would record it
        twice)."""
        self._none_seen.pop(db, None)
        try:
            with write_transaction(db):
                rows = self._covering(db, model, agent)
                fired = _record_crossings(db, rows) if rows else []
        except Exception:
            log.exception("psai: the call is recorded, but its budget alerts could not be")
            return
        _fire(fired)


WATCHER = BudgetWatcher()


def on_budget_event(callback: Callable[[BudgetEventRow], Any]) -> Callable[[BudgetEventRow], Any]:
    """Call ``callback(event)`` in this process after each call it records
    that crosses a threshold (once the call is committed). Returns the
    callback, so this works as a decorator."""
    _listeners.append(callback)
    return callback


def budget_events(since: datetime.date | str | None = None) -> list[BudgetEventRow]:
    """The thresholds crossed, oldest first (``since``: from that time on)."""
    db = model_db(BudgetEvent)
    if not table_columns(db, BudgetEvent._meta.table_name):
        return []
    from_time = as_datetime(since)
    query = BudgetEvent.select(BudgetEvent, Budget).join(Budget).order_by(BudgetEvent.at, BudgetEvent.id)
    if from_time is not None:
        query = query.where(BudgetEvent.at >= from_time)
    return [_event_row(event, event.budget) for event in query]

