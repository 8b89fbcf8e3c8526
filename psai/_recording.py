"""Recording calls: ``record_usage`` writes one call as PolicySynth 1.3.172
does, a ``ps_model_usage_item`` with the prices in force (``psai._items``),
its tokens added to the counters of ``ps_model_usage`` (one row per model,
agent, connector and UTC day), in one transaction; on PostgreSQL outside a
caller's transaction, in one round trip. ``model_cost`` prices a call for a
stored model without recording it."""
import datetime
import json
import math
import operator
import uuid
from decimal import Decimal
from functools import cached_property, reduce
from typing import Any, Callable, TypedDict

from peewee import SQL, Cast, Insert, IntegrityError, ModelUpdate

from ._arguments import agent_arg, attribution_arg, check_counts, check_ids, model_arg
from ._constants import MAX_INTEGER, strict_json_dumps
from .db import execute_prepared, is_postgres, lock, lock_id, model_db, table_columns, write_transaction
from .errors import NotFoundError, ValidationError
from .fields import UTC, utcnow
from ._items import item_data, item_model, item_price, item_pricing, price_problem
from ._budget_ledger import budgets_covering, carrying_write, fire, record_crossings
from .models import (
    AgentRef, BudgetReservation, ModelRef, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem,
    Reservation, ref_key, usage_counters,
)
from .pricing import CostBreakdown, cost_breakdown, partition_usage
from .query import UNMATCHED_PREFIX, is_unmatched, resolve_model, unmatched_model
from ._responses import usage_from_response
from .schemas import json_problem
from ._sql import (
    USAGE_ROW_COLUMNS, Statement, compiled, item_by_response_id_sql, item_insert, one_round_trip_statements, slot,
    stored_configuration_sql,
)

__all__ = ["record_usage", "model_cost", "usage_counters", "NO_AGENT", "CACHE_WRITE_COUNTERS", "record_response",
           "record_response_data", "RecordedCall", "recorded_response",
           "assign_unmatched", "Assignment"]

# ps_model_usage_item.agent_id for usage without an agent (NOT NULL there).
NO_AGENT = 0


def _round_half_up(value: float) -> int:
    # Half up, as JavaScript's Math.round: whole tokens for the integer counters.
    return int(math.floor(value + 0.5))


