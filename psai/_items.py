"""One model call as PolicySynth records it, and what it costs.

PolicySynth 1.3.172 writes a ``ps_model_usage_item`` row per call
(``base/modelUsageItemManager.js``) whose ``data`` holds the prices in force
then; its item cost manager (``operations/agentCostItemManager.js``) prices
each item from that snapshot. psai writes the same layout (``item_data``) and
prices items by the same rules (``item_cost``, and the reports in
``psai.usage``, which add calls up in SQL first):

- the tier the provider applied (``providerMetadata.appliedServiceTier`` for
  OpenAI and Azure, ``appliedSpeed`` or a ``priority`` service tier for
  Anthropic) wins over the one requested; Azure ignores a requested tier;
- the EU margin applies to OpenAI calls only;
- a long-context rate that is unset or 0 falls back to the standard rate;
- each call's own input total decides whether it was long context.

psai adds what it records and PolicySynth 1.3.172 does not, under the key
``psai`` (PolicySynth ignores it): cache-write tokens, priced with
``cacheWriteInputCostMultiplier`` (PolicySynth prices them as ordinary input,
since they are part of ``tokensIn``), and web searches. Counts that are
negative or not numbers count as 0 (PolicySynth would subtract them).
"""
import datetime
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, TypeGuard

from ._constants import OPTIONAL_NUMBER_KEYS, REQUIRED_RATE_KEYS
from .pricing import (
    APART, BUCKET_COUNTERS, BUCKETS, _count, _is_number as _number_type, _pricer_of, resolve_prices,
)

__all__ = ["item_data", "item_model", "item_pricing", "item_cost", "item_price",
           "effective_prices", "price_problem", "call_buckets", "applied_tier_metadata", "item_apart", "APART",
           "BUCKETS", "BUCKET_COUNTERS", "LAYOUT_VERSION"]

LAYOUT_VERSION = 1

_OPENAI = ("openai", "openairesponses")


def _is_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (not a boolean)."""
    return _number_type(value) and math.isfinite(value)


def js_timestamp(moment: datetime.datetime) -> str:
    """JavaScript's ``Date.toISOString()``: UTC, milliseconds, ``Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def item_data(*, model_id: int, configuration: Mapping[str, Any], user_id: int, agent_id: int | None,
              connector_id: int | None, moment: datetime.datetime, tokens_in: float, tokens_out: float,
              cached_tokens: float = 0, cache_write_tokens: float = 0, reasoning_tokens: float = 0,
              audio_tokens: float = 0, image_tokens: float = 0, web_searches: float = 0, audio_in_tokens: float = 0,
              provider_metadata: Mapping[str, Any] | None = None,
              response: Mapping[str, Any] | None = None,
              attribution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``ps_model_usage_item.data`` for one call, in PolicySynth's layout
    (version 1). ``configuration`` is the model's, as stored at call time;
    the result shares its ``prices`` (it is meant to be serialised).
    ``response``, for a call recorded from the provider's response: its
    ``apiFamily`` and ``usageRaw`` as PolicySynth's classes write them, and
    what psai keeps of it besides (``psai``: 1-hour cache writes, the
    provider's own cost). ``attribution``: whose the call was (``user``,
    ``session``, ``trace``, ``tags``, ``environment``), kept in ``psai`` too."""
    provider = configuration.get("provider")
    actor = {"userId": user_id, "agentId": agent_id}
    if connector_id is not None:
        actor["connectorId"] = connector_id
    data = {
        "version": LAYOUT_VERSION,
        "provider": provider,
        "apiFamily": provider,
        "timestamp": js_timestamp(moment),
        "model": item_model(model_id, configuration),
        "actor": actor,
        "request": {},
        "pricing": item_pricing(configuration, provider_metadata),
        "usageNormalized": {"tokensIn": tokens_in, "tokensOut": tokens_out, "cachedInTokens": cached_tokens,
                            "reasoningTokens": reasoning_tokens, "audioTokens": audio_tokens,
                            "imageTokens": image_tokens},
    }
    if provider_metadata is not None:
        data["providerMetadata"] = provider_metadata
    # Audio input is part of tokensIn, as PolicySynth counts it; psai prices it at its own rate.
    extras = {key: value for key, value in (("cacheWriteTokens", cache_write_tokens), ("webSearches", web_searches),
                                            ("audioInTokens", audio_in_tokens)) if value}
    if response is not None:
        data["apiFamily"] = response.get("apiFamily", provider)
        if response.get("usageRaw") is not None:
            data["usageRaw"] = response["usageRaw"]
        extras.update(response.get("psai") or {})
    if attribution:
        extras.update(attribution)
    if extras:
        data["psai"] = extras
    return data


def item_model(model_id: int, configuration: Mapping[str, Any]) -> dict[str, Any]:
    """An item's ``model``: the model it was recorded on."""
    return {"id": model_id, "name": configuration.get("model"), "type": configuration.get("type"),
            "size": configuration.get("modelSize")}


