"""Price catalogs: genai-prices and LiteLLM imports, provenance, drift, and
agreement with genai-prices' own calculation."""
import json
import random
import sys
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from psai import PsAiModel, catalog
from psai.cli import cli
from psai.fields import UTC
from psai.pricing import estimate_cost

from conftest import IN_CI

try:
    import genai_prices
except ImportError:  # psai[catalog]; `make test` installs it, so under CI=true its absence fails the run
    if IN_CI:
        raise
    pytest.skip("genai-prices is not installed (pip install 'psai[catalog]')", allow_module_level=True)
from genai_prices.data import providers as GENAI_PROVIDERS  # noqa: E402
from genai_prices.types import TimeOfDateConstraint  # noqa: E402

GENAI_VERSION = genai_prices.__version__


def genai_model(source_model):
    provider_id, _, model_id = source_model.partition("/")
    provider = next(p for p in GENAI_PROVIDERS if p.id == provider_id)
    return provider, next(m for m in provider.models if m.id == model_id)


def run(backend, *args):
    result = CliRunner().invoke(cli, ["--database", backend.url, *args])
    psai.connect(backend.url)  # the CLI connected on its own
    return result


def test_import_openai_and_anthropic_with_provenance_then_drift(db, backend):
    result = catalog.import_catalog("genai-prices", providers=["openai", "anthropic"], user_id=1, organization_id=2)
    expected = catalog.read_catalog("genai-prices", providers=["openai", "anthropic"])
    assert result["source_version"] == GENAI_VERSION
    assert {m["source_model"] for m in result["models"]} == set(expected["entries"])
    assert len(result["models"]) > 100 and all(m["action"] == "imported" for m in result["models"])
    assert PsAiModel.select().count() == len(result["models"])
    assert result["skipped"] == expected["skipped"]  # each with its reason
    assert all(result["skipped"].values())

    gpt = PsAiModel.get(PsAiModel.name == "openai/gpt-4o")
    assert gpt.configuration["model"] == "gpt-4o" and gpt.configuration["provider"] == "openai"
    assert gpt.configuration["prices"]["costInTokensPerMillion"] == 2.5
    origin = catalog.provenance(gpt)
    assert (origin["source"], origin["source_version"], origin["source_model"]) == (
        "genai-prices", GENAI_VERSION, "openai/gpt-4o")
    assert origin["imported_at"] is not None
    assert catalog.provenance(gpt.id) == origin == catalog.provenance(str(gpt.uuid))
    typed_in = PsAiModel.create(user_id=1, organization_id=2, name="mine", configuration=gpt.configuration)
    assert catalog.provenance(typed_in) is None

    assert catalog.diff("genai-prices") == []
    sonnet = PsAiModel.get(PsAiModel.name == "anthropic/claude-sonnet-4-5")
    sonnet.update_configuration({"prices": {"costOutTokensPerMillion": 99}})
    [difference] = catalog.diff("genai-prices")
    assert difference == {"model_id": sonnet.id, "name": sonnet.name, "source_model": "anthropic/claude-sonnet-4-5",
                          "field": "prices.costOutTokensPerMillion", "stored": 99,
                          "source": expected["entries"]["anthropic/claude-sonnet-4-5"]
                          ["configuration"]["prices"]["costOutTokensPerMillion"]}
    assert catalog.diff("genai-prices", apply=True) == [difference]
    assert catalog.diff("genai-prices") == []
    history = psai.price_history(sonnet)
    assert [v["prices"]["costOutTokensPerMillion"] for v in history] == [
        difference["source"], 99, difference["source"]]


def test_a_second_import_updates_in_place_keeping_history_links_and_your_keys(db):
    catalog.import_catalog("genai-prices", models=["gpt-4o"], providers=["openai"], user_id=1, organization_id=2)
    [gpt] = PsAiModel.select()
    agent = psai.PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a"})
    agent.ai_models.add(gpt)
    gpt.update_configuration({"prices": {"costInTokensPerMillion": 1, "regionalProcessingMargin": 10},
                              "maxTokensOut": 1000})
    again = catalog.import_catalog("genai-prices", models=["gpt-4o"], providers=["openai"], user_id=1,
                                   organization_id=2, dry_run=True)
    assert [m["action"] for m in again["models"]] == ["would update"]
    assert PsAiModel.get_by_id(gpt.id).configuration["prices"]["costInTokensPerMillion"] == 1  # dry run
    again = catalog.import_catalog("genai-prices", models=["openai/gpt-4o"], providers=["openai"], user_id=1,
                                   organization_id=2)
    assert [(m["action"], m["model_id"]) for m in again["models"]] == [("updated", gpt.id)]
    assert PsAiModel.select().count() == 1  # never duplicated
    stored = PsAiModel.get_by_id(gpt.id).configuration
    assert stored["prices"]["costInTokensPerMillion"] == 2.5
    assert stored["prices"]["regionalProcessingMargin"] == 10 and stored["maxTokensOut"] == 1000  # yours
    assert agent.select_model("text", "large").id == gpt.id
    assert [v["prices"]["costInTokensPerMillion"] for v in psai.price_history(gpt)] == [2.5, 1, 2.5]
    third = catalog.import_catalog("genai-prices", models=["gpt-4o"], providers=["openai"], user_id=1,
                                   organization_id=2)
    assert [m["action"] for m in third["models"]] == ["unchanged"]
    # Another organization gets its own row.
    catalog.import_catalog("genai-prices", models=["gpt-4o"], providers=["openai"], user_id=1, organization_id=3)
    assert PsAiModel.select().count() == 2


