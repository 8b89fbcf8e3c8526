"""The one cost formula (``psai.pricing.Pricer``) against the three it
replaced, kept here as the oracle: ``cost_of_counters`` (exact), the
reports' ``BucketPricer`` and ``apart_extra`` (the tokens priced apart), as
they were before issue 32. Same Decimal, digits and exponent (str equal)."""
import math
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from psai._constants import CACHE_WRITE_12H_KEY, CACHE_WRITE_1H_KEY
from psai._items import item_price
from psai.pricing import (
    APART, BUCKET_COUNTERS, COUNTERS, PRICE_UNITS, Pricer, cost_breakdown, counter_buckets, estimate_cost,
)

# -- the oracle: the formulas before issue 32, verbatim but for names ----------------


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value):
    return value if _is_number(value) and math.isfinite(value) and value > 0 else 0


def _rate(value):
    return Decimal(repr(value if _is_number(value) else 0))


def _exact(value):
    return value if isinstance(value, Decimal) else Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def old_cost_of_counters(counters, p, *, web_searches=0, zero_long_rate_is_unset=False):
    c = {key: _exact(counters.get(key, 0) or 0) for key in COUNTERS}
    rate_in = _rate(p.get("costInTokensPerMillion"))
    rate_cached = _rate(p.get("costInCachedContextTokensPerMillion"))
    rate_out = _rate(p.get("costOutTokensPerMillion"))

    def long_rate(key, base):
        value = p.get(key)
        if value is None or (zero_long_rate_is_unset and value == 0):
            return base
        return _rate(value)

    long_in = long_rate("longContextCostInTokensPerMillion", rate_in)
    long_cached = long_rate("longContextCostInCachedContextTokensPerMillion", rate_cached)
    long_out = long_rate("longContextCostOutTokensPerMillion", rate_out)
    multiplier = p.get("cacheWriteInputCostMultiplier")
    if not (_is_number(multiplier) and math.isfinite(multiplier) and multiplier >= 0):
        multiplier = 1
    multiplier = _rate(multiplier)
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
    million = Decimal(1_000_000)
    result = {key: value / million for key, value in parts.items()}
    per_thousand = p.get("costPerThousandWebSearches")
    searches = math.floor(_count(web_searches))
    if _is_number(per_thousand) and math.isfinite(per_thousand) and per_thousand >= 0:
        web = searches * _rate(per_thousand) / Decimal(1000)
    else:
        web = Decimal(0)
    result["web_search"] = web
    result["total"] = (input_sum + output_sum) / million + web
    return result


_ZERO = Decimal(0)


def old_bucket_pricer(prices, buckets, web_searches=0):
    rate_in = _rate(prices.get("costInTokensPerMillion"))
    rate_cached = _rate(prices.get("costInCachedContextTokensPerMillion"))
    rate_out = _rate(prices.get("costOutTokensPerMillion"))

    def long_rate(key, base):
        value = prices.get(key)
        return base if value is None or value == 0 else _rate(value)

    long_in = long_rate("longContextCostInTokensPerMillion", rate_in)
    long_cached = long_rate("longContextCostInCachedContextTokensPerMillion", rate_cached)
    long_out = long_rate("longContextCostOutTokensPerMillion", rate_out)
    multiplier = prices.get("cacheWriteInputCostMultiplier")
    if not (_is_number(multiplier) and math.isfinite(multiplier) and multiplier >= 0):
        multiplier = 1
    multiplier = _rate(multiplier)
    per_thousand = prices.get("costPerThousandWebSearches")
    web_rate = _rate(per_thousand) if _is_number(per_thousand) and math.isfinite(per_thousand) \
        and per_thousand >= 0 else None
    get = buckets.get

    def n(value):
        return _exact(value or 0)

    input_sum = (n(get("in")) * rate_in + n(get("cached")) * rate_cached
                 + n(get("cache_write")) * rate_in * multiplier + n(get("long_in")) * long_in
                 + n(get("long_cached")) * long_cached + n(get("long_cache_write")) * long_in * multiplier)
    output_sum = ((n(get("out")) + _ZERO + _ZERO + _ZERO) * rate_out
                  + (n(get("long_out")) + _ZERO + _ZERO + _ZERO) * long_out)
    web = _ZERO if web_rate is None else math.floor(_count(web_searches)) * web_rate / Decimal(1000)
    return (input_sum + output_sum) / Decimal(1_000_000) + web


