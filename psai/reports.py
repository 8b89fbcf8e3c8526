"""Reports: what recorded usage cost.

Every call is priced from its own item: the prices stored with it, the tier
the provider applied, its own long-context split. The SQL adds up calls
that are priced alike (same model, snapshot, tier and split), so Python
prices groups, not rows, and the sums stay exact (cost is linear in the
counts of a group). Counter usage that no item covers (recorded before
items existed, or by other tools) is priced by the price version in force
when its counter row was started, else by the model's current prices.
"""
import bisect
import datetime
import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal, ParamSpec, TypedDict, TypeVar, get_args
from dataclasses import MISSING, dataclass, field, fields
import json
from collections import defaultdict, deque
from decimal import Decimal

from peewee import Database

from ._arguments import as_datetime, attribution_arg, tag_key_problem
from ._constants import strict_json_dumps
from .db import is_postgres, model_db, read_transaction, table_columns
from .errors import UnpricedUsageError, ValidationError
from .fields import UTC
from ._items import APART, BUCKETS, effective_prices
from .pricing import COUNTERS_OF_BUCKET, OUTPUT_COUNTERS, Pricer, exact_sum
from .models import AgentRef, ModelRef, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, find_agent, find_models
from ._recording import usage_counters
from .rollups import (
    ReadPlan, any_negative_counters, coverage_kept, enabled, kept_counter_totals, key_totals, ledger_enabled,
    ledger_kinds, ledger_rows, read_plan, rollup_rows, scan_where, uncovered_keys,
)
from ._sql import (
    ITEM_VALUES, ItemReader, JsonSQL, attribute_sql, counter_bucket_sums_sql, counter_rows_sql, counter_sums_sql,
    counter_totals_sql, counters_negative, counters_sound, ids_in, item_groups_sql, item_kinds_sql, item_totals_sql,
    negative_rows_sql, odd_counter_times_sql, price_period_sql, window,
)
from ._versions import histories_of, prices_at

__all__ = ["one_snapshot", "cost_report", "cost_reports", "report_totals", "daily_costs", "REPORT_GROUPINGS",
           "ReportGrouping", "usage_parts", "item_parts",
           "price_parts", "merge_parts", "part_tokens", "part_provider", "CostRow", "CurrencyTotal", "DailyCost",
           "Attribution", "ATTRIBUTE_GROUPINGS", "CROSS_GROUPINGS", "attribution_kinds"]

ReportGrouping = Literal["model", "agent", "tree", "provider", "day"]
REPORT_GROUPINGS: tuple[ReportGrouping, ...] = get_args(ReportGrouping)
# Groupings by whose the calls were (data.psai), besides ``tag:KEY``: a report's row key of the same name.
ATTRIBUTE_GROUPINGS = ("user", "session")


@dataclass(frozen=True)
class Attribution:
    """What a report asks of the calls' attribution (their items'
    ``data.psai``): ``by``, the one it groups by (``user``, ``session``,
    ``tag:KEY``) or None; ``only``, (kind, value) pairs each call must have."""

    by: str | None = None
    only: tuple[tuple[str, str], ...] = ()


def _attribute_grouping(by: object) -> str | None:
    """``by`` when it groups by an attribution (checked), else None."""
    if by in ATTRIBUTE_GROUPINGS:
        return str(by)
    if isinstance(by, str) and by.startswith("tag:"):
        problem = tag_key_problem(by[4:])
        if problem:
            raise ValidationError({"by": [problem]})
        return by
    return None


# What a cross grouping (``by="agent,model"``) may pair: two of these, at most one an attribution.
CROSS_GROUPINGS = ("model", "agent", "provider", "day")


def _dimensions(by: object) -> tuple[str, ...]:
    """The groupings ``by`` names, checked: one, or two comma-separated (a
    cross grouping, its rows keyed by both, in that order)."""
    if not isinstance(by, str) or "," not in by:
        if by not in REPORT_GROUPINGS and _attribute_grouping(by) is None:
            raise ValidationError({"by": ["Must be one of: %s, or tag:KEY; or two of them comma-separated "
                                          "(e.g. agent,model)." % ", ".join(REPORT_GROUPINGS + ATTRIBUTE_GROUPINGS)]})
        return (str(by),)
    names = tuple(name.strip() for name in by.split(","))
    attributes = [name for name in names if name not in CROSS_GROUPINGS]
    if len(names) != 2 or len(set(names)) != 2 or len(attributes) > 1 or any(
            _attribute_grouping(name) is None for name in attributes):
        raise ValidationError({"by": ["%r: a cross grouping is two different groupings among %s, user, session "
                                      "and tag:KEY, at most one of those three, comma-separated (e.g. agent,model "
                                      "or tag:team,model); tree groups alone." % (by, ", ".join(CROSS_GROUPINGS))]})
    return names


def _attribution(by: object, user: str | None, session: str | None,
                 tags: dict[str, str] | None) -> Attribution | None:
    """A report's Attribution (None: it asks nothing of it), its filters checked as recording checks them."""
    given = attribution_arg(user=user, session=session, tags=tags)
    only = tuple((kind, given[kind]) for kind in ("user", "session") if kind in given) + tuple(
        ("tag:" + key, value) for key, value in sorted((given.get("tags") or {}).items()))
    grouped = _attribute_grouping(by)
    return Attribution(grouped, only) if grouped is not None or only else None

# A token count or a sum of them: whole, or exact where SQL summed fractions.
Number = int | Decimal


class CostRow(TypedDict, total=False):
    """A row of ``cost_report``: the group's keys (by model: ``model_id``,
    ``model_name``, ``provider``; by agent: ``agent_id``, ``agent_name``; by
    tree: those and ``parent_agent_id``, ``level``; by provider:
    ``provider``; by day: ``day``; by user, session: ``user``, ``session``;
    by tag:KEY: ``tag``, the calls' value of tag KEY; None for the calls
    without it), then what the group cost."""

    model_id: int | None
    model_name: str | None
    agent_id: int | None
    agent_name: str | None
    parent_agent_id: int | None
    level: int | None
    provider: str | None
    day: str | None
    user: str | None
    session: str | None
    tag: str | None
    calls: int
    tokens_in: Number
    tokens_out: Number
    cached_tokens: Number  # of tokens_in, read from cache
    cache_write_tokens: Number  # of tokens_in, written to cache
    reasoning_tokens: Number  # of tokens_out, reasoning
    cost: Decimal | None
    currency: str | None
    unpriced_tokens: Number
    priced_from: str | None
    unpriced_reason: str | None
    # What the provider itself said the calls cost (OpenRouter's usage.cost), beside psai's cost; None: not said.
    provider_cost: Decimal | None


class CurrencyTotal(TypedDict):
    """``report_totals``' entry for one currency (None: the unpriced usage)."""

    calls: int
    tokens_in: Number
    tokens_out: Number
    cached_tokens: Number
    cache_write_tokens: Number
    reasoning_tokens: Number
    cost: Decimal | None
    unpriced_tokens: Number
    provider_cost: Decimal | None


class DailyCost(TypedDict):
    """A row of ``daily_costs``: one model's cost on one UTC day, in one currency."""

    day: str | None
    model_id: int
    model_name: str | None
    provider: str | None
    currency: str | None
    calls: int
    cost: Decimal | None
    tokens_in: Number
    tokens_out: Number
    unpriced_tokens: Number
    provider_cost: Decimal | None


#
# Every call is priced from its own item: the prices stored with it, the tier
# the provider applied, its own long-context split. The SQL adds up calls
# that are priced alike (same model, snapshot, tier and split), so Python
# prices groups, not rows, and the sums stay exact (cost is linear in the
# counts of a group). Counter usage that no item covers (recorded before
# items existed, or by other tools) is priced by the price version in force
# when its counter row was started, else by the model's current prices.

@dataclass
class TokenTotals:
    """The input and output tokens of the usage of one (model, agent,
    connector): what tells whether items cover the counters."""

    tokens_in: Number = 0
    tokens_out: Number = 0