def test_what_the_configuration_cannot_say_is_reported(db):
    entries = catalog.read_catalog("genai-prices")
    def notes(source_model):
        return " | ".join(entries["entries"][source_model]["unexpressed"])
    # 1-hour cache writes are said now, by psai's own key: Haiku 4.5's $2/MTok on $1 input.
    haiku = entries["entries"]["anthropic/claude-haiku-4-5"]["configuration"]["prices"]
    assert haiku["cacheWrite1hInputCostMultiplier"] == 2.0 and haiku["cacheWriteInputCostMultiplier"] == 1.25
    assert "1-hour cache writes" not in notes("anthropic/claude-haiku-4-5")
    assert "processing=batch" in notes("anthropic/claude-haiku-4-5")
    assert "a per-request fee" in notes("perplexity/sonar")
    deepseek = [k for k, e in entries["entries"].items()
                if k.startswith("deepseek/") and "time-of-day" in " ".join(e["unexpressed"])]
    assert deepseek
    assert "PolicySynth's rules price it differently" in notes("openai/gpt-5.4")
    assert any("price tiers" in reason for reason in entries["skipped"].values())
    assert entries["skipped"]  # audio or image only: no input token price
    assert all(entries["skipped"].values())


def test_sizes_and_types(db):
    assert [catalog.default_size({"costInTokensPerMillion": rate}) for rate in (0.02, 0.5, 1.99, 2, 15)] == [
        "small", "medium", "medium", "large", "large"]
    catalog.import_catalog("genai-prices", models=["gpt-4o-mini", "text-embedding-3-small", "gpt-4o"],
                           providers=["openai"], user_id=1, organization_id=2)
    by_model = {m.configuration["model"]: m.configuration for m in PsAiModel.select()}
    assert by_model["gpt-4o-mini"]["modelSize"] == "small" and by_model["gpt-4o"]["modelSize"] == "large"
    assert by_model["text-embedding-3-small"]["type"] == "embedding"
    assert by_model["gpt-4o"]["maxTokensOut"] == 4096 and by_model["gpt-4o"]["maxContextTokens"] == 128000
    catalog.import_catalog("genai-prices", models=["o3"], providers=["openai"], user_id=1, organization_id=2,
                           size="medium", temperature=0.2)
    o3 = PsAiModel.where_config(model="o3").get().configuration
    assert (o3["modelSize"], o3["defaultTemperature"]) == ("medium", 0.2)


def _time_outside_off_peak(model):
    """A moment when none of the model's time-of-day prices applies."""
    moment = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    windows = [c.constraint for c in (model.prices if isinstance(model.prices, list) else [])
               if isinstance(c.constraint, TimeOfDateConstraint)]
    for hour in range(24):
        candidate = moment + timedelta(hours=hour)
        if not any(window.active(candidate) for window in windows):
            return candidate
    raise AssertionError("no hour outside the off-peak windows of %s" % model.id)


def _features(usage, threshold):
    regime = " from %d input tokens" % threshold if threshold and usage["tokens_in"] >= threshold else ""
    ordinary = usage["tokens_in"] - usage["cached_tokens"] - usage["cache_write_tokens"]
    used = {"input" + regime: ordinary, "cached input" + regime: usage["cached_tokens"],
            "cache writes" + regime: usage["cache_write_tokens"], "output" + regime: usage["tokens_out"],
            "reasoning tokens" + regime: usage["reasoning_tokens"],
            "web searches": usage["web_searches"]}
    return {what for what, count in used.items() if count}


CONTEXTS = {None: None, "flex": {"service_tier": "flex"}, "priority": {"service_tier": "priority"}}