def _day_bounds(moment: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    start = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    return start, start + datetime.timedelta(days=1)


CACHE_WRITE_COUNTERS = {"token_in_cache_write_count": "token_in_count",
                        "long_context_token_in_cache_write_count": "long_context_token_in_count"}


def record_usage(model: ModelRef, agent: AgentRef | None = None, *,
                 tokens_in: int = 0, tokens_out: int = 0, cached_tokens: int = 0, cache_write_tokens: int = 0,
                 reasoning_tokens: int = 0, audio_tokens: int = 0, image_tokens: int = 0,
                 web_searches: int = 0, audio_in_tokens: int = 0, user_id: int | None = None,
                 connector_id: int | None = None, provider_metadata: dict[str, Any] | None = None,
                 reservation: Reservation | None = None, user: str | None = None, session: str | None = None,
                 trace: str | dict[str, str] | None = None, tags: dict[str, str] | None = None,
                 environment: str | None = None) -> PsModelUsage:
    """Record one call: add its tokens to the usage counters of (model,
    agent) and write its ``ps_model_usage_item`` with the model's prices as
    stored at that moment, in one transaction.

    The counts are the provider's totals, as ``psai.pricing.estimate_cost``
    takes them (rounded half up to whole tokens); they are partitioned like
    PolicySynth does (long context when ``tokens_in`` reaches the model's
    threshold). ``audio_tokens`` and ``image_tokens`` are output,
    ``audio_in_tokens`` input (part of ``tokens_in``): reports price each
    at its own rate (``costOutAudioTokensPerMillion``,
    ``costOutImageTokensPerMillion``, ``costInAudioTokensPerMillion``), and
    leave it unpriced, saying why, where the prices lack it.
    ``provider_metadata`` is what the provider reported, e.g.
    ``{"appliedServiceTier": "flex"}``: reports price the tier applied.
    ``reservation``: what ``psai.check_budget(..., reserve=True)`` held for
    this call, settled in its transaction (its real cost replaces it).
    ``user`` (the application's end user), ``session`` (the
    conversation), ``trace`` (a trace id, or ``{"traceId", "spanId"}``),
    ``tags`` (text keys and values) and ``environment``: whose the call
    was, kept in the item's ``psai`` part; reports group and filter by
    them (``cost_report(by="user")``, docs/capture.md). Safe when several
    processes record at once, and against a concurrent price change: the
    call is priced either before it or after it. Returns the counter row.

    On a ps_model_usage table without the cache-write counters (PolicySynth's
    npm release), cache-write tokens are added to the ordinary input counters,
    as that release itself counts them. On a database without
    ps_model_usage_item (a PolicySynth older than items), only the counters
    are written.
    """
    counts = dict(tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached_tokens,
                  cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
                  audio_tokens=audio_tokens, image_tokens=image_tokens, web_searches=web_searches,
                  audio_in_tokens=audio_in_tokens)
    check_counts(counts)
    if audio_in_tokens > tokens_in:
        raise ValidationError({"audio_in_tokens": ["Part of tokens_in (%s), so at most that." % tokens_in]})
    check_ids({"user_id": user_id, "connector_id": connector_id})
    if provider_metadata is not None:
        problem = "Must be a dict, e.g. {'appliedServiceTier': 'flex'}." if not isinstance(provider_metadata, dict) \
            else json_problem(provider_metadata)
        if problem:
            raise ValidationError({"provider_metadata": [problem]})
    attribution = attribution_arg(user=user, session=session, trace=trace, tags=tags, environment=environment)
    whole = {name: _round_half_up(value) for name, value in counts.items()}
    return _record(model_arg(model), agent_arg(agent), whole, user_id, connector_id, provider_metadata,
                   reservation=reservation, attribution=attribution)[0]


def _record(model: PsAiModel, agent: PsAgent | None, counts: dict[str, int], user_id: int | None,
            connector_id: int | None, provider_metadata: dict[str, Any] | None,
            response: dict[str, Any] | None = None, reservation: Reservation | None = None,
            after_commit: list[Callable[[], None]] | None = None,
            attribution: dict[str, Any] | None = None) -> tuple[PsModelUsage, str | None]:
    """Record one call of checked, whole counts: (the counter row, the
    item's data as written, or None without items). ``response``: what the
    item keeps of the provider's response (``item_data``'s ``response``).
    ``after_commit``: inside the caller's transaction, what must run once it
    commits (budget alerts) is added to it, not run. ``attribution``: the
    checked ``attribution_arg``, for the item's ``psai`` part."""
    counts = dict(counts)
    web_searches = counts.pop("web_searches")
    db = model_db(PsModelUsage)
    present = usage_counters(db)
    with_items = bool(table_columns(db, PsModelUsageItem._meta.table_name))
    if user_id is None:
        user_id = agent.user_id if agent is not None else model.user_id
    agent_id = agent.id if agent is not None else None
    keys = (model.id, agent_id, connector_id)
    call = dict(counts, model_id=model.id, user_id=user_id, agent_id=agent_id, connector_id=connector_id,
                web_searches=web_searches, provider_metadata=provider_metadata, response=response,
                attribution=attribution or None)
    one_trip = is_postgres(db) and with_items and not db.in_transaction() and isinstance(
        model.configuration, dict) and reservation is None
    # The budgets this call counts against (none, on PostgreSQL, without a round trip
    # once a database is seen without budgets: _budget_ledger.NO_BUDGET_RECHECK).
    # Whose the call was: given to record_usage, or in what a response's item keeps (record_response's).
    whose = attribution or (response.get("psai") if response is not None else None)
    alerting = budgets_covering(db, model, agent, whose)
    if one_trip and not alerting:
        returned, data = _record_in_one_round_trip(db, present, model.configuration, call)
        if returned is not None:
            return _usage_row(present, returned), data
    find, update, insert = _usage_statements(db, present, agent_id is None, connector_id is None)
    # What budgets have spent, kept for the data as it is: carried over this call (plus its item).
    with carrying_write(db) as answers:
        lock(db, keys)
        # The prices as stored now, not as this object last saw them; the
        # shared lock makes a concurrent price change wait for this call.
        configuration = _stored_configuration(db, model)
        now = utcnow()  # after the lock: a price change is wholly before or after the call
        values = _statement_values(db, call, present, *_call_rows(configuration, present, with_items, now, call), now)
        row = db.execute_sql(find.sql, find.params(values)).fetchone()
        if row is None:
            cursor = db.execute_sql(insert.sql, insert.params(values))
        else:
            cursor = db.execute_sql(update.sql, update.params(dict(values, id=row[0])))
        returned = cursor.fetchone()
        item_id = None
        if with_items:
            item = db.execute_sql(item_insert(db), _item_params(values))
            item_id = item.fetchone()[0] if is_postgres(db) else item.lastrowid
        if reservation is not None:  # settled: the call's real cost, in the rollups, replaces the estimate
            BudgetReservation.delete().where(BudgetReservation.token == reservation.token).execute()
        state = answers.carry(item_id) if answers is not None else None
        # The budgets' alerts in the call's own transaction; their listeners once it commits.
        fired = record_crossings(db, alerting, state) if alerting else []
    if fired and after_commit is not None:
        after_commit.append(lambda: fire(fired))
    elif fired:
        fire(fired)
    return _usage_row(present, returned), values["data"]


def _stamp(moment: datetime.datetime) -> Any:
    return PsModelUsage.created_at.db_value(moment)


_STATEMENTS: dict[tuple, tuple[Statement, Statement, Statement]] = {}


def _usage_statements(db, present, agent_is_null, connector_is_null, guarded=False):
    """record_usage's statements on ``ps_model_usage`` (find the day's
    counter row, update it, insert one), compiled by peewee once per backend
    and shape: the hot path of every agent call does not build SQL.
    ``guarded``: the find also needs a row in ``m`` (the one-round-trip
    statement's model check)."""
    key = (type(db), present, agent_is_null, connector_is_null, guarded)
    found = _STATEMENTS.get(key)
    if found is None:
        usage, columns = PsModelUsage, PsModelUsage._meta.columns
        # A row with no room left for these counts (32-bit counters) is not
        # found, and a new one is started: reports add all rows up.
        where: list[Any] = [usage.model == slot("model_id"),
                 usage.agent.is_null() if agent_is_null else usage.agent == slot("agent_id"),
                 usage.connector_id.is_null() if connector_is_null else usage.connector_id == slot("connector_id"),
                 usage.created_at >= slot("start"), usage.created_at < slot("end")]
        where += [columns[name] <= slot("room_" + name) for name in present]
        if guarded:
            where.insert(0, SQL("EXISTS (SELECT 1 FROM m)"))
        returning = [columns[name] for name in USAGE_ROW_COLUMNS + present]
        find = usage.select(usage.id).where(reduce(operator.and_, where)).order_by(usage.id).limit(1)
        # peewee's own queries: these values are checked already, and an
        # INSERT of the model's would add the defaults of columns a
        # PolicySynth table may not have.
        added = {columns[name]: slot("add_" + name) for name in present}
        update = ModelUpdate(usage, {**{field: field + value for field, value in added.items()},
                                     usage.updated_at: slot("stamp")}) \
            .where(usage.id == slot("id")).returning(*returning)
        insert = Insert(usage._meta.table, {
            usage.model: slot("model_id"), usage.agent: slot("agent_id"), usage.connector_id: slot("connector_id"),
            usage.user_id: slot("user_id"), usage.created_at: slot("stamp"), usage.updated_at: slot("stamp"),
            **added}).returning(*returning)
        found = _STATEMENTS[key] = (compiled(find, db), compiled(update, db), compiled(insert, db))
    return found


# The stored form of a day's bounds, by backend and day: one a day, not two a call.
_DAY_STAMPS: dict[tuple[type, datetime.date], tuple[Any, Any]] = {}


def _day_stamps(db: Any, moment: datetime.datetime) -> tuple[Any, Any]:
    key = (type(db), moment.date())
    found = _DAY_STAMPS.get(key)
    if found is None:
        if len(_DAY_STAMPS) > 8:
            _DAY_STAMPS.clear()
        start, end = _day_bounds(moment)
        found = _DAY_STAMPS[key] = (_stamp(start), _stamp(end))
    return found


def _statement_values(db, call, present, values, data, now):
    """The values of record_usage's statements' slots for one call on ``db``."""
    start, end = _day_stamps(db, now)
    named = dict(call, start=start, end=end, stamp=_stamp(now), data=data)
    for name, count in zip(present, values):
        named["add_" + name] = count
        named["room_" + name] = MAX_INTEGER - count
    return named


def _item_params(values):
    """The item INSERT's parameters (``item_insert``)."""
    return [values["user_id"], values["stamp"], values["stamp"], values["model_id"], values["agent_id"] or NO_AGENT,
            values["connector_id"], values["data"]]


def _call_rows(configuration: Any, present: tuple[str, ...], with_items: bool, now: datetime.datetime,
               call: dict[str, Any]) -> tuple[list[float], str | None]:
    """(counter values in the order of ``present``, the item's JSON text or
    None) of one call priced with ``configuration``."""
    prices = configuration.get("prices") if isinstance(configuration.get("prices"), dict) else {}
    counts = {name: call[name] for name in _RECORDED_COUNTS}
    counters = partition_usage(long_context_threshold=prices.get("longContextTokenThreshold"), **counts)
    for name, fallback in CACHE_WRITE_COUNTERS.items():
        if name not in present:
            counters[fallback] += counters.pop(name)
    data = None
    if with_items:
        data = strict_json_dumps(item_data(configuration=configuration, moment=now, **call))
    return [counters[name] for name in present], data


_RECORDED_COUNTS = ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
                    "audio_tokens", "image_tokens")


