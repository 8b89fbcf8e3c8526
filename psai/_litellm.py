"""LiteLLM's model cost map (``model_prices_and_context_window.json``, shipped
in the ``litellm`` package) as PolicySynth configurations; ``psai.catalog``
imports them.

LiteLLM gives USD per token; PolicySynth wants per million tokens. What maps:

| LiteLLM | psai configuration |
| --- | --- |
| ``input_cost_per_token``, ``output_cost_per_token`` | ``prices.costIn/OutTokensPerMillion`` |
| ``cache_read_input_token_cost`` | ``prices.costInCachedContextTokensPerMillion`` (absent: the input rate) |
| ``cache_creation_input_token_cost`` | ``prices.cacheWriteInputCostMultiplier`` (its ratio to the input rate) |
| ``*_above_Nk_tokens`` | ``prices.longContext*`` rates and ``longContextTokenThreshold`` = N × 1000 |
| ``*_flex``, ``*_priority`` | ``prices.flexTokens*``, ``prices.priorityTokens*`` |
| ``input_cost_per_audio_token``, ``output_cost_per_audio_token`` | ``prices.costIn/OutAudioTokensPerMillion`` |
| ``output_cost_per_image_token`` | ``prices.costOutImageTokensPerMillion`` |
| ``search_context_cost_per_query.search_context_size_medium`` | ``prices.costPerThousandWebSearches`` (× 1000) |
| ``mode``: chat, completion, responses; embedding | ``type``: text; embedding |
| ``mode``: image_generation; audio_speech, audio_transcription; video_generation | ``type``: image; audio; video |
| ``max_output_tokens`` | ``maxTokensOut``; ``max_input_tokens`` → ``maxContextTokens`` |
| ``litellm_provider`` | ``provider`` |

The audio and image rates are psai's own keys (PolicySynth ignores them).
LiteLLM has no model size and no temperature, so the caller gives them.
An entry that cannot be mapped (no token prices, another mode, no output
limit, two different long-context thresholds, a configuration psai's schema
refuses) is reported with the reason, never guessed.
"""
import importlib.util
import json
import os
import re
from collections.abc import Callable, Collection
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._constants import LONG_CONTEXT_RATE_KEYS, MODALITY_RATE_KEYS, TIER_KEYS
from .errors import CatalogUnavailableError, ValidationError
from .schemas import json_problem, validate_configuration

__all__ = ["map_entry", "consumed_keys", "MODES", "LITELLM_FILE", "litellm_cost_map_path", "litellm_version",
           "litellm_catalog"]

# The cost map inside the litellm package.
LITELLM_FILE = "model_prices_and_context_window_backup.json"

MODES = {"chat": "text", "completion": "text", "responses": "text", "embedding": "embedding",
         "image_generation": "image", "audio_speech": "audio", "audio_transcription": "audio",
         "video_generation": "video"}
_ABOVE = re.compile(r"^(?P<base>.+)_above_(?P<n>\d+)k_tokens$")
# LiteLLM's input, cached input and output rates (the order of constants.BASE_RATE_KEYS).
_RATES = ("input_cost_per_token", "cache_read_input_token_cost", "output_cost_per_token")
# LiteLLM's ``RATE_above_Nk_tokens`` base and PolicySynth's long-context key:
# input_cost_per_token → longContextCostInTokensPerMillion, ...
_LONG_KEYS = dict(zip(_RATES, LONG_CONTEXT_RATE_KEYS))
# LiteLLM's ``RATE_flex`` and ``RATE_priority`` and PolicySynth's tier key:
# input_cost_per_token_flex → flexTokensIn, cache_read_input_token_cost_priority → priorityTokensCachedIn, ...
_TIER_KEYS = {"%s_%s" % (rate, tier): key
              for tier in ("flex", "priority") for rate, key in zip(_RATES, TIER_KEYS[tier])}
# LiteLLM's per-token rates of tokens that are not text, and psai's own keys for them.
_MODALITY_KEYS = dict(zip(("input_cost_per_audio_token", "output_cost_per_audio_token",
                           "output_cost_per_image_token"), MODALITY_RATE_KEYS))


def _per_million(value):
    # Per-token rates are tiny binary fractions: round away the float noise
    # that multiplying by a million leaves (3e-06 × 1e6 = 2.9999999999999996).
    return round(value * 1_000_000, 9)


def _rate(entry, key):
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _per_million(value)


def map_entry(name: str, entry: Any, *, model_size: str, default_temperature: float = 0.7) -> dict[str, Any]:
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
    for key, target in list(_TIER_KEYS.items()) + list(_MODALITY_KEYS.items()):
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


def consumed_keys(entry: dict[str, Any]) -> set[str]:
    """The price keys of ``entry`` that ``map_entry`` turns into PolicySynth
    prices (the others are reported by a catalog import)."""
    used = {"input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
            "cache_creation_input_token_cost", "search_context_cost_per_query"} | set(_TIER_KEYS) | set(_MODALITY_KEYS)
    for key in entry:
        match = _ABOVE.match(key)
        if match and match.group("base") in _LONG_KEYS:
            used.add(key)
    return used


# -- reading the cost map --------------------------------------------------------

def litellm_cost_map_path() -> str:
    """The cost map inside the installed litellm package, found without
    importing it."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise CatalogUnavailableError(
            "LiteLLM is not installed: pip install litellm, or pass its cost map with --file PATH "
            "(model_prices_and_context_window.json)")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, LITELLM_FILE)
        if os.path.exists(path):
            return path
    raise CatalogUnavailableError("the installed litellm package has no %s" % LITELLM_FILE)


def litellm_version() -> str:
    """The installed litellm's version, or "unknown"."""
    try:
        return version("litellm")
    except PackageNotFoundError:
        return "unknown"


def _litellm_notes(entry, consumed):
    notes = []
    for key, value in entry.items():
        if key in consumed or "cost" not in key or not value:
            continue
        if isinstance(value, (int, float, dict)) and not isinstance(value, bool):
            notes.append("%s %s: no PolicySynth price for it" % (key, json.dumps(value, sort_keys=True)))
    return notes


def litellm_catalog(cost_map: dict[str, Any], providers: Collection[str],
                    wanted: Callable[[str, str], bool] | None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The entries of a cost map, optionally only these ``litellm_provider``
    values and the models ``wanted(key, key without its provider/)`` takes:
    ``({name: {"name", "configuration", "unexpressed", "disagreements",
    "maxTokensOut"}}, {name: why it is skipped})``. The configurations have
    no size and no temperature (the import gives them)."""
    entries: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, entry in cost_map.items():
        if name == "sample_spec":
            continue  # LiteLLM's own documentation of the format
        problem = json_problem(entry)
        if problem:
            skipped[name] = problem
            continue
        provider = entry.get("litellm_provider") if isinstance(entry, dict) else None
        if providers and provider not in providers:
            continue
        if wanted is not None and not wanted(name, name[len(provider) + 1:] if isinstance(provider, str)
                                             and name.startswith(provider + "/") else name):
            continue
        try:
            configuration = map_entry(name, entry, model_size="medium")
        except ArithmeticError:
            skipped[name] = "a number too large to use"  # e.g. 10**400, which no float holds
            continue
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        for key in ("modelSize", "defaultTemperature", "maxTokensOut"):
            configuration.pop(key)
        entries[name] = {"name": name, "configuration": configuration,
                         "unexpressed": _litellm_notes(entry, consumed_keys(entry)), "disagreements": set(),
                         "maxTokensOut": entry["max_output_tokens"]}
    return entries, skipped
