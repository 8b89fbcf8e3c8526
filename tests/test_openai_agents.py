"""psai.openai_agents.TracingProcessor with the real OpenAI Agents SDK's
tracing: response spans (the Responses API's own response) and generation
spans (Chat Completions' usage) recorded as calls on both backends, agent
spans' totals not, a response recorded once, a broken span never raising."""
import logging
from decimal import Decimal

import pytest

agents = pytest.importorskip("agents")
from agents import agent_span, generation_span, response_span, set_trace_processors, trace  # noqa: E402
from openai.types.responses import Response  # noqa: E402

import psai  # noqa: E402
from psai import PsAiModel, PsModelUsageItem  # noqa: E402
from psai.openai_agents import TracingProcessor  # noqa: E402

M = Decimal(10) ** 6
RESPONSE = {
    "id": "resp_agents_1", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-4o-2024-08-06",
    "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
    "usage": {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
              "output_tokens": 700, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 3700}}
GENERATION_USAGE = {"requests": 1, "input_tokens": 3000, "output_tokens": 700, "total_tokens": 3700,
                    "input_tokens_details": {"cached_tokens": 1024}, "output_tokens_details": {"reasoning_tokens": 0}}
COST = (Decimal(3000 - 1024) * Decimal("2.5") + 1024 * Decimal("1.25") + 700 * 10) / M


@pytest.fixture
def gpt4o(db):
    return PsAiModel.create(user_id=1, organization_id=1, name="GPT-4o", configuration={
        "type": "text", "modelSize": "large", "model": "gpt-4o", "provider": "openai", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7,
        "prices": {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10,
                   "costInCachedContextTokensPerMillion": 1.25, "currency": "USD"}})


@pytest.fixture
def processor():
    processor = TracingProcessor(tags={"team": "search"})
    set_trace_processors([processor])  # the SDK's own exporter replaced: nothing leaves the machine
    yield processor
    set_trace_processors([])


def items():
    psai.flush()  # the processor hands its writes to psai's writer
    return [row.data for row in PsModelUsageItem.select().order_by(PsModelUsageItem.id)]


def test_a_response_span_is_recorded_once_from_the_response_itself(gpt4o, processor):
    response = Response.model_validate(RESPONSE)
    with trace("support", group_id="conversation-3"):
        with agent_span(name="Researcher"):
            with response_span(response=response):
                pass
            with response_span(response=response):  # the same response again: one call
                pass
    [data] = items()
    assert data["psai"]["responseId"] == "resp_agents_1" and data["apiFamily"] == "responses"
    assert psai.recorded_response("resp_agents_1").cost == COST
    assert data["psai"]["source"] == "openai-agents" and data["psai"]["session"] == "conversation-3"
    assert data["psai"]["tags"] == {"team": "search"} and "approximate" not in data["psai"]


def test_a_generation_span_is_recorded_from_its_usage(gpt4o, processor):
    with trace("support"):
        with generation_span(model="gpt-4o", usage=dict(GENERATION_USAGE)):
            pass
        with generation_span(model="gpt-4o"):  # no usage reported: nothing to record
            pass
    [data] = items()
    assert data["usageNormalized"]["tokensIn"] == 3000 and data["usageNormalized"]["cachedInTokens"] == 1024
    assert data["model"]["id"] == gpt4o.id
    assert data["psai"]["approximate"] == ["webSearches", "serviceTier"]


def test_a_broken_span_never_raises_into_the_run(gpt4o, processor, caplog):
    with caplog.at_level(logging.WARNING, logger="psai.openai_agents"):
        with trace("support"):
            with generation_span(model="gpt-4o", usage={"input_tokens": -1, "output_tokens": 5}):
                pass
            with generation_span(model=None, usage=dict(GENERATION_USAGE)):
                pass
        processor.on_span_end(None)
    assert items() == []
    assert caplog.text.count("psai could not record the generation span") == 2
    assert "psai could not read span None" in caplog.text
