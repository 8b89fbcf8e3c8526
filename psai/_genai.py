"""genai-prices' packaged data as PolicySynth configurations; ``psai.catalog``
imports them.

genai-prices is the optional extra ``psai[catalog]`` (pinned): psai imports
without it, and what needs it raises CatalogUnavailableError. Only its
packaged data (``genai_prices.data``) is read, never its network update.

Each genai-prices model becomes a configuration whose prices are the ones in
force without a request context; its flex, priority and fast variants become
PolicySynth's tier rates where PolicySynth can say them. Whatever else the
source prices (batch or off-peak prices, per-request fees, ...) is listed
in ``unexpressed``; 1-hour cache writes and flat audio and image token
prices go to psai's own keys; a model whose token prices cannot be
said at all raises Unmappable with the reason. Every mapped model is checked
against genai-prices' own calculation: a rate that would come out
differently is in ``disagreements``, not passed off as agreeing.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from copy import copy
from datetime import datetime
from decimal import Decimal
from typing import Any

from ._constants import CACHE_WRITE_1H_KEY, LONG_CONTEXT_RATE_KEYS, MODALITY_RATE_KEYS, TIER_KEYS
from .errors import CatalogUnavailableError, Unmappable
from .pricing import estimate_cost, normalize_inference_type

try:
    import genai_prices
    from genai_prices import data as genai_data
    from genai_prices.types import (
        ModelInfo, ModelPrice, Provider, StartDateConstraint, TieredPrices, TimeOfDateConstraint, Usage,
    )
except ImportError:  # the psai[catalog] extra is not installed: psai works without it
    genai_prices = genai_data = None  # type: ignore[assignment]
    ModelInfo = ModelPrice = Provider = StartDateConstraint = TieredPrices = None  # type: ignore[assignment,misc]
    TimeOfDateConstraint = Usage = None  # type: ignore[assignment,misc]

__all__ = ["genai_catalog", "genai_entry", "genai_usage", "standard_prices", "Unmappable"]

# genai-prices price keys PolicySynth's configuration expresses.
_GENAI_EXPRESSED = {"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "web_searches_kcount"}
_GENAI_WHAT = {
    "cache_write_1h_mtok": "1-hour cache writes, not imported: psai's cacheWrite1hInputCostMultiplier is one "
                           "multiplier of the input rate, and this price is not",
    "requests_kcount": "a per-request fee",
    "storage_searches_kcount": "file-search calls",
    "output_reasoning_mtok": "a separate reasoning-token price",
}
# genai-prices' prices of tokens that are not text, and psai's own keys for them.
_GENAI_MODALITY_KEYS = dict(zip(("input_audio_mtok", "output_audio_mtok", "output_image_mtok"), MODALITY_RATE_KEYS))
# PolicySynth's inference tiers and the genai-prices request contexts they are.
_TIER_CONTEXTS = {"flex": ({"service_tier": "flex"},), "priority": ({"service_tier": "priority"},),
                  "fast": ({"speed": "fast"}, {"service_tier": "fast"})}
_IGNORED_CONTEXTS = ({"service_tier": "default"},)  # the standard prices again


def _require() -> None:
    if genai_prices is None:
        raise CatalogUnavailableError("genai-prices is not installed: pip install 'psai[catalog]'")


def _genai():
    _require()
    return genai_prices.__version__, genai_data.providers


def _price_text(value):
    if isinstance(value, TieredPrices):
        return "%s (above %s input tokens: %s)" % (
            value.base, ", ".join(str(t.start) for t in value.tiers), ", ".join(str(t.price) for t in value.tiers))
    return str(value)


def standard_prices(model: ModelInfo, now: datetime) -> tuple[ModelPrice, list[str]]:
    """genai-prices' prices for ``model`` in force at ``now`` without a
    request context, and notes on the dated and time-of-day prices beside
    them. Time-of-day prices (off-peak discounts) are left out: PolicySynth
    has none, and the import must not depend on the hour it runs."""
    _require()
    if isinstance(model.prices, ModelPrice):
        return model.prices, []
    chosen, notes = model.prices[0].prices, []
    for conditional in reversed(model.prices):  # genai-prices: the last one in force wins
        constraint = conditional.constraint
        if constraint is None or (isinstance(constraint, StartDateConstraint) and constraint.active(now)):
            chosen = conditional.prices
            break
    for conditional in model.prices:
        constraint = conditional.constraint
        if isinstance(constraint, TimeOfDateConstraint):
            notes.append("time-of-day prices %s-%s UTC: %s" % (
                constraint.start_time.strftime("%H:%M"), constraint.end_time.strftime("%H:%M"),
                conditional.prices))
        elif isinstance(constraint, StartDateConstraint) and not constraint.active(now):
            notes.append("a price change from %s: %s" % (constraint.start_date, conditional.prices))
    return chosen, notes


def _with_context(model, standard, context, now):
    """``standard`` with the overrides of the variants matching ``context``
    (genai-prices' own rule: the first matching variant sets each key)."""
    overrides: dict[str, Any] = {}
    matched = False
    for variant in model.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        if variant.when != context:
            continue
        matched = True
        for key, price in variant.prices.__dict__.items():
            if price is not None:
                overrides.setdefault(key, price)
    if not matched:
        return None
    resolved = copy(standard)
    resolved.__dict__.update(overrides)
    return resolved


def _split(prices, key):
    """(base, long, threshold) of one genai-prices price: a flat price has no
    long rate; a price with one tier above ``start`` input tokens is
    PolicySynth's long context from ``start + 1`` (PolicySynth: total ≥
    threshold; genai-prices: total > start)."""
    value = prices.__dict__.get(key)
    if value is None:
        return None, None, None
    if isinstance(value, TieredPrices):
        if len(value.tiers) != 1:
            raise Unmappable("%s has %d price tiers; PolicySynth has one long-context threshold"
                             % (key, len(value.tiers)))
        return value.base, value.tiers[0].price, value.tiers[0].start + 1
    return value, None, None


def _token_rates(prices):
    """The four token rates of a genai-prices ModelPrice as PolicySynth sees
    them: base and long input, cached input, cache write, output; cached input
    and cache writes without a price of their own cost what input costs."""
    rates = {name: _split(prices, key) for name, key in (
        ("in", "input_mtok"), ("cached", "cache_read_mtok"), ("write", "cache_write_mtok"), ("out", "output_mtok"))}
    thresholds = {threshold for _, _, threshold in rates.values() if threshold is not None}
    if len(thresholds) > 1:
        raise Unmappable("long-context thresholds differ between prices (%s)"
                         % ", ".join(str(t - 1) for t in sorted(thresholds)))
    if rates["in"][0] is None:
        raise Unmappable("no input token price")
    for name in ("cached", "write"):
        if rates[name][0] is None:
            rates[name] = rates["in"]
    return rates, (thresholds.pop() if thresholds else None)


def _number(value):
    return float(value) if value is not None else None


def _standard_configuration(provider, model, prices):
    rates, threshold = _token_rates(prices)
    output_keys = [key for key, value in prices.__dict__.items()
                   if value is not None and key.startswith("output_") and key != "output_mtok"]
    if rates["out"][0] is None:
        if output_keys:
            raise Unmappable("no output token price (priced by %s)" % ", ".join(sorted(output_keys)))
        model_type, rates["out"] = "embedding", (Decimal(0), None, None)
    else:
        model_type = "text"
    (rate_in, long_in, _), (cached, long_cached, _) = rates["in"], rates["cached"]
    # A long-context cache-write price is PolicySynth's long input rate times the multiplier: the probes check it.
    (write, _, _), (rate_out, long_out, _) = rates["write"], rates["out"]
    result = {"costInTokensPerMillion": _number(rate_in), "costOutTokensPerMillion": _number(rate_out),
              "costInCachedContextTokensPerMillion": _number(cached), "currency": "USD"}
    if prices.__dict__.get("cache_write_mtok") is not None and write != rate_in:
        if not rate_in:
            raise Unmappable("a cache-write price on a free input price (PolicySynth has a multiplier of it)")
        result["cacheWriteInputCostMultiplier"] = float(write / rate_in)
    if threshold is not None:
        result["longContextTokenThreshold"] = threshold
        for key, value in zip(LONG_CONTEXT_RATE_KEYS, (long_in, long_cached, long_out)):
            if value is not None:
                result[key] = float(value)
    hour = prices.__dict__.get("cache_write_1h_mtok")
    if isinstance(hour, Decimal) and rate_in:  # a flat price; psai's own key (PolicySynth ignores it)
        result[CACHE_WRITE_1H_KEY] = float(hour / rate_in)
    elif isinstance(hour, TieredPrices) and rate_in and long_in and len(hour.tiers) == 1 \
            and hour.tiers[0].start + 1 == threshold and hour.base / rate_in == hour.tiers[0].price / long_in:
        # Tiered like the input (Sonnet 4.5: 6 then 12 on 3 then 6): one
        # multiplier of the input rate in force says both.
        result[CACHE_WRITE_1H_KEY] = float(hour.base / rate_in)
    for source_key, key in _GENAI_MODALITY_KEYS.items():
        rate = prices.__dict__.get(source_key)
        if isinstance(rate, Decimal):  # a flat price; psai's own keys (PolicySynth ignores them)
            result[key] = float(rate)
    web = prices.__dict__.get("web_searches_kcount")
    if web is not None:
        if not isinstance(web, Decimal):
            raise Unmappable("tiered web-search prices")
        result["costPerThousandWebSearches"] = float(web)
    configuration = {"type": model_type, "model": model.id, "provider": provider.id, "active": True,
                     "prices": result}
    if model.context_window:
        configuration["maxContextTokens"] = model.context_window
    return configuration, threshold


def _tier_rates(prices):
    """A tier's (input, cached input, output) rates: TIER_KEYS' order."""
    rates, _ = _token_rates(prices)
    return (rates["in"][0], rates["cached"][0], rates["out"][0] if rates["out"][0] is not None else Decimal(0))


def _probes(threshold):
    """Usages that between them exercise every rate PolicySynth's
    configuration holds: each token kind below and above the long-context
    threshold, and web searches, each as the difference it makes to a call
    (so a per-request fee, reported on its own, does not hide the rest).
    Cost is linear in each within a regime, so agreeing on these is agreeing
    on every call."""
    regimes = []
    if threshold is None or threshold > 1:
        regimes.append(("", 1000 if threshold is None else min(1000, threshold - 1)))
    if threshold is not None:
        regimes.append((" from %d input tokens" % threshold, threshold))
    for regime, total in regimes:
        yield "input" + regime, {"tokens_in": total}, {}
        yield "cached input" + regime, {"tokens_in": total, "cached_tokens": total}, {}
        yield "cache writes" + regime, {"tokens_in": total, "cache_write_tokens": total}, {}
        yield "output" + regime, {"tokens_in": total, "tokens_out": 1000}, {"tokens_in": total}
        yield ("reasoning tokens" + regime, {"tokens_in": total, "tokens_out": 1000, "reasoning_tokens": 1000},
               {"tokens_in": total, "tokens_out": 1000})
    yield "web searches", {"web_searches": 10}, {}


def genai_usage(tokens_in: int = 0, tokens_out: int = 0, cached_tokens: int = 0, cache_write_tokens: int = 0,
                reasoning_tokens: int = 0, web_searches: int = 0) -> Usage:
    """psai's usage keywords as a genai-prices Usage (both count totals:
    cached and cache-write tokens are part of the input, reasoning part of
    the output)."""
    _require()
    values = {"input_tokens": tokens_in, "output_tokens": tokens_out, "cache_read_tokens": cached_tokens,
              "cache_write_tokens": cache_write_tokens, "output_reasoning_tokens": reasoning_tokens,
              "web_searches": web_searches}
    return Usage(**{key: value for key, value in values.items() if value})


def _disagreements(configuration, tiers, threshold):
    """Where psai's estimate_cost on ``configuration`` and genai-prices'
    calculation differ: ``{(tier or "standard", what)}``."""
    prices, provider = configuration["prices"], configuration["provider"]
    found = set()
    for tier, tier_prices in tiers.items():
        def ours(usage):
            usage = dict({"tokens_in": 0, "tokens_out": 0}, **usage)
            return Decimal(estimate_cost(prices, **usage, provider=provider, inference_type=tier))

        for what, usage, minus in _probes(threshold):
            try:
                theirs = (tier_prices.calc_price(genai_usage(**usage))["total_price"]
                          - tier_prices.calc_price(genai_usage(**minus))["total_price"])
            except ValueError:
                found.add((tier or "standard", what))
                continue
            difference = ours(usage) - ours(minus)
            if abs(difference - theirs) > Decimal("1e-12") * max(abs(theirs), 1):
                found.add((tier or "standard", what))
    return found


def _tiered_configuration(configuration, model, standard, now, threshold):
    """Add the source's flex, priority and fast prices to ``configuration``
    where PolicySynth can say them; returns ``{tier: genai prices}`` for the
    tiers the source has and the notes on its other request variants."""
    provider = configuration["provider"]
    tiers: dict[str | None, Any] = {None: standard}
    notes = []
    used = list(_IGNORED_CONTEXTS)
    for tier, contexts in _TIER_CONTEXTS.items():
        for context in contexts:
            resolved = _with_context(model, standard, context, now)
            if resolved is None:
                continue
            used.append(context)
            tiers[tier] = resolved
            if normalize_inference_type(provider, tier) == tier:
                # A tier PolicySynth maps onto another (OpenAI's fast is its
                # priority) keeps no rates of its own: the probes compare.
                for key, value in zip(TIER_KEYS[tier], _tier_rates(resolved)):
                    configuration["prices"][key] = float(value)
            break
    for variant in model.price_variants or ():
        if variant.when not in used:
            used.append(variant.when)
            notes.append("prices when %s: %s" % (
                ", ".join("%s=%s" % item for item in variant.when.items()), variant.prices))
    return tiers, notes


def _fewest_disagreements(configuration, tiers, threshold):
    """PolicySynth re-derives flex and priority long-context rates only with
    ``flexPriorityTokensEnabledOnLongContext``: keep whichever setting agrees
    with the source in more places (off when they tie)."""
    found = _disagreements(configuration, tiers, threshold)
    if threshold is None or not (set(tiers) & {"flex", "priority"}) or not found:
        return found
    prices = configuration["prices"]
    prices["flexPriorityTokensEnabledOnLongContext"] = True
    flagged = _disagreements(configuration, tiers, threshold)
    if len(flagged) < len(found):
        return flagged
    del prices["flexPriorityTokensEnabledOnLongContext"]
    return found


def genai_entry(provider: Provider, model: ModelInfo, now: datetime) -> dict[str, Any]:
    """One genai-prices model as ``{"configuration", "unexpressed",
    "disagreements"}`` (the configuration without size, temperature and
    output limit); raises Unmappable with the reason."""
    standard, notes = standard_prices(model, now)
    configuration, threshold = _standard_configuration(provider, model, standard)
    for key, value in standard.__dict__.items():
        expressed = key in _GENAI_EXPRESSED or (key == "cache_write_1h_mtok"
                                                and CACHE_WRITE_1H_KEY in configuration["prices"]) or (
            _GENAI_MODALITY_KEYS.get(key) in configuration["prices"])
        if value is not None and not expressed:
            notes.append("%s %s: %s" % (key, _price_text(value), _GENAI_WHAT.get(key, "no PolicySynth price for it")))
    tiers, variant_notes = _tiered_configuration(configuration, model, standard, now, threshold)
    disagreements = _fewest_disagreements(configuration, tiers, threshold)
    notes += variant_notes
    notes += ["%s %s: PolicySynth's rules price it differently" % (tier, what)
              for tier, what in sorted(disagreements)]
    return {"configuration": configuration, "unexpressed": notes, "disagreements": disagreements}


def genai_catalog(providers: Collection[str], wanted: Callable[[str, str], bool] | None,
                  now: datetime) -> tuple[str, dict[str, dict[str, Any]], dict[str, str]]:
    """The installed genai-prices' models, optionally only these providers
    and the models ``wanted(provider/model, model)`` takes: ``(version, {source_model:
    entry}, {source_model: why it is skipped})``; each entry is
    ``genai_entry``'s with its ``name``."""
    version, catalog = _genai()
    entries, skipped = {}, {}
    for provider in catalog:
        if providers and provider.id not in providers:
            continue
        for model in provider.models:
            source_model = "%s/%s" % (provider.id, model.id)
            if wanted is not None and not wanted(source_model, model.id):
                continue
            try:
                entries[source_model] = dict(genai_entry(provider, model, now), name=source_model)
            except Unmappable as exc:
                skipped[source_model] = str(exc)
    return version, entries, skipped

