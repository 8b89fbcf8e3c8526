"""psai.otel.SpanProcessor with the real OpenTelemetry SDK: spans made by
hand with the attribute sets each instrumentation emits (the OTel GenAI
conventions, OpenLLMetry, OpenInference, pydantic-ai), recorded as calls on
both backends: the counts right, agent and workflow spans ignored, a call
two instrumentations wrap recorded once, what spans cannot say flagged, and
a broken span never raising into the application."""
import logging
import subprocess
import sys
from decimal import Decimal

import pytest
from opentelemetry.sdk.trace import TracerProvider

import psai
from psai import PsAiModel, PsModelUsageItem
from psai.otel import SpanProcessor, is_inference, span_usage

M = Decimal(10) ** 6
# 3000 in (1024 cached), 700 out at GPT-4o's prices.
GPT4O_COST = (Decimal(3000 - 1024) * Decimal("2.5") + 1024 * Decimal("1.25") + 700 * 10) / M
# 2600 in (2000 cache reads, 500 cache writes), 300 out at Claude's.
CLAUDE_COST = (100 * 3 + 2000 * Decimal("0.3") + 500 * Decimal("3.75") + 300 * 15) / M

# -- the attribute sets instrumentations put on their spans ---------------------------------

# OpenLLMetry (traceloop) openai instrumentation, legacy names: a chat span.
OPENLLMETRY_OPENAI = {
    "llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.response.id": "chatcmpl-1",
    "gen_ai.usage.prompt_tokens": 3000, "gen_ai.usage.completion_tokens": 700, "llm.usage.total_tokens": 3700,
    "llm.usage.cache_read_input_tokens": 1024, "llm.is_streaming": False,
}
# OpenLLMetry's anthropic instrumentation: input_tokens with the cache tokens added in.
OPENLLMETRY_ANTHROPIC = {
    "llm.request.type": "chat", "gen_ai.system": "Anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
    "gen_ai.response.model": "claude-sonnet-4-5-20250929", "gen_ai.response.id": "msg_01",
    "gen_ai.usage.input_tokens": 2600, "gen_ai.usage.output_tokens": 300, "llm.usage.total_tokens": 2900,
    "gen_ai.usage.cache_read_input_tokens": 2000, "gen_ai.usage.cache_creation_input_tokens": 500,
}
OPENLLMETRY_WORKFLOW = {"traceloop.span.kind": "workflow", "traceloop.entity.name": "answer"}
# OpenInference's openai instrumentation: an LLM span, no response id.
OPENINFERENCE_OPENAI = {
    "openinference.span.kind": "LLM", "llm.system": "openai", "llm.provider": "openai",
    "llm.model_name": "gpt-4o-2024-08-06", "llm.token_count.prompt": 3000, "llm.token_count.completion": 700,
    "llm.token_count.total": 3700, "llm.token_count.prompt_details.cache_read": 1024,
}
OPENINFERENCE_AGENT = {"openinference.span.kind": "AGENT", "llm.model_name": "gpt-4o-2024-08-06",
                       "llm.token_count.prompt": 6000, "llm.token_count.completion": 1400}
# pydantic-ai (logfire): the model request's span, usage details apart.
PYDANTIC_AI_CHAT = {
    "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.response.id": "chatcmpl-1",
    "gen_ai.usage.input_tokens": 3000, "gen_ai.usage.output_tokens": 700,
    "gen_ai.usage.details.cache_read_tokens": 1024, "model_request_parameters": "{}",
}
# pydantic-ai's agent run span: the run's usage added up over its requests.
PYDANTIC_AI_AGENT = {
    "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support", "gen_ai.system": "openai",
    "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 6000, "gen_ai.usage.output_tokens": 1400,
}
# The current OTel GenAI conventions (semconv 1.37+).
SEMCONV_ANTHROPIC = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
    "gen_ai.response.model": "claude-sonnet-4-5-20250929", "gen_ai.response.id": "msg_02",
    "gen_ai.usage.input_tokens": 2600, "gen_ai.usage.output_tokens": 300,
    "gen_ai.usage.cache_read.input_tokens": 2000, "gen_ai.usage.cache_creation.input_tokens": 500,
    "gen_ai.conversation.id": "conv-1", "gen_ai.agent.name": "Researcher",
}


@pytest.fixture
def models(db):
    gpt = PsAiModel.create(user_id=1, organization_id=1, name="GPT-4o", configuration={
        "type": "text", "modelSize": "large", "model": "gpt-4o", "provider": "openai", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7,
        "prices": {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10,
                   "costInCachedContextTokensPerMillion": 1.25, "currency": "USD"}})
    claude = PsAiModel.create(user_id=1, organization_id=1, name="Claude Sonnet 4.5", configuration={
        "type": "text", "modelSize": "large", "model": "claude-sonnet-4-5", "provider": "anthropic", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7,
        "prices": {"costInTokensPerMillion": 3, "costOutTokensPerMillion": 15,
                   "costInCachedContextTokensPerMillion": 0.3, "cacheWriteInputCostMultiplier": 1.25,
                   "currency": "USD"}})
    return gpt, claude