def _record_in_one_round_trip(db, present, configuration, call):
    """PostgreSQL, outside a transaction: record the call in one round trip,
    priced with the configuration the caller's model object holds, on
    condition that it is still the stored one (compared as jsonb, under the
    share lock the general path takes). One message of two statements: the
    advisory lock, then a prepared statement that finds or starts the day's
    counter row, adds to it and writes the item. PostgreSQL runs a message
    of several statements as one transaction, and psycopg2 (autocommit, as
    peewee runs it) adds no BEGIN or COMMIT round trip. The lock is its own
    statement so that the next one's snapshot sees the rows written by the
    writer it waited for.

    Returns (the counter row, the item's data), the row None when the
    stored configuration differs (or the model is gone): nothing was
    written, and the general path takes over."""
    agent_id, connector_id = call["agent_id"], call["connector_id"]
    now = utcnow()
    values = _statement_values(db, call, present, *_call_rows(configuration, present, True, now, call), now)
    find = _usage_statements(db, present, agent_id is None, connector_id is None, guarded=True)[0]
    counts = [values["add_" + name] for name in present]
    params = ([lock_id((call["model_id"], agent_id, connector_id)), call["model_id"], strict_json_dumps(configuration)]
              + find.params(values) + counts + [values["stamp"]]
              + [call["model_id"], agent_id, connector_id, call["user_id"], values["stamp"], values["stamp"]] + counts
              + _item_params(values))
    lock_sql, record_sql = one_round_trip_statements(find.sql, present, agent_id is None, connector_id is None)
    return execute_prepared(db, record_sql, params, before=lock_sql + "; ").fetchone(), values["data"]