@dataclass
class GroupSums:
    """What SQL adds up for one group of items priced alike (its columns in
    this order): the calls, the input in its buckets (neither cached nor a
    cache write; cached; cache writes), all output, web searches, the
    items' input and output totals as recorded, the tokens priced apart
    (``items.APART``: 1-hour and 12-hour cache writes among the cache
    writes, audio input among the input, audio and image output among the
    output), the reasoning tokens among the output, and the provider's own
    cost of the calls that reported one (None when none did)."""

    calls: int
    fresh_in: Number
    cached: Number
    cache_write: Number
    out: Number
    web: Number
    all_in: Number
    all_out: Number
    cache_write_1h: Number
    cache_write_12h: Number
    audio_in: Number
    audio_out: Number
    image_out: Number
    reasoning_out: Number
    provider_cost: Number | None

    @classmethod
    def of(cls, values: Iterable[Any]) -> "GroupSums":
        """The sums of a row's columns in the order of the fields, as exact
        numbers: SQLite sums REAL values as floats, and a PostgreSQL numeric
        arrives as a Decimal, which adds in 28 digits (None stays None)."""
        # Most are ints (SQLite) or zero (PostgreSQL's numerics of the tokens priced apart): no call for them.
        exact: list[Any] = [value if value is None or type(value) is int else exact_sum(value) if value else 0
                            for value in values]
        return cls(*exact)

    def apart(self) -> dict[str, Number]:
        """The tokens priced apart, by ``items.APART``'s names."""
        return dict(zip(APART, (self.cache_write_1h, self.cache_write_12h, self.audio_in, self.audio_out,
                                self.image_out)))

    def add(self, other: "GroupSums") -> None:
        """Add another group's sums (the coverage totals stay this group's)."""
        self.calls += other.calls or 0
        self.fresh_in += other.fresh_in or 0
        self.cached += other.cached or 0
        self.cache_write += other.cache_write or 0
        self.out += other.out or 0
        self.web += other.web or 0
        self.cache_write_1h += other.cache_write_1h or 0
        self.cache_write_12h += other.cache_write_12h or 0
        self.audio_in += other.audio_in or 0
        self.audio_out += other.audio_out or 0
        self.image_out += other.image_out or 0
        self.reasoning_out += other.reasoning_out or 0
        self.provider_cost = _plus(self.provider_cost, other.provider_cost)


@dataclass(frozen=True, eq=False)
class UsagePart:
    """Usage priced alike, what the report pipeline adds up and prices: its
    keys (the model; the agent, connector and UTC day where kept apart; the
    ``attribute`` a report by attribution groups by, None for the calls
    without it), its tokens (``buckets``: BUCKETS; ``apart``: APART's
    tokens, counted in ``buckets`` too and priced apart, ``long_`` ones for
    long context; ``reasoning``: the reasoning tokens among the output), and
    its pricing context (the item's ``pricing``, the tier the provider
    applied in ``metadata``, where its prices come from). ``price_parts``
    gives a copy with ``cost`` (None: unpriced), ``currency`` and ``reason``."""

    model_id: Any
    buckets: dict[str, Number]
    agent_id: Any = None
    connector_id: Any = None
    day: str | None = None
    attribute: str | None = None
    provider: str | None = None
    pricing: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    priced_from: str = "snapshot"  # snapshot, history or current
    has_usage: bool = True  # False: its counts cannot be read (never priced)
    problem: str | None = None  # why it is unpriced whatever its prices
    calls: int = 0
    web: int = 0
    reasoning: Number = 0
    apart: dict[str, Number] = field(default_factory=dict)
    provider_cost: Number | None = None
    # What tells parts priced alike (with the provider), hashable; None: from pricing and metadata.
    price_key: Any = None
    cost: Decimal | None = None
    currency: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.price_key is None:
            object.__setattr__(self, "price_key", strict_json_dumps([self.pricing, self.metadata], sort_keys=True))

    @classmethod
    def of(cls, **values: Any) -> "UsagePart":
        """A part of these fields (``price_key`` among them, not None), the
        others their defaults, made without ``__init__``'s checks and
        ``__post_init__``: a report makes one a group."""
        part = object.__new__(cls)
        object.__setattr__(part, "__dict__", dict(_PART_DEFAULTS, **values))
        return part

    def tokens(self) -> tuple[Number, Number]:
        """(input, output) tokens."""
        buckets = self.buckets
        return (buckets["in"] + buckets["cached"] + buckets["cache_write"] + buckets["long_in"]
                + buckets["long_cached"] + buckets["long_cache_write"]), buckets["out"] + buckets["long_out"]

    def priced(self, cost: Decimal | None, currency: str | None, reason: str | None) -> "UsagePart":
        """This part with its price (a copy: ``replace`` without its checks, many parts a report)."""
        return self._with(cost=cost, currency=currency, reason=reason)

    def _with(self, **changes: Any) -> "UsagePart":
        """``dataclasses.replace`` without its checks and ``__post_init__``:
        a report makes many copies. Frozen: set as dataclasses' own ``__init__`` sets them."""
        part = object.__new__(UsagePart)
        object.__setattr__(part, "__dict__", dict(self.__dict__, **changes))
        return part

    @staticmethod
    def added(parts: "list[UsagePart]") -> "UsagePart":
        """The first of ``parts`` with all their tokens (reasoning ones too),
        calls, web searches, provider's cost and cost added up."""
        first = parts[0]
        if len(parts) == 1:
            return first
        buckets = dict(first.buckets)
        apart = dict(first.apart)
        calls, web, reasoning = first.calls, first.web, first.reasoning
        provider_cost, cost = first.provider_cost, first.cost
        for other in parts[1:]:
            for bucket, value in other.buckets.items():
                buckets[bucket] = buckets.get(bucket, 0) + value
            for name, value in other.apart.items():
                apart[name] = apart.get(name, 0) + value
            calls += other.calls
            web += other.web
            reasoning += other.reasoning
            provider_cost = _plus(provider_cost, other.provider_cost)
            cost = _plus(cost, other.cost)
        return first._with(buckets=buckets, apart=apart, calls=calls, web=web, reasoning=reasoning,
                           provider_cost=provider_cost, cost=cost)


# UsagePart's fields with defaults (``UsagePart.of``); ``metadata`` and ``apart`` are given.
_PART_DEFAULTS = {f.name: f.default for f in fields(UsagePart) if f.default is not MISSING}


def _item_groups(db, keys=(), since=None, until=None, model_ids=None, agents=None, totals=None, key_buckets=None,
                 agent_ids=None, attribution=None):
    """Items added up in SQL by model, ``keys`` (among agent, connector and
    day, the UTC day) and everything that decides their price. One part a
    group; ``agent_id`` is None for usage without an agent or whose agent
    was deleted (``agents``: the ids that exist, when the caller has them).

    ``totals``, a ``defaultdict(TokenTotals)``, gets the items' input and
    output tokens per (model, agent, connector) from the same pass: what
    ``_uncovered_counters`` compares with the counters; ``key_buckets``, a
    ``defaultdict`` of BUCKETS, gets their buckets per (model, agent,
    connector). ``agent_ids``: only the items of these agents (a budget's).
    ``attribution`` (an Attribution): only the items it asks for, grouped
    by the one it groups by too (key ``attribute``, among ``keys``)."""
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    r = ItemReader(is_postgres(db))
    # Closed days from the rollups, what they do not cover from the items.
    cover = read_plan(db, since, until)
    # Whose calls were: the ledger's days when it answers (one kind asked), else every item is read.
    ledger = attribution is not None and _ledger_answers(db, attribution)
    if attribution is not None and not ledger:
        cover = ReadPlan(since, until, (), ((since, until),))
    params: list[Any] = []
    column_params: list[Any] = []
    attribute = None
    if attribution is not None and attribution.by is not None:
        attribute = attribute_sql(r.postgres, "i.data", attribution.by, column_params)
    where = _item_window(db, cover, model_ids, params, agent_ids)
    for kind, value in attribution.only if attribution is not None else ():
        where.append("%s = %s" % (attribute_sql(r.postgres, "i.data", kind, params), db.param))
        params.append(value)
    params = column_params + params  # in the order the statement names them: its columns first
    read = r.select([name for name, _path, _kind in ITEM_VALUES], where, model_threshold=True, attribute=attribute)
    # Rows that differ only by the agent and connector asked for by
    # ``totals`` and not by ``keys`` are added up in Python.
    extra = () if totals is None and key_buckets is None else tuple(
        k for k in ("agent", "connector") if k not in keys)
    grouped = tuple(keys) + extra
    sql, group = item_groups_sql(r, read, grouped)
    if agents is None and "agent" in grouped:
        agents = _agent_ids(db)
    # The columns of a group, without the extra ones.
    extra_columns = {k + "_id" for k in extra}
    names = [name for name in group if name not in extra_columns]
    # Rolled-up days are read without the extra keys: their ``totals`` and
    # ``key_buckets`` come from light reads of the rollups below, not from
    # many more rows here.
    if attribution is None:
        sources = [(rollup_rows(db, names, cover.days, model_ids, agent_ids), names)]
    else:
        kind, value = _ledger_query(attribution)
        sources = [(ledger_rows(db, names, cover.days, model_ids, agent_ids, kind, value) if ledger else [], names)]
    if cover.reads_items:
        sources.append((db.execute_sql(sql, params), group))
    merged: dict[tuple, GroupSums] = {}
    for source_rows, layout in sources:
        # The rows carry (model, agent, connector) for totals and key_buckets.
        per_key = layout is group and (totals is not None or key_buckets is not None)
        width = len(layout)
        # Where the keys are among the row's columns (GroupSums' columns after them).
        agent_at = layout.index("agent_id") if "agent_id" in layout else None
        key_at = [layout.index(name) for name in names]
        whole_key = key_at == list(range(width))
        if per_key:
            model_at, per_agent_at, connector_at, long_at = (
                layout.index(name) for name in ("model_id", "agent_id", "connector_id", "long"))
        for values in source_rows:
            row = values[:width]
            if agent_at is not None and row[agent_at] not in agents:
                row = row[:agent_at] + (None,) + row[agent_at + 1:]
            sums = GroupSums.of(values[width:])
            if per_key and totals is not None:
                entry = totals[(row[model_at], row[per_agent_at], row[connector_at])]
                entry.tokens_in += sums.all_in or 0
                entry.tokens_out += sums.all_out or 0
            if per_key and key_buckets is not None:
                into_buckets = key_buckets[(row[model_at], row[per_agent_at], row[connector_at])]
                prefix = "long_" if row[long_at] else ""
                for bucket, value in (("in", sums.fresh_in), ("cached", sums.cached),
                                      ("cache_write", sums.cache_write), ("out", sums.out)):
                    into_buckets[prefix + bucket] += exact_sum(value)
            key = tuple(row) if whole_key else tuple(row[i] for i in key_at)
            into = merged.get(key)
            if into is None:
                merged[key] = sums
            else:
                into.add(sums)
    if totals is not None:
        _add_rolled_totals(db, cover, model_ids, agents, totals)
    if key_buckets is not None:
        _add_rolled_buckets(db, cover.days, model_ids, agents, key_buckets)
    if len(_PARSED) > _RESOLVED_MAX:
        _PARSED.clear()
    # In one order whatever read them (rollups, items): what depends on order (daily_costs' provider) agrees.
    contexts: dict[tuple, tuple] = {}
    return [_group_part(dict(zip(names, key)), sums, _PARSED, contexts)
            for key, sums in sorted(merged.items(), key=lambda entry: repr(entry[0]))]


