"""Numbers and names psai shares across its layers, each said once: the
limits of PolicySynth's columns, the keys of its ``prices``, psai's JSON text."""
import datetime
import json
from functools import partial

__all__ = ["MAX_INTEGER", "MIN_INTEGER", "MAX_SAFE_INTEGER", "BASE_RATE_KEYS", "REQUIRED_RATE_KEYS",
           "LONG_CONTEXT_RATE_KEYS", "TIER_KEYS", "TIER_RATE_KEYS", "PRICE_KEYS", "OPTIONAL_NUMBER_KEYS",
           "CATALOG_PRICE_KEYS", "CACHE_WRITE_1H_KEY", "CACHE_WRITE_12H_KEY", "MODALITY_RATE_KEYS",
           "strict_json_dumps", "time_range_problem"]

# PolicySynth's ids, references and token counters are PostgreSQL INTEGERs
# (SQLite would store more, which PolicySynth could not read back).
MAX_INTEGER = 2 ** 31 - 1
MIN_INTEGER = -MAX_INTEGER - 1

# PolicySynth's timestamps are timestamptz, which holds years Python cannot
# read (BC, past 9999); psai writes only times whose UTC falls in years 1-9999.
TIME_RANGE_MESSAGE = "Out of range: in UTC it falls outside the years 1 to 9999."


def time_range_problem(value: datetime.datetime) -> str | None:
    """Why an aware time cannot be written (it could not be read back), or
    None. A naive time is taken as UTC, so it is always in range."""
    if value.tzinfo is None or 1 < value.year < 9999:  # only the first and last year can cross
        return None
    try:
        value.astimezone(datetime.timezone.utc)
    except OverflowError:
        return TIME_RANGE_MESSAGE
    return None


# JavaScript's Number.MAX_SAFE_INTEGER: PolicySynth reads configurations in Node.
MAX_SAFE_INTEGER = 2 ** 53 - 1

# -- the keys of a configuration's ``prices`` ------------------------------------

# The standard rates per million tokens: input, cached input, output.
BASE_RATE_KEYS = ("costInTokensPerMillion", "costInCachedContextTokensPerMillion", "costOutTokensPerMillion")
# The rates every priced model has (PolicySynth's required keys), in its order.
REQUIRED_RATE_KEYS = ("costInTokensPerMillion", "costOutTokensPerMillion", "costInCachedContextTokensPerMillion")
# The long-context rates, in the order of BASE_RATE_KEYS.
LONG_CONTEXT_RATE_KEYS = (
    "longContextCostInTokensPerMillion",
    "longContextCostInCachedContextTokensPerMillion",
    "longContextCostOutTokensPerMillion",
)
# An inference tier's rates, in the order of BASE_RATE_KEYS (input, cached input, output).
TIER_KEYS = {
    "flex": ("flexTokensIn", "flexTokensCachedIn", "flexTokensOut"),
    "priority": ("priorityTokensIn", "priorityTokensCachedIn", "priorityTokensOut"),
    "fast": ("fastTokensIn", "fastTokensCachedIn", "fastTokensOut"),
}
TIER_RATE_KEYS = tuple(key for keys in TIER_KEYS.values() for key in keys)

# psai's own rates per million tokens that are not text: audio input, audio
# output, image output (PolicySynth ignores them and prices those tokens as
# text; psai prices them at these, and without them leaves them unpriced).
MODALITY_RATE_KEYS = ("costInAudioTokensPerMillion", "costOutAudioTokensPerMillion", "costOutImageTokensPerMillion")

# Every key ``prices`` may hold, in ModelPricesSchema's order (a test holds them together).
PRICE_KEYS = (
    REQUIRED_RATE_KEYS + ("currency", "costPerThousandWebSearches", "cacheWriteInputCostMultiplier",
                          "cacheWrite1hInputCostMultiplier", "cacheWrite12hInputCostMultiplier")
    + MODALITY_RATE_KEYS + LONG_CONTEXT_RATE_KEYS + ("longContextTokenThreshold", "regionalProcessingMargin")
    + TIER_RATE_KEYS + ("flexPriorityTokensEnabledOnLongContext",)
)
# The optional keys whose value is a number.
OPTIONAL_NUMBER_KEYS = (
    ("costPerThousandWebSearches", "cacheWriteInputCostMultiplier", "cacheWrite1hInputCostMultiplier",
     "cacheWrite12hInputCostMultiplier") + MODALITY_RATE_KEYS + LONG_CONTEXT_RATE_KEYS
    + ("longContextTokenThreshold",) + TIER_RATE_KEYS
)
# psai's own key (PolicySynth ignores it): 1-hour cache writes cost the input rate times this.
CACHE_WRITE_1H_KEY = "cacheWrite1hInputCostMultiplier"
# psai's own key: OpenAI's 12-hour cache writes cost the input rate times this (30-minute
# writes are ordinary cache writes, priced with cacheWriteInputCostMultiplier).
CACHE_WRITE_12H_KEY = "cacheWrite12hInputCostMultiplier"

# The keys a catalog writes and compares; the rest (the EU margin) is the user's.
CATALOG_PRICE_KEYS = tuple(key for key in PRICE_KEYS if key != "regionalProcessingMargin")

# NaN and Infinity are not JSON; PostgreSQL's jsonb refuses them, so SQLite must too.
strict_json_dumps = partial(json.dumps, allow_nan=False, separators=(",", ":"))