def _finite(value):
    return _is_number(value) and math.isfinite(value)


_OLD_APART = (("cw1h", "1-hour cache writes", CACHE_WRITE_1H_KEY, "Anthropic bills them at 2x input"),
              ("cw12h", "12-hour cache writes", CACHE_WRITE_12H_KEY,
               "OpenAI bills them apart from 30-minute writes"))
_OLD_MODALITIES = (("audio_in", "audio input tokens", "costInAudioTokensPerMillion", "in"),
                   ("audio_out", "audio output tokens", "costOutAudioTokensPerMillion", "out"),
                   ("image_out", "image output tokens", "costOutImageTokensPerMillion", "out"))


def old_apart_extra(apart, prices):
    if not any(apart.values()):
        return Decimal(0), None
    five = prices.get("cacheWriteInputCostMultiplier")
    five = _rate(five if _finite(five) and five >= 0 else 1)
    rates = {}
    for side, base_key, long_key in (("in", "costInTokensPerMillion", "longContextCostInTokensPerMillion"),
                                     ("out", "costOutTokensPerMillion", "longContextCostOutTokensPerMillion")):
        base, long = prices.get(base_key), prices.get(long_key)
        rates[side] = _rate(base)
        rates["long_" + side] = rates[side] if not _finite(long) or long == 0 else _rate(long)
    extra = Decimal(0)
    for prefix in ("", "long_"):
        for name, what, key, why in _OLD_APART:
            tokens = _count(apart.get(prefix + name))
            if tokens:
                multiplier = prices.get(key)
                if not (_finite(multiplier) and multiplier >= 0):
                    return Decimal(0), "%s, and the prices have no %s (psai's key; %s)" % (what, key, why)
                extra += _exact(tokens) * rates[prefix + "in"] * (_rate(multiplier) - five)
        for name, what, key, side in _OLD_MODALITIES:
            tokens = _count(apart.get(prefix + name))
            if tokens:
                rate = prices.get(key)
                if not (_finite(rate) and rate >= 0):
                    return Decimal(0), ("%s, and the prices have no %s (psai's key): they are not priced at the "
                                        "text rate" % (what, key))
                extra += _exact(tokens) * (_rate(rate) - rates[prefix + side])
    return extra / Decimal(1_000_000), None


# Old apart names to the new ones (APART's).
_RENAMED = dict(zip(("cw1h", "cw12h", "audio_in", "audio_out", "image_out"), APART))

# -- strategies ----------------------------------------------------------------------

RATE = st.one_of(st.integers(0, 10 ** 6), st.floats(0, 1e6, allow_nan=False), st.decimals(0, 1000, places=3),
                 st.none(), st.just("12"), st.just(True))
COUNT = st.one_of(st.integers(0, 10 ** 12), st.floats(0, 1e12, allow_nan=False), st.decimals(0, 10 ** 9, places=2),
                  st.none())
TEXT_KEYS = ("costInTokensPerMillion", "costInCachedContextTokensPerMillion", "costOutTokensPerMillion",
             "longContextCostInTokensPerMillion", "longContextCostInCachedContextTokensPerMillion",
             "longContextCostOutTokensPerMillion", "cacheWriteInputCostMultiplier")
ANY_PRICES = st.fixed_dictionaries({}, optional=dict(
    dict.fromkeys(TEXT_KEYS, RATE), costPerThousandWebSearches=st.one_of(RATE, st.just(float("inf")), st.just(-1))))