def _stored_configuration(db, model):
    row = db.execute_sql(stored_configuration_sql(db), (model.id,)).fetchone()
    if row is None:
        raise NotFoundError("PsAiModel %s does not exist" % model.id)
    if isinstance(row[0], str):  # SQLite's text: parsed once while it is unchanged
        return _parsed(row[0])[0]
    configuration = PsAiModel.configuration.python_value(row[0])
    return configuration if isinstance(configuration, dict) else {}


def _usage_row(present, values):
    """A PsModelUsage from a RETURNING row."""
    fields = PsModelUsage._meta.columns
    data = {}
    for column, value in zip(USAGE_ROW_COLUMNS + present, values):
        field = fields[column]
        # A whole count needs no conversion (the counters are most of the row).
        data[field.name] = value if type(value) is int else field.python_value(value)
    row = PsModelUsage(__no_default__=True, **data)
    row._dirty.clear()
    return row


def _call_context(configuration: dict[str, Any]) -> dict[str, Any]:
    """How a model's calls are priced, from its configuration: the keyword
    arguments resolve_prices and cost_breakdown take besides the prices."""
    return {"provider": configuration.get("provider"),
            "inference_type": configuration.get("inferenceType"),
            "regional_processing": configuration.get("regionalProcessing")}


_CALL_COUNTS = ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
                "audio_tokens", "image_tokens", "web_searches")


