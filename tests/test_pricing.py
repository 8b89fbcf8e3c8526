"""PolicySynth's pricing rules (shared/PRICING.md): one test per rule, the
reference cases from PolicySynth's own tests, and properties."""
import math
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from psai.pricing import (
    COUNTERS, Pricer, cost_breakdown, counter_buckets, estimate_cost, exact_sum, partition_usage, resolve_prices,
)

BASE = {"costInTokensPerMillion": 10, "costInCachedContextTokensPerMillion": 1,
        "costOutTokensPerMillion": 40, "currency": "USD"}
TIERS = {"flexTokensIn": 5, "flexTokensCachedIn": 0.5, "flexTokensOut": 20,
         "priorityTokensIn": 12, "priorityTokensCachedIn": 1.2, "priorityTokensOut": 48,
         "fastTokensIn": 60, "fastTokensCachedIn": 6, "fastTokensOut": 240}
LONG = {"longContextTokenThreshold": 100, "longContextCostInTokensPerMillion": 15,
        "longContextCostInCachedContextTokensPerMillion": 2, "longContextCostOutTokensPerMillion": 60}


def rates(resolved):
    keys = ("costInTokensPerMillion", "costInCachedContextTokensPerMillion", "costOutTokensPerMillion")
    return tuple(resolved[k] for k in keys)


def long_rates(resolved):
    keys = ("longContextCostInTokensPerMillion", "longContextCostInCachedContextTokensPerMillion",
            "longContextCostOutTokensPerMillion")
    return tuple(resolved.get(k) for k in keys)


# -- 1. normalising the inference type by provider ------------------------------

@pytest.mark.parametrize("provider, requested, expected", [
    ("openai", "fast", (12, 1.2, 48)),             # fast means priority on OpenAI
    ("OpenAIResponses", "fast", (12, 1.2, 48)),    # provider compared lower-case
    ("openai", "flex", (5, 0.5, 20)),
    ("openai", "batch", (10, 1, 40)),              # anything else: no tier
    ("anthropic", "priority", (60, 6, 240)),       # priority means fast on Anthropic
    ("anthropic", "fast", (60, 6, 240)),
    ("google", "flex", (5, 0.5, 20)),              # other providers: unchanged
    ("google", "fast", (60, 6, 240)),
    (None, "priority", (12, 1.2, 48)),
    ("openai", None, (10, 1, 40)),
])
def test_inference_type_is_normalised_by_provider(provider, requested, expected):
    assert rates(resolve_prices({**BASE, **TIERS}, provider=provider, inference_type=requested)) == expected


# -- 2./3. tier rates, fallbacks, long-context re-derivation ----------------------

def test_missing_tier_rate_falls_back_to_the_standard_rate():
    prices = {**BASE, "flexTokensIn": 5}
    assert rates(resolve_prices(prices, provider="openai", inference_type="flex")) == (5, 1, 40)
    prices = {**BASE, "fastTokensOut": 100}
    assert rates(resolve_prices(prices, provider="anthropic", inference_type="fast")) == (10, 1, 100)


def test_flex_and_priority_rederive_long_rates_only_when_enabled():
    prices = {**BASE, **TIERS, **LONG}
    off = resolve_prices(prices, provider="openai", inference_type="priority")
    assert long_rates(off) == (15, 2, 60)
    on = resolve_prices({**prices, "flexPriorityTokensEnabledOnLongContext": True},
                        provider="openai", inference_type="priority")
    assert long_rates(on) == pytest.approx((12 * 15 / 10, 1.2 * 2 / 1, 48 * 60 / 40))


def test_fast_always_rederives_long_rates():
    resolved = resolve_prices({**BASE, **TIERS, **LONG}, provider="anthropic", inference_type="fast")
    assert long_rates(resolved) == pytest.approx((60 * 15 / 10, 6 * 2 / 1, 240 * 60 / 40))


def test_reference_openai_fast_is_priority_and_scales_long_rate():
    # PolicySynth: a priority input rate 12 on base 10 scales a long rate 15 to 18.
    prices = {**BASE, "priorityTokensIn": 12, "longContextTokenThreshold": 1000,
              "longContextCostInTokensPerMillion": 15, "flexPriorityTokensEnabledOnLongContext": True}
    resolved = resolve_prices(prices, provider="openai", inference_type="fast")
    assert resolved["costInTokensPerMillion"] == 12
    assert resolved["longContextCostInTokensPerMillion"] == 18