WEB = st.one_of(st.integers(0, 10 ** 6), st.floats(0, 1e6, allow_nan=False))
# Prices as an item is priced at: numbers 0 or more where set (price_problem refuses the rest).
USABLE = st.one_of(st.integers(0, 1000), st.floats(0, 1000, allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.075, 1.25, 2.5, 3.75, 0.3, 15]))
ITEM_PRICES = st.fixed_dictionaries({}, optional=dict.fromkeys(
    TEXT_KEYS + ("costPerThousandWebSearches", CACHE_WRITE_1H_KEY, CACHE_WRITE_12H_KEY,
                 "costInAudioTokensPerMillion", "costOutAudioTokensPerMillion", "costOutImageTokensPerMillion"),
    USABLE))
TOKENS = st.one_of(st.integers(0, 10 ** 9), st.just(0))


@settings(max_examples=300)
@given(ANY_PRICES, st.fixed_dictionaries({}, optional=dict.fromkeys(COUNTERS, COUNT)), WEB, st.booleans())
def test_the_pricer_is_cost_of_counters_to_the_exponent(prices, counters, web, zero_long_rate_is_unset):
    expected = old_cost_of_counters(counters, prices, web_searches=web,
                                    zero_long_rate_is_unset=zero_long_rate_is_unset)["total"]
    pricer = Pricer(prices, zero_long_rate_is_unset=zero_long_rate_is_unset)
    assert str(pricer.text_cost(counter_buckets(counters), web)) == str(expected)


@settings(max_examples=300)
@given(ANY_PRICES, st.fixed_dictionaries({}, optional=dict.fromkeys(BUCKET_COUNTERS, COUNT)), WEB)
def test_the_pricer_is_the_reports_bucket_pricer_to_the_exponent(prices, buckets, web):
    pricer = Pricer(prices, zero_long_rate_is_unset=True)
    assert str(pricer.text_cost(buckets, web)) == str(old_bucket_pricer(prices, buckets, web))


@settings(max_examples=500)
@given(ITEM_PRICES, st.fixed_dictionaries({}, optional=dict.fromkeys(BUCKET_COUNTERS, TOKENS)),
       st.fixed_dictionaries({}, optional=dict.fromkeys(
           [prefix + name for prefix in ("", "long_") for name in _RENAMED], TOKENS)), st.integers(0, 100))
def test_the_pricer_prices_apart_as_apart_extra(prices, buckets, apart, web):
    """A report's group (or an item): its text buckets at the bucket
    pricer, plus what the tokens priced apart add, or why they cannot be priced."""
    extra, problem = old_apart_extra(apart, prices)
    cost, why = Pricer(prices, zero_long_rate_is_unset=True).price(
        {**buckets, **{key.replace(old, new): value for key, value in apart.items()
                       for old, new in _RENAMED.items() if key.endswith(old) and key in (old, "long_" + old)}}, web)
    assert why == problem
    if problem is None:
        assert str(cost) == str(old_bucket_pricer(prices, buckets, web) + extra)
    else:
        assert cost is None


def test_the_table_prices_every_bucket_and_its_long_context_side():
    """Each unit prices its bucket at its rate; long-context tokens at the long rate."""
    prices = {"costInTokensPerMillion": 2, "costInCachedContextTokensPerMillion": 1, "costOutTokensPerMillion": 8,
              "longContextCostInTokensPerMillion": 4, "longContextCostInCachedContextTokensPerMillion": 2,
              "longContextCostOutTokensPerMillion": 16, "cacheWriteInputCostMultiplier": 1.25,
              CACHE_WRITE_1H_KEY: 2, CACHE_WRITE_12H_KEY: 3, "costInAudioTokensPerMillion": 40,
              "costOutAudioTokensPerMillion": 80, "costOutImageTokensPerMillion": 30}
    pricer = Pricer(prices)
    for unit in PRICE_UNITS:
        within = unit.within or unit.bucket
        for prefix, rate_key in (("", unit.rate_key), ("long_", unit.long_rate_key or unit.rate_key)):
            # A million of the unit's tokens, counted in its text bucket too.
            buckets = {prefix + within: 1_000_000, prefix + unit.bucket: 1_000_000}
            multiplier = prices[unit.multiplier_key] if unit.multiplier_key else 1
            assert pricer.price(buckets) == (Decimal(repr(prices[rate_key] * multiplier)), None), unit