_BY_KEY_SQL: dict[tuple[bool, str], str] = {}
# Configurations as read, by the JSON text stored: a row read again whose
# text has not changed is not parsed and checked again (the row itself is
# always read afresh, so a price another process changed is seen at once).
_PARSED: dict[str, tuple[dict[str, Any], Any, str | None]] = {}
_PARSED_MAX = 512


def _parsed(text: str) -> tuple[dict[str, Any], Any, str | None]:
    """(configuration, prices, price problem) of a configuration's JSON text."""
    found = _PARSED.get(text)
    if found is None:
        try:
            configuration = json.loads(text)
        except ValueError:  # SQLite's text may not be JSON: read as the JSON field reads it, unchanged
            configuration = text
        found = _checked_configuration(configuration)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[text] = found
    return found


def _checked_configuration(configuration: Any) -> tuple[dict[str, Any], Any, str | None]:
    configuration = configuration if isinstance(configuration, dict) else {}
    prices = configuration.get("prices")
    return configuration, prices, price_problem(prices)


def _stored(key: int | str | uuid.UUID) -> tuple[int, tuple[dict[str, Any], Any, str | None]]:
    """``(id, (configuration, prices, price problem))`` of the model with this
    id or uuid, as stored now: one statement (built by peewee once per
    backend and key kind), no row object. The configuration may be shared
    with other calls: read it, never change it."""
    field, value = PsAiModel.key_field(key)
    db = model_db(PsAiModel)
    postgres = is_postgres(db)
    cache_key = (postgres, field.name)
    sql = _BY_KEY_SQL.get(cache_key)
    if sql is None:
        # The configuration as text on PostgreSQL too (psycopg2 would parse
        # jsonb on every call): parsed once per distinct text by _parsed.
        configuration = Cast(PsAiModel.configuration, "text") if postgres else PsAiModel.configuration
        sql = _BY_KEY_SQL[cache_key] = PsAiModel.select(PsAiModel.id, configuration).where(field == value).sql()[0]
    params = (field.db_value(value),)
    if postgres:
        cursor = execute_prepared(db, sql, params)  # parsed and planned once per connection
    else:
        cursor = db.cursor()  # peewee's cursor on the thread's connection: the statement is built already
        cursor.execute(sql, params)
    row = cursor.fetchone()
    if row is None:
        raise NotFoundError("PsAiModel %s does not exist" % key)
    return row[0], _parsed(row[1])


def model_cost(model: ModelRef, **usage: Any) -> CostBreakdown:
    """``psai.pricing.cost_breakdown`` for a stored model (a row, an id, a
    uuid or a name): its prices, with its provider, inference type and region unless
    given. Counts follow ``record_usage``'s rule (a bad count is a
    ValidationError, not 0), and prices that cannot price a call are a
    ValidationError, not a cost of 0."""
    check_counts({name: value for name, value in usage.items() if name in _CALL_COUNTS})
    if not isinstance(model, PsAiModel):
        kind, key = ref_key(model)
        model = model_arg(model) if kind == "name" else key  # an id, or a uuid read once
    if isinstance(model, PsAiModel):
        model_id = model.id
        configuration, prices, problem = _checked_configuration(model.configuration)
    else:
        model_id, (configuration, prices, problem) = _stored(model)
    if problem:
        raise ValidationError({"prices": ["Model %s cannot be priced: %s." % (model_id, problem)]})
    usage = dict(_call_context(configuration), **usage)
    return cost_breakdown(prices, **usage)


# -- recording from the provider's response ------------------------------------------------

