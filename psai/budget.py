"""Budgets: spending limits over one scope (an agent and its sub-agents, a
model name across its versions, a provider, an organization, or all usage;
only the calls of one end user, session or tag, if asked) and a calendar
period in an IANA time zone, checked before a call (``check_budget``, with
reservations), with threshold alerts recorded once
per budget and period (``budget_events``) in the transaction of the call
that crosses them.

What a budget has spent, and the alerts recording raises, are the ledger's
(``psai._budget_ledger``, below recording, which calls it directly): a
lookup of the rollups the triggers keep, each group of calls priced alike
priced from its own snapshot as ``cost_report`` prices it."""
import datetime
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal, overload

from peewee import Database

from ._arguments import agent_arg, as_datetime, attribution_arg, model_arg
from .db import is_postgres, lock, model_db, table_columns, write_transaction
from .errors import BudgetExceededError, NotAdoptedError, NotFoundError, ValidationError
from .fields import utcnow
from .models import (
    AgentRef, Budget, BudgetEvent, BudgetReservation, ModelRef, PsAiModel, Reservation, find_models,
)
from ._budget_ledger import (
    LIMIT, LISTENERS, BudgetEventRow, BudgetStatus, budget_rows, carrying_write, covering, event_row, forget,
    kept_statuses, ledger_snapshot, period_bounds, scope_of, statuses,
)
from ._recording import model_cost
from .schemas import BUDGET_FIELDS, BudgetPeriod, BudgetUnpriced, validate_budget_values
from ._sql import compiled_once, slot, state_and_rows_sql

__all__ = ["set_budget", "budgets", "remove_budget", "budget_status", "check_budget", "budget_events",
           "on_budget_event", "period_bounds", "RESERVATION_TTL", "Reservation",
           "BudgetStatus", "BudgetEventRow", "LIMIT", "scope_of", "check_before_call"]


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
    if values["user"] is not None:
        scope += " of user %s" % values["user"]
    elif values["session"] is not None:
        scope += " of session %s" % values["session"]
    elif values["tag_key"] is not None:
        scope += " tagged %s=%s" % (values["tag_key"], values["tag_value"])
    return "%s per %s" % (scope, values["period"]) if values["period"] != "total" else scope + " in total"


