"""The demo `make demo` runs: a small catalog of models from three providers
in three sizes, three agents linked to them (one a sub-agent), which model
each agent selects and why, a few recorded calls, their cost, and an HTML
report. Running it again finds what it stored instead of adding copies."""
from collections.abc import Mapping
from typing import Any

from .db import model_db, write_transaction
from .models import PsAgent, PsAiModel
from .query import SIZE_FALLBACK, select_model
from .usage import record_usage


def _model(name, provider, model, size, rate_in, rate_out, rate_cached, **extra):
    prices = {"costInTokensPerMillion": rate_in, "costOutTokensPerMillion": rate_out,
              "costInCachedContextTokensPerMillion": rate_cached, "currency": "USD"}
    prices.update(extra)
    return {"user_id": 1, "organization_id": 2, "name": name, "configuration": {
        "type": "text", "modelSize": size, "model": model, "provider": provider, "active": True,
        "prices": prices, "maxTokensOut": 4096, "defaultTemperature": 0.7}}


SEED_MODELS = [
    _model("OpenAI GPT-4 Large", "openai", "gpt-4", "large", 30, 60, 10),
    _model("OpenAI GPT-4o mini", "openai", "gpt-4o-mini", "small", 0.15, 0.6, 0.075),
    _model("Anthropic Claude Sonnet", "anthropic", "claude-sonnet-4-5", "medium", 3, 15, 0.3,
           cacheWriteInputCostMultiplier=1.25),
    _model("Anthropic Claude Haiku", "anthropic", "claude-haiku-4-5", "small", 1, 5, 0.1,
           cacheWriteInputCostMultiplier=1.25),
    _model("Google Gemini Pro", "google", "gemini-2.5-pro", "large", 1.25, 10, 0.125,
           longContextTokenThreshold=200_001, longContextCostInTokensPerMillion=2.5,
           longContextCostInCachedContextTokensPerMillion=0.25, longContextCostOutTokensPerMillion=15),
]
SEED_MODEL = SEED_MODELS[0]
# (name, parent, the models it is linked to, the size it asks for)
SEED_AGENTS = [
    ("Researcher", None, ["OpenAI GPT-4 Large", "OpenAI GPT-4o mini"], "large"),
    ("Writer", None, ["Anthropic Claude Sonnet", "Google Gemini Pro"], "medium"),
    ("Summarizer", "Writer", ["OpenAI GPT-4o mini", "Anthropic Claude Haiku"], "medium"),
]
# (agent, input tokens, of them cached, output tokens) for each recorded call
SEED_CALLS = [
    ("Researcher", 120_000, 20_000, 4_000), ("Researcher", 80_000, 0, 2_500),
    ("Writer", 40_000, 10_000, 6_000), ("Writer", 30_000, 12_000, 5_000),
    ("Summarizer", 25_000, 0, 800), ("Summarizer", 18_000, 6_000, 600),
]


def seed() -> tuple[dict[str, PsAiModel], dict[str, PsAgent], bool]:
    """Store the demo's models, agents and links once, and record its calls
    the first time. Returns ``(models, agents, recorded)``: rows by name,
    and whether the calls were recorded now."""
    with write_transaction(model_db(PsAiModel)):
        models: dict[str, PsAiModel] = {}
        for fields in SEED_MODELS:
            found = PsAiModel.get_or_none(PsAiModel.name == fields["name"])
            models[fields["name"]] = found or PsAiModel.create(**fields)
        agents: dict[str, PsAgent] = {}
        fresh = False
        for name, parent, linked, _size in SEED_AGENTS:
            agent = PsAgent.select().where(PsAgent.configuration["name"] == name).first()
            if agent is None:
                fresh = True
                agent = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name},
                                       parent_agent=agents.get(parent) if parent is not None else None)
            agent.ai_models.add([models[model] for model in linked])
            agents[name] = agent
        if fresh:
            for name, tokens_in, cached, tokens_out in SEED_CALLS:
                agent = agents[name]
                record_usage(select_model(agent, "text", _asks(name)), agent, tokens_in=tokens_in,
                             cached_tokens=cached, tokens_out=tokens_out)
    return models, agents, fresh


def _asks(agent_name: str) -> str:
    return next(size for name, _parent, _linked, size in SEED_AGENTS if name == agent_name)


def selections(agents: Mapping[str, PsAgent]) -> list[dict[str, Any]]:
    """For each demo agent: the size it asks for, the model select_model
    gives it, and why (PolicySynth's size fallback)."""
    rows = []
    for name, _parent, _linked, size in SEED_AGENTS:
        agent = agents[name]
        model = select_model(agent, "text", size)
        got = model.configuration.get("modelSize")
        if got == size:
            why = "a %s model is linked" % size
        else:
            skipped = SIZE_FALLBACK[size][:SIZE_FALLBACK[size].index(got)]
            why = "no %s model linked: falls back to %s" % (" or ".join(skipped), got)
        rows.append({"agent": name, "asks for": "text/" + size, "uses": model.name, "why": why})
    return rows