def test_rederiving_without_a_long_rate_uses_the_selected_rate():
    prices = {**BASE, "fastTokensIn": 60}
    resolved = resolve_prices(prices, provider="anthropic", inference_type="fast")
    assert resolved["longContextCostInTokensPerMillion"] == 60


def test_reference_zero_base_rate_keeps_the_explicit_long_rate():
    prices = {**BASE, "costInTokensPerMillion": 0, "fastTokensIn": 3,
              "longContextTokenThreshold": 10, "longContextCostInTokensPerMillion": 7}
    resolved = resolve_prices(prices, provider="anthropic", inference_type="fast")
    assert resolved["longContextCostInTokensPerMillion"] == 7


def test_resolving_does_not_change_the_prices_given():
    prices = {**BASE, **TIERS, **LONG, "regionalProcessingMargin": 10}
    snapshot = dict(prices)
    resolve_prices(prices, provider="anthropic", inference_type="fast", regional_processing="eu")
    assert prices == snapshot


# -- 5. regional margin -------------------------------------------------------

def test_reference_eu_margin_turns_flex_rate_2_into_2_2():
    prices = {**BASE, "flexTokensIn": 2, "regionalProcessingMargin": 10}
    resolved = resolve_prices(prices, provider="openai", inference_type="flex", regional_processing="eu")
    assert resolved["costInTokensPerMillion"] == pytest.approx(2.2)
    assert resolved["flexTokensIn"] == pytest.approx(2.2)


def test_eu_margin_applies_to_every_rate_after_the_tier():
    prices = {**BASE, **TIERS, **LONG, "regionalProcessingMargin": 50}
    resolved = resolve_prices(prices, regional_processing="eu")
    assert rates(resolved) == (15, 1.5, 60)
    assert long_rates(resolved) == (22.5, 3, 90)
    assert [resolved[k] for k in sorted(TIERS)] == [TIERS[k] * 1.5 for k in sorted(TIERS)]
    assert resolved["longContextTokenThreshold"] == 100  # not a rate


@pytest.mark.parametrize("margin, region", [
    (float("nan"), "eu"), ("10", "eu"), (True, "eu"), (None, "eu"), (10, "us"), (10, None),
])
def test_eu_margin_ignored_when_not_a_finite_number_or_not_eu(margin, region):
    prices = {**BASE, "regionalProcessingMargin": margin}
    assert rates(resolve_prices(prices, regional_processing=region)) == (10, 1, 40)


# -- 2. partitioning input tokens ---------------------------------------------------

def test_reference_partition_ordinary_cached_cache_write():
    counters = partition_usage(tokens_in=100, cached_tokens=20, cache_write_tokens=30)
    assert (counters["token_in_count"], counters["token_in_cached_context_count"],
            counters["token_in_cache_write_count"]) == (50, 20, 30)
    assert sum(v for k, v in counters.items() if k.startswith("long_context")) == 0


def test_reference_partition_at_threshold_is_all_long_context():
    counters = partition_usage(tokens_in=100, tokens_out=7, cached_tokens=20, cache_write_tokens=30,
                               reasoning_tokens=2, long_context_threshold=100)
    assert (counters["long_context_token_in_count"], counters["long_context_token_in_cached_context_count"],
            counters["long_context_token_in_cache_write_count"]) == (50, 20, 30)
    assert (counters["long_context_token_out_count"], counters["long_context_token_out_reasoning_count"]) == (5, 2)
    assert sum(v for k, v in counters.items() if not k.startswith("long_context")) == 0
    below = partition_usage(tokens_in=99, long_context_threshold=100)
    assert below["token_in_count"] == 99 and below["long_context_token_in_count"] == 0


def test_partition_never_goes_negative():
    counters = partition_usage(tokens_in=10, cached_tokens=8, cache_write_tokens=7)
    assert (counters["token_in_count"], counters["token_in_cached_context_count"],
            counters["token_in_cache_write_count"]) == (0, 8, 7)
    counters = partition_usage(tokens_in=-5, tokens_out=float("nan"), cached_tokens="12", reasoning_tokens=-1)
    assert all(value == 0 for value in counters.values())


def test_partition_keeps_fractions_until_stored():
    counters = partition_usage(tokens_in=11.75, cached_tokens=1)
    assert counters["token_in_count"] == 10.75