def tracer(**options):
    provider = TracerProvider()
    processor = SpanProcessor(**options)
    provider.add_span_processor(processor)
    return provider.get_tracer("test"), processor


def items():
    psai.flush()  # the processor hands its writes to psai's writer
    return [row.data for row in PsModelUsageItem.select().order_by(PsModelUsageItem.id)]


def item_cost(data):
    return psai.recorded_response(data["psai"]["responseId"]).cost


def test_psai_otel_is_reached_lazily_and_import_psai_loads_no_opentelemetry():
    code = ("import sys, psai; assert 'opentelemetry' not in sys.modules and 'psai.otel' not in sys.modules; "
            "assert psai.otel.SpanProcessor; assert 'opentelemetry.sdk.trace' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("attributes", [OPENLLMETRY_OPENAI, PYDANTIC_AI_CHAT], ids=["openllmetry", "pydantic-ai"])
def test_an_openai_chat_span_is_recorded_at_the_bills_cost(models, attributes):
    trace, _processor = tracer()
    with trace.start_as_current_span("chat gpt-4o", attributes=attributes):
        pass
    [data] = items()
    assert data["usageNormalized"]["tokensIn"] == 3000 and data["usageNormalized"]["cachedInTokens"] == 1024
    assert data["usageNormalized"]["tokensOut"] == 700
    assert data["model"]["id"] == models[0].id
    assert item_cost(data) == GPT4O_COST
    assert data["psai"]["source"] == "otel" and data["psai"]["trace"]["spanId"]


@pytest.mark.parametrize("attributes", [OPENLLMETRY_ANTHROPIC, SEMCONV_ANTHROPIC], ids=["openllmetry", "semconv"])
def test_an_anthropic_span_counts_its_cache_tokens_once(models, attributes):
    trace, _processor = tracer()
    with trace.start_as_current_span("chat claude", attributes=attributes):
        pass
    [data] = items()
    assert data["usageNormalized"]["tokensIn"] == 2600
    assert data["model"]["id"] == models[1].id
    assert item_cost(data) == CLAUDE_COST
    # 5-minute or 1-hour writes, web searches, the tier: a span says none of them.
    assert set(data["psai"]["approximate"]) == {"cacheWriteDuration", "webSearches", "serviceTier"}


def test_input_tokens_reported_without_the_cache_tokens_get_them_added(models):
    # Anthropic's own usage, passed through as it is: input_tokens counts the uncached input only.
    apart = dict(SEMCONV_ANTHROPIC, **{"gen_ai.usage.input_tokens": 100})
    with_total = dict(apart, **{"gen_ai.usage.input_tokens": 2200, "gen_ai.usage.cache_creation.input_tokens": 100,
                                "gen_ai.usage.total_tokens": 2200 + 2000 + 100 + 300})
    assert span_usage(apart)[0].tokens_in == 2600
    assert span_usage(with_total)[0].tokens_in == 4300
    assert span_usage(SEMCONV_ANTHROPIC)[0].tokens_in == 2600


def test_an_openinference_span_is_recorded(models):
    trace, _processor = tracer()
    with trace.start_as_current_span("agent", attributes=OPENINFERENCE_AGENT):
        with trace.start_as_current_span("ChatCompletion", attributes=OPENINFERENCE_OPENAI):
            pass
    [data] = items()
    assert data["usageNormalized"]["tokensIn"] == 3000 and data["usageNormalized"]["cachedInTokens"] == 1024
    assert "responseId" not in data["psai"]  # OpenInference puts no response id on the span


def test_agent_and_workflow_spans_are_not_recorded_only_the_calls_below_them(models):
    trace, _processor = tracer(agent=None)
    with trace.start_as_current_span("workflow", attributes=OPENLLMETRY_WORKFLOW):
        with trace.start_as_current_span("invoke_agent support", attributes=PYDANTIC_AI_AGENT):
            with trace.start_as_current_span("chat gpt-4o", attributes=dict(
                    PYDANTIC_AI_CHAT, **{"gen_ai.response.id": "chatcmpl-a"})):
                pass
            with trace.start_as_current_span("chat gpt-4o", attributes=dict(
                    PYDANTIC_AI_CHAT, **{"gen_ai.response.id": "chatcmpl-b"})):
                pass
    assert [data["psai"]["responseId"] for data in items()] == ["chatcmpl-a", "chatcmpl-b"]
    assert not is_inference(PYDANTIC_AI_AGENT) and not is_inference(OPENINFERENCE_AGENT)


def test_a_span_whose_children_carry_the_usage_is_not_recorded_again(models):
    # An aggregate that names no operation: its child's call is the call.
    aggregate = {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 3000,
                 "gen_ai.usage.output_tokens": 700}
    trace, _processor = tracer()
    with trace.start_as_current_span("run", attributes=aggregate):
        with trace.start_as_current_span("ChatCompletion", attributes=OPENINFERENCE_OPENAI):
            pass
    assert len(items()) == 1


def test_one_call_two_instrumentations_wrap_is_recorded_once(models):
    trace, _processor = tracer()
    # pydantic-ai's span around OpenLLMetry's, one response.
    with trace.start_as_current_span("chat gpt-4o", attributes=PYDANTIC_AI_CHAT):
        with trace.start_as_current_span("openai.chat", attributes=OPENLLMETRY_OPENAI):
            pass
    # The same response's spans side by side (two tracer providers, say): the response id.
    with trace.start_as_current_span("openai.chat", attributes=OPENLLMETRY_OPENAI):
        pass
    with trace.start_as_current_span("chat gpt-4o", attributes=PYDANTIC_AI_CHAT):
        pass
    [data] = items()
    assert data["psai"]["responseId"] == "chatcmpl-1"
    assert item_cost(data) == GPT4O_COST


def test_a_span_with_its_tier_is_priced_at_it_and_not_flagged_for_it(models):
    trace, _processor = tracer(tags={"team": "search"})
    with trace.start_as_current_span("chat", attributes=dict(OPENLLMETRY_OPENAI, **{
            "openai.response.service_tier": "default"})):
        pass
    [data] = items()
    assert data["psai"]["approximate"] == ["webSearches"]
    assert data["providerMetadata"]["appliedServiceTier"] == "default"
    assert data["psai"]["tags"] == {"team": "search"}


def test_conversation_and_agent_name_are_kept(models):
    trace, _processor = tracer()
    with trace.start_as_current_span("chat", attributes=SEMCONV_ANTHROPIC):
        pass
    [data] = items()
    assert data["psai"]["session"] == "conv-1" and data["psai"]["agentName"] == "Researcher"


def test_an_unmatched_model_is_recorded_unpriced_on_a_placeholder(models):
    trace, _processor = tracer()
    with trace.start_as_current_span("chat", attributes=dict(OPENLLMETRY_OPENAI, **{
            "gen_ai.response.model": "gpt-9-preview", "gen_ai.request.model": "gpt-9-preview"})):
        pass
    [data] = items()
    assert data["psai"]["unmatchedModel"] == "gpt-9-preview"
    assert psai.recorded_response("chatcmpl-1").cost is None


def test_the_agent_and_the_database_given_are_used(models, backend, tmp_path):
    agent = psai.PsAgent.create(user_id=7, class_id=1, group_id=1, configuration={"name": "Researcher"})
    database = psai.connect(backend.url, bind=False)
    trace, _processor = tracer(agent=agent.id, database=database)
    with trace.start_as_current_span("chat", attributes=OPENLLMETRY_OPENAI):
        pass
    [data] = items()
    assert data["actor"]["agentId"] == agent.id


@pytest.mark.parametrize("attributes", [
    dict(PYDANTIC_AI_CHAT, **{"gen_ai.usage.input_tokens": -5}),
    dict(PYDANTIC_AI_CHAT, **{"gen_ai.usage.output_tokens": "many"}),
    dict(OPENLLMETRY_ANTHROPIC, **{"gen_ai.usage.cache_read_input_tokens": [1, 2]}),
], ids=["negative", "text", "list"])
def test_a_broken_span_never_raises_into_the_application(models, attributes, caplog):
    trace, _processor = tracer()
    with caplog.at_level(logging.WARNING, logger="psai.otel"):
        with trace.start_as_current_span("chat", attributes=attributes):
            pass
    assert items() == []
    assert "psai could not record span of model 'gpt-4o-2024-08-06'" in caplog.text or \
        "psai could not record span of model 'claude-sonnet-4-5-20250929'" in caplog.text


def test_a_failing_database_never_raises_into_the_application(models, caplog):
    trace, processor = tracer(agent="no such agent")
    with caplog.at_level(logging.WARNING, logger="psai.otel"):
        with trace.start_as_current_span("chat", attributes=OPENLLMETRY_OPENAI):
            pass
    assert items() == [] and "no such agent" in caplog.text


def test_bad_tags_are_refused():
    with pytest.raises(psai.ValidationError, match="tags"):
        SpanProcessor(tags={"team": 1})


def test_a_writer_takes_the_write_off_the_thread_that_ends_the_span(models):
    trace, processor = tracer()
    jobs = []
    processor.submit = jobs.append
    with trace.start_as_current_span("chat", attributes=OPENLLMETRY_OPENAI):
        pass
    assert items() == [] and len(jobs) == 1
    jobs[0]()
    assert len(items()) == 1


def test_what_is_not_a_span_never_raises_either(caplog):
    processor = SpanProcessor()
    with caplog.at_level(logging.WARNING, logger="psai.otel"):
        processor.on_end(None)  # type: ignore[arg-type]
    assert "psai could not read span None" in caplog.text