def test_psai_and_genai_prices_agree_on_random_calls(db):
    """Hundreds of random calls over the imported models: psai's cost of the
    stored configuration equals genai-prices' calc_price to 1e-9, wherever the
    import did not report a difference."""
    providers = ["openai", "anthropic", "google", "deepseek", "perplexity", "mistral"]
    result = catalog.import_catalog("genai-prices", providers=providers, user_id=1, organization_id=2)
    stored = {catalog.provenance(m)["source_model"]: m.configuration for m in PsAiModel.select()}
    entries = catalog.read_catalog("genai-prices", providers=providers)["entries"]
    assert set(stored) == {m["source_model"] for m in result["models"]}
    rng = random.Random(1125)
    compared = tiers_compared = long_compared = 0
    names = sorted(stored)
    # Half the calls on models with long-context or tier prices, where the rules are subtle.
    subtle = [name for name in names if "longContextTokenThreshold" in stored[name]["prices"]
              or "flexTokensIn" in stored[name]["prices"] or "priorityTokensIn" in stored[name]["prices"]]
    for _ in range(1000):
        source_model = rng.choice(rng.choice([names, subtle]))
        configuration, entry = stored[source_model], entries[source_model]
        prices = configuration["prices"]
        provider, model = genai_model(source_model)
        threshold = prices.get("longContextTokenThreshold")
        tier = rng.choice([t for t in CONTEXTS if t is None or "%sTokensIn" % t in prices])
        top = 2 * threshold if threshold else 400_000
        tokens_in = rng.choice([rng.randint(0, top), threshold or 0, max((threshold or 1) - 1, 0)])
        cached = rng.randint(0, tokens_in)
        cache_write = rng.randint(0, tokens_in - cached)
        tokens_out = rng.randint(0, 50_000)
        usage = {"tokens_in": tokens_in, "cached_tokens": cached, "cache_write_tokens": cache_write,
                 "tokens_out": tokens_out, "reasoning_tokens": rng.randint(0, tokens_out),
                 "web_searches": rng.choice([0, 0, 3])}
        if any((tier or "standard", what) in entry["disagreements"] for what in _features(usage, threshold)):
            continue
        ours = estimate_cost(prices, provider=configuration["provider"], inference_type=tier, **usage)
        moment = _time_outside_off_peak(model)
        calculation = model.calc_price(catalog.genai_usage(**usage), provider, genai_request_timestamp=moment,
                                       price_context=CONTEXTS[tier])
        fee = model.calc_price(catalog.genai_usage(), provider, genai_request_timestamp=moment).total_price
        if fee:  # a per-request fee, which the import reported: not PolicySynth's to price
            assert any("per-request fee" in note for note in entry["unexpressed"])
        assert abs(Decimal(ours) - (calculation.total_price - fee)) <= Decimal("1e-9"), (source_model, tier, usage)
        compared += 1
        tiers_compared += tier is not None
        long_compared += bool(threshold and tokens_in >= threshold)
    assert compared >= 800 and tiers_compared >= 100 and long_compared >= 100


def test_genai_prices_top_level_calc_price_on_a_known_model(db):
    catalog.import_catalog("genai-prices", models=["claude-sonnet-4-5"], providers=["anthropic"], user_id=1,
                           organization_id=2)
    sonnet = PsAiModel.select().get()
    usage = {"tokens_in": 250_000, "cached_tokens": 50_000, "cache_write_tokens": 10_000, "tokens_out": 3_000}
    theirs = genai_prices.calc_price(catalog.genai_usage(**usage), "claude-sonnet-4-5",
                                     provider_id="anthropic").total_price
    ours = estimate_cost(sonnet.configuration["prices"], provider="anthropic", **usage)
    assert abs(Decimal(ours) - theirs) <= Decimal("1e-9")


