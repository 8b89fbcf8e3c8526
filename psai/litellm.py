"""LiteLLM's model cost map (``model_prices_and_context_window.json``, shipped
in the ``litellm`` package) as PolicySynth configurations; ``psai.catalog``
imports them.

LiteLLM gives USD per token; PolicySynth wants per million tokens. What maps:

| LiteLLM | psai configuration |
| --- | --- |
| ``input_cost_per_token``, ``output_cost_per_token`` | ``prices.costIn/OutTokensPerMillion`` |
| ``cache_read_input_token_cost`` | ``prices.costInCachedContextTokensPerMillion`` (absent: the input rate, as without a cache discount) |
| ``cache_creation_input_token_cost`` | ``prices.cacheWriteInputCostMultiplier`` (its ratio to the input rate) |
| ``*_above_Nk_tokens`` | ``prices.longContext*`` rates and ``longContextTokenThreshold`` = N × 1000 |
| ``*_flex``, ``*_priority`` | ``prices.flexTokens*``, ``prices.priorityTokens*`` |
| ``search_context_cost_per_query.search_context_size_medium`` | ``prices.costPerThousandWebSearches`` (× 1000) |
| ``mode`` | ``type``: chat, completion, responses → text; embedding; image_generation → image; audio_* → audio; video_generation → video |
| ``max_output_tokens`` | ``maxTokensOut``; ``max_input_tokens`` → ``maxContextTokens`` |
| ``litellm_provider`` | ``provider`` |

LiteLLM has no model size and no temperature, so the caller gives them.
An entry that cannot be mapped (no token prices, another mode, no output
limit, two different long-context thresholds, a configuration psai's schema
refuses) is reported with the reason, never guessed.
"""
import re

from .errors import ValidationError
from .schemas import validate_configuration

__all__ = ["map_entry", "consumed_keys", "MODES"]

MODES = {"chat": "text", "completion": "text", "responses": "text", "embedding": "embedding",
         "image_generation": "image", "audio_speech": "audio", "audio_transcription": "audio",
         "video_generation": "video"}
_ABOVE = re.compile(r"^(?P<base>.+)_above_(?P<n>\d+)k_tokens$")
_LONG_KEYS = {"input_cost_per_token": "longContextCostInTokensPerMillion",
              "output_cost_per_token": "longContextCostOutTokensPerMillion",
              "cache_read_input_token_cost": "longContextCostInCachedContextTokensPerMillion"}
_TIER_KEYS = {"input_cost_per_token_flex": "flexTokensIn", "output_cost_per_token_flex": "flexTokensOut",
              "cache_read_input_token_cost_flex": "flexTokensCachedIn",
              "input_cost_per_token_priority": "priorityTokensIn",
              "output_cost_per_token_priority": "priorityTokensOut",
              "cache_read_input_token_cost_priority": "priorityTokensCachedIn"}


def _per_million(value):
    # Per-token rates are tiny binary fractions: round away the float noise
    # that multiplying by a million leaves (3e-06 × 1e6 = 2.9999999999999996).
    return round(value * 1_000_000, 9)


def _rate(entry, key):
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _per_million(value)


def map_entry(name, entry, *, model_size, default_temperature=0.7):
    """The psai configuration for one cost-map entry. Raises ValueError with
    the reason when it cannot be mapped."""
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    mode = entry.get("mode")
    if mode not in MODES:
        raise ValueError("mode %r has no PolicySynth model type" % (mode,))
    rate_in, rate_out = _rate(entry, "input_cost_per_token"), _rate(entry, "output_cost_per_token")
    if rate_in is None or rate_out is None:
        raise ValueError("no per-token input and output prices")
    max_out = entry.get("max_output_tokens")
    if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1:
        raise ValueError("no max_output_tokens")
    provider = entry.get("litellm_provider")
    if not isinstance(provider, str) or not provider:
        raise ValueError("no litellm_provider")

    cached = _rate(entry, "cache_read_input_token_cost")
    prices = {"costInTokensPerMillion": rate_in, "costOutTokensPerMillion": rate_out,
              "costInCachedContextTokensPerMillion": rate_in if cached is None else cached,
              "currency": "USD"}
    cache_write = _rate(entry, "cache_creation_input_token_cost")
    if cache_write is not None and rate_in:
        prices["cacheWriteInputCostMultiplier"] = round(cache_write / rate_in, 9)
    thresholds = set()
    for key in entry:
        match = _ABOVE.match(key)
        if match and match.group("base") in _LONG_KEYS and _rate(entry, key) is not None:
            thresholds.add(int(match.group("n")) * 1000)
            prices[_LONG_KEYS[match.group("base")]] = _rate(entry, key)
    if len(thresholds) > 1:
        raise ValueError("long-context prices at several thresholds (%s)" % ", ".join(map(str, sorted(thresholds))))
    if thresholds:
        prices["longContextTokenThreshold"] = thresholds.pop()
    for key, target in _TIER_KEYS.items():
        if _rate(entry, key) is not None:
            prices[target] = _rate(entry, key)
    search = entry.get("search_context_cost_per_query")
    if isinstance(search, dict) and isinstance(search.get("search_context_size_medium"), (int, float)):
        prices["costPerThousandWebSearches"] = round(search["search_context_size_medium"] * 1000, 9)

    prefix = provider + "/"
    configuration = {
        "type": MODES[mode], "modelSize": model_size,
        "model": name[len(prefix):] if name.startswith(prefix) else name,
        "provider": provider, "active": True, "prices": prices, "maxTokensOut": max_out,
        "defaultTemperature": default_temperature,
    }
    max_in = entry.get("max_input_tokens")
    if isinstance(max_in, int) and not isinstance(max_in, bool) and max_in >= 1:
        configuration["maxContextTokens"] = max_in
    try:
        return validate_configuration(configuration)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def consumed_keys(entry):
    """The price keys of ``entry`` that ``map_entry`` turns into PolicySynth
    prices (the others are reported by a catalog import)."""
    used = {"input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
            "cache_creation_input_token_cost", "search_context_cost_per_query"} | set(_TIER_KEYS)
    for key in entry:
        match = _ABOVE.match(key)
        if match and match.group("base") in _LONG_KEYS:
            used.add(key)
    return used