def item_pricing(configuration: Mapping[str, Any],
                 provider_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An item's ``pricing``: the snapshot of the model's prices in force
    (they are shared, not copied), and how its calls are priced."""
    pricing = {"configuredPrices": configuration.get("prices")}
    for key in ("inferenceType", "regionalProcessing"):
        if configuration.get(key) is not None:
            pricing[key] = configuration[key]
    # Gemini and Vertex report the tier that served (psai._responses keeps
    # trafficType / serviceTier as appliedServiceTier), which PolicySynth's
    # cost manager reads for Google only as the item's inferenceType.
    served = provider_metadata.get("appliedServiceTier") if isinstance(provider_metadata, Mapping) else None
    if str(configuration.get("provider")).lower() == "google" and served in ("flex", "priority", "standard"):
        if served == "standard":
            pricing.pop("inferenceType", None)
        else:
            pricing["inferenceType"] = served
    return pricing


def applied_tier_metadata(provider: str | None, tier: str | None) -> dict[str, str] | None:
    """``providerMetadata`` saying the provider served ``tier``, as
    PolicySynth's item cost manager reads it: Anthropic reports a speed
    (``fast`` / ``standard``), the others a service tier."""
    if tier is None:
        return None
    if (provider or "").lower() == "anthropic" and tier in ("fast", "standard"):
        return {"appliedSpeed": tier}
    return {"appliedServiceTier": tier}


def _lower(value: object) -> str | None:
    return value.lower() if isinstance(value, str) else None


def applied_tier(provider: Any, metadata: Any) -> tuple[str | None, bool]:
    """(tier, reported): the tier the provider says it applied, and whether
    it said anything PolicySynth reads."""
    provider = _lower(provider)
    metadata = metadata if isinstance(metadata, dict) else {}
    service_tier, speed = _lower(metadata.get("appliedServiceTier")), _lower(metadata.get("appliedSpeed"))
    if provider in _OPENAI + ("azure",) and service_tier:
        return (service_tier if service_tier in ("flex", "priority") else None), True
    if provider == "anthropic":
        if speed:
            return ("fast" if speed == "fast" else None), True
        if service_tier:
            return ("fast" if service_tier == "priority" else None), True
    return None, False


def _requested_tier(pricing: Mapping[str, Any]) -> Any:
    legacy = pricing.get("inferenceMode")
    tier = pricing.get("inferenceType")
    if tier is None and legacy in ("flex", "priority"):
        tier = legacy
    return tier


def price_problem(prices: Any) -> str | None:
    """Why these prices cannot price a call (a sentence), or None."""
    if not isinstance(prices, dict):
        return "no prices"
    if not prices:
        return ("no prices: the model has none (a placeholder for calls whose model name matched no configured "
                "model; configure it and run `psai usage assign`)")
    for key in REQUIRED_RATE_KEYS:
        value = prices.get(key)
        if value is None:
            return "prices.%s is missing" % key
        if not _is_number(value) or value < 0:
            return "prices.%s is not a usable rate (%r)" % (key, value)
    for key in OPTIONAL_NUMBER_KEYS:
        value = prices.get(key)
        if value is not None and not (_is_number(value) and value >= 0):
            return "prices.%s is not a usable number (%r)" % (key, value)
    margin = prices.get("regionalProcessingMargin")
    if margin is not None and not isinstance(margin, str) and not _is_number(margin):
        return "prices.regionalProcessingMargin is not a usable number (%r)" % (margin,)
    if not isinstance(prices.get("currency"), str) or not prices.get("currency"):
        return "prices.currency is missing"
    return None


def effective_prices(provider: Any, pricing: Any, provider_metadata: Any = None,
                     fallback_prices: Any = None) -> tuple[Any, str | None]:
    """The rates a call is priced at: PolicySynth's
    ``AgentCostItemManager.resolveEffectivePrices``. ``pricing`` is the
    item's ``pricing`` (its snapshot), ``provider_metadata`` what the
    provider reported (the tier applied); ``fallback_prices`` the model's
    current prices, used only when the item has no snapshot. Returns
    ``(prices, problem)``: ``problem`` a sentence when they cannot be used."""
    pricing = pricing if isinstance(pricing, dict) else {}
    configured = pricing.get("configuredPrices")
    if configured is None:
        configured = fallback_prices
    provider_name = _lower(provider)
    tier, reported = applied_tier(provider, provider_metadata)
    if not reported:
        tier = None if provider_name == "azure" else _requested_tier(pricing)
    snapshot = pricing.get("effectivePrices")
    if snapshot is not None and not reported and provider_name != "azure":
        return snapshot, price_problem(snapshot)
    problem = price_problem(configured)
    if problem:
        return configured, problem
    region = pricing.get("regionalProcessing") if provider_name in _OPENAI else None
    resolved = resolve_prices(configured, provider=provider if isinstance(provider, str) else None,
                              inference_type=tier if tier in ("flex", "priority", "fast") else None,
                              regional_processing=region)
    return resolved, None


def call_buckets(usage: Any, *, cache_write_tokens: float = 0, threshold: Any = None) -> dict[str, float]:
    """One call's usage (``usageNormalized``) in BUCKETS: input beyond the
    cached and cache-write parts is ordinary; all of it is long context when
    the input total reaches ``threshold``."""
    usage = usage if isinstance(usage, dict) else {}
    total_in, cached, cache_write = _count(usage.get("tokensIn")), _count(usage.get("cachedInTokens")), \
        _count(cache_write_tokens)
    parts = [_count(usage.get(key)) for key in ("reasoningTokens", "audioTokens", "imageTokens")]
    out = max(_count(usage.get("tokensOut")) - sum(parts), 0) + sum(parts)
    buckets: dict[str, float] = dict.fromkeys(BUCKETS, 0)
    prefix = "long_" if _is_number(threshold) and threshold > 0 and total_in >= threshold else ""
    buckets.update({prefix + "in": max(total_in - cached - cache_write, 0), prefix + "cached": cached,
                    prefix + "cache_write": cache_write, prefix + "out": out})
    return buckets


def item_apart(data: Mapping[str, Any], long: bool) -> dict[str, float]:
    """An item's tokens priced apart (APART's buckets; ``long_`` ones for a
    long-context call): from psai's part and usageNormalized."""
    extras, usage = data.get("psai"), data.get("usageNormalized")
    extras = extras if isinstance(extras, dict) else {}
    usage = usage if isinstance(usage, dict) else {}
    prefix = "long_" if long else ""
    return {prefix + name: _count(value) for name, value in zip(APART, (
        extras.get("cacheWrite1hTokens"), extras.get("cacheWrite12hTokens"), extras.get("audioInTokens"),
        usage.get("audioTokens"), usage.get("imageTokens")))}


