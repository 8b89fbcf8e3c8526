"""Adding a model in one line (docs/configuration.md): flags for what a
script cares about, documented defaults for the rest, errors that name the
flag typed."""
import json

import pytest

import psai
from psai import PsAiModel
from psai.catalog import catalog_defaults
from psai.query import PRICE_FLAGS, model_configuration


def test_a_model_in_one_line(run):
    # A model no catalog knows: the documented defaults.
    added = json.loads(run("models", "add", "GPT-4o", "--provider", "openai", "--model", "gpt-4o-of-our-own",
                           "--in", "2.5", "--out", "10", "--currency", "usd", "--json").output)
    assert (added["name"], added["user_id"], added["organization_id"]) == ("GPT-4o", 1, 1)
    assert added["configuration"] == {
        "type": "text", "modelSize": "medium", "model": "gpt-4o-of-our-own", "provider": "openai", "active": True,
        "prices": {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10,
                   "costInCachedContextTokensPerMillion": 2.5, "currency": "USD"},
        "maxTokensOut": 4096, "defaultTemperature": 0.7}


COST_MAP = {
    "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05, "max_output_tokens": 16384, "max_input_tokens": 128000},
    "gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.5e-07,
                    "output_cost_per_token": 6e-07, "max_output_tokens": 8192},
}


def test_size_and_output_limit_from_a_catalog_that_knows_the_model(run, tmp_path):
    """Before: medium and 4096 whatever the model; now as `--from` derives
    them (size by the catalog's input price), flags given still winning."""
    cost_map = tmp_path / "cost_map.json"
    cost_map.write_text(json.dumps(COST_MAP))

    def add(name, *args):
        added = json.loads(run("models", "add", name, "--in", "1", "--out", "2", *args, "--json").output)
        return added["configuration"]["modelSize"], added["configuration"]["maxTokensOut"]
    litellm = ["--catalog-file", str(cost_map)]
    assert add("4o", "--provider", "openai", "--model", "gpt-4o", *litellm) == ("large", 16384)
    assert add("mini", "--provider", "openaiResponses", "--model", "gpt-4o-mini", *litellm) == ("small", 8192)
    assert add("sized", "--provider", "openai", "--model", "gpt-4o", "--size", "medium", "--max-tokens-out", "100",
               *litellm) == ("medium", 100)
    # Only the provider's own entries.
    assert add("other", "--provider", "anthropic", "--model", "gpt-4o", *litellm) == ("medium", 4096)
    assert catalog_defaults("openai", "gpt-4o*", file=cost_map) == {}  # a name is never a glob
    assert add("unknown", "--provider", "ollama", "--any-provider", "--model", "llama3", *litellm) == ("medium", 4096)
    pytest.importorskip("genai_prices")  # what genai-prices (no output limits) says without a cost map
    assert add("4o from genai-prices", "--provider", "openai", "--model", "gpt-4o") == ("large", 4096)
    assert catalog_defaults("openai", "gpt-4o-mini") == {"size": "small", "max_tokens_out": 4096}


def test_every_price_key_has_a_flag(run):
    values = {"currency": "eur", "flex-priority-on-long-context": "true"}
    args = []
    for number, flag in enumerate(PRICE_FLAGS, 1):
        args += ["--" + flag, values.get(flag, str(number))]
    added = json.loads(run("models", "add", "Everything", "--provider", "anthropic", "--model", "claude-x",
                           "--size", "large", "--max-tokens-out", "8192", "--temperature", "0.2",
                           *args, "--json").output)
    prices = added["configuration"]["prices"]
    assert set(prices) == set(PRICE_FLAGS.values())
    assert prices["cacheWriteInputCostMultiplier"] == list(PRICE_FLAGS).index("cache-write-multiplier") + 1
    assert prices["currency"] == "EUR" and prices["flexPriorityTokensEnabledOnLongContext"] is True
    assert (added["configuration"]["modelSize"], added["configuration"]["maxTokensOut"]) == ("large", 8192)


def test_errors_name_the_flag_typed(run):
    base = ["models", "add", "X", "--provider", "openai", "--model", "gpt-4o", "--in", "1", "--out", "2"]
    bad = run(*base, "--max-tokens-out", "-5", "--temperature", "9", code=2)
    assert "--max-tokens-out: " in bad.stderr and "--temperature: " in bad.stderr
    assert "configuration." not in bad.stderr
    assert "--cache-write-multiplier: " in run(*base, "--cache-write-multiplier", "-1", code=2).stderr
    assert "--in/--in-price: " in run(*base[:-4], "--in-price", "-1", "--out", "2", code=2).stderr
    unknown = run("models", "add", "X", "--provider", "opneai", "--model", "m", "--in", "1", "--out", "2", code=2)
    assert "--provider: Unknown provider 'opneai': one of openai, openaiResponses, anthropic, google, azure" \
        in unknown.stderr
    assert "give --model, --in" in run("models", "add", "X", "--provider", "openai", "--out", "1", code=2).stderr
    assert PsAiModel.select().count() == 0
    added = json.loads(run("models", "add", "Local", "--provider", "ollama", "--any-provider", "--model", "llama3",
                           "--in", "0", "--out", "0", "--json").output)
    assert added["configuration"]["provider"] == "ollama"


def test_the_same_in_python(db):
    configuration = model_configuration(provider="anthropic", model="claude-sonnet-4-5",
                                        prices={"costInTokensPerMillion": 3, "costOutTokensPerMillion": 15,
                                                "costInCachedContextTokensPerMillion": 0.3, "currency": "usd"})
    model = psai.add_model(name="Sonnet", configuration=configuration)
    assert model.configuration["prices"]["currency"] == "USD" and model.configuration["modelSize"] == "medium"
    with pytest.raises(psai.ValidationError, match="Unknown provider 'antropic'"):
        model_configuration(provider="antropic", model="m", prices={"costInTokensPerMillion": 1})