# Items' pricing texts parsed, by text (never changed in place: price_parts copies what it changes).
_PARSED: dict[str, Any] = {}


def _group_part(row, sums, parsed, contexts):
    """A group of items (``row``: its columns by name; ``sums``) as a part.
    ``parsed``: pricing texts parsed so far, by text; ``contexts``: the
    pricing contexts made so far, by (text, tier, speed), shared by the
    parts priced alike (never changed in place)."""
    long = row["long"]
    exact = exact_sum
    fresh, cached, written, out = (exact(sums.fresh_in), exact(sums.cached), exact(sums.cache_write),
                                   exact(sums.out))
    buckets: dict[str, Number] = {
        "in": 0 if long else fresh, "cached": 0 if long else cached, "cache_write": 0 if long else written,
        "long_in": fresh if long else 0, "long_cached": cached if long else 0,
        "long_cache_write": written if long else 0, "out": 0 if long else out, "long_out": out if long else 0}
    text, tier, speed = row["pricing"], row["applied_service_tier"], row["applied_speed"]
    price_key = (text, tier, speed)
    context = contexts.get(price_key)
    if context is None:
        # Pricing is JSON text: parsed once for each distinct text, and with the
        # tier applied, what tells groups priced alike without comparing dicts.
        pricing = None
        if text is not None:
            pricing = parsed.get(text)
            if pricing is None:
                pricing = parsed[text] = json.loads(text)
        context = contexts[price_key] = (
            pricing, {k: v for k, v in (("appliedServiceTier", tier), ("appliedSpeed", speed)) if v is not None},
            "snapshot" if isinstance(pricing, dict) and pricing.get("configuredPrices") is not None else "current")
    pricing, metadata, priced_from = context
    prefix = "long_" if long else ""
    return UsagePart.of(
        model_id=row["model_id"], agent_id=row.get("agent_id"), connector_id=row.get("connector_id"),
        day=row.get("day"), attribute=row.get("attribute"), provider=row["provider"], pricing=pricing,
        metadata=metadata, priced_from=priced_from, has_usage=bool(row["has_usage"]), calls=sums.calls,
        buckets=buckets, web=int(sums.web or 0), reasoning=exact(sums.reasoning_out),
        # Counted in the buckets above; what they cost beyond them is priced apart (Pricer.price).
        apart={prefix + name: exact(value) for name, value in sums.apart().items() if value}
        if sums.cache_write_1h or sums.cache_write_12h or sums.audio_in or sums.audio_out or sums.image_out else {},
        provider_cost=None if sums.provider_cost is None else exact(sums.provider_cost), price_key=price_key)


def _ledger_query(attribution):
    """(kind, value) the ledger is read for: the one kind the Attribution
    asks about, and the value it filters on (None: every value, and the
    calls without one)."""
    kinds = {kind for kind, _value in attribution.only} | ({attribution.by} if attribution.by else set())
    kind = min(kinds)
    return kind, dict(attribution.only).get(kind)


def _ledger_answers(db, attribution):
    """True when the attribution ledger can answer: its triggers keep it
    beside the rollups, and the report asks about one kind of attribution
    (grouping by it, filtering on it, or both; other mixes read the items)."""
    kinds = {kind for kind, _value in attribution.only} | ({attribution.by} if attribution.by else set())
    return len(kinds) == 1 and len(attribution.only) <= 1 and enabled(db) and ledger_enabled(db)


def _item_window(db, cover, model_ids, params, agent_ids=None):
    """WHERE clauses for the items a report scans: the ranges ``cover``
    leaves to the items, of the models ``model_ids`` (and agents ``agent_ids``)."""
    where = scan_where(db, "i.created_at", cover, params) + window(
        db, "i.created_at", PsModelUsageItem.created_at, None, None, model_ids, params)
    if agent_ids is not None:
        where.append("i.agent_id IN (%s)" % (", ".join([db.param] * len(agent_ids)) or "NULL"))
        params.extend(agent_ids)
    return where


def _tuples(query) -> Iterable[tuple[Any, ...]]:
    """A query's rows as tuples (peewee's stubs type its rows as models)."""
    return query.tuples()


def _agent_ids(db):
    """The ids of the agents that exist: usage of a deleted agent (or of
    none, agent_id 0 in an item) is reported without one, as
    ps_model_usage's ON DELETE SET NULL has it."""
    return {agent_id for (agent_id,) in _tuples(PsAgent.select(PsAgent.id))}


class _AgentIds:
    """``_agent_ids``, read when first asked (in the report's snapshot): a
    report by model over kept totals may never ask."""

    __slots__ = ("_db", "_ids")

    def __init__(self, db):
        self._db, self._ids = db, None

    def __contains__(self, agent_id):
        if self._ids is None:
            self._ids = _agent_ids(self._db)
        return agent_id in self._ids


def _bucket_reader(present):
    """A function from a row by column name (``_named``), holding the
    counters ``present`` (or their sums), to BUCKETS. Output counters are
    one bucket: they share the output rate."""
    spec = [(bucket, [n for n in names if n in present]) for bucket, names in COUNTERS_OF_BUCKET.items()]

    def read(row):
        return {bucket: sum(int(row[name] or 0) for name in names) for bucket, names in spec}
    return read


# The counters of the reasoning tokens among the output (each output bucket's).
_REASONING_COUNTER_NAMES = ("token_out_reasoning_count", "long_context_token_out_reasoning_count")


def _reasoning_reader(present):
    """A function from a row by column name (``_named``), holding the
    counters ``present`` (or their sums), to the reasoning tokens among
    their output (0 where a table has no such counter)."""
    names = [name for name in _REASONING_COUNTER_NAMES if name in present]

    def read(row):
        return sum(int(row[name] or 0) for name in names)
    return read


def _named(rows, names):
    """A statement's rows (tuples) as dicts by column name: ``names``, its columns in order."""
    return (dict(zip(names, values)) for values in rows)


# The keys of the counter statements' rows (sql.py), before the counters.
_COUNTER_KEYS = ("model_id", "agent_id", "connector_id")


def _named_rollups(db, keys, days, model_ids, sums):
    """``rollup_rows`` grouped by ``keys``, each row a dict by column name (the keys, then ``sums``,
    names among ROLLUP_SUMS: only what the caller reads is added up)."""
    names = list(keys) + list(sums)
    return [dict(zip(names, row)) for row in rollup_rows(db, list(keys), days, model_ids, only=sums)]


