"""PolicySynth's pricing rules (shared/PRICING.md), as pure functions.

All rates are per million tokens. ``resolve_prices`` gives the rates in force
for a call (inference tier, long-context re-derivation, EU margin);
``partition_usage`` splits provider totals into PolicySynth's counters;
``cost_breakdown`` and ``estimate_cost`` price one call, in floating point
as PolicySynth does, though not in its order (PolicySynth divides each part
by a million before adding, psai adds first), so the last digit can differ;
reports use exact ``Decimal`` arithmetic (``cost_of_counters(..., exact=True)``).
"""
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, TypedDict, TypeGuard, cast

from .constants import BASE_RATE_KEYS, LONG_CONTEXT_RATE_KEYS, MODALITY_RATE_KEYS, TIER_KEYS, TIER_RATE_KEYS

__all__ = [
    "resolve_prices", "partition_usage", "cost_of_counters", "cost_breakdown", "estimate_cost",
    "COUNTERS", "normalize_inference_type", "CostBreakdown",
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


def _rate(value, exact):
    value = value if _is_number(value) else 0
    return Decimal(repr(value)) if exact else value


def _exact(value):
    return value if isinstance(value, Decimal) else Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def cost_of_counters(counters: Mapping[str, float], resolved_prices: Mapping[str, Any], *, web_searches: float = 0,
                     exact: bool = False, zero_long_rate_is_unset: bool = False) -> dict[str, Any]:
    """Price a set of counters with already resolved rates. Returns a dict of
    parts (input, cached_input, cache_write_input, long_context_* of each,
    output, long_context_output, web_search) and ``total``. With
    ``exact=True`` every part is a ``Decimal`` computed without rounding.

    A long-context rate of 0 is a rate (PRICING.md) unless
    ``zero_long_rate_is_unset``: PolicySynth's cost managers, which price
    recorded usage, fall back to the standard rate for 0 as for unset."""
    p = resolved_prices
    c = {key: counters.get(key, 0) or 0 for key in COUNTERS}
    if exact:
        c = {key: _exact(value) for key, value in c.items()}
    rate_in = _rate(p.get("costInTokensPerMillion"), exact)
    rate_cached = _rate(p.get("costInCachedContextTokensPerMillion"), exact)
    rate_out = _rate(p.get("costOutTokensPerMillion"), exact)

    def long_rate(key, base):
        # A long-context rate that is set wins, an explicit 0 included
        # (unless zero_long_rate_is_unset).
        value = p.get(key)
        if value is None or (zero_long_rate_is_unset and value == 0):
            return base
        return _rate(value, exact)

    long_in = long_rate("longContextCostInTokensPerMillion", rate_in)
    long_cached = long_rate("longContextCostInCachedContextTokensPerMillion", rate_cached)
    long_out = long_rate("longContextCostOutTokensPerMillion", rate_out)
    multiplier = p.get("cacheWriteInputCostMultiplier")
    if not (_is_number(multiplier) and math.isfinite(multiplier) and multiplier >= 0):
        multiplier = 1
    multiplier = _rate(multiplier, exact)

    parts = {
        "input": c["token_in_count"] * rate_in,
        "cached_input": c["token_in_cached_context_count"] * rate_cached,
        "cache_write_input": c["token_in_cache_write_count"] * rate_in * multiplier,
        "long_context_input": c["long_context_token_in_count"] * long_in,
        "long_context_cached_input": c["long_context_token_in_cached_context_count"] * long_cached,
        "long_context_cache_write_input": c["long_context_token_in_cache_write_count"] * long_in * multiplier,
        "output": (c["token_out_count"] + c["token_out_reasoning_count"]
                   + c["token_out_audio_count"] + c["token_out_image_count"]) * rate_out,
        "long_context_output": (c["long_context_token_out_count"] + c["long_context_token_out_reasoning_count"]
                                + c["long_context_token_out_audio_count"]
                                + c["long_context_token_out_image_count"]) * long_out,
    }
    input_sum = (parts["input"] + parts["cached_input"] + parts["cache_write_input"]
                 + parts["long_context_input"] + parts["long_context_cached_input"]
                 + parts["long_context_cache_write_input"])
    output_sum = parts["output"] + parts["long_context_output"]
    million = Decimal(1_000_000) if exact else 1e6
    result = {key: value / million for key, value in parts.items()}
    per_thousand = p.get("costPerThousandWebSearches")
    searches = math.floor(_count(web_searches))
    if _is_number(per_thousand) and math.isfinite(per_thousand) and per_thousand >= 0:
        web = searches * _rate(per_thousand, exact) / (Decimal(1000) if exact else 1000)
    else:
        web = Decimal(0) if exact else 0
    result["web_search"] = web
    result["total"] = (input_sum + output_sum) / million + web
    return result


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
    costs = cost_of_counters(counters, rates, web_searches=web_searches)
    return {"currency": prices.get("currency"), "total": costs.pop("total"), "parts": costs,
            "counters": counters, "rates": rates}


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