def item_cost(data: Any, fallback_prices: Any = None) -> Decimal | None:
    """What one item (its ``data``) cost, as a Decimal, or None when its
    prices are missing or unusable. ``fallback_prices``: the model's current
    prices, for an item without a snapshot (PolicySynth's rule too)."""
    return item_price(data, fallback_prices)[0]


def item_price(data: Any, fallback_prices: Any = None) -> tuple[Decimal | None, str | None]:
    """``(cost, None)`` of one item (its ``data``), or ``(None, why)`` when
    it cannot be priced: ``item_cost`` with the reason a report gives."""
    if not isinstance(data, dict) or not isinstance(data.get("usageNormalized"), dict):
        return None, "the item has no usable token counts (usageNormalized.tokensIn)"
    prices, problem = effective_prices(data.get("provider"), data.get("pricing"), data.get("providerMetadata"),
                                       fallback_prices)
    if problem:
        return None, problem
    extras = data.get("psai")
    if not isinstance(extras, dict):
        extras = {}
    buckets = call_buckets(data["usageNormalized"], cache_write_tokens=extras.get("cacheWriteTokens", 0),
                           threshold=prices.get("longContextTokenThreshold"))
    long = bool(buckets["long_in"] or buckets["long_cached"] or buckets["long_cache_write"] or buckets["long_out"])
    return _pricer_of(prices, zero_long_rate_is_unset=True).price(
        {**buckets, **item_apart(data, long)}, _count(extras.get("webSearches")))