def _add_rolled_totals(db, plan, model_ids, agents, totals):
    """Add the input and output tokens of the days ``plan`` reads from the
    rollups to ``totals`` per (model, agent, connector)."""
    for model_id, agent_id, connector_id, tokens_in, tokens_out in key_totals(db, plan, model_ids):
        entry = totals[(model_id, agent_id if agent_id in agents else None, connector_id)]
        entry.tokens_in += exact_sum(tokens_in)
        entry.tokens_out += exact_sum(tokens_out)


def _add_rolled_buckets(db, days, model_ids, agents, key_buckets):
    """Add the buckets of the rolled-up ``days`` to ``key_buckets`` per (model, agent, connector)."""
    for row in _named_rollups(db, ("model_id", "agent_id", "connector_id", "long"), days, model_ids,
                              ("fresh_in", "cached", "cache_write", "out")):
        into = key_buckets[(row["model_id"], row["agent_id"] if row["agent_id"] in agents else None,
                            row["connector_id"])]
        prefix = "long_" if row["long"] else ""
        for bucket, name in (("in", "fresh_in"), ("cached", "cached"), ("cache_write", "cache_write"), ("out", "out")):
            into[prefix + bucket] += exact_sum(row[name])


def _item_totals(db, agents, model_ids=None):
    """Input and output tokens of all items per (model, agent, connector):
    the light pass that tells which counters the items cover."""
    totals: defaultdict[tuple, TokenTotals] = defaultdict(TokenTotals)
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return totals
    r = ItemReader(is_postgres(db))
    cover = read_plan(db)
    params: list[Any] = []
    read = r.select(["tin", "tout"], _item_window(db, cover, model_ids, params))
    _add_rolled_totals(db, cover, model_ids, agents, totals)
    for model_id, agent_id, connector_id, tokens_in, tokens_out in (
            db.execute_sql(item_totals_sql(r, read), params) if cover.reads_items else ()):
        entry = totals[(model_id, agent_id if agent_id in agents else None, connector_id)]
        entry.tokens_in += exact_sum(tokens_in)
        entry.tokens_out += exact_sum(tokens_out)
    return totals


def _uncovered_counters(db, by, agents, since=None, until=None, model_ids=None, itemized=None, recent=None,
                        kept=False):
    """Counter usage in [since, until) that no item accounts for, as pieces
    of counter rows.

    Items and counters are compared per (model, agent, connector). Where
    there are no items at all (usage recorded before items, or by other
    tools), every counter row is uncovered, and SQL adds the rows up by
    price period (``_untouched_pieces``). Where there are items, but fewer
    tokens than the counters hold, what the items add up to is taken off
    the newest counter rows first (items came later than counters), bucket
    by bucket, and what is left of each row is its uncovered part. Items
    beyond the counters (a counter write that failed) count as they are:
    the items are the record of the calls. ``itemized``: the items' totals
    per (model, agent, connector), when the caller has them already.
    ``recent``: the buckets of the period's items per (model, agent,
    connector), which may tell without the pass over all items that
    nothing in the period is uncovered (``_newest_rows_covered``).
    ``kept``: over all usage, where the database keeps both sides' totals
    (``rollups.coverage_kept``), it compares them."""
    present = usage_counters(db)
    # A row with a negative counter (written by hand) is not counted: it is
    # reported unpriced (_negative_counters).
    sound = counters_sound(present)
    if recent is not None and since is not None and _newest_rows_covered(db, present, sound, since, model_ids,
                                                                          agents, recent):
        return []
    # Over all usage, where the database keeps both sides' totals, it names the keys counted beyond their items.
    if kept:
        any_items, uncovered = uncovered_keys(db)
        if not any_items:  # no items at all (a database from before them): every row is uncovered
            return _untouched_pieces(db, by, since, until, None, agents, sound, model_ids)
        short = {(model_id, agent_id, connector_id) for model_id, agent_id, connector_id, _items in uncovered}
        untouched = {(model_id, agent_id, connector_id) for model_id, agent_id, connector_id, items in uncovered
                     if not items}
    else:
        if itemized is None:
            itemized = _item_totals(db, agents, model_ids)
        if not itemized:  # no items at all (a database from before them): every row is uncovered
            return _untouched_pieces(db, by, since, until, None, agents, sound, model_ids)
        short, untouched = _counted_beyond(db, present, sound, agents, model_ids, itemized)
    if not short:
        return []
    read = _bucket_reader(present)
    pieces = _untouched_pieces(db, by, since, until, untouched, agents, sound) if untouched else []
    partly = short - untouched
    if not partly:
        return pieces
    models = sorted({key[0] for key in partly})
    folded = "token_in_cache_write_count" not in present
    covered: defaultdict[tuple, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(BUCKETS, 0))
    covered_reasoning: defaultdict[tuple, Any] = defaultdict(int)
    reasoning = _reasoning_reader(present)
    for group in _item_groups(db, ("agent", "connector"), model_ids=models, agents=agents):
        key = (group.model_id, group.agent_id, group.connector_id)
        covered_reasoning[key] += group.reasoning
        into = covered[key]
        for bucket, value in group.buckets.items():
            if folded and bucket.endswith("cache_write"):
                bucket = bucket.replace("cache_write", "in")  # how such a table counted them
            into[bucket] += value
    rows = db.execute_sql(counter_rows_sql(db, present, len(models), sound), models).fetchall()
    for row in _named(rows, _COUNTER_KEYS + ("created_at",) + tuple(present)):
        key = (row["model_id"], row["agent_id"] if row["agent_id"] in agents else None, row["connector_id"])
        if key not in partly:
            continue
        remaining = covered[key]
        buckets = read(row)
        piece = {}
        for bucket in BUCKETS:
            taken = min(buckets[bucket], remaining[bucket])
            remaining[bucket] -= taken
            piece[bucket] = buckets[bucket] - taken
        # The reasoning tokens the items hold are taken off as the output is, and what is left is at most the
        # piece's output (items may hold less reasoning than the output they cover).
        reasoned = reasoning(row)
        taken = min(reasoned, covered_reasoning[key])
        covered_reasoning[key] -= taken
        piece_reasoning = min(reasoned - taken, piece["out"] + piece["long_out"])
        created_at = PsModelUsage.created_at.python_value(row["created_at"])
        if isinstance(created_at, str):  # not a time: in no period, in the whole (flagged unpriced)
            within = since is None and until is None
        else:
            within = (since is None or created_at >= since) and (until is None or created_at < until)
        if any(piece.values()) and within:
            pieces.append({"model_id": key[0], "agent_id": key[1], "connector_id": key[2],
                           "created_at": created_at, "buckets": piece, "reasoning": piece_reasoning})
    return pieces


def _counted_beyond(db, present, sound, agents, model_ids, itemized):
    """The keys (model, agent, connector) whose counters hold more input or
    output tokens than their items (``itemized``), and those of them
    without items (``_uncovered_counters``')."""
    where: list[str] = [sound]
    params: list[Any] = []
    ids_in(db, "model_id", model_ids, where, params)
    # Input and output tokens of the counters per (model, agent, connector).
    counted: defaultdict[tuple, TokenTotals] = defaultdict(TokenTotals)
    kept = kept_counter_totals(db, model_ids)
    for model_id, agent_id, connector_id, tokens_in, tokens_out in (
            kept if kept is not None else db.execute_sql(counter_totals_sql(present, OUTPUT_COUNTERS, where), params)):
        entry = counted[(model_id, agent_id if agent_id in agents else None, connector_id)]
        entry.tokens_in += int(tokens_in)
        entry.tokens_out += int(tokens_out)
    nothing = TokenTotals()
    short = {key for key, total in counted.items()
             if total.tokens_in > itemized.get(key, nothing).tokens_in
             or total.tokens_out > itemized.get(key, nothing).tokens_out}
    return short, {key for key in short if key not in itemized}