class RecordedCall:
    """What ``record_response`` recorded: the call's ``cost`` (a Decimal in
    ``currency``; None when it cannot be priced, and ``unpriced_reason``
    says why), the model it was recorded on (``model_id``; a placeholder
    when no configured model matched the response's model name, see
    ``assign_unmatched``), the counter row it added to (``usage_row``),
    and ``duplicate``: the response (its id, ``response_id``) had been
    recorded already, nothing was added, and the cost is the first's.

    ``other_calls``: the calls of other models the response reported
    beside this one (an Anthropic advisor's iterations), each recorded as
    its own item on its model (a ``RecordedCall`` each, ``response_id``
    the response's with ``#advisor-N``). ``cost`` is this call's alone:
    each other call has its own, in its own model's currency.

    The cost is worked out from the item when first read, so a caller
    that does not read it does not pay for it."""

    def __init__(self, model_id: int, response_id: str | None, duplicate: bool, usage_row: PsModelUsage | None,
                 data: str | dict[str, Any] | None, fallback_prices: Any = None) -> None:
        self.model_id, self.response_id, self.duplicate, self.usage_row = model_id, response_id, duplicate, usage_row
        self._data, self._fallback = data, fallback_prices
        self.other_calls: list[RecordedCall] = []

    @cached_property
    def _priced(self) -> tuple[Decimal | None, str | None, str | None]:
        item = json.loads(self._data) if isinstance(self._data, str) else self._data
        if item is None:  # a database without items: the counters only
            return None, None, "no usage items in this database"
        cost, reason = item_price(item, self._fallback)
        pricing = item.get("pricing")
        prices = pricing.get("configuredPrices") if isinstance(pricing, dict) else None
        currency = prices.get("currency") if isinstance(prices, dict) else None
        if cost is not None and not isinstance(currency, str):
            return None, None, "the prices have no currency"
        return cost, currency if cost is not None else None, reason

    @property
    def cost(self) -> Decimal | None:
        return self._priced[0]

    @property
    def currency(self) -> str | None:
        return self._priced[1]

    @property
    def unpriced_reason(self) -> str | None:
        return self._priced[2]

    def __repr__(self) -> str:
        return "RecordedCall(cost=%r, currency=%r, model_id=%r, response_id=%r, duplicate=%r)" % (
            self.cost, self.currency, self.model_id, self.response_id, self.duplicate)


def record_response(model: ModelRef | None, agent: AgentRef | None,
                    response: Any, *, provider: str | None = None, user_id: int | None = None,
                    connector_id: int | None = None, reservation: Reservation | None = None,
                    user: str | None = None, session: str | None = None,
                    trace: str | dict[str, str] | None = None, tags: dict[str, str] | None = None,
                    environment: str | None = None) -> RecordedCall:
    """Record one call from the provider's own response (``usage_from_response``
    reads it: an SDK object, its JSON, or a stream's chunks or events)
    through ``record_usage``: counters and item in one transaction, the item
    with the response's ``usageRaw``, ``apiFamily`` and ``providerMetadata``
    as PolicySynth's classes write them. ``model=None``: the stored model
    the response's model name means (``psai.query.resolve_model``); when
    none does, the call is recorded all the same, unpriced, on a
    placeholder model (``assign_unmatched`` moves it once the model is
    configured). A response already recorded (the same provider response
    id) is not recorded again: the result is the first's. The calls of
    other models the response reports (an Anthropic advisor's iterations,
    ``ResponseUsage.other_calls``) are recorded in the same transaction,
    each as its own item on the model its name means (or its
    placeholder), with the same agent, user and connector; the call's item
    lists them in ``psai.otherCalls``. Returns the call's cost
    (``RecordedCall``, its ``other_calls`` theirs). ``reservation``: as
    ``record_usage``'s, settled by the call's own cost. ``user``,
    ``session``, ``trace``, ``tags``, ``environment``: whose the call was,
    as ``record_usage`` keeps them (the other calls' items too)."""
    attribution = attribution_arg(user=user, session=session, trace=trace, tags=tags, environment=environment)
    return record_response_data(model, agent, response, provider, user_id, connector_id, reservation,
                                attribution=attribution)