def set_budget(*, amount: Decimal | int | float | str, currency: str = "USD", period: BudgetPeriod = "month",
               timezone: str = "UTC", agent: AgentRef | None = None,
               include_sub_agents: bool = True, model: ModelRef | None = None,
               provider: str | None = None, organization_id: int | None = None,
               user: str | None = None, session: str | None = None, tags: Mapping[str, str] | None = None,
               warn_at: Iterable[float] = (0.8,), hard: bool = True, unpriced: BudgetUnpriced = "block",
               name: str | None = None) -> Budget:
    """Create a budget, or change the one of that ``name`` (its alerts so far
    stay). One scope at most: ``agent`` (with its sub-agent tree unless
    ``include_sub_agents=False``), ``model`` (a model named as everywhere:
    row, id, uuid or name; the budget covers every version of its name), ``provider``,
    ``organization_id``; none: all usage. ``user`` (the application's end
    user), ``session`` (one conversation) or ``tags`` (one tag,
    ``{"team": "search"}``, as ``cost_report``'s ``tags=`` filter names it):
    only the calls of the scope recorded with that user, session or tag
    (``record_usage(..., user=, session=, tags=)``, ``track``,
    ``instrument``), one attribution per budget. ``period``: day, week (ISO, from
    Monday), month, year (on the calendar of ``timezone``) or total.
    ``warn_at``: fractions of the limit that raise an alert; the limit is one
    too. ``hard``: ``check_budget`` refuses calls once it is reached.
    ``unpriced="block"``: usage that cannot be priced makes ``check_budget``
    refuse (the state is ``unknown``); ``"allow"`` lets it pass."""
    if include_sub_agents is False and agent is None:  # it would silently cover all usage
        raise ValidationError({"include_sub_agents": ["False limits an agent budget to the agent itself: "
                                                      "give an agent."]})
    tag = _one_tag(user, session, tags)
    agent_row = agent_arg(agent) if agent is not None else None
    if model is not None:  # every version of the model this names: its name
        model = find_models(model)[0].name
    values = {"amount": amount, "currency": currency, "period": period, "timezone": timezone,
              "agent_id": agent_row.id if agent_row is not None else None,
              "include_sub_agents": include_sub_agents, "model_name": model, "provider": provider,
              "organization_id": organization_id, "user": user, "session": session,
              "tag_key": tag[0] if tag else None, "tag_value": tag[1] if tag else None,
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
    forget(db)  # this process's calls weigh it from the next one on
    return row


def _one_tag(user: str | None, session: str | None, tags: Mapping[str, str] | None) -> tuple[str, str] | None:
    """The one tag a budget is limited to, checked as recording checks a
    call's (and the user and session with it: one of the three at most);
    None without tags."""
    given = attribution_arg(user=user, session=session, tags=tags)
    named = [name for name in ("user", "session", "tags") if name in given]
    if len(named) > 1:  # the last one named carries the error: tags, else session
        raise ValidationError({named[-1]: ["A budget covers one attribution (a user, a session or one tag), "
                                           "not %s: set a budget for each." % " and ".join(named)]})
    if "tags" not in given:
        if tags is not None:  # {}: it would silently cover every call
            raise ValidationError({"tags": ["Give the one tag the budget covers, e.g. {'team': 'search'}."]})
        return None
    if len(given["tags"]) != 1:
        raise ValidationError({"tags": ["A budget covers one tag: got %d (%s); set a budget for each." % (
            len(given["tags"]), ", ".join(sorted(given["tags"])))]})
    [(key, value)] = given["tags"].items()
    return key, value


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


def budget_status(budget: Budget | str | None = None) -> list[BudgetStatus]:
    """The state of one budget (by name or row) or of every budget, now:
    the same spending as ``cost_report`` over that scope and period."""
    chosen = [_budget(budget)] if budget is not None else budgets()
    if not chosen:
        return []
    db = model_db(Budget)
    with ledger_snapshot(db) as state:
        return statuses(db, chosen, utcnow(), state)


# -- before a call ----------------------------------------------------------------------

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


def _held_statement(db: Database, rows: list[Budget], now: datetime.datetime) -> tuple[str, list]:
    """The query of the live reservations held against ``rows`` (budget id, amount) and its parameters."""
    values = {"id%d" % i: row.id for i, row in enumerate(rows)}
    values["now"] = BudgetReservation.expires_at.db_value(now)
    statement = compiled_once(db, ("held", len(rows)), lambda: (
        BudgetReservation.select(BudgetReservation.budget, BudgetReservation.amount)
        .where(BudgetReservation.budget.in_([slot("id%d" % i) for i in range(len(rows))])
               & (BudgetReservation.expires_at > slot("now")))))
    return statement.sql, statement.params(values)


def _add_held(held: dict[int, Decimal], budget_id: int | None, amount: str | None) -> None:
    if budget_id is not None:
        held[budget_id] = held.get(budget_id, Decimal(0)) + Decimal(str(amount))


def _held(db: Database, rows: list[Budget], now: datetime.datetime) -> dict[int, Decimal]:
    """What live reservations hold against each of ``rows``."""
    if not rows or not table_columns(db, BudgetReservation._meta.table_name):
        return {}
    held: dict[int, Decimal] = {}
    for budget_id, amount in db.execute_sql(*_held_statement(db, rows, now)):
        _add_held(held, budget_id, amount)
    return held


def _unchanged(db: Database, rows: list[Budget], now: datetime.datetime
               ) -> tuple[list[BudgetStatus], dict[int, Decimal]] | None:
    """PostgreSQL, outside a transaction: the statuses kept for the data as
    one statement sees it and what reservations hold in it, read by that
    one statement (a read transaction takes four round trips: BEGIN, the
    state, the reservations, COMMIT). None when a status is not kept for
    that data: the caller reads in a read transaction."""
    if not table_columns(db, BudgetReservation._meta.table_name):
        return None
    sql, params = _held_statement(db, rows, now)
    found = db.execute_sql(state_and_rows_sql(sql), params).fetchall()
    width = len(found[0]) - 2
    kept = kept_statuses(db, rows, now, tuple(found[0][:width]))
    if kept is None:
        return None
    held: dict[int, Decimal] = {}
    for row in found:
        _add_held(held, *row[width:])
    return kept, held


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


def _refuse(rows: list[Budget], found: list[BudgetStatus], held: dict[int, Decimal],
            guess: tuple[Decimal, str | None] | None) -> None:
    for row, status in zip(rows, found):
        reason = _refusal(row, status, held.get(row.id, Decimal(0)), guess)
        if reason is not None:
            raise BudgetExceededError(reason, budget=row.name, spent=status["spent"], limit=status["limit"],
                                      currency=row.currency, period_end=status["period_end"])


@overload
def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 user: str | None = None, session: str | None = None,
                 tags: Mapping[str, str] | None = None,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: Literal[False] = False) -> list[BudgetStatus]: ...