def test_catalog_from_the_command_line(backend):
    base = ["--user-id", "1", "--organization-id", "2"]
    dry = run(backend, "catalog", "import", "genai-prices", "--provider", "anthropic", *base, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert {m["action"] for m in json.loads(dry.stdout)["models"]} == {"would import"}
    assert PsAiModel.select().count() == 0
    done = run(backend, "catalog", "import", "genai-prices", "--provider", "openai", "--provider", "anthropic", *base)
    assert done.exit_code == 0, done.output
    assert "anthropic/claude-haiku-4-5" in done.stdout and "not expressed: " in done.stdout
    assert run(backend, "catalog", "diff", "genai-prices", "--json").stdout.strip() == "[]"
    assert run(backend, "catalog", "diff", "genai-prices").stdout.strip() == "no differences"
    gpt = PsAiModel.get(PsAiModel.name == "openai/gpt-4o")
    assert run(backend, "models", "update", str(gpt.id), "--set", "prices.costInTokensPerMillion=3").exit_code == 0
    drift = json.loads(run(backend, "catalog", "diff", "genai-prices", "--json").stdout)
    assert [(d["model_id"], d["field"], d["stored"], d["source"]) for d in drift] == [
        (gpt.id, "prices.costInTokensPerMillion", 3, 2.5)]
    assert run(backend, "catalog", "diff", "genai-prices", "--apply").exit_code == 0
    assert json.loads(run(backend, "catalog", "diff", "genai-prices", "--json").stdout) == []
    shown = json.loads(run(backend, "models", "show", str(gpt.id), "--json").stdout)
    assert shown["provenance"]["source"] == "genai-prices" and shown["provenance"]["source_model"] == "openai/gpt-4o"
    assert "provenance.source_version" in run(backend, "models", "show", str(gpt.id)).stdout
    bad = run(backend, "catalog", "import", "nowhere", *base)
    assert bad.exit_code == 2


LITELLM_MAP = {
    "sample_spec": {"input_cost_per_token": 0.0, "mode": "one of ..."},
    "gpt-4o": {"max_output_tokens": 16384, "max_input_tokens": 128000, "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
               "input_cost_per_audio_token": 4e-05, "litellm_provider": "openai", "mode": "chat"},
    "claude-haiku-4-5": {"max_output_tokens": 64000, "input_cost_per_token": 1e-06, "output_cost_per_token": 5e-06,
                         "cache_creation_input_token_cost": 1.25e-06, "cache_read_input_token_cost": 1e-07,
                         "litellm_provider": "anthropic", "mode": "chat"},
    "dall-e-3": {"output_cost_per_image": 0.04, "litellm_provider": "openai", "mode": "image_generation"},
}


def test_litellm_from_a_file_and_its_alias(backend, db, tmp_path):
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(LITELLM_MAP))
    result = catalog.import_catalog("litellm", file=str(path), user_id=1, organization_id=2)
    assert {m["source_model"]: m["action"] for m in result["models"]} == {
        "gpt-4o": "imported", "claude-haiku-4-5": "imported"}
    assert result["skipped"] == {"dall-e-3": "no per-token input and output prices"}
    [gpt_notes] = [m["unexpressed"] for m in result["models"] if m["source_model"] == "gpt-4o"]
    assert gpt_notes == []  # its audio input rate is psai's own key
    gpt = PsAiModel.get(PsAiModel.name == "gpt-4o")
    assert gpt.configuration["prices"]["costInAudioTokensPerMillion"] == 40
    haiku = PsAiModel.get(PsAiModel.name == "claude-haiku-4-5")
    assert haiku.configuration["prices"]["cacheWriteInputCostMultiplier"] == 1.25
    assert haiku.configuration["maxTokensOut"] == 64000 and haiku.configuration["modelSize"] == "medium"
    origin = catalog.provenance(haiku)
    assert origin["source"] == "litellm" and origin["source_version"].startswith("file sha256:")
    assert catalog.diff("litellm", file=str(path)) == []
    newer = json.loads(json.dumps(LITELLM_MAP))
    newer["gpt-4o"]["input_cost_per_token"] = 2e-06
    del newer["claude-haiku-4-5"]
    path.write_text(json.dumps(newer))
    drift = catalog.diff("litellm", file=str(path))
    assert [(d["source_model"], d["field"], d["stored"], d["source"]) for d in drift] == [
        ("claude-haiku-4-5", "model", "claude-haiku-4-5", None),
        ("gpt-4o", "prices.costInTokensPerMillion", 2.5, 2.0)]
    # The old command is an alias of the catalog import: it updates, with history.
    alias = run(backend, "models", "import-litellm", str(path), "--user-id", "1", "--organization-id", "2", "--json")
    assert alias.exit_code == 0, alias.output
    assert [m["action"] for m in json.loads(alias.stdout)["models"]] == ["updated"]
    assert PsAiModel.select().count() == 2
    assert [v["prices"]["costInTokensPerMillion"] for v in psai.price_history("gpt-4o")] == [2.5, 2]


def test_litellm_is_read_from_the_installed_package_without_importing_it(db, tmp_path, monkeypatch):
    package = tmp_path / "site" / "litellm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('importing litellm fetches prices from the network')\n")
    (package / catalog.LITELLM_FILE).write_text(json.dumps(LITELLM_MAP))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = catalog.import_catalog("litellm", providers=["anthropic"], user_id=1, organization_id=2)
    assert [m["source_model"] for m in result["models"]] == ["claude-haiku-4-5"]
    assert "litellm" not in sys.modules


def test_litellm_missing_is_a_clear_error(db, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litellm" else real(name, *a))
    with pytest.raises(catalog.CatalogUnavailableError, match="--file PATH"):
        catalog.import_catalog("litellm", user_id=1, organization_id=2)
