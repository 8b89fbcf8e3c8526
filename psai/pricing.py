"""PolicySynth's pricing rules (shared/PRICING.md), as pure functions.

All rates are per million tokens. ``resolve_prices`` gives the rates in force
for a call (inference tier, long-context re-derivation, EU margin);
``partition_usage`` splits provider totals into PolicySynth's counters;
``Pricer`` is the one cost formula, exact (``Decimal``), over the table
``PRICE_UNITS``: reports and items price with it; ``cost_breakdown`` and
``estimate_cost`` price one call with it and give floats, the nearest to
the exact cost (PolicySynth computes in floating point, dividing each part
by a million before adding, so its last digit can differ).
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypedDict, TypeGuard, cast

from ._constants import (
    BASE_RATE_KEYS, CACHE_WRITE_12H_KEY, CACHE_WRITE_1H_KEY, LONG_CONTEXT_RATE_KEYS, MODALITY_RATE_KEYS, TIER_KEYS,
    TIER_RATE_KEYS,
)

__all__ = [
    "resolve_prices", "partition_usage", "cost_breakdown", "estimate_cost", "counter_buckets", "Pricer",
    "PriceUnit", "PRICE_UNITS", "APART", "BUCKETS", "BUCKET_COUNTERS", "COUNTERS_OF_BUCKET", "COUNTERS",
    "OUTPUT_COUNTERS", "normalize_inference_type", "CostBreakdown", "exact_sum",
]

# The token counters of ps_model_usage, in PolicySynth's names.
COUNTERS = (
    "token_in_count", "token_in_cached_context_count", "token_in_cache_write_count",
    "long_context_token_in_count", "long_context_token_in_cached_context_count",
    "long_context_token_in_cache_write_count",
    "token_out_count", "token_out_reasoning_count", "token_out_audio_count", "token_out_image_count",
    "long_context_token_out_count", "long_context_token_out_reasoning_count",
    "long_context_token_out_audio_count", "long_context_token_out_image_count",
)


class CostBreakdown(TypedDict):
    """What ``cost_breakdown`` returns: the cost of one call."""

    currency: str | None  # the prices' currency
    total: float
    parts: dict[str, float]  # the cost of each part: input, cached_input, ..., web_search
    counters: dict[str, float]  # the counters the call adds, keyed by COUNTERS
    rates: dict[str, Any]  # the resolved prices (PolicySynth's camelCase keys)


# The rates the EU margin raises.
_MARGIN_KEYS = BASE_RATE_KEYS + LONG_CONTEXT_RATE_KEYS + TIER_RATE_KEYS + MODALITY_RATE_KEYS


def exact_sum(value: Any) -> Any:
    """A sum SQL returned, as an exact number: None as 0; a whole float
    (SQLite adds REAL values as floats) or a whole Decimal (PostgreSQL's
    numeric, which Python adds in 28 digits) as an int; a fraction as the
    Decimal of its text."""
    kind = type(value)
    if kind is int:
        return value
    if value is None:
        return 0
    if kind is Decimal and value.is_finite():  # the common case on PostgreSQL: one test of the number
        whole = int(value)
        return whole if whole == value else value
    if isinstance(value, float):
        return int(value) if value.is_integer() else Decimal(repr(value))
    return int(value) if isinstance(value, Decimal) and value == value.to_integral_value() else value


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_inference_type(provider: str | None, inference_type: str | None) -> str | None:
    """OpenAI knows flex and priority (``fast`` means priority); Anthropic
    calls its priority tier ``fast``; other providers keep what they are given."""
    if not inference_type:
        return None
    provider = (provider or "").lower()
    if provider in ("openai", "openairesponses"):
        if inference_type == "fast":
            return "priority"
        return inference_type if inference_type in ("flex", "priority") else None
    if provider == "anthropic":
        return "fast" if inference_type == "priority" else inference_type
    return inference_type


def _derive_long_rate(selected, base, long):
    if long is None:
        return selected
    if not base:
        return long
    return selected * (long / base)


def resolve_prices(prices: Mapping[str, Any], *, provider: str | None = None, inference_type: str | None = None,
                   regional_processing: str | None = None) -> dict[str, Any]:
    """The rates in force for one call, as a new dict with PolicySynth's
    camelCase keys. ``prices`` is left unchanged."""
    resolved = dict(prices)
    tier = normalize_inference_type(provider, inference_type)
    if tier in ("flex", "priority", "fast"):
        # A tier rate that is not set falls back to the standard rate.
        selected = [prices.get(base_key) if prices.get(tier_key) is None else prices[tier_key]
                    for tier_key, base_key in zip(TIER_KEYS[tier], BASE_RATE_KEYS)]
        for base_key, rate in zip(BASE_RATE_KEYS, selected):
            resolved[base_key] = rate
        if tier == "fast" or prices.get("flexPriorityTokensEnabledOnLongContext"):
            for long_key, base_key, rate in zip(LONG_CONTEXT_RATE_KEYS, BASE_RATE_KEYS, selected):
                resolved[long_key] = _derive_long_rate(rate, prices.get(base_key), prices.get(long_key))
    margin = prices.get("regionalProcessingMargin")
    if regional_processing == "eu" and _is_number(margin) and math.isfinite(margin):
        multiplier = 1 + margin / 100
        for key in _MARGIN_KEYS:
            if resolved.get(key) is not None:
                resolved[key] = resolved[key] * multiplier
    return resolved


def _count(value: Any) -> float:
    """Negative, non-finite or non-numeric counts count as 0."""
    return value if _is_number(value) and math.isfinite(value) and value > 0 else 0


def partition_usage(*, tokens_in: float, tokens_out: float = 0, cached_tokens: float = 0,
                    cache_write_tokens: float = 0, reasoning_tokens: float = 0, audio_tokens: float = 0,
                    image_tokens: float = 0, long_context_threshold: float | None = None) -> dict[str, float]:
    """Split a call's provider totals into PolicySynth's counters (a dict keyed
    by ``COUNTERS``). Counts are not rounded here (``record_usage`` rounds
    the counts it records)."""
    total_in, cached, cache_write = _count(tokens_in), _count(cached_tokens), _count(cache_write_tokens)
    reasoning, audio, image = _count(reasoning_tokens), _count(audio_tokens), _count(image_tokens)
    ordinary = max(total_in - cached - cache_write, 0)
    out = max(_count(tokens_out) - reasoning - audio - image, 0)
    counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
    long = bool(long_context_threshold) and total_in >= cast(float, long_context_threshold)
    prefix = "long_context_" if long else ""
    counters.update({
        prefix + "token_in_count": ordinary,
        prefix + "token_in_cached_context_count": cached,
        prefix + "token_in_cache_write_count": cache_write,
        prefix + "token_out_count": out,
        prefix + "token_out_reasoning_count": reasoning,
        prefix + "token_out_audio_count": audio,
        prefix + "token_out_image_count": image,
    })
    return counters


# The buckets usage is priced in: the input (neither cached nor a cache
# write; cached; cache writes) and all output (reasoning, audio and image
# tokens are output); a long-context call's under ``long_`` + name.
BUCKETS = ("in", "cached", "cache_write", "long_in", "long_cached", "long_cache_write", "out", "long_out")
# The counter of each input bucket; output buckets add up several counters (``counter_buckets``).
BUCKET_COUNTERS = {
    "in": "token_in_count", "cached": "token_in_cached_context_count",
    "cache_write": "token_in_cache_write_count", "long_in": "long_context_token_in_count",
    "long_cached": "long_context_token_in_cached_context_count",
    "long_cache_write": "long_context_token_in_cache_write_count",
    "out": "token_out_count", "long_out": "long_context_token_out_count",
}
# The counters each bucket adds up: all output counters share the output rate.
COUNTERS_OF_BUCKET = {
    **{bucket: (counter,) for bucket, counter in BUCKET_COUNTERS.items()},
    "out": ("token_out_count", "token_out_reasoning_count", "token_out_audio_count", "token_out_image_count"),
    "long_out": ("long_context_token_out_count", "long_context_token_out_reasoning_count",
                 "long_context_token_out_audio_count", "long_context_token_out_image_count"),
}
# The counters of output tokens (every other counter counts input).
OUTPUT_COUNTERS = frozenset(COUNTERS_OF_BUCKET["out"] + COUNTERS_OF_BUCKET["long_out"])


@dataclass(frozen=True)
class PriceUnit:
    """A line of the price table (genai-prices' way): the tokens of
    ``bucket`` cost ``rate_key``'s rate per million (a long-context call's,
    in ``"long_" + bucket``, ``long_rate_key``'s; None: the same rate),
    times ``multiplier_key``'s value when it has one. ``side``: input or
    output. ``within``: for psai's units priced apart, the text bucket
    their tokens are counted in too, so they cost what their rate adds to
    that bucket's, and without their key they cannot be priced (never at
    the text rate)."""

    bucket: str
    rate_key: str
    long_rate_key: str | None
    multiplier_key: str | None
    side: str
    within: str | None = None


_IN, _CACHED, _OUT = BASE_RATE_KEYS
_LONG_IN, _LONG_CACHED, _LONG_OUT = LONG_CONTEXT_RATE_KEYS
PRICE_UNITS = (
    # PolicySynth's text units.
    PriceUnit("in", _IN, _LONG_IN, None, "in"),
    PriceUnit("cached", _CACHED, _LONG_CACHED, None, "in"),
    PriceUnit("cache_write", _IN, _LONG_IN, "cacheWriteInputCostMultiplier", "in"),
    PriceUnit("out", _OUT, _LONG_OUT, None, "out"),
    # psai's, priced apart: longer-lived cache writes, and tokens that are not text.
    PriceUnit("cache_write_1h", _IN, _LONG_IN, CACHE_WRITE_1H_KEY, "in", within="cache_write"),
    PriceUnit("cache_write_12h", _IN, _LONG_IN, CACHE_WRITE_12H_KEY, "in", within="cache_write"),
    PriceUnit("audio_in", MODALITY_RATE_KEYS[0], None, None, "in", within="in"),
    PriceUnit("audio_out", MODALITY_RATE_KEYS[1], None, None, "out", within="out"),
    PriceUnit("image_out", MODALITY_RATE_KEYS[2], None, None, "out", within="out"),
)
# The buckets of the units priced apart, in PRICE_UNITS' order.
APART = tuple(unit.bucket for unit in PRICE_UNITS if unit.within)
# Why a unit priced apart cannot be priced without its key.
_MISSING = {
    "cache_write_1h": "1-hour cache writes, and the prices have no %s (psai's key; Anthropic bills them at 2x input)",
    "cache_write_12h": ("12-hour cache writes, and the prices have no %s (psai's key; OpenAI bills them apart "
                        "from 30-minute writes)"),
    "audio_in": "audio input tokens, and the prices have no %s (psai's key): they are not priced at the text rate",
    "audio_out": "audio output tokens, and the prices have no %s (psai's key): they are not priced at the text rate",
    "image_out": "image output tokens, and the prices have no %s (psai's key): they are not priced at the text rate",
}
_TEXT_UNITS = tuple(unit for unit in PRICE_UNITS if not unit.within)
_APART_UNITS = tuple(unit for unit in PRICE_UNITS if unit.within)
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1000)


def _exact_rate(value: Any) -> Decimal:
    """A rate as an exact Decimal (what is not a number is 0)."""
    return Decimal(repr(value)) if _is_number(value) else _ZERO


def _exact(value: Any) -> Decimal:
    """A count as an exact Decimal."""
    return value if isinstance(value, Decimal) else Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _usable(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value >= 0


def counter_buckets(counters: Mapping[str, Any]) -> dict[str, Decimal]:
    """PolicySynth's counters (keyed by COUNTERS) in BUCKETS, as exact
    Decimals: the output counters add up to the output bucket of their side."""
    buckets = {}
    for bucket in BUCKETS:
        names = COUNTERS_OF_BUCKET[bucket]
        first = counters.get(names[0])
        total = _exact(first) if first else _ZERO  # 0, 0.0 and None alike: Decimal(0)
        zero = False
        for name in names[1:]:
            value = counters.get(name, 0)
            if value:
                total += _exact(value)
            else:
                zero = True
        # Adding the counters of 0 adds one Decimal(0) (their exponent, 0): the same digits as each.
        buckets[bucket] = total + _ZERO if zero else total
    return buckets


class Pricer:
    """The one cost formula: usage in buckets (BUCKETS, and APART's units'
    tokens, also counted in their ``within`` bucket) priced by PRICE_UNITS
    at one set of resolved prices (``resolve_prices``, or an item's
    ``effective_prices``), exactly, in ``Decimal``. The rates are read once,
    so a report prices its many groups at few prices.

    A long-context rate that is unset falls back to the standard one; an
    explicit 0 is a rate (PRICING.md), unless ``zero_long_rate_is_unset``
    (PolicySynth's cost managers, which price recorded usage). A cache-write
    multiplier that is unset, negative or not a finite number is 1; web
    searches cost ``costPerThousandWebSearches`` per thousand whole ones.

    The exponent of a cost follows one rule, Decimal's for exact
    arithmetic: every text unit's term (tokens × rate × multiplier), zero
    tokens included, summed input side then output side, over a million;
    plus the web searches; plus, over a million, what the units priced
    apart add for the tokens they have (none: 0)."""

    def __init__(self, prices: Mapping[str, Any], *, zero_long_rate_is_unset: bool = False) -> None:
        self.currency = prices.get("currency")
        # Per bucket (long ones too): (rate, multiplier or None).
        self.rates: dict[str, tuple[Decimal, Decimal | None]] = {}
        for unit in _TEXT_UNITS:
            rate = _exact_rate(prices.get(unit.rate_key))
            multiplier = None
            if unit.multiplier_key is not None:
                value = prices.get(unit.multiplier_key)
                multiplier = _exact_rate(value if _usable(value) else 1)
            long = prices.get(unit.long_rate_key) if unit.long_rate_key else None
            unset = long is None or (zero_long_rate_is_unset and long == 0)
            self.rates[unit.bucket] = rate, multiplier
            self.rates["long_" + unit.bucket] = (rate if unset else _exact_rate(long)), multiplier
        # Per apart bucket (long ones too): (rate, multiplier or None), or the reason it cannot be priced.
        self.apart: dict[str, tuple[Decimal, Decimal | None] | str] = {}
        for unit in _APART_UNITS:
            key = unit.multiplier_key or unit.rate_key
            value = prices.get(key)
            if not _usable(value):
                self.apart[unit.bucket] = self.apart["long_" + unit.bucket] = _MISSING[unit.bucket] % key
                continue
            for prefix in ("", "long_"):
                if unit.multiplier_key:  # the text rate of its bucket, its own multiplier
                    within = self.rates[prefix + cast(str, unit.within)][0]
                    self.apart[prefix + unit.bucket] = within, _exact_rate(value)
                else:  # its own rate, long context or not
                    self.apart[prefix + unit.bucket] = _exact_rate(value), None
        per_thousand = prices.get("costPerThousandWebSearches")
        self.web_rate = _exact_rate(per_thousand) if _usable(per_thousand) else None
        # The text terms in the order they are added (input side, then output side), with what the term
        # of no tokens is: still a term (its exponent is the rate's), computed once.
        self._terms = [(bucket, rate, multiplier, _ZERO * rate if multiplier is None else _ZERO * rate * multiplier)
                       for bucket, (rate, multiplier) in ((bucket, self.rates[bucket]) for bucket in BUCKETS)]
        self._apart_buckets = [prefix + unit.bucket for prefix in ("", "long_") for unit in _APART_UNITS]

    def parts(self, buckets: Mapping[str, Any]) -> dict[str, Decimal]:
        """The cost of each text bucket (before the division by a million), in BUCKETS' order."""
        return dict(zip(BUCKETS, self._term_list(buckets)))

    def _term_list(self, buckets: Mapping[str, Any]) -> list[Decimal]:
        """``parts``' values, in BUCKETS' order (a report prices many groups: no dict)."""
        get = buckets.get
        terms = []
        for bucket, rate, multiplier, none in self._terms:
            count = get(bucket)
            if not count:  # no tokens (0, 0.0, None) count as the whole number 0
                terms.append(none)
                continue
            term = (Decimal(count) if type(count) is int else _exact(count)) * rate
            terms.append(term if multiplier is None else term * multiplier)
        return terms

    def web(self, web_searches: Any = 0) -> Decimal:
        """What ``web_searches`` searches cost."""
        if self.web_rate is None:
            return _ZERO
        return math.floor(_count(web_searches)) * self.web_rate / _THOUSAND

    def text_cost(self, buckets: Mapping[str, Any], web_searches: Any = 0) -> Decimal:
        """The cost of the text buckets and web searches (APART's tokens at their bucket's rate)."""
        return self._cost_of_terms(self._term_list(buckets), web_searches)

    def _cost_of_terms(self, terms: list[Decimal], web_searches: Any) -> Decimal:
        """``text_cost`` of the buckets whose terms (``_term_list``'s) are ``terms``."""
        fresh, cached, written, long_fresh, long_cached, long_written, out, long_out = terms
        input_sum = fresh + cached + written + long_fresh + long_cached + long_written
        return (input_sum + (out + long_out)) / _MILLION + self.web(web_searches)

    def apart_surcharge(self, buckets: Mapping[str, Any]) -> tuple[Decimal, str | None]:
        """What the tokens priced apart (APART's buckets, ``long_`` ones for a
        long-context call) cost beyond their text bucket's rate:
        ``(extra, None)``, or ``(0, why)`` when a key they need is missing."""
        if not any(map(buckets.get, self._apart_buckets)):
            return _ZERO, None
        extra, counted = _ZERO, False
        for prefix in ("", "long_"):
            for unit in _APART_UNITS:
                bucket = prefix + unit.bucket
                value = buckets.get(bucket)
                counted = counted or bool(value)
                tokens = _count(value)
                if not tokens:
                    continue
                priced = self.apart[bucket]
                if isinstance(priced, str):
                    return _ZERO, priced
                rate, multiplier = priced
                text_rate, text_multiplier = self.rates[prefix + cast(str, unit.within)]
                if multiplier is not None:  # the same rate, another multiplier
                    extra += _exact(tokens) * rate * (multiplier - cast(Decimal, text_multiplier))
                else:
                    extra += _exact(tokens) * (rate - text_rate)
        return (extra / _MILLION if counted else _ZERO), None

    def price(self, buckets: Mapping[str, Any], web_searches: Any = 0) -> tuple[Decimal | None, str | None]:
        """``(cost, None)`` of usage in buckets (APART's included), or
        ``(None, why)`` when tokens priced apart lack their key."""
        extra, problem = self.apart_surcharge(buckets)
        if problem:
            return None, problem
        return self.text_cost(buckets, web_searches) + extra, None

    def price_text(self, buckets: Mapping[str, Any], web_searches: Any = 0) -> Decimal:
        """``price``'s cost of usage without tokens priced apart (none of
        APART's buckets in ``buckets``), without looking for them."""
        return self.text_cost(buckets, web_searches) + _ZERO


# Pricers by the prices they read (their items, in order) and the long-context rule: a rate card
# prices many calls, and reading its rates is most of pricing one.
_PRICERS: dict[tuple, Pricer] = {}
_PRICERS_MAX = 1024


def _pricer_of(prices: Mapping[str, Any], *, zero_long_rate_is_unset: bool = False) -> Pricer:
    """``Pricer(prices, ...)``, made once for prices with the same items,
    each value of the same type (1, 1.0 and True are other rates: their
    costs have other digits); the rates of prices whose values are not all
    hashable are read again."""
    try:
        key = (tuple(prices.items()), tuple(map(type, prices.values())), zero_long_rate_is_unset)
        found = _PRICERS.get(key)
    except TypeError:  # a value that is a list or a dict
        return Pricer(prices, zero_long_rate_is_unset=zero_long_rate_is_unset)
    if found is None:
        if len(_PRICERS) >= _PRICERS_MAX:
            _PRICERS.clear()
        found = _PRICERS[key] = Pricer(prices, zero_long_rate_is_unset=zero_long_rate_is_unset)
    return found


def cost_breakdown(prices: Mapping[str, Any], *, tokens_in: float, tokens_out: float, cached_tokens: float = 0,
                   cache_write_tokens: float = 0, reasoning_tokens: float = 0, audio_tokens: float = 0,
                   image_tokens: float = 0, web_searches: float = 0, provider: str | None = None,
                   inference_type: str | None = None, regional_processing: str | None = None) -> CostBreakdown:
    """Everything about the cost of one call: the resolved ``rates``, the
    ``counters`` it adds, the cost of each part, ``total`` and ``currency``."""
    rates = resolve_prices(prices, provider=provider, inference_type=inference_type,
                           regional_processing=regional_processing)
    counters = partition_usage(
        tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached_tokens,
        cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
        audio_tokens=audio_tokens, image_tokens=image_tokens,
        long_context_threshold=prices.get("longContextTokenThreshold"),
    )
    pricer = _pricer_of(rates)
    terms = pricer._term_list(counter_buckets(counters))
    parts = {name: float(cost / _MILLION) for name, cost in zip(_PART_NAMES, terms)}
    parts["web_search"] = float(pricer.web(web_searches))
    return {"currency": prices.get("currency"), "total": float(pricer._cost_of_terms(terms, web_searches)),
            "parts": parts, "counters": counters, "rates": rates}


# cost_breakdown's names of BUCKETS' costs.
_PART_NAMES = ("input", "cached_input", "cache_write_input", "long_context_input", "long_context_cached_input",
               "long_context_cache_write_input", "output", "long_context_output")


def estimate_cost(prices: Mapping[str, Any], *, tokens_in: float, tokens_out: float, cached_tokens: float = 0,
                  cache_write_tokens: float = 0, reasoning_tokens: float = 0, audio_tokens: float = 0,
                  image_tokens: float = 0, web_searches: float = 0, provider: str | None = None,
                  inference_type: str | None = None, regional_processing: str | None = None) -> float:
    """The cost of one call in the prices' currency. ``tokens_in`` and
    ``tokens_out`` are the provider's totals (cached, cache-write, reasoning,
    audio and image tokens are parts of them)."""
    return cost_breakdown(
        prices, tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached_tokens,
        cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
        audio_tokens=audio_tokens, image_tokens=image_tokens, web_searches=web_searches,
        provider=provider, inference_type=inference_type, regional_processing=regional_processing,
    )["total"]