def record_response_data(model: Any, agent: Any, response: Any, provider: str | None, user_id: int | None,
                         connector_id: int | None, reservation: Reservation | None = None,
                         kept: dict[str, Any] | None = None,
                         attribution: dict[str, Any] | None = None) -> RecordedCall:
    """``record_response``, its arguments checked. ``kept``: more for the
    item's ``psai`` part (JSON; a span's approximations, its trace);
    ``attribution`` (``attribution_arg``'s), whose the call was, over it."""
    usage = usage_from_response(response, provider=provider)
    check_ids({"user_id": user_id, "connector_id": connector_id})
    problem = json_problem(usage.usage_raw)  # the other calls' usage is part of it
    if problem:
        raise ValidationError({"response.usage": [problem]})
    found_agent = agent_arg(agent)
    owner = user_id if user_id is not None else found_agent.user_id if found_agent is not None else 0
    if model is None:
        if not usage.model:
            raise ValidationError({"model": ["The response names no model: give the stored model."]})
        found, extras = _model_named(usage, owner)
    else:
        found, extras = model_arg(model), {}
    attributed = dict(kept or {}, **(attribution or {}))
    extras = dict(attributed, **extras)
    response_id = usage.provider_metadata.get("responseId")
    response_id = response_id if isinstance(response_id, str) and response_id else None
    # Another model's calls (an Anthropic advisor's iterations): each its own
    # item on its model, found by its name; an id derived from the response's
    # makes recording the response again record none of them twice.
    others = []
    for number, other in enumerate(usage.other_calls, 1):
        other_model, other_extras = _model_named(other, owner)
        other_extras = dict(attributed, **other_extras)  # the same caller's: the same attribution
        other_id = "%s#advisor-%s" % (response_id, other.provider_metadata.get("advisorIteration", number)) \
            if response_id is not None else None
        if response_id is not None:
            other_extras["parentResponseId"] = response_id
        others.append((other, other_model, other_id, other_extras))
    if others:  # the main item names them, so its own data says the response cost more
        extras["otherCalls"] = [{"model": other.model, "modelId": other_model.id, "responseId": other_id}
                                for other, other_model, other_id, _extras in others]
    calls = [(usage, found, response_id, extras)] + others
    try:
        if not others:  # the hot path: one call, maybe in one round trip
            counts, metadata, kept = _recorded_counts(usage, response_id, extras)
            row, data = _record(found, found_agent, counts, user_id, connector_id, metadata, kept, reservation)
            return RecordedCall(found.id, response_id, False, row, data)
        db = model_db(PsModelUsage)
        after: list[Callable[[], None]] = []
        with write_transaction(db):  # all the response's calls or none
            for model_id in sorted({call_model.id for _call, call_model, _id, _extras in calls}):
                lock(db, (model_id, found_agent.id if found_agent is not None else None, connector_id))
            recorded = []
            for call, call_model, call_id, call_extras in calls:
                counts, metadata, kept = _recorded_counts(call, call_id, call_extras)
                row, data = _record(call_model, found_agent, counts, user_id, connector_id, metadata, kept,
                                    reservation if call is usage else None, after)
                recorded.append(RecordedCall(call_model.id, call_id, False, row, data))
        for then in after:
            then()
        recorded[0].other_calls = recorded[1:]
        return recorded[0]
    except IntegrityError:
        # Recorded already (by this process or another at the same moment):
        # the unique index on the response id refused the second item, and
        # its transaction wrote nothing.
        first = _recorded_response(response_id) if response_id is not None else None
        if first is None:
            raise
        if reservation is not None:  # no call of its own to settle it: its estimate is given back
            reservation.release()
        return first


def _model_named(usage: Any, owner: int) -> tuple[PsAiModel, dict[str, Any]]:
    """(the stored model a response's model name means, the item's extras:
    ``unmatchedModel`` when none does and the call goes on the name's
    placeholder)."""
    # PolicySynth configures the Responses API's models as provider "openaiResponses".
    stored = ["openai", "openaiResponses"] if usage.provider == "openai" else usage.provider
    try:
        return resolve_model(usage.model, provider=stored), {}
    except NotFoundError:
        # The provider was paid: the call is recorded, unpriced, on the name's placeholder.
        return unmatched_model(usage.model, usage.provider, user_id=owner), {"unmatchedModel": usage.model}


def _recorded_counts(usage: Any, response_id: str | None, extras: dict[str, Any]
                     ) -> tuple[dict[str, int], dict[str, Any] | None, dict[str, Any]]:
    """``_record``'s counts, provider metadata and response for one call."""
    extras = dict(extras)
    if response_id is not None:
        extras["responseId"] = response_id
    if usage.cache_write_1h_tokens:
        extras["cacheWrite1hTokens"] = usage.cache_write_1h_tokens
    if usage.provider_cost is not None:
        extras["providerCost"] = usage.provider_cost
    if usage.cache_write_12h_tokens:
        extras["cacheWrite12hTokens"] = usage.cache_write_12h_tokens
    kept = {"apiFamily": usage.api_family, "usageRaw": usage.usage_raw, "psai": extras}
    # counts() has every cache write among the cache writes (the longer-lived priced apart); audio input is
    # among the input and priced apart too.
    counts = dict(usage.counts(), audio_in_tokens=usage.audio_in_tokens)
    return counts, usage.provider_metadata or None, kept