def test_output_parts_are_not_counted_twice():
    counters = partition_usage(tokens_in=0, tokens_out=100, reasoning_tokens=60, audio_tokens=10, image_tokens=5)
    assert (counters["token_out_count"], counters["token_out_reasoning_count"],
            counters["token_out_audio_count"], counters["token_out_image_count"]) == (25, 60, 10, 5)
    assert estimate_cost(BASE, tokens_in=0, tokens_out=100, reasoning_tokens=60,
                         audio_tokens=10, image_tokens=5) == 100 * 40 / 1e6


# -- 3. cost ------------------------------------------------------------------------

REFERENCE_PRICES = {
    "costInTokensPerMillion": 1_000_000, "costOutTokensPerMillion": 2_000_000,
    "costInCachedContextTokensPerMillion": 500_000, "longContextTokenThreshold": 100,
    "longContextCostInTokensPerMillion": 3_000_000,
    "longContextCostInCachedContextTokensPerMillion": 1_000_000,
    "longContextCostOutTokensPerMillion": 4_000_000, "currency": "USD",
}


def test_reference_item_costs_678():
    prices = {**REFERENCE_PRICES, "cacheWriteInputCostMultiplier": 1.25, "costPerThousandWebSearches": 10}
    result = cost_breakdown(prices, tokens_in=200, cached_tokens=50, cache_write_tokens=20,
                            tokens_out=40, reasoning_tokens=10, audio_tokens=5, image_tokens=5,
                            web_searches=300)
    parts = result["parts"]
    assert parts["long_context_input"] == 390
    assert parts["long_context_cached_input"] == 50
    assert parts["long_context_cache_write_input"] == 75
    assert parts["long_context_output"] == 160
    assert parts["web_search"] == 3
    assert result["total"] == 678 and result["currency"] == "USD"


def test_reference_long_context_item_costs_660():
    assert estimate_cost(REFERENCE_PRICES, tokens_in=200, cached_tokens=50, tokens_out=40,
                         reasoning_tokens=10, audio_tokens=5, image_tokens=5) == 660


def test_reference_stored_counters_cost_124_5():
    counters = {"token_in_count": 10, "token_out_count": 20, "token_in_cached_context_count": 5,
                "long_context_token_in_count": 7, "long_context_token_in_cached_context_count": 3,
                "token_out_reasoning_count": 2, "token_out_audio_count": 1, "token_out_image_count": 1,
                "long_context_token_out_count": 4, "long_context_token_out_reasoning_count": 3,
                "long_context_token_out_audio_count": 2, "long_context_token_out_image_count": 1}
    assert Pricer(REFERENCE_PRICES).text_cost(counter_buckets(counters)) == Decimal("124.5")


@pytest.mark.parametrize("multiplier, expected", [
    (None, 1), (1.25, 1.25), (0, 0), (float("nan"), 1), (-1, 1), ("2", 1),
])
def test_cache_write_multiplier(multiplier, expected):
    prices = {**BASE, "cacheWriteInputCostMultiplier": multiplier}
    cost = estimate_cost(prices, tokens_in=1_000_000, cache_write_tokens=1_000_000, tokens_out=0)
    assert cost == pytest.approx(10 * expected)


def test_explicit_zero_long_rate_is_kept_and_missing_falls_back():
    prices = {**BASE, "longContextTokenThreshold": 10, "longContextCostInTokensPerMillion": 0}
    result = cost_breakdown(prices, tokens_in=1_000_000, tokens_out=1_000_000)
    assert result["parts"]["long_context_input"] == 0
    assert result["parts"]["long_context_output"] == 40  # no long output rate: the standard one


def test_ordinary_and_cached_input_and_output():
    result = cost_breakdown(BASE, tokens_in=3_000_000, cached_tokens=1_000_000, tokens_out=500_000)
    assert result["parts"]["input"] == 20
    assert result["parts"]["cached_input"] == 1
    assert result["parts"]["output"] == 20
    assert result["total"] == 41


@pytest.mark.parametrize("searches, per_thousand, expected", [
    (3, 10, 0.03), (3.9, 10, 0.03), (3, 0, 0), (-1, 10, 0), (1, float("nan"), 0), (1, None, 0),
])
def test_web_search_cost(searches, per_thousand, expected):
    prices = {**BASE, "costPerThousandWebSearches": per_thousand}
    assert estimate_cost(prices, tokens_in=0, tokens_out=0, web_searches=searches) == expected


def test_tier_and_region_flow_into_the_cost():
    prices = {**BASE, **TIERS, "regionalProcessingMargin": 10}
    assert estimate_cost(prices, tokens_in=1_000_000, tokens_out=0, provider="openai",
                         inference_type="flex", regional_processing="eu") == pytest.approx(5.5)