def test_a_unit_priced_apart_without_its_key_is_unpriced_never_at_the_text_rate():
    prices = {"costInTokensPerMillion": 2, "costInCachedContextTokensPerMillion": 1, "costOutTokensPerMillion": 8}
    cost, why = Pricer(prices).price({"out": 10, "image_out": 4})
    assert cost is None and "costOutImageTokensPerMillion" in why
    assert Pricer(prices).price({"out": 10, "image_out": 0}) == (Decimal("0.00008"), None)


@given(st.fixed_dictionaries({"costInTokensPerMillion": USABLE, "costOutTokensPerMillion": USABLE,
                              "costInCachedContextTokensPerMillion": USABLE},
                             optional={"cacheWriteInputCostMultiplier": USABLE,
                                       "costPerThousandWebSearches": USABLE}),
       st.integers(0, 10 ** 7), st.integers(0, 10 ** 7), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
       st.integers(0, 100))
def test_estimate_cost_is_the_exact_cost_as_the_nearest_float(prices, tokens_in, tokens_out, cached, written, web):
    """One call's cost as a float: the exact cost, rounded once (the float
    arithmetic before it agreed to 1e-12)."""
    cached, written = min(cached, tokens_in), min(written, max(tokens_in - cached, 0))
    result = cost_breakdown(prices, tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached,
                            cache_write_tokens=written, web_searches=web)
    exact = old_cost_of_counters(result["counters"], prices, web_searches=web)
    assert result["total"] == float(exact["total"])
    assert result["parts"] == {key: float(value) for key, value in exact.items() if key != "total"}
    assert estimate_cost(prices, tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached,
                         cache_write_tokens=written, web_searches=web) == result["total"]


def test_an_item_is_priced_by_the_one_pricer():
    prices = {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10, "currency": "USD",
              "costInCachedContextTokensPerMillion": 1.25, "costInAudioTokensPerMillion": 40}
    data = {"provider": "openai", "pricing": {"configuredPrices": prices},
            "usageNormalized": {"tokensIn": 10_000, "tokensOut": 2_000}, "psai": {"audioInTokens": 4_000}}
    # 6k text × 2.5 + 4k audio × 40 + 2k × 10, per million
    assert item_price(data) == (Decimal("0.195"), None)
    del prices["costInAudioTokensPerMillion"]
    cost, why = item_price(data)
    assert cost is None and "costInAudioTokensPerMillion" in why


@pytest.mark.parametrize("counters", [dict.fromkeys(COUNTERS, 0), {"token_out_audio_count": 3, "token_out_count": 1}])
def test_counter_buckets_add_the_output_counters(counters):
    buckets = counter_buckets(counters)
    assert buckets["out"] == sum(v for k, v in counters.items() if k.startswith("token_out"))
    assert set(buckets) == set(BUCKET_COUNTERS)


def test_a_rate_card_is_read_once_and_its_types_kept():
    """``_pricer_of`` keeps one Pricer per rate card, told apart by each
    value's type too: a rate of 1 and of 1.0 price alike but give the cost
    other digits, as a Pricer of its own does."""
    from psai.pricing import Pricer, _pricer_of
    ints = {"costInTokensPerMillion": 1, "costOutTokensPerMillion": 2, "currency": "USD"}
    floats = {"costInTokensPerMillion": 1.0, "costOutTokensPerMillion": 2.0, "currency": "USD"}
    assert _pricer_of(ints) is _pricer_of(dict(ints)) and _pricer_of(ints) is not _pricer_of(floats)
    assert _pricer_of(ints) is not _pricer_of(ints, zero_long_rate_is_unset=True)
    buckets = {"in": 1_000_000, "out": 0}
    for prices in (ints, floats, ints, dict(ints, tiers=[1, 2])):  # a list: not kept, read again
        assert str(_pricer_of(prices).price(buckets)[0]) == str(Pricer(prices).price(buckets)[0])
    assert (str(_pricer_of(ints).price(buckets)[0]), str(_pricer_of(floats).price(buckets)[0])) == ("1", "1.0")
