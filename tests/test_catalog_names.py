"""Catalog prices under your own model (docs/catalog.md): `psai models add
NAME --from SOURCE REF`, your rows winning over imported ones, --model as
an exact id or a glob, diffs that keep your keys, a readable dry run."""
import json

import pytest

import psai
from conftest import make_configuration
from psai import PsAiModel, catalog
from psai.query import resolve_model

pytest.importorskip("genai_prices")


def sonnet_config(**prices):
    return make_configuration(provider="anthropic", model="claude-sonnet-4-5", prices=dict(
        {"costInTokensPerMillion": 3, "costOutTokensPerMillion": 15, "costInCachedContextTokensPerMillion": 0.3,
         "currency": "USD"}, **prices))


def test_a_catalog_fills_your_model(db):
    created = catalog.add_from_catalog("GPT-4o", "genai-prices", "openai/gpt-4o")
    assert created["action"] == "created"
    model = PsAiModel.get_by_id(created["model_id"])
    assert model.name == "GPT-4o" and model.configuration["prices"]["costInTokensPerMillion"] == 2.5
    assert catalog.provenance(model)["source_model"] == "openai/gpt-4o"
    assert catalog.add_from_catalog("GPT-4o", "genai-prices", "openai/gpt-4o")["action"] == "unchanged"

    mine = PsAiModel.create(name="Sonnet", configuration=sonnet_config(
        costOutTokensPerMillion=99, regionalProcessingMargin=10))
    filled = catalog.add_from_catalog("Sonnet", "genai-prices", "anthropic/claude-sonnet-4-5")
    assert (filled["action"], filled["model_id"]) == ("filled", mine.id)
    assert ("costOutTokensPerMillion", 99, 15.0) in filled["changes"]
    prices = PsAiModel.get_by_id(mine.id).configuration["prices"]
    assert prices["costOutTokensPerMillion"] == 15 and prices["regionalProcessingMargin"] == 10  # yours kept
    assert prices["cacheWrite1hInputCostMultiplier"] == 2.0  # Sonnet 4.5's tiered 1-hour writes, imported
    # A later import of the source model updates your row, never adds one beside it.
    again = catalog.import_catalog("genai-prices", models=["anthropic/claude-sonnet-4-5"])
    assert [(m["action"], m["model_id"]) for m in again["models"]] == [("unchanged", mine.id)]
    assert PsAiModel.select().count() == 2
    with pytest.raises(psai.ValidationError, match="nearest: openai/gpt-4o"):
        catalog.add_from_catalog("X", "genai-prices", "openai/gpt-4oo")


def test_your_rows_win_over_imported_ones(db):
    mine = PsAiModel.create(name="Sonnet", configuration=sonnet_config())
    result = catalog.import_catalog("genai-prices", models=["anthropic/claude-sonnet-4-5"], dry_run=True)
    assert result["models"][0]["calls"] == "calls answered as 'claude-sonnet-4-5' stay on your model Sonnet " \
                                          "(id %s)" % mine.id
    catalog.import_catalog("genai-prices", models=["anthropic/claude-sonnet-4-5", "google/claude-sonnet-4-5"])
    assert PsAiModel.select().count() == 3
    found, why = resolve_model("claude-sonnet-4-5-20250929", explain=True)
    assert found.id == mine.id  # before: ambiguous between anthropic's and google's, or the newest row
    assert "rows you made win over rows a catalog import made" in why and "anthropic/claude-sonnet-4-5" in why
    row = psai.record_response(None, None, {"id": "msg_1", "type": "message", "model": "claude-sonnet-4-5-20250929",
                                            "usage": {"input_tokens": 10, "output_tokens": 1}})
    assert row.model_id == mine.id


def test_an_import_that_moves_calls_says_so(db):
    first = catalog.import_catalog("genai-prices", models=["openai/gpt-4o"], organization_id=2)
    moved = catalog.import_catalog("genai-prices", models=["openai/gpt-4o"], organization_id=3)
    assert moved["models"][0]["calls"] == "calls answered as 'gpt-4o' land here instead of on openai/gpt-4o " \
                                         "(id %s)" % first["models"][0]["model_id"]


def test_model_patterns_are_exact_ids_or_globs(db):
    with pytest.raises(psai.ValidationError, match="Several models have this id: anthropic/claude-sonnet-4-5, "
                                                   "google/claude-sonnet-4-5"):
        catalog.import_catalog("genai-prices", models=["claude-sonnet-4-5"])
    with pytest.raises(psai.ValidationError, match="No model of genai-prices .* is 'nothing-like-it'"):
        catalog.import_catalog("genai-prices", models=["nothing-like-it"])
    assert PsAiModel.select().count() == 0
    found = catalog.read_catalog("genai-prices", models=["openai/gpt-4o-mini*"])
    assert found["entries"] and all(k.startswith("openai/gpt-4o-mini") for k in found["entries"])
    assert list(catalog.read_catalog("genai-prices", models=["gpt-4o"], providers=["openai"])["entries"]) == [
        "openai/gpt-4o"]


def test_diff_apply_keeps_keys_the_catalog_does_not_set(db):
    [imported] = catalog.import_catalog("genai-prices", models=["openai/gpt-4o"])["models"]
    model = PsAiModel.get_by_id(imported["model_id"])
    model.update_configuration({"prices": {"costOutTokensPerMillion": 11, "cacheWrite1hInputCostMultiplier": 2,
                                           "regionalProcessingMargin": 10}})
    differences = catalog.diff("genai-prices", apply=True)
    assert [d["field"] for d in differences] == ["prices.costOutTokensPerMillion"]
    prices = PsAiModel.get_by_id(model.id).configuration["prices"]
    assert prices["costOutTokensPerMillion"] == 10 and prices["cacheWrite1hInputCostMultiplier"] == 2
    assert prices["regionalProcessingMargin"] == 10


def test_from_a_litellm_cost_map(run, tmp_path):
    from test_litellm import COST_MAP
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(COST_MAP))
    added = json.loads(run("models", "add", "Sonnet", "--from", "litellm", "claude-sonnet-4-20250514",
                           "--catalog-file", str(path), "--json").stdout)
    assert added["configuration"]["prices"]["costOutTokensPerMillion"] == 15
    assert added["configuration"]["maxTokensOut"] == 64000
    assert catalog.provenance(added["id"])["source"] == "litellm"


def test_on_the_command_line(run):
    added = json.loads(run("models", "add", "GPT-4o", "--from", "genai-prices", "openai/gpt-4o", "--json").stdout)
    assert added["name"] == "GPT-4o" and added["configuration"]["prices"]["costOutTokensPerMillion"] == 10
    assert "created model" in run("models", "add", "Mini", "--from", "genai-prices", "openai/gpt-4o-mini").stderr
    assert "--from takes the catalog's configuration" in run(
        "models", "add", "X", "--from", "genai-prices", "openai/gpt-4o", "--in", "3", code=2).stderr
    assert "is not one of genai-prices, litellm" in run(
        "models", "add", "X", "--from", "nowhere", "gpt-4o", code=2).stderr
    bad = run("catalog", "import", "genai-prices", "--model", "gpt-4oo", code=2)
    assert "nearest: openai/gpt-4o" in bad.stderr
    dry = run("catalog", "import", "genai-prices", "--provider", "anthropic", "--dry-run")
    assert "would import" in dry.stdout
    assert max(len(line) for line in dry.output.splitlines()) < 160
    assert PsAiModel.select().count() == 2
