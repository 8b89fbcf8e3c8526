"""hypothesis strategies for configurations, valid and invalid."""
import copy

from hypothesis import strategies as st

from psai.enums import InferenceType, PsAiModelSize, PsAiModelType, ReasoningMode
from psai.schemas import AiModelConfigurationSchema, ModelPricesSchema

finite = dict(allow_nan=False, allow_infinity=False)
rates = st.one_of(st.integers(0, 10_000), st.floats(0, 10_000, **finite))
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"),
                min_size=1, max_size=40)

OPTIONAL_RATES = [
    "costPerThousandWebSearches", "flexTokensIn", "flexTokensCachedIn", "flexTokensOut",
    "priorityTokensIn", "priorityTokensCachedIn", "priorityTokensOut",
    "fastTokensIn", "fastTokensCachedIn", "fastTokensOut",
]


@st.composite
def prices(draw):
    result = {
        "costInTokensPerMillion": draw(rates),
        "costOutTokensPerMillion": draw(rates),
        "costInCachedContextTokensPerMillion": draw(rates),
        "currency": draw(st.sampled_from(["USD", "EUR", "ISK"])),
    }
    for key in draw(st.lists(st.sampled_from(OPTIONAL_RATES), unique=True)):
        result[key] = draw(rates)
    if draw(st.booleans()):
        result["longContextTokenThreshold"] = draw(st.integers(1, 2_000_000))
        for key in ("longContextCostInTokensPerMillion", "longContextCostInCachedContextTokensPerMillion",
                    "longContextCostOutTokensPerMillion"):
            if draw(st.booleans()):
                result[key] = draw(rates)
    if draw(st.booleans()):
        result["regionalProcessingMargin"] = draw(st.floats(0, 100, **finite))
    if draw(st.booleans()):
        result["cacheWriteInputCostMultiplier"] = draw(st.floats(0, 10, **finite))
    if draw(st.booleans()):
        result["flexPriorityTokensEnabledOnLongContext"] = draw(st.booleans())
    return result


@st.composite
def configurations(draw):
    result = {
        "type": draw(st.sampled_from([t.value for t in PsAiModelType])),
        "modelSize": draw(st.sampled_from([s.value for s in PsAiModelSize])),
        "model": draw(names),
        "provider": draw(st.sampled_from(["openai", "anthropic", "google", "azure", "mistral"])),
        "active": draw(st.booleans()),
        "prices": draw(prices()),
        "maxTokensOut": draw(st.integers(1, 1_000_000)),
        "defaultTemperature": draw(st.floats(0, 2, **finite)),
    }
    optional = {
        "apiModel": names,
        "accountingVersion": st.sampled_from([1, 2]),
        "inferenceType": st.sampled_from([t.value for t in InferenceType]),
        "regionalProcessing": st.just("eu"),
        "maxContextTokens": st.integers(1, 10_000_000),
        "deploymentName": names,
        "endpoint": st.just("https://example.openai.azure.com/"),
        "limitTPM": st.integers(0, 10**9),
        "limitRPM": st.integers(0, 10**6),
        "timeoutMs": st.integers(1, 10**7),
        "reasoningMode": st.sampled_from([m.value for m in ReasoningMode]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        result[key] = draw(optional[key])
    return result


NUMBER_KEYS = ["maxTokensOut", "defaultTemperature", "prices.costInTokensPerMillion",
               "prices.costOutTokensPerMillion", "prices.costInCachedContextTokensPerMillion"]
bad_numbers = st.sampled_from([-1, -0.5, float("nan"), float("inf"), float("-inf"), "30", True, None, [], {}])
bad_scalars = st.one_of(st.integers(), st.floats(), st.text(max_size=10), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=2))


def _set(config, path, value):
    *parents, last = path.split(".")
    target = config
    for key in parents:
        target = target[key]
    target[last] = value


def _remove(config, path):
    *parents, last = path.split(".")
    target = config
    for key in parents:
        target = target[key]
    del target[last]


@st.composite
def invalid_configurations(draw):
    """A valid configuration with one thing broken. Returns (config, path)."""
    config = copy.deepcopy(draw(configurations()))
    kind = draw(st.sampled_from(["missing", "bad_number", "bad_enum", "unknown", "bad_bool",
                                 "bad_currency", "bad_prices"]))
    if kind == "missing":
        path = draw(st.sampled_from(
            [n for n, f in AiModelConfigurationSchema._declared_fields.items() if f.required]
            + ["prices." + n for n, f in ModelPricesSchema._declared_fields.items() if f.required]))
        _remove(config, path)
    elif kind == "bad_number":
        path = draw(st.sampled_from(NUMBER_KEYS))
        _set(config, path, draw(bad_numbers))
    elif kind == "bad_enum":
        path = draw(st.sampled_from(["type", "modelSize", "inferenceType", "reasoningMode",
                                     "regionalProcessing"]))
        value = draw(st.one_of(st.text(max_size=12), st.integers()))
        valid = AiModelConfigurationSchema._declared_fields[path].validators[0].choices
        if value in valid:
            value = value + "x"
        _set(config, path, value)
    elif kind == "unknown":
        key = draw(st.text(min_size=1, max_size=20).filter(
            lambda k: k not in AiModelConfigurationSchema._declared_fields))
        path = key
        config[key] = draw(bad_scalars)  # the key may hold dots: set it directly
    elif kind == "bad_bool":
        path = "active"
        _set(config, path, draw(st.one_of(st.integers(), st.text(max_size=5), st.none())))
    elif kind == "bad_currency":
        path = "prices.currency"
        _set(config, path, draw(st.one_of(st.text(max_size=6).filter(lambda c: not (
            len(c) == 3 and c.isascii() and c.isalpha() and c.isupper())), st.integers())))
    else:
        path = "prices"
        _set(config, path, draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=5),
                                          st.integers(), st.none())))
    return config, path