def _newest_rows_covered(db, present, sound, since, model_ids, agents, recent):
    """True when the period's items alone cover, bucket by bucket, every
    counter row from ``since`` on (``recent``: their buckets per key).

    Items are taken off the newest counter rows first, and all the items of
    a key are at least those of the period: so then no counter row of the
    period keeps an uncovered part, and the pass over every item is not
    needed. (Usage recorded through psai or PolicySynth, an item beside
    every counter increment, is always so.)"""
    if not is_postgres(db) and db.execute_sql(odd_counter_times_sql(db, model_ids), list(model_ids or ())).fetchone():
        # A time stored otherwise than psai's text (SQLite keeps what it is
        # given) compares with ``since`` as text, not as the time it is.
        return False
    params: list[Any] = []
    where = window(db, "u.created_at", PsModelUsage.created_at, since, None, model_ids, params) + [sound]
    read = _bucket_reader(present)
    counted: defaultdict[tuple, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(BUCKETS, 0))
    for row in _named(db.execute_sql(counter_bucket_sums_sql(present, where), params),
                      _COUNTER_KEYS + tuple(present)):
        # Keys as reports name them: a deleted agent's rows and the rows without one are one key.
        into = counted[(row["model_id"], row["agent_id"] if row["agent_id"] in agents else None,
                        row["connector_id"])]
        for bucket, count in read(row).items():
            into[bucket] += count
    folded = "token_in_cache_write_count" not in present
    for key, counters in counted.items():
        items = recent.get(key)
        if items is None:
            return False
        if folded:  # how such a table counted cache writes
            items = dict(items, **{prefix + "in": items[prefix + "in"] + items[prefix + "cache_write"]
                                   for prefix in ("", "long_")})
        if any(count > items[bucket] for bucket, count in counters.items()):
            return False
    return True


def _price_moments(histories):
    """For each model, the moments where the prices in force may change (a
    version or a correction begins or ends): usage between the same two of
    them is priced alike."""
    return {model_id: sorted({t for v in history for t in (v["valid_from"], v["valid_to"]) if t is not None}
                             | {t for c in corrections for t in (c["since"], c["until"]) if t is not None})
            for model_id, (history, corrections) in histories.items()}


MAX_PERIOD_BRANCHES = 400


def _untouched_pieces(db, by, since, until, keys, agents, sound, model_ids=None):
    """The counter rows of ``keys`` (keys with no item at all; None: every
    row), added up in SQL by key, price period (and day), each sum a piece
    dated by its first row. Without keys, rows are added up only by what
    the report needs (the agent for agent and tree reports)."""
    j = JsonSQL(is_postgres(db))
    field = PsModelUsage.created_at
    present = usage_counters(db)
    if keys is not None:
        model_ids = sorted({key[0] for key in keys})
    else:  # the models that have counter rows
        used = {row[0] for row in _tuples(PsModelUsage.select(PsModelUsage.model).distinct())}
        model_ids = sorted(used if model_ids is None else used & set(model_ids))
    if not model_ids:
        return []
    models = list(PsAiModel.select().where(PsAiModel.id.in_(model_ids)))
    moments = _price_moments(histories_of(models))
    if sum(len(times) for times in moments.values()) > MAX_PERIOD_BRANCHES:
        # The period expression grows with the moments of every model and is
        # evaluated per row: past a few hundred, each row on its own is faster.
        moments = {}
    params: list = []
    period = price_period_sql(db, "u", {model_id: [field.db_value(t) for t in times]
                                        for model_id, times in moments.items()}, params)
    whole = keys is not None or "agent" in _keys(by)
    columns = ["u.model_id", "u.agent_id" if whole else "NULL", "u.connector_id" if keys is not None else "NULL",
               "(%s)" % period if moments else "u.id"]
    if "day" in _keys(by):
        columns.append(j.day("u.created_at"))
    where = window(db, "u.created_at", PsModelUsage.created_at, since, until, model_ids, params) + [sound]
    sql = counter_sums_sql(present, columns, where)
    read, reasoning = _bucket_reader(present), _reasoning_reader(present)
    # The key columns (the period, the day: grouped by, not read), the first row's time, the counters' sums.
    names = _COUNTER_KEYS + tuple("group_%d" % i for i in range(len(columns) - 3)) + ("created_at",) + tuple(present)
    pieces = []
    for row in _named(db.execute_sql(sql, params).fetchall(), names):
        key = (row["model_id"], row["agent_id"] if row["agent_id"] in agents else None, row["connector_id"])
        if keys is None or key in keys:
            pieces.append({"model_id": key[0], "agent_id": key[1], "connector_id": key[2],
                           "created_at": field.python_value(row["created_at"]), "buckets": read(row),
                           "reasoning": reasoning(row)})
    return pieces


def _negative_counters(db, by, agents, since, until, model_ids=None):
    """Counter rows with a negative counter, as unpriced parts: a negative
    count is never added (it would lower the total) nor priced as 0."""
    present = usage_counters(db)
    params: list[Any] = []
    where = window(db, "u.created_at", PsModelUsage.created_at, since, until, model_ids, params) + [
        counters_negative(present, "u")]
    read, reasoning = _bucket_reader(present), _reasoning_reader(present)
    parts = []
    for row in _named(db.execute_sql(negative_rows_sql(present, where), params).fetchall(),
                      ("id", "model_id", "agent_id", "created_at") + tuple(present)):
        model_id, agent_id = row["model_id"], row["agent_id"]
        counts = {name: max(row[name] or 0, 0) for name in present}
        created_at = PsModelUsage.created_at.python_value(row["created_at"])
        parts.append(_unpriced_counters(model_id, agent_id if agent_id in agents else None, read(counts),
                                        reasoning(counts), "negative token counters",
                                        _day(created_at) if "day" in _keys(by) else None))
    return parts


def _day(moment):
    """A counter row's UTC day; one psai cannot read as a time (it reads as
    its text) shows its first ten characters as stored, as items' days do."""
    return moment[:10] if isinstance(moment, str) else moment.astimezone(UTC).strftime("%Y-%m-%d")


def _unpriced_counters(model_id, agent_id, buckets, reasoning, why, day):
    """Counter rows reported unpriced, with why (never priced as 0)."""
    return UsagePart(model_id=model_id, agent_id=agent_id, buckets=buckets, reasoning=reasoning, day=day,
                     has_usage=False, priced_from="current", problem="%s (`psai check` lists the rows)" % why)


def _keys(by):
    """What parts are kept apart by besides the model, for a grouping (or
    these keys themselves, a tuple among agent and day)."""
    return by if isinstance(by, tuple) else {"agent": ("agent",), "tree": ("agent",), "day": ("day",)}.get(by, ())


def item_parts(db: Database, keys: Iterable[str], since: datetime.datetime | None, until: datetime.datetime | None,
               model_ids: Iterable[int] | None = None, agent_ids: Iterable[int] | None = None) -> list[UsagePart]:
    """The calls' items in [since, until) as parts (``usage_parts``' item
    groups, kept apart by ``keys`` among agent and day; of ``model_ids``
    and ``agent_ids``), read from the rollups but at the period's edges:
    what a budget weighs, without the counters' pass."""
    return _item_groups(db, tuple(keys), since, until, model_ids, agent_ids=agent_ids)


def usage_parts(db: Database, by: Any, since: datetime.datetime | None, until: datetime.datetime | None,
                model_ids: Iterable[int] | None = None, attribution: Attribution | None = None) -> list[UsagePart]:
    """All recorded usage in [since, until), as parts (``UsagePart``) each
    priced alike: item groups and uncovered counter pieces, with
    ``agent_id`` (by agent or tree) and ``day`` (by day). ``by``: a
    grouping, or the keys (agent, day) to keep parts apart by.
    ``attribution`` (an Attribution): only the calls it asks for, each part
    with its ``attribute`` (the value grouped by; None for counter usage no
    item covers, which has no attribution, and which is left out when the
    attribution filters)."""
    if attribution is not None:
        keys = tuple(_keys(by)) + (("attribute",) if attribution.by is not None else ())
        agents = _agent_ids(db)
        parts = _item_groups(db, keys, since, until, model_ids, agents, attribution=attribution)
        if attribution.only:
            return parts
        # Counter parts have no attribution (their ``attribute`` is None).
        return parts + _counter_parts(db, keys, agents, since, until, model_ids, None, None,
                                      _coverage_kept(db, since, until, model_ids))
    keys = _keys(by)
    agents = _AgentIds(db)  # once a report: items and counters both map deleted agents to None
    # What the items cover of the counters comes from a pass over all items.
    # Over all usage, the pass that adds the items up can give it, grouping
    # by agent and connector too. That is cheaper than a second pass on
    # SQLite, which reads each row's JSON once either way, and on
    # PostgreSQL when the groups have the agent already; otherwise more
    # groups cost PostgreSQL's parallel workers more than a light pass.
    # (Days read from rollups give their part from a light read of the
    # rollups: with the rollups kept, the items read are few, and the one
    # pass spares PostgreSQL a second plan of the period.)
    # Where the database keeps the items' and the counters' totals, it compares them (_uncovered_counters).
    kept = _coverage_kept(db, since, until, model_ids)
    one_pass = not kept and since is None and until is None and model_ids is None and (
        "agent" in keys or not is_postgres(db) or enabled(db))
    itemized: defaultdict[tuple, TokenTotals] | None = defaultdict(TokenTotals) if one_pass else None
    # A period's own items may be enough to tell what they cover of its counters.
    recent: defaultdict[tuple, dict[str, Any]] | None = (
        defaultdict(lambda: dict.fromkeys(BUCKETS, 0)) if since is not None else None)
    parts = _item_groups(db, keys, since, until, model_ids, agents, totals=itemized, key_buckets=recent)
    return parts + _counter_parts(db, by, agents, since, until, model_ids, itemized, recent, kept)