def test_exact_costs_match_float_costs():
    prices = {**BASE, **LONG, "cacheWriteInputCostMultiplier": 1.25}
    loose = cost_breakdown(prices, tokens_in=123_457, tokens_out=9_876, cached_tokens=1_001,
                           cache_write_tokens=17, reasoning_tokens=33)
    exact = Pricer(prices).text_cost(counter_buckets(loose["counters"]))
    assert isinstance(exact, Decimal) and loose["total"] == float(exact)
    assert sum(loose["parts"].values()) == pytest.approx(loose["total"], rel=1e-12)


# -- properties ---------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
rate = st.one_of(st.integers(0, 1000), st.floats(0, 1000, **finite))
counts = st.integers(0, 10_000_000)


@st.composite
def price_sets(draw, long_not_cheaper=False):
    prices = {"costInTokensPerMillion": draw(rate), "costInCachedContextTokensPerMillion": draw(rate),
              "costOutTokensPerMillion": draw(rate), "currency": "USD"}
    if draw(st.booleans()):
        prices["longContextTokenThreshold"] = draw(st.integers(1, 5_000_000))
        for key, base in (("longContextCostInTokensPerMillion", "costInTokensPerMillion"),
                          ("longContextCostInCachedContextTokensPerMillion", "costInCachedContextTokensPerMillion"),
                          ("longContextCostOutTokensPerMillion", "costOutTokensPerMillion")):
            if draw(st.booleans()):
                extra = draw(rate)
                prices[key] = prices[base] + extra if long_not_cheaper else extra
    for key in ("cacheWriteInputCostMultiplier", "costPerThousandWebSearches", "regionalProcessingMargin"):
        if draw(st.booleans()):
            prices[key] = draw(st.floats(0, 100, **finite))
    return prices


@given(prices=price_sets(), usage=st.fixed_dictionaries({
    "tokens_in": counts, "tokens_out": counts, "cached_tokens": counts, "cache_write_tokens": counts,
    "reasoning_tokens": counts, "audio_tokens": counts, "image_tokens": counts,
    "web_searches": st.integers(0, 1000)}),
    tier=st.sampled_from([None, "flex", "priority", "fast"]), region=st.sampled_from([None, "eu"]))
def test_cost_is_never_negative(prices, usage, tier, region):
    cost = estimate_cost(prices, provider="openai", inference_type=tier, regional_processing=region, **usage)
    assert cost >= 0 and math.isfinite(cost)


@given(prices=price_sets(), counters=st.fixed_dictionaries({key: counts for key in COUNTERS}),
       key=st.sampled_from(COUNTERS), more=st.integers(1, 1_000_000))
def test_cost_is_monotone_in_each_counter(prices, counters, key, more):
    before = Pricer(prices).text_cost(counter_buckets(counters))
    after = Pricer(prices).text_cost(counter_buckets({**counters, key: counters[key] + more}))
    assert after >= before


@given(prices=price_sets(long_not_cheaper=True), tokens_in=counts, tokens_out=counts,
       cached=counts, reasoning=counts, which=st.sampled_from(["tokens_in", "tokens_out", "reasoning_tokens"]),
       more=st.integers(1, 1_000_000))
def test_cost_is_monotone_in_the_provider_totals(prices, tokens_in, tokens_out, cached, reasoning, which, more):
    # More input, output or reasoning never costs less (with long-context
    # rates not below the standard ones, as providers set them).
    usage = dict(tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=min(cached, tokens_in),
                 reasoning_tokens=reasoning)
    larger = dict(usage, **{which: usage[which] + more})
    assert estimate_cost(prices, **larger) >= estimate_cost(prices, **usage) * (1 - 1e-12)


@pytest.mark.parametrize("summed, exact", [
    (None, 0), (7, 7), (7.0, 7), (0.1, Decimal("0.1")), (Decimal("12.000"), 12), (Decimal("-0"), 0),
    (Decimal("2.5"), Decimal("2.5")), (Decimal(10) ** 30, 10 ** 30),
])
def test_a_sum_sql_returned_becomes_an_exact_number(summed, exact):
    """SQLite adds REAL values as floats, PostgreSQL's numeric arrives as a
    Decimal: a whole sum is an int, a fraction the Decimal of its text."""
    found = exact_sum(summed)
    assert found == exact and type(found) is type(exact)
    nan = exact_sum(Decimal("NaN"))
    assert isinstance(nan, Decimal) and nan.is_nan()