@overload
def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 user: str | None = None, session: str | None = None,
                 tags: Mapping[str, str] | None = None,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: Literal[True]) -> Reservation: ...


def check_budget(agent: AgentRef | None = None,
                 model: ModelRef | None = None, *,
                 user: str | None = None, session: str | None = None,
                 tags: Mapping[str, str] | None = None,
                 estimate: Decimal | int | float | str | dict[str, Any] | None = None,
                 reserve: bool = False) -> list[BudgetStatus] | Reservation:
    """Before a call: raise ``BudgetExceededError`` when a hard budget
    covering this agent and model is reached, would be passed by
    ``estimate`` (a cost in the budget's currency, or the counts of the call,
    priced with the model's prices), or is ``unknown`` and blocks unpriced
    usage. What live reservations hold counts as spent. Returns the
    statuses of the budgets checked. ``user``, ``session``, ``tags``: whose
    the call will be (as it will be recorded): the budgets limited to a
    user, a session or a tag are checked only for calls that carry it.

    ``reserve=True``: the check and a hold of ``estimate`` against every
    covering hard budget are one atomic step (concurrent reservations
    queue), and the ``Reservation`` is returned: record the call with
    ``record_usage(..., reservation=r)`` (its real cost replaces the
    estimate) or ``r.release()`` it; one left alone expires after
    ``RESERVATION_TTL``. So N processes never spend past a hard limit by
    more than their estimates were wrong."""
    whose = attribution_arg(user=user, session=session, tags=tags)
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
    rows = covering(model_row, agent_row, [row for row in budget_rows(db, order="name") if row.hard],
                    whose)
    if not reserve:
        if not rows:
            return []
        unchanged = _unchanged(db, rows, now) if is_postgres(db) and not db.in_transaction() else None
        if unchanged is None:
            with ledger_snapshot(db) as state:
                found = statuses(db, rows, now, state)
                held = _held(db, rows, now)
        else:
            found, held = unchanged
        _refuse(rows, found, held, guess)
        return found
    assert guess is not None
    token = str(uuid.uuid4())
    # The answers kept for the data as it is hold after this transaction's writes, which spend nothing.
    with carrying_write(db) as answers:
        if rows and is_postgres(db):
            # Reservations and recordings of these budgets queue here (recording locks them for its alerts).
            rows = budget_rows(db, ids=[row.id for row in rows], lock=True)
            rows.sort(key=lambda row: row.name)
        BudgetReservation.delete().where(BudgetReservation.expires_at <= now).execute()
        found = statuses(db, rows, now, answers.carry() if answers is not None else None)
        _refuse(rows, found, _held(db, rows, now), guess)
        holding = [row for row in rows if guess[1] in (None, row.currency)]
        if holding:
            BudgetReservation.insert_many([{"token": token, "budget": row.id, "amount": str(guess[0]),
                                            "created_at": now, "expires_at": now + RESERVATION_TTL}
                                           for row in holding]).execute()
    return Reservation(token, guess[0], tuple(row.name for row in holding), now + RESERVATION_TTL)


def check_before_call(agent: AgentRef | None, model: ModelRef | None, *,
                      estimate: Decimal | int | float | str | dict[str, Any] | None, reserve: bool,
                      user: str | None, session: str | None, tags: Mapping[str, str] | None
                      ) -> Reservation | None:
    """``check_budget`` before one call, as ``psai.track``'s ``run.check`` and
    ``psai.instrument(..., budget=True)`` make it: with ``reserve`` and an
    ``estimate``, the estimate is held and its Reservation returned (the
    recording of the call settles it, ``release()`` gives it back); else
    the budgets are only checked (with the estimate, if any) and None returned."""
    if reserve and estimate is not None:
        return check_budget(agent, model, user=user, session=session, tags=tags, estimate=estimate, reserve=True)
    check_budget(agent, model, user=user, session=session, tags=tags, estimate=estimate)
    return None


# -- alerts -------------------------------------------------------------------------

def on_budget_event(callback: Callable[[BudgetEventRow], Any]) -> Callable[[BudgetEventRow], Any]:
    """Call ``callback(event)`` in this process after each call it records
    that crosses a threshold (once the call is committed). Returns the
    callback, so this works as a decorator."""
    LISTENERS.append(callback)
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
    return [event_row(event, event.budget) for event in query]