def _coverage_kept(db, since, until, model_ids):
    """Whether a read of all usage (no period, every model) compares the
    totals the database keeps of items and counters (``rollups.coverage_kept``)."""
    return since is None and until is None and model_ids is None and coverage_kept(db)


def _counter_parts(db, by, agents, since, until, model_ids, itemized, recent, kept):
    """The counter usage of [since, until) no item accounts for, as parts
    (``usage_parts``'; ``itemized``, ``recent`` and ``kept``: ``_uncovered_counters``')."""
    keys = _keys(by)
    # Where the database keeps the counters' totals, it counts the rows with a negative counter too.
    parts = _negative_counters(db, by, agents, since, until, model_ids) if not kept or any_negative_counters(db) \
        else []
    pieces = _uncovered_counters(db, by, agents, since, until, model_ids, itemized, recent, kept)
    if not pieces:
        return parts
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p["model_id"] for p in pieces})))}
    histories = histories_of(list(models.values()))
    moments = _price_moments(histories)
    merged: dict[tuple, Any] = {}  # (model, agent, day, period): [its part's fields, its buckets]
    for piece in pieces:
        model_id = piece["model_id"]
        day = _day(piece["created_at"]) if "day" in keys else None
        if isinstance(piece["created_at"], str):  # no time, so no price in force: unpriced, with why
            parts.append(_unpriced_counters(model_id, piece["agent_id"], piece["buckets"], piece["reasoning"],
                                            "usage rows whose created_at cannot be read as a time", day))
            continue
        period = bisect.bisect_right(moments.get(model_id, ()), piece["created_at"])
        key = (model_id, piece["agent_id"], day, period)
        if key in merged:
            for bucket, value in piece["buckets"].items():
                merged[key][1][bucket] += value
            merged[key][2] += piece["reasoning"]
            continue
        model = models.get(model_id)
        configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
        prices, known = prices_at(model, piece["created_at"], *histories[model_id]) if model is not None \
            else (None, False)
        pricing = {"configuredPrices": prices}
        for name in ("inferenceType", "regionalProcessing"):
            if configuration.get(name) is not None:
                pricing[name] = configuration[name]
        merged[key] = [dict(model_id=model_id, agent_id=piece["agent_id"], connector_id=piece["connector_id"],
                            provider=configuration.get("provider"), pricing=pricing,
                            priced_from="history" if known else "current", day=day), dict(piece["buckets"]),
                       piece["reasoning"]]
    return parts + [UsagePart(buckets=buckets, reasoning=reasoning, **fields)
                    for fields, buckets, reasoning in merged.values()]


def merge_parts(parts: Iterable[UsagePart], keys: Iterable[str]) -> list[UsagePart]:
    """Parts that agree on ``keys`` (UsagePart's field names) and on
    everything that prices them, added up: each is priced once."""
    keys = tuple(keys)
    # Calls with tokens priced apart kept apart: without their price keys only they are unpriced.
    return _summed(parts, lambda part: tuple(getattr(part, name) for name in keys) + (
        part.provider, part.priced_from, part.has_usage, part.price_key, bool(part.apart)))


def _summed(parts: Iterable[UsagePart], key: Callable[[UsagePart], tuple]) -> list[UsagePart]:
    """``parts`` added up (``UsagePart.added``) by ``key(part)``, in the order each key first comes."""
    groups: dict[tuple, list[UsagePart]] = {}
    for part in parts:
        found = key(part)
        group = groups.get(found)
        if group is None:
            groups[found] = [part]
        else:
            group.append(part)
    return [UsagePart.added(group) for group in groups.values()]


# Prices resolved and their pricer, by what decides them (provider, snapshot text, tier applied, model's
# prices): kept across calls, so a budget check or a report prices its groups without resolving them again.
_RESOLVED: dict = {}
_RESOLVED_MAX = 4096


_NO_USAGE = ("the item has no usable token counts (usageNormalized.tokensIn a number, every count 0 or more and "
             "within a counter)")


def price_parts(parts: Iterable[UsagePart], transform: Callable[[Any], Any] | None = None) -> list[UsagePart]:
    """The parts, each with its ``cost`` (Decimal, or None), ``currency``
    and, when it cannot be priced, ``reason``. ``transform(prices)`` changes
    the prices a part is priced at (psai.reprice's "after"). Each distinct
    set of prices is resolved and its rates read once (``Pricer``)."""
    parts = list(parts)
    current = sorted({p.model_id for p in parts if p.priced_from == "current"})
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(current))} if current else {}
    resolved = _RESOLVED if transform is None else {}
    if len(resolved) > _RESOLVED_MAX:
        resolved.clear()
    priced = []
    for part in parts:
        if not part.has_usage:
            priced.append(part.priced(None, None, part.problem or _NO_USAGE))
            continue
        pricing = part.pricing if isinstance(part.pricing, dict) else {}
        fallback = None
        if pricing.get("configuredPrices") is None:
            model = models.get(part.model_id)
            configuration = model.configuration if model is not None else None
            fallback = configuration.get("prices") if isinstance(configuration, dict) else None
        if transform is not None:
            pricing = dict(pricing, configuredPrices=transform(
                pricing["configuredPrices"] if pricing.get("configuredPrices") is not None else fallback))
        key: Any
        if transform is None:
            # The model's current prices as they are now, when they price the part: a change is a new key.
            key = (part.provider, part.price_key,
                   strict_json_dumps(fallback, sort_keys=True) if fallback is not None else None)
        else:
            key = strict_json_dumps([part.provider, pricing, part.metadata, fallback], sort_keys=True)
        pricer = resolved.get(key)
        if pricer is None:
            prices, problem = effective_prices(part.provider, pricing, part.metadata, fallback)
            # PolicySynth's item rule: a long-context rate of 0 means unset.
            pricer = resolved[key] = problem or Pricer(prices, zero_long_rate_is_unset=True)
        if isinstance(pricer, str):
            priced.append(part.priced(None, None, pricer))
            continue
        if part.apart:
            cost, problem = pricer.price({**part.buckets, **part.apart}, part.web)
        else:  # the buckets hold none of APART's (they are in ``apart``)
            cost, problem = pricer.price_text(part.buckets, part.web), None
        priced.append(part.priced(cost, None if problem else pricer.currency, problem))
    return priced


def part_provider(part: UsagePart, models: dict[int, PsAiModel]) -> str | None:
    """A part's provider as provider reports name it: the item's, else its
    model's (``models``: rows by id, holding the part's model)."""
    provider = part.provider
    if provider is None and part.model_id in models:
        configuration = models[part.model_id].configuration
        provider = configuration.get("provider") if isinstance(configuration, dict) else None
    return provider


def part_tokens(part: UsagePart) -> tuple[Number, Number]:
    """A part's (input, output) tokens."""
    return part.tokens()


def _agent_tree(db):
    """``(levels, ancestors)`` of every agent, from one query of (id,
    parent): its depth in its tree, and the agents whose tree holds it
    (itself first, its root last). A loop in parent_agent_id, which
    PolicySynth does not prevent, is cut at its smallest id, which stands
    as the root of the loop: every agent has one root, so each call is
    counted once in the roots' totals."""
    parent: dict[Any, Any] = dict(_tuples(PsAgent.select(PsAgent.id, PsAgent.parent_agent)))
    children = defaultdict(list)
    for child, of in parent.items():
        if of in parent:
            children[of].append(child)
    levels = {}

    def walk(root):
        queue = deque([(root, 0)])
        while queue:
            agent, level = queue.popleft()
            if agent not in levels:
                levels[agent] = level
                queue.extend((child, level + 1) for child in sorted(children[agent]))

    for agent in sorted(parent):
        if parent[agent] not in parent:
            walk(agent)
    for agent in sorted(parent):
        if agent not in levels:  # in a loop, or under one
            path, node = [], agent
            while node not in path:
                path.append(node)
                node = parent[node]
            walk(min(path[path.index(node):]))
    ancestors = {}
    for agent in parent:
        chain = [agent]
        while levels[chain[-1]] > 0:
            chain.append(parent[chain[-1]])
        ancestors[agent] = chain
    return levels, ancestors


Params = ParamSpec("Params")
Result = TypeVar("Result")


