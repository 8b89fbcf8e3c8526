"""Import of LiteLLM's model cost map, on a small file in its format."""
import json

import pytest
from click.testing import CliRunner

import psai
from psai import PsAiModel
from psai.cli import cli
from psai.catalog import import_catalog
from psai._litellm import map_entry

COST_MAP = {
    "sample_spec": {"max_tokens": "LEGACY parameter", "input_cost_per_token": 0.0, "mode": "one of ..."},
    "gpt-4o": {
        "max_tokens": 16384, "max_input_tokens": 128000, "max_output_tokens": 16384,
        "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
        "cache_read_input_token_cost": 1.25e-06,
        "input_cost_per_token_flex": 1.25e-06, "output_cost_per_token_flex": 5e-06,
        "input_cost_per_token_priority": 4.25e-06,
        "search_context_cost_per_query": {"search_context_size_low": 0.03, "search_context_size_medium": 0.035},
        "litellm_provider": "openai", "mode": "chat", "supports_vision": True,
    },
    "gemini/gemini-2.5-pro": {
        "max_input_tokens": 1048576, "max_output_tokens": 65535,
        "input_cost_per_token": 1.25e-06, "input_cost_per_token_above_200k_tokens": 2.5e-06,
        "output_cost_per_token": 1e-05, "output_cost_per_token_above_200k_tokens": 1.5e-05,
        "cache_read_input_token_cost": 3.1e-07, "cache_read_input_token_cost_above_200k_tokens": 6.25e-07,
        "litellm_provider": "gemini", "mode": "chat",
    },
    "claude-sonnet-4-20250514": {
        "max_input_tokens": 200000, "max_output_tokens": 64000,
        "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
        "cache_creation_input_token_cost": 3.75e-06, "cache_read_input_token_cost": 3e-07,
        "litellm_provider": "anthropic", "mode": "chat",
    },
    "text-embedding-3-small": {
        "max_tokens": 8191, "max_input_tokens": 8191, "output_vector_size": 1536,
        "input_cost_per_token": 2e-08, "output_cost_per_token": 0.0,
        "litellm_provider": "openai", "mode": "embedding",
    },
    "dall-e-3": {"mode": "image_generation", "litellm_provider": "openai", "output_cost_per_pixel": 0.0},
    "omni-moderation-latest": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                               "max_output_tokens": 0, "litellm_provider": "openai", "mode": "moderation"},
    "odd/two-thresholds": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                           "input_cost_per_token_above_128k_tokens": 2e-06,
                           "output_cost_per_token_above_200k_tokens": 4e-06,
                           "max_output_tokens": 100, "litellm_provider": "odd", "mode": "chat"},
}


def test_mapping_rules():
    gpt = map_entry("gpt-4o", COST_MAP["gpt-4o"], model_size="large")
    assert gpt["prices"] == {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10,
                             "costInCachedContextTokensPerMillion": 1.25, "currency": "USD",
                             "flexTokensIn": 1.25, "flexTokensOut": 5, "priorityTokensIn": 4.25,
                             "costPerThousandWebSearches": 35}
    assert (gpt["type"], gpt["model"], gpt["provider"], gpt["maxTokensOut"], gpt["maxContextTokens"]) == (
        "text", "gpt-4o", "openai", 16384, 128000)
    gemini = map_entry("gemini/gemini-2.5-pro", COST_MAP["gemini/gemini-2.5-pro"], model_size="large")
    assert gemini["model"] == "gemini-2.5-pro"
    assert {k: v for k, v in gemini["prices"].items() if k.startswith("longContext")} == {
        "longContextTokenThreshold": 200_000, "longContextCostInTokensPerMillion": 2.5,
        "longContextCostOutTokensPerMillion": 15, "longContextCostInCachedContextTokensPerMillion": 0.625}
    claude = map_entry("claude-sonnet-4-20250514", COST_MAP["claude-sonnet-4-20250514"], model_size="medium")
    assert claude["prices"]["cacheWriteInputCostMultiplier"] == 1.25
    assert claude["prices"]["costInCachedContextTokensPerMillion"] == 0.3


@pytest.mark.parametrize("name, reason", [
    ("text-embedding-3-small", "no max_output_tokens"),
    ("dall-e-3", "no per-token input and output prices"),
    ("omni-moderation-latest", "mode 'moderation' has no PolicySynth model type"),
    ("odd/two-thresholds", "long-context prices at several thresholds (128000, 200000)"),
])
def test_entries_that_cannot_be_mapped_are_reported(name, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        map_entry(name, COST_MAP[name], model_size="small")


def _import(tmp_path, cost_map, **options):
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(cost_map))
    return import_catalog("litellm", file=str(path), user_id=1, organization_id=2, **options)


def test_import_creates_models_and_reports_the_rest(db, tmp_path):
    result = _import(tmp_path, COST_MAP, size="medium")
    assert sorted(m["source_model"] for m in result["models"]) == [
        "claude-sonnet-4-20250514", "gemini/gemini-2.5-pro", "gpt-4o"]
    assert set(result["skipped"]) == {"text-embedding-3-small", "dall-e-3", "omni-moderation-latest",
                                      "odd/two-thresholds"}
    assert "sample_spec" not in result["skipped"]
    gemini = PsAiModel.where_config(provider="gemini").get()
    assert gemini.configuration["prices"]["longContextTokenThreshold"] == 200_000
    # Importing a newer map updates the imported row in place; the old prices stay in its history.
    newer = json.loads(json.dumps(COST_MAP))
    newer["gpt-4o"]["input_cost_per_token"] = 2e-06
    _import(tmp_path, newer, size="medium", providers={"openai"})
    [gpt] = PsAiModel.history("gpt-4o")
    assert [v["prices"]["costInTokensPerMillion"] for v in psai.price_history(gpt)] == [2.5, 2]
    assert PsAiModel.select().count() == 3


def test_import_from_the_command_line(backend, tmp_path):
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(COST_MAP))
    command = ["--database", backend.url, "models", "import-litellm", str(path),
               "--user-id", "1", "--organization-id", "2", "--size", "large"]
    result = CliRunner().invoke(cli, command + ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would import" in result.stdout and "skipped: no max_output_tokens" in result.stdout
    psai.connect(backend.url)
    assert PsAiModel.select().count() == 0
    result = CliRunner().invoke(cli, command + ["--json"])
    assert sorted(m["source_model"] for m in json.loads(result.stdout)["models"]) == [
        "claude-sonnet-4-20250514", "gemini/gemini-2.5-pro", "gpt-4o"]
    psai.connect(backend.url)
    assert PsAiModel.select().count() == 3
    result = CliRunner().invoke(cli, command[:5] + ["--organization-id", "2"])  # the store's user_id
    assert result.exit_code == 0 and "unchanged" in result.stdout, result.output