def _recorded_response(response_id: str) -> RecordedCall | None:
    """The RecordedCall of the item recorded for ``response_id`` (with its
    other calls), or None."""
    db = model_db(PsModelUsageItem)
    found = db.execute_sql(item_by_response_id_sql(db), (response_id,)).fetchone()
    if found is None:
        return None
    _item_id, model_id, data = found
    data = PsModelUsageItem.data.python_value(data)
    fallback = None
    if isinstance(data, dict) and (data.get("pricing") or {}).get("configuredPrices") is None:
        stored = PsAiModel.get_or_none(PsAiModel.id == model_id)
        fallback = stored.configuration.get("prices") if stored is not None and isinstance(
            stored.configuration, dict) else None
    first = RecordedCall(model_id, response_id, True, None, data, fallback)
    extras = data.get("psai") if isinstance(data, dict) else None
    others = extras.get("otherCalls") if isinstance(extras, dict) else None
    for other in others if isinstance(others, list) else []:
        other_id = other.get("responseId") if isinstance(other, dict) else None
        recorded = _recorded_response(other_id) if isinstance(other_id, str) and other_id else None
        if recorded is not None:
            first.other_calls.append(recorded)
    return first


def recorded_response(response_id: str) -> RecordedCall | None:
    """What the call recorded for the provider's response id cost
    (``RecordedCall``, ``duplicate`` True), or None when none was."""
    if not isinstance(response_id, str) or not response_id:
        raise ValidationError({"response_id": ["Give the provider's response id, e.g. 'chatcmpl-...'."]})
    return _recorded_response(response_id)


# -- calls recorded on a placeholder model --------------------------------------------------

class Assignment(TypedDict):
    """What ``assign_unmatched`` did (or would do) for one placeholder model."""

    placeholder_id: int
    name: str  # the model name the responses gave
    provider: str | None
    calls: int
    model_id: int | None  # the configured model now matching the name; None: still none
    reason: str  # how the model was found, or why none was
    applied: bool


def assign_unmatched(*, dry_run: bool = True) -> list[Assignment]:
    """Move the calls recorded on placeholder models (their response's
    model name matched no configured model, ``record_response``) to the
    model now configured for that name (``resolve_model``): each item gets
    that model and a snapshot of its prices as stored now, the counters
    move with it, and the placeholder is removed; from then on reports
    price them. ``dry_run=True`` (the default) changes nothing. Returns one
    entry a placeholder; those whose name still matches no model stay."""
    found: list[Assignment] = []
    placeholders = [m for m in PsAiModel.select().where(PsAiModel.name.startswith(UNMATCHED_PREFIX))
                    .order_by(PsAiModel.id) if is_unmatched(m)]
    db = model_db(PsModelUsageItem)
    for placeholder in placeholders:
        name, provider = placeholder.configuration["model"], placeholder.configuration.get("provider")
        stored = ["openai", "openaiResponses"] if provider == "openai" else provider
        try:
            target, reason = resolve_model(name, provider=stored, explain=True)
        except NotFoundError as exc:
            target, reason = None, str(exc)
        calls = PsModelUsageItem.select().where(PsModelUsageItem.model_id == placeholder.id).count()
        entry = Assignment(placeholder_id=placeholder.id, name=name, provider=provider, calls=calls,
                           model_id=target.id if target is not None else None, reason=reason, applied=False)
        if target is not None and not dry_run:
            _assign(db, placeholder, target)
            entry["applied"] = True
        found.append(entry)
    return found


def _assign(db: Any, placeholder: PsAiModel, target: PsAiModel) -> None:
    """Move a placeholder's items and counters to ``target``, in one transaction."""
    with write_transaction(db):
        lock(db, ("unmatched model", placeholder.name))
        configuration = _stored_configuration(db, target)
        now = utcnow()
        item = PsModelUsageItem
        moved = list(item.select(item.id, item.data).where(item.model_id == placeholder.id))
        for row in moved:
            data = row.data if isinstance(row.data, dict) else {}
            data = dict(data, provider=configuration.get("provider"), model=item_model(target.id, configuration),
                        pricing=item_pricing(configuration, data.get("providerMetadata")))
            item.update(model_id=target.id, data=data, updated_at=now).where(item.id == row.id).execute()
        PsModelUsage.update(model=target.id, updated_at=now).where(PsModelUsage.model == placeholder.id).execute()
        placeholder.delete_instance()