def one_snapshot(function: Callable[Params, Result]) -> Callable[Params, Result]:
    """``function`` reading the usage tables in one read transaction: the
    items, counters, models and agents it reads are of one moment, however
    many statements read them (writers go on meanwhile)."""
    @functools.wraps(function)
    def read(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        with read_transaction(model_db(PsModelUsage)):
            return function(*args, **kwargs)
    return read


@one_snapshot
def cost_report(by: ReportGrouping | str = "model", *, since: datetime.date | str | None = None,
                until: datetime.date | str | None = None, strict: bool = False,
                progress: Callable[[int, int], object] | None = None, agent: AgentRef | None = None,
                model: ModelRef | None = None, provider: str | None = None, user: str | None = None,
                session: str | None = None, tags: dict[str, str] | None = None) -> list[CostRow]:
    """Cost of recorded usage grouped ``by`` model, agent, tree, provider,
    day, or whose the calls were: ``user``, ``session`` or ``tag:KEY``
    (what ``record_usage(..., user=, session=, tags=)`` kept; the calls
    without it in a row whose key is None); or two of them comma-separated,
    a cross grouping (``"agent,model"``, ``"tag:team,model"``): rows keyed
    by both, ordered by the first then the second; two of model, agent,
    provider and day, or one of them with user, session or tag:KEY.

    Each call is priced from its own usage item (the prices stored with it,
    the tier the provider applied), so editing a price never changes the
    cost of calls already recorded. Rows have the group's keys, ``calls``
    (items), ``tokens_in``, ``tokens_out``, ``cost`` (an exact ``Decimal``),
    ``currency``, ``unpriced_tokens`` and ``priced_from`` (``snapshot``, and
    for usage without a snapshot ``history`` or ``current``). Usage whose
    prices are missing or unusable is never priced at 0: it is in a row of
    its own with ``currency`` and ``cost`` None, its tokens in
    ``unpriced_tokens`` and why in ``unpriced_reason``; with ``strict=True``
    it raises ``UnpricedUsageError`` instead.

    Rows also have ``cached_tokens`` and ``cache_write_tokens`` (of the
    input), ``reasoning_tokens`` (of the output) and, after them,
    ``provider_cost``.

    ``tree`` rows hold an agent with all its sub-agents, and their ``level``.
    ``since``/``until`` limit the usage by time recorded (dates or datetimes;
    a date ``until`` is inclusive); ``agent`` (that agent's own calls),
    ``model`` (every version of it) and ``provider`` (the calls' provider)
    limit it too, whatever the grouping; agents and models are named as
    everywhere (``psai.find_agent``, ``psai.find_model``); ``user``,
    ``session`` (text) and ``tags`` (a dict: the calls having every one of
    these tags) limit it to the calls so attributed (counter usage without
    an item has no attribution: it is in none of them). ``progress``, if
    given, is called as ``progress(done, total)`` while the groups the SQL
    summed are priced.
    """
    dimensions = _dimensions(by)
    attribution = _attribution(next((d for d in dimensions if d not in REPORT_GROUPINGS), None), user, session,
                               tags)
    since, until = as_datetime(since), as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    keep = tuple(key for d in dimensions for key in {"agent": ("agent_id",), "tree": ("agent_id",),
                                                     "day": ("day",)}.get(d, ()))
    if attribution is not None and attribution.by is not None:
        keep += ("attribute",)
    model_ids = [row.id for row in find_models(model)] if model is not None else None
    agent_id = find_agent(agent).id if agent is not None else None
    # An agent filter needs each part's agent, whatever the grouping.
    keys = tuple(key for d in dimensions for key in _keys(d))
    keys += ("agent",) if agent_id is not None and "agent" not in keys else ()
    parts = _only(usage_parts(db, keys, since, until, model_ids, attribution), agent_id, provider)
    parts = price_parts(merge_parts(parts, ("model_id",) + keep))
    return _rows_of(db, dimensions, parts, strict, progress)


def _only(parts, agent_id, provider):
    """The parts of one agent's calls and of one provider's (None: any)."""
    if agent_id is not None:
        parts = [part for part in parts if part.agent_id == agent_id]
    if provider is not None:
        models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(
            sorted({p.model_id for p in parts if p.provider is None})))}
        parts = [part for part in parts if part_provider(part, models) == provider]
    return parts


def cost_reports(groupings: Iterable[str], *, since: datetime.date | str | None = None,
                 until: datetime.date | str | None = None, agent: AgentRef | None = None,
                 model: ModelRef | None = None, provider: str | None = None, user: str | None = None,
                 session: str | None = None, tags: dict[str, str] | None = None
                 ) -> tuple[dict[str, list[CostRow]], list[DailyCost]]:
    """``cost_report`` of each grouping and ``daily_costs``, the same rows,
    from one read of the priced groups (kept apart by model, agent and
    day, priced once, then added up for each): what the HTML page shows.
    A grouping by user, session or tag:KEY (alone or crossed) adds one read
    for each kind of attribution (of the ledger, where it answers).
    ``agent``, ``model``, ``provider``, ``user``, ``session``, ``tags``:
    ``cost_report``'s filters."""
    groupings = list(groupings)
    dimensions = {by: _dimensions(by) for by in groupings}
    only = _attribution(None, user, session, tags)
    since, until = as_datetime(since), as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    model_ids = [row.id for row in find_models(model)] if model is not None else None
    agent_id = find_agent(agent).id if agent is not None else None
    parts = _only(usage_parts(db, ("agent", "day"), since, until, model_ids, only), agent_id, provider)
    parts = price_parts(merge_parts(parts, ("model_id", "agent_id", "day")))
    # The groupings but by day need no day: the priced parts added up without it first.
    undated = _undated(parts)
    reports: dict[str, list[CostRow]] = {}
    attributed: defaultdict[str, list[str]] = defaultdict(list)
    for by, grouped in dimensions.items():
        kind = next((d for d in grouped if d not in REPORT_GROUPINGS), None)
        if kind is None:
            reports[by] = _rows_of(db, grouped, parts if "day" in grouped else undated, False, None)
        else:
            attributed[kind].append(by)
    for kind, named in attributed.items():  # one read of each kind of attribution, for its groupings
        keys = tuple(sorted({key for by in named for d in dimensions[by] for key in _keys(d)}
                            | ({"agent"} if agent_id is not None else set())))
        read = _only(usage_parts(db, keys, since, until, model_ids, Attribution(kind, only.only if only else ())),
                     agent_id, provider)
        read = price_parts(merge_parts(read, ("model_id",) + tuple(key + "_id" if key == "agent" else key
                                                                   for key in keys) + ("attribute",)))
        for by in named:
            reports[by] = _rows_of(db, dimensions[by], read, False, None)
    return {by: reports[by] for by in groupings}, _daily_of(parts)


@one_snapshot
def attribution_kinds(*, since: datetime.date | str | None = None,
                      until: datetime.date | str | None = None) -> list[str]:
    """The kinds of attribution the calls of [since, until) carry (as
    text), sorted: ``session``, ``tag:KEY`` for each tag key, ``user``;
    what ``cost_report`` can group by besides the rest. Read from the
    attribution ledger for the days it keeps, else from the items."""
    since, until = as_datetime(since), as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    cover = read_plan(db, since, until)
    if not ledger_enabled(db):
        cover = ReadPlan(since, until, (), ((since, until),))
    found = ledger_kinds(db, cover.days)
    if cover.reads_items:
        params: list[Any] = []
        where = scan_where(db, "i.created_at", cover, params)
        found |= {kind for (kind,) in db.execute_sql(item_kinds_sql(is_postgres(db), where), params * 3)}
    # A tag key written by hand that reports cannot name is left out.
    return sorted(kind for kind in found if not kind.startswith("tag:") or tag_key_problem(kind[4:]) is None)


def _undated(parts):
    """Priced parts added up by all that ``_rows_of`` reads of them but the day."""
    return _summed(parts, lambda part: (part.model_id, part.agent_id, part.provider, part.currency,
                                        part.priced_from, part.reason))


def _part_keys(by, part, models, ancestors):
    """A part's keys in one grouping: by tree, every agent whose tree holds it."""
    if by == "model":
        return (part.model_id,)
    if by == "agent":
        return (part.agent_id,)
    if by == "provider":
        return (part_provider(part, models),)
    if by == "day":
        return (part.day,)
    if by == "tree":
        return ancestors.get(part.agent_id, [None])
    return (part.attribute,)  # whose the calls were


def _rows_of(db, by, parts, strict, progress):
    """A report's rows grouped ``by`` (a grouping, or a tuple of them: a
    cross grouping), from priced parts kept apart at least by what it groups by."""
    by = _dimensions(by) if isinstance(by, str) else by
    if strict:
        _refuse_unpriced(parts)
    levels, ancestors = _agent_tree(db) if "tree" in by else ({}, {})
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p.model_id for p in parts})))} \
        if {"model", "provider"} & set(by) else {}
    totals: dict[tuple, dict[str, Any]] = {}
    for done, part in enumerate(parts, 1):
        if progress:
            progress(done, len(parts))
        keys: list[tuple] = [()]
        for dimension in by:
            keys = [key + (value,) for key in keys for value in _part_keys(dimension, part, models, ancestors)]
        for key in keys:
            key += (part.currency,)
            entry = totals.get(key)
            if entry is None:
                entry = totals[key] = _new_total(priced_from=set(), unpriced_reason=set())
            if _add_part(entry, part):
                entry["priced_from"].add(part.priced_from)
            else:
                entry["unpriced_reason"].add(part.reason)
    return _report_rows(by, totals, models, levels)


def _decimal(value):
    return None if value is None else value if isinstance(value, Decimal) else Decimal(repr(value))


def _plus(a, b):
    """A sum of amounts that may be absent (None): None only when both are."""
    return b if a is None else a if b is None else a + b


def _new_total(**more):
    return dict({"calls": 0, "tokens_in": 0, "tokens_out": 0, "cached_tokens": 0, "cache_write_tokens": 0,
                 "reasoning_tokens": 0, "cost": None, "unpriced_tokens": 0, "provider_cost": None}, **more)


def _add_part(entry, part):
    """Add a priced part's calls, tokens and cost to a report entry (its
    tokens to ``unpriced_tokens`` when it has no cost, never a cost of 0).
    True when the part was priced."""
    tokens_in, tokens_out = part_tokens(part)
    entry["calls"] += part.calls
    entry["tokens_in"] += tokens_in
    entry["tokens_out"] += tokens_out
    buckets = part.buckets
    entry["cached_tokens"] += buckets["cached"] + buckets["long_cached"]
    entry["cache_write_tokens"] += buckets["cache_write"] + buckets["long_cache_write"]
    entry["reasoning_tokens"] += part.reasoning
    entry["provider_cost"] = _plus(entry["provider_cost"], _decimal(part.provider_cost))
    if part.cost is None:
        entry["unpriced_tokens"] += tokens_in + tokens_out
        return False
    entry["cost"] = (entry["cost"] or Decimal(0)) + part.cost
    return True


def _refuse_unpriced(parts):
    unpriced = [p for p in parts if p.cost is None]
    if unpriced:
        tokens = sum(sum(part_tokens(p)) for p in unpriced)
        reasons = sorted({"model %s: %s" % (p.model_id, p.reason) for p in unpriced})
        raise UnpricedUsageError("%d tokens (%d calls) cannot be priced: %s" % (
            tokens, sum(p.calls for p in unpriced), "; ".join(reasons)))


def _key_columns(row, by, key, models, agents, levels, provider=True):
    """Add a row's key columns of one grouping (``provider``: by model, the
    model's provider too; not when the report groups by provider as well)."""
    if by == "model":
        model = models.get(key)
        configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
        row.update(model_id=key, model_name=model.name if model else None)
        if provider:
            row["provider"] = configuration.get("provider")
    elif by in ("agent", "tree"):
        agent = agents.get(key)
        configuration = agent.configuration if agent is not None and isinstance(agent.configuration, dict) else {}
        row.update(agent_id=key, agent_name=configuration.get("name"))
        if by == "tree":
            row.update(parent_agent_id=agent.parent_agent_id if agent else None, level=levels.get(key))
    elif by in ("provider", "day"):
        row[by] = key
    else:  # user, session, tag:KEY
        row[_first_column(by)] = key


def _first_column(by):
    """The column a grouping's rows are ordered by: its first key column."""
    return {"model": "model_id", "agent": "agent_id", "tree": "agent_id"}.get(by, "tag" if by.startswith("tag:")
                                                                             else by)


def _report_rows(by, totals, models, levels):
    rows = []
    agent_ids = {key[i] for key in totals for i, dimension in enumerate(by)
                 if dimension in ("agent", "tree") and key[i] is not None}
    # What the rows show of their agents (a report by agent names them all): not every column.
    agents = {a.id: a for a in PsAgent.select(PsAgent.id, PsAgent.configuration, PsAgent.parent_agent).where(
        PsAgent.id.in_(sorted(agent_ids)))} if agent_ids else {}
    for key, entry in totals.items():
        currency = key[-1]
        row: dict[str, Any] = {}
        for dimension, value in zip(by, key):
            # By model and provider, ``provider`` is the calls' provider (the grouping's), not the model's.
            _key_columns(row, dimension, value, models, agents, levels, provider="provider" not in by)
        row.update(calls=entry["calls"], tokens_in=entry["tokens_in"], tokens_out=entry["tokens_out"],
                   cached_tokens=entry["cached_tokens"], cache_write_tokens=entry["cache_write_tokens"],
                   reasoning_tokens=entry["reasoning_tokens"], cost=entry["cost"], currency=currency,
                   unpriced_tokens=entry["unpriced_tokens"],
                   priced_from=",".join(sorted(entry["priced_from"])) or None,
                   unpriced_reason="; ".join(sorted(entry["unpriced_reason"])) or None,
                   provider_cost=entry["provider_cost"])
        rows.append(row)

    def order(row):
        if by == ("tree",):
            return (row["level"] is None, row["level"] or 0, row["agent_id"] is None, row["agent_id"] or 0,
                    row["currency"] is None, row["currency"] or "")
        keys = [row[_first_column(dimension)] for dimension in by]
        return tuple(x for key in keys for x in (key is None, key if key is not None else 0)) + (
            row["currency"] is None, row["currency"] or "")
    rows.sort(key=order)
    return rows


def report_totals(rows: Iterable[CostRow], by: str | None = None) -> dict[str | None, CurrencyTotal]:
    """Totals per currency (None: the unpriced usage, whose ``cost`` is
    None). Tree rows overlap (a parent holds its sub-agents), so for them
    only the roots (level 0) are added."""
    totals: dict[str | None, CurrencyTotal] = {}
    for row in rows:
        if by == "tree" and row.get("level") not in (0, None):
            continue
        entry = totals.setdefault(row["currency"], {"calls": 0, "tokens_in": 0, "tokens_out": 0, "cached_tokens": 0,
                                                    "cache_write_tokens": 0, "reasoning_tokens": 0, "cost": None,
                                                    "unpriced_tokens": 0, "provider_cost": None})
        entry["calls"] += row["calls"]
        entry["tokens_in"] += row["tokens_in"]
        entry["tokens_out"] += row["tokens_out"]
        entry["cached_tokens"] += row.get("cached_tokens", 0)
        entry["cache_write_tokens"] += row.get("cache_write_tokens", 0)
        entry["reasoning_tokens"] += row.get("reasoning_tokens", 0)
        entry["unpriced_tokens"] += row["unpriced_tokens"]
        entry["provider_cost"] = _plus(entry.get("provider_cost"), row.get("provider_cost"))
        if row["cost"] is not None:
            entry["cost"] = (entry["cost"] or Decimal(0)) + row["cost"]
    return totals


@one_snapshot
def daily_costs(*, since: datetime.date | str | None = None,
                until: datetime.date | str | None = None) -> list[DailyCost]:
    """Cost per UTC day and model, for charts: rows ``{"day", "model_id",
    "model_name", "provider", "currency", "calls", "cost", "tokens_in",
    "tokens_out", "unpriced_tokens"}`` (``cost`` None where nothing of it
    could be priced), each call priced as ``cost_report`` prices it."""
    since, until = as_datetime(since), as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    return _daily_of(price_parts(merge_parts(usage_parts(db, "day", since, until), ("model_id", "day"))))


def _daily_of(parts):
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p.model_id for p in parts})))}
    rows: dict[tuple, Any] = {}
    providers: defaultdict[tuple, set[str]] = defaultdict(set)
    for part in parts:
        key = (part.day, part.model_id, part.currency)
        row = rows.get(key)
        if row is None:
            model = models.get(part.model_id)
            configuration = model.configuration if model is not None and isinstance(model.configuration, dict) \
                else {}
            row = rows[key] = _new_total(day=part.day, model_id=part.model_id,
                                         model_name=model.name if model else None,
                                         provider=configuration.get("provider"), currency=part.currency)
        if part.provider is not None:
            providers[key].add(part.provider)
        _add_part(row, part)
    for key, named in providers.items():
        # The calls' own provider (the first by name where they name several: the same whatever the order).
        rows[key]["provider"] = min(named)
    return sorted(rows.values(), key=lambda r: (r["day"] or "", r["model_id"], r["currency"] or ""))
