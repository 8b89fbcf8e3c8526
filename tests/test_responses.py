"""Recording a call from the provider's own response: canned responses in
each API's documented shape, whole and streamed, as dicts, as SDK-like
objects and as JSON lines; what they cost against the bill worked out by
hand from the providers' documented semantics; on both backends."""
import datetime
import json
import os
from decimal import Decimal

import pydantic  # the provider SDKs' own dependency
import pytest
from anthropic.types import Message
from click.testing import CliRunner
from google.genai.types import GenerateContentResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

import psai
import psai._audit
from psai import PsAgent, PsAiModel, PsModelUsageItem
from psai.cli import cli
from psai._responses import load_response, usage_from_response
from psai.usage import report_totals

from conftest import run_beside
from test_policysynth import policysynth_package, run_node  # noqa: F401  (the session fixture)

M = Decimal(10) ** 6


def chat_completion(**usage):
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": dict({"prompt_tokens": 3000, "completion_tokens": 700, "total_tokens": 3700,
                           "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                           "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0}}, **usage)}


def chat_stream(include_usage=True):
    chunks = [{"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
               "service_tier": "flex", "choices": [{"index": 0, "delta": {"content": "h"}}]},
              {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    if include_usage:
        chunks.append({"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
                       "choices": [], "usage": chat_completion()["usage"]})
    return chunks


def responses_response(searches=1):
    return {"id": "resp_1", "object": "response", "status": "completed", "model": "o3-2025-04-16",
            "service_tier": "priority",
            "output": [{"type": "web_search_call", "id": "ws_%d" % i, "status": "completed"}
                       for i in range(searches)] + [
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}],
            "usage": {"input_tokens": 5000, "input_tokens_details": {"cached_tokens": 2000},
                      "output_tokens": 1500, "output_tokens_details": {"reasoning_tokens": 1000},
                      "total_tokens": 6500}}


def claude_message(one_hour=0, speed=None):
    usage = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000 + one_hour,
             "cache_read_input_tokens": 10000,
             "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": one_hour},
             "server_tool_use": {"web_search_requests": 2}, "service_tier": "standard"}
    if speed:
        usage["speed"] = speed
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": usage}


def claude_stream():
    message = claude_message()
    start = dict(message, content=[], usage=dict(message["usage"], output_tokens=1))
    return [{"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 500}},
            {"type": "message_stop"}]


def gemini_response():
    return {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 4000, "candidatesTokenCount": 600, "totalTokenCount": 5900,
                              "cachedContentTokenCount": 1000, "thoughtsTokenCount": 1200,
                              "toolUsePromptTokenCount": 100,
                              "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 600}]},
            "modelVersion": "gemini-2.5-pro", "responseId": "gem-1"}


class Dumped:
    """An SDK response object: read through model_dump(), as pydantic's."""

    def __init__(self, data):
        self._data = data

    def model_dump(self, mode="python"):
        return json.loads(json.dumps(self._data))


class GenaiLike:
    """google-genai's objects: to_json_dict() with snake_case keys."""

    def __init__(self, data):
        self._data = data

    def to_json_dict(self):
        def snake(value):
            if isinstance(value, dict):
                return {"".join("_" + c.lower() if c.isupper() else c for c in k): snake(v) for k, v in value.items()}
            if isinstance(value, list):
                return [snake(v) for v in value]
            return value
        return snake(self._data)


# -- reading responses (no database) ---------------------------------------------------------

def test_openai_chat_counts_and_its_stream():
    usage = usage_from_response(chat_completion())
    assert (usage.tokens_in, usage.tokens_out, usage.cached_tokens, usage.reasoning_tokens) == (3000, 700, 1024, 256)
    assert (usage.provider, usage.api_family, usage.model) == ("openai", "openai.chat.completions", "gpt-4o-2024-08-06")
    assert usage.provider_metadata == {"responseId": "chatcmpl-9", "appliedServiceTier": "default"}
    streamed = usage_from_response(chat_stream())
    assert streamed.counts() == usage.counts() and streamed.provider_metadata["appliedServiceTier"] == "flex"
    assert usage_from_response(Dumped(chat_completion())).counts() == usage.counts()


def test_a_stream_without_usage_is_refused_never_zero():
    with pytest.raises(psai.ValidationError, match="include_usage"):
        usage_from_response(chat_stream(include_usage=False))
    cut = [{"type": "response.created", "response": dict(responses_response(), status="in_progress", usage=None)},
           {"type": "response.output_text.delta", "delta": "h"}]
    with pytest.raises(psai.ValidationError, match="response.completed"):
        usage_from_response(cut)


def test_openai_responses_counts_web_searches_and_the_tier():
    usage = usage_from_response(responses_response(searches=2))
    assert (usage.tokens_in, usage.tokens_out, usage.cached_tokens, usage.reasoning_tokens) == (5000, 1500, 2000, 1000)
    assert usage.web_searches == 2 and usage.api_family == "responses"
    assert usage.provider_metadata == {"responseId": "resp_1", "appliedServiceTier": "priority"}
    events = [{"type": "response.created", "response": dict(responses_response(), usage=None)},
              {"type": "response.completed", "response": responses_response(searches=2)}]
    assert usage_from_response(events).counts() == usage.counts()


def test_anthropic_input_is_fresh_input_plus_cache_writes_plus_reads():
    usage = usage_from_response(claude_message(one_hour=3000, speed="fast"))
    assert usage.tokens_in == 1000 + 5000 + 10000 and usage.tokens_out == 500
    assert (usage.cached_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (10000, 2000, 3000)
    assert usage.web_searches == 2 and usage.provider_metadata["appliedSpeed"] == "fast"
    assert usage.api_family == "messages" and usage.provider == "anthropic"
    streamed = usage_from_response(claude_stream())
    assert streamed.counts() == usage_from_response(claude_message()).counts()
    assert streamed.tokens_out == 500  # message_delta's cumulative count, not message_start's 1


def test_gemini_bills_thoughts_as_output_and_tool_prompts_as_input():
    usage = usage_from_response(gemini_response())
    assert (usage.tokens_in, usage.tokens_out, usage.cached_tokens, usage.reasoning_tokens) == (4100, 1800, 1000, 1200)
    assert (usage.provider, usage.api_family, usage.model) == ("google", "generateContent", "gemini-2.5-pro")
    assert usage_from_response(GenaiLike(gemini_response())).counts() == usage.counts()
    chunks = [dict(gemini_response(), usageMetadata={"promptTokenCount": 4000}), gemini_response()]
    assert usage_from_response(chunks).counts() == usage.counts()


def test_azure_is_told_by_its_content_filter_results():
    response = chat_completion()
    response["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
    assert usage_from_response(response).provider == "azure"
    assert usage_from_response(chat_completion(), provider="azure").provider == "azure"
    with pytest.raises(psai.ValidationError, match="not anthropic"):
        usage_from_response(chat_completion(), provider="anthropic")
    read = usage_from_response(chat_completion())
    assert usage_from_response(read) is read  # read once, recorded as it is
    with pytest.raises(psai.ValidationError, match="not anthropic"):
        usage_from_response(read, provider="anthropic")


@pytest.mark.parametrize("usage, field", [
    ({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 11}},
     "usage.prompt_tokens_details.cached_tokens"),
    ({"prompt_tokens": -1, "completion_tokens": 1}, "usage.prompt_tokens"),
    ({"prompt_tokens": 1.5, "completion_tokens": 1}, "usage.prompt_tokens"),
    ({"prompt_tokens": "12", "completion_tokens": 1}, "usage.prompt_tokens"),
])
def test_counts_that_cannot_be_are_refused_by_name(usage, field):
    with pytest.raises(psai.ValidationError) as caught:
        usage_from_response({"object": "chat.completion", "model": "m", "choices": [], "usage": usage})
    assert field in caught.value.paths


def test_what_is_not_a_response_is_refused():
    for bad in ({"hello": 1}, 42, [{"nothing": True}]):
        with pytest.raises(psai.ValidationError, match="response"):
            usage_from_response(bad)


def test_saved_responses_and_json_lines_streams_load():
    assert load_response(json.dumps(claude_message())) == claude_message()
    lines = "\n".join(json.dumps(event) for event in claude_stream())
    assert load_response(lines) == claude_stream()
    sse = "\n".join("data: " + json.dumps(chunk) for chunk in chat_stream()) + "\ndata: [DONE]\n"
    assert usage_from_response(load_response(sse)).tokens_in == 3000
    with pytest.raises(psai.ValidationError, match="line 2"):
        load_response('{"a": 1}\n{nope\n')


def test_policysynth_view_reproduces_its_classes_quirks_included():
    """What PolicySynth 1.3.172's classes write as usageNormalized for the same
    response (claudeChat.js weights cache writes 1.25 and reads 0.1 into
    tokensIn, fractional, and puts the writes in cachedInTokens)."""
    claude = usage_from_response({"type": "message", "model": "m", "content": [], "usage": {
        "input_tokens": 100, "output_tokens": 7, "cache_creation_input_tokens": 1001, "cache_read_input_tokens": 3}})
    assert claude.policysynth() == {"tokensIn": 1351.55, "tokensOut": 7, "cachedInTokens": 1001,
                                    "cacheReadInputTokens": 3}
    assert usage_from_response(claude_message()).policysynth() == {
        "tokensIn": 1000 + 2500 + 1000, "tokensOut": 500, "cachedInTokens": 2000, "cacheReadInputTokens": 10000}
    assert usage_from_response(chat_completion()).policysynth() == {
        "tokensIn": 3000, "tokensOut": 700, "cachedInTokens": 1024, "reasoningTokens": 256, "audioTokens": 0}
    assert usage_from_response(responses_response()).policysynth() == {
        "tokensIn": 5000, "tokensOut": 1500, "cachedInTokens": 2000, "reasoningTokens": 1000, "audioTokens": 0}
    assert usage_from_response(gemini_response()).policysynth() == {
        "tokensIn": 4100, "tokensOut": 1800, "cachedInTokens": 1000, "reasoningTokens": 1200}
    # Streams: OpenAI's accumulator drops usage on a chunk without an id; Gemini reads the last chunk only.
    no_id = chat_stream()
    no_id[-1] = {k: v for k, v in no_id[-1].items() if k != "id"}
    assert usage_from_response(no_id).tokens_in == 3000 and usage_from_response(no_id).policysynth()["tokensIn"] == 0
    trailing = [gemini_response(), {"candidates": gemini_response()["candidates"]}]
    assert usage_from_response(trailing).tokens_in == 4100
    assert usage_from_response(trailing).policysynth() == {"tokensIn": 0, "tokensOut": 0, "cachedInTokens": 0,
                                                          "reasoningTokens": 0}
    azure = dict(chat_completion(), prompt_filter_results=[])
    assert usage_from_response(azure).api_family == "chat.completions"


def sdk_object(model_class, data):
    """The SDK's own response object for ``data``: validated where the fixture
    has every field this SDK version requires, else built as is (the SDK's
    model_dump() serialises it either way)."""
    try:
        return model_class.model_validate(data)
    except pydantic.ValidationError:  # a field this SDK version requires that the fixture leaves out
        return model_class.model_construct(**data)


def test_the_sdks_own_response_objects():
    assert usage_from_response(sdk_object(ChatCompletion, chat_completion())).counts() == \
        usage_from_response(chat_completion()).counts()
    assert usage_from_response(sdk_object(Response, responses_response(searches=2))).counts() == \
        usage_from_response(responses_response(searches=2)).counts()
    claude = usage_from_response(sdk_object(Message, claude_message(one_hour=3000, speed="fast")))
    assert claude.counts() == usage_from_response(claude_message(one_hour=3000, speed="fast")).counts()
    assert claude.provider_metadata["appliedSpeed"] == "fast"
    gemini = GenerateContentResponse.model_validate(gemini_response())  # google-genai: to_json_dict()
    assert usage_from_response(gemini).counts() == usage_from_response(gemini_response()).counts()
    assert usage_from_response(gemini).model == "gemini-2.5-pro"


# -- recording them (both backends) ---------------------------------------------------------------

def configuration(model, provider, **prices):
    return {"type": "text", "modelSize": "large", "model": model, "provider": provider, "active": True,
            "prices": dict({"currency": "USD"}, **prices), "maxTokensOut": 4096, "defaultTemperature": 0.7}


@pytest.fixture
def stored(db):
    models = {
        "gpt": PsAiModel.create(user_id=1, organization_id=1, name="GPT-4o", configuration=configuration(
            "gpt-4o", "openai", costInTokensPerMillion=2.5, costOutTokensPerMillion=10,
            costInCachedContextTokensPerMillion=1.25, flexTokensIn=1.25, flexTokensCachedIn=0.625,
            flexTokensOut=5)),
        "o3": PsAiModel.create(user_id=1, organization_id=1, name="o3", configuration=configuration(
            "o3", "openai", costInTokensPerMillion=2, costOutTokensPerMillion=8,
            costInCachedContextTokensPerMillion=0.5, priorityTokensIn=3.5, priorityTokensCachedIn=0.875,
            priorityTokensOut=14, costPerThousandWebSearches=10)),
        "sonnet": PsAiModel.create(user_id=1, organization_id=1, name="Sonnet", configuration=configuration(
            "claude-sonnet-4-5", "anthropic", costInTokensPerMillion=3, costOutTokensPerMillion=15,
            costInCachedContextTokensPerMillion=0.3, cacheWriteInputCostMultiplier=1.25,
            costPerThousandWebSearches=10)),
        "gemini": PsAiModel.create(user_id=1, organization_id=1, name="Gemini", configuration=configuration(
            "gemini-2.5-pro", "google", costInTokensPerMillion=1.25, costOutTokensPerMillion=10,
            costInCachedContextTokensPerMillion=0.31)),
    }
    agent = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "Researcher"})
    return models, agent


def test_each_api_recorded_costs_what_the_provider_bills(stored):
    models, agent = stored
    with psai.track(agent) as run:
        chat = run.record(chat_stream())  # flex, as the provider says it served
        response = run.record(responses_response(searches=1))  # priority
        claude = run.record(claude_message())
        gemini = run.record(GenaiLike(gemini_response()))
    # The bills, from each provider's documented semantics.
    assert chat == (Decimal(3000 - 1024) * Decimal("1.25") + 1024 * Decimal("0.625") + 700 * 5) / M
    assert response == (Decimal(3000) * Decimal("3.5") + 2000 * Decimal("0.875") + 1500 * 14) / M + Decimal("0.01")
    assert claude == (1000 * 3 + 2000 * Decimal("3.75") + 10000 * Decimal("0.3") + 500 * 15) / M + Decimal("0.02")
    assert gemini == (Decimal(4100 - 1000) * Decimal("1.25") + 1000 * Decimal("0.31") + 1800 * 10) / M
    assert run.calls == 4 and run.cost == {"USD": chat + response + claude + gemini}
    total = report_totals(psai.cost_report("model"))["USD"]["cost"]
    assert total == run.cost["USD"]


def test_the_item_keeps_the_raw_usage_family_and_metadata(stored):
    models, agent = stored
    psai.record_response(None, agent, Dumped(claude_message(one_hour=3000)))
    item = PsModelUsageItem.select().get()
    assert item.model_id == models["sonnet"].id and item.agent_id == agent.id
    data = item.data
    assert data["apiFamily"] == "messages" and data["usageRaw"] == claude_message(one_hour=3000)["usage"]
    assert data["providerMetadata"] == {"responseId": "msg_01", "appliedServiceTier": "standard",
                                        "appliedSpeed": "standard"}
    assert data["usageNormalized"]["tokensIn"] == 16000 and data["usageNormalized"]["cachedInTokens"] == 10000
    assert data["psai"] == {"cacheWriteTokens": 5000, "cacheWrite1hTokens": 3000, "webSearches": 2,
                            "responseId": "msg_01"}


def test_the_model_is_found_from_the_response_never_another(stored):
    models, _agent = stored
    assert psai.resolve_model("gpt-4o-2024-08-06") == models["gpt"]
    assert psai.resolve_model("claude-sonnet-4-5@20250929") == models["sonnet"]
    assert psai.resolve_model("models/gemini-2.5-pro") == models["gemini"]
    with pytest.raises(psai.NotFoundError, match="gpt-4o-mini"):
        psai.resolve_model("gpt-4o-mini")
    newer = PsAiModel.create(user_id=1, organization_id=1, name="GPT-4o v2",
                             configuration=dict(models["gpt"].configuration))
    found, reason = psai.resolve_model("gpt-4o", explain=True)
    assert found == newer and "newest" in reason
    PsAiModel.create(user_id=1, organization_id=1, name="Other", configuration=dict(
        models["o3"].configuration, model="o3-pro", apiModel="gpt-4o"))
    with pytest.raises(psai.NotFoundError, match="several"):
        psai.resolve_model("gpt-4o")


def test_a_refused_response_records_nothing(stored):
    _models, agent = stored
    with pytest.raises(psai.ValidationError):
        psai.record_response(None, agent, chat_stream(include_usage=False))
    assert PsModelUsageItem.select().count() == 0 and psai.PsModelUsage.select().count() == 0


def test_record_response_from_the_command_line(stored, backend, tmp_path):
    _models, agent = stored
    events = tmp_path / "stream.jsonl"
    events.write_text("\n".join(json.dumps(event) for event in claude_stream()))
    result = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record-response", "--agent",
                                      str(agent.id), "--file", str(events), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["tokens_in"] == 13000 and shown["model"] == "claude-sonnet-4-5-20250929"
    resolved = CliRunner().invoke(cli, ["--database", backend.url, "models", "resolve",
                                        "claude-sonnet-4-5-20250929", "--explain"])
    assert resolved.exit_code == 0 and "Sonnet" in resolved.stdout and "snapshot" in resolved.output
    bad = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record-response", "--file", "-"],
                             input=json.dumps(chat_stream(include_usage=False)))
    assert bad.exit_code == 2 and "include_usage" in bad.output


def test_one_hour_cache_writes_are_priced_at_their_rate_or_said_unpriced(stored):
    models, agent = stored
    sonnet = models["sonnet"]
    with psai.track(agent, sonnet) as run:
        assert run.record(claude_message(one_hour=3000)) is None  # no 1-hour rate: never priced as 5-minute
        run.record(dict(claude_message(), id="msg_02"))  # another call (the same id would be the same call)
    assert run.unpriced_calls == 1 and run.calls == 2
    rows = psai.cost_report("model")
    unpriced = [r for r in rows if r["cost"] is None]
    assert len(unpriced) == 1 and "cacheWrite1hInputCostMultiplier" in unpriced[0]["unpriced_reason"]
    assert unpriced[0]["unpriced_tokens"] == 1000 + 5000 + 10000 + 500
    sonnet.update_configuration({"prices": {"cacheWrite1hInputCostMultiplier": 2}})
    with psai.track(agent, sonnet) as run:
        cost = run.record(dict(claude_message(one_hour=3000), id="msg_03"))
    bill = (1000 * 3 + 2000 * Decimal("3.75") + 3000 * 6 + 10000 * Decimal("0.3") + 500 * 15) / M + Decimal("0.02")
    assert cost == bill
    priced = [r for r in psai.cost_report("model") if r["cost"] is not None]
    assert priced[0]["cost"] == bill + (1000 * 3 + 2000 * Decimal("3.75") + 10000 * Decimal("0.3") + 500 * 15) / M \
        + Decimal("0.02")


def policysynth_claude_item(model, agent, usage_raw):
    """An item as PolicySynth 1.3.172's claudeChat.js writes it (its own
    weighting of cache writes and reads into tokensIn; fast mode lost)."""
    usage = usage_from_response({"type": "message", "content": [], "usage": usage_raw})
    data = {"version": 1, "provider": "anthropic", "apiFamily": "messages", "timestamp": "2026-11-30T10:00:00.000Z",
            "model": {"id": model.id, "name": "claude-sonnet-4-5", "type": "text", "size": "large"},
            "actor": {"userId": 1, "agentId": agent.id}, "request": {"streaming": False},
            "pricing": {"configuredPrices": model.configuration["prices"]},
            "usageNormalized": usage.policysynth(), "usageRaw": usage_raw,
            "providerMetadata": {"responseId": "msg_ps", "appliedSpeed": None,
                                 "appliedServiceTier": usage_raw.get("service_tier")}}
    return PsModelUsageItem.create(user_id=1, model_id=model.id, agent_id=agent.id, data=data)


def test_audit_finds_what_policysynths_claude_class_under_priced(stored, backend):
    models, agent = stored
    sonnet = models["sonnet"]
    sonnet.update_configuration({"prices": {"fastTokensIn": 18, "fastTokensCachedIn": 1.8, "fastTokensOut": 90}})
    raw = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
           "cache_read_input_tokens": 10000, "service_tier": "standard"}
    weighted = policysynth_claude_item(sonnet, agent, raw)
    fast = policysynth_claude_item(sonnet, agent, {"input_tokens": 1000, "output_tokens": 500, "speed": "fast"})
    psai.record_response(sonnet, agent, claude_message())  # psai's own item: what it says is right
    result = psai.audit()
    assert result["items_read"] == 3
    found = {f["item_id"]: f for f in result["findings"]}
    assert set(found) == {weighted.id, fast.id}
    # PolicySynth: 4500 "input" (1000 + 2000 x 1.25 + 10000 x 0.1) of which 2000 "cached" (the writes).
    assert found[weighted.id]["stored"]["tokensIn"] == 4500 and found[weighted.id]["billed"]["tokensIn"] == 13000
    recorded = (Decimal(2500) * 3 + 2000 * Decimal("0.3") + 500 * 15) / M
    billed = (1000 * 3 + 2000 * Decimal("3.75") + 10000 * Decimal("0.3") + 500 * 15) / M
    assert found[weighted.id]["cost_recorded"] == recorded and found[weighted.id]["cost_billed"] == billed
    # Fast mode, lost by PolicySynth (it reads response.speed): a sixth of the bill.
    assert found[fast.id]["cost_recorded"] == (1000 * 3 + 500 * 15) / M
    assert found[fast.id]["cost_billed"] == (1000 * 18 + 500 * 90) / M
    assert result["billed"]["USD"] - result["recorded"]["USD"] == billed - recorded + (1000 * 15 + 500 * 75) / M
    assert psai.audit(model="GPT-4o")["findings"] == []
    shown = CliRunner().invoke(cli, ["--database", backend.url, "audit"])
    assert shown.exit_code == 0 and "4500 -> 13000" in shown.stdout and "USD: recorded" in shown.output


def test_audit_apply_corrects_items_and_counters_so_the_report_moves_by_the_difference(stored, backend):
    models, agent = stored
    sonnet = models["sonnet"]
    raw = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
           "cache_read_input_tokens": 10000, "service_tier": "standard"}
    item = policysynth_claude_item(sonnet, agent, raw)
    # PolicySynth's counters for the call (saveTokenUsage: its weighted input less its "cached"),
    # and older counter usage no item covers.
    psai.PsModelUsage.create(user_id=1, model=sonnet.id, agent=agent.id, token_in_count=2500 + 7000,
                             token_in_cached_context_count=2000, token_out_count=500 + 100)
    before = report_totals(psai.cost_report("model"))["USD"]["cost"]
    dry = psai.audit()
    assert not dry["applied"] and report_totals(psai.cost_report("model"))["USD"]["cost"] == before
    applied = psai.audit(dry_run=False)
    assert applied["applied"] and [f["item_id"] for f in applied["findings"]] == [item.id]
    after = report_totals(psai.cost_report("model"))["USD"]["cost"]
    assert after - before == applied["billed"]["USD"] - applied["recorded"]["USD"] > 0
    data = PsModelUsageItem.get_by_id(item.id).data
    assert data["usageNormalized"]["tokensIn"] == 13000 and data["psai"]["originalUsage"]["usageNormalized"][
        "tokensIn"] == 4500
    row = psai.PsModelUsage.select().get()
    assert (row.token_in_count, row.token_in_cached_context_count, row.token_in_cache_write_count) == (
        1000 + 7000, 10000, 2000)
    assert psai.audit()["findings"] == []  # a second audit finds nothing left to correct
    [version] = psai.price_history(sonnet)
    [correction] = version["corrections"]
    assert correction["changes"] == {} and correction["calls"] == 1
    assert correction["after"] - correction["before"] == after - before
    assert data["psai"]["corrections"] == [correction["id"]]


def test_calls_are_recorded_while_an_audit_reads_the_items(stored, backend, db, monkeypatch):
    """``audit --apply`` compares the items with their raw usage before it
    writes: on SQLite in a read transaction, before the write lock, so
    calls are recorded meanwhile (an item that arrives in the audited
    period is found under the lock, the items read again, and corrected
    too); on PostgreSQL in its write transaction, which locks nothing while
    it reads."""
    models, agent = stored
    sonnet = models["sonnet"]
    raw = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
           "cache_read_input_tokens": 10000}
    first = policysynth_claude_item(sonnet, agent, raw)
    find, finished, arrived = psai._audit._find, [], []

    def record_meanwhile(query):
        found = find(query)
        if not finished:
            def write():
                psai.record_usage(models["gpt"], agent, tokens_in=100, tokens_out=10)
                arrived.append(policysynth_claude_item(sonnet, agent, raw).id)
                db.close()
            finished.extend(run_beside(write))
        return found
    monkeypatch.setattr(psai._audit, "_find", record_meanwhile)
    applied = psai.audit(dry_run=False)
    finished[1].join(60)
    assert finished[0], "a call waited for the audit to end"
    corrected = [f["item_id"] for f in applied["findings"]]
    assert corrected == ([first.id] + arrived if backend.kind == "sqlite" else [first.id])
    # On PostgreSQL the item that arrived while the audit read is left for the next audit.
    assert [f["item_id"] for f in psai.audit()["findings"]] == ([] if backend.kind == "sqlite" else arrived)
    assert psai.rollups.verify(db) == []


def test_an_audit_folds_its_corrections_and_keeps_every_trigger(stored, backend, db, clock, monkeypatch):
    """The items an audit corrects, on three days, one of them attributed
    (the ledger's): the rollups, slots and ledger come out as a rebuild
    makes them, every trigger is there after, and reports by model and by
    user equal those of a rebuild. On SQLite the folds are prepared before
    the write lock, from the items as the audit leaves them."""
    models, agent = stored
    sonnet = models["sonnet"]
    raw = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
           "cache_read_input_tokens": 10000}
    items = []
    for day in range(3):
        clock.set(datetime.datetime(2026, 11, 20 + day, 9 + day, tzinfo=datetime.timezone.utc))
        items.append(policysynth_claude_item(sonnet, agent, raw))
    attributed = PsModelUsageItem.get_by_id(items[0].id)
    attributed.data = dict(attributed.data, psai={"user": "alice", "tags": {"team": "search"}})
    attributed.save()
    psai.record_response(sonnet, agent, claude_message())  # psai's own item, left as it is
    applying, folds = psai._audit.applying_change, []
    monkeypatch.setattr(psai._audit, "applying_change", lambda db, prepared: folds.append(prepared) or applying(
        db, prepared))
    applied = psai.audit(dry_run=False)
    assert sorted(f["item_id"] for f in applied["findings"]) == [item.id for item in items]
    assert len(folds) == 1 and (folds[0] is None) == (backend.kind == "postgres")  # SQLite: prepared
    assert psai.rollups.enabled(db) and psai.rollups.ledger_enabled(db) and psai.rollups.slots_enabled(db)
    assert psai.rollups.verify(db) == []
    kept = [psai.cost_report("model"), psai.cost_report("user")]
    psai.rollups.rebuild(db)
    assert [psai.cost_report("model"), psai.cost_report("user")] == kept
    assert psai.cost_report("user")[0]["user"] == "alice"
    psai.record_response(sonnet, agent, dict(claude_message(), id="msg_after"))  # the triggers fold again
    assert psai.rollups.verify(db) == []


def test_the_providers_own_cost_is_kept_and_shown_beside_psais(stored):
    models, agent = stored
    said = chat_completion(cost=0.00123)  # OpenRouter's usage.cost
    psai.record_response(models["gpt"], agent, said)
    psai.record_response(models["gpt"], agent, dict(chat_completion(), id="chatcmpl-2"))  # says nothing: adds nothing
    [row] = psai.cost_report("model")
    assert row["provider_cost"] == Decimal("0.00123") and row["calls"] == 2
    assert row["cost"] == 2 * (Decimal(3000 - 1024) * Decimal("2.5") + 1024 * Decimal("1.25") + 700 * 10) / M
    assert report_totals([row])["USD"]["provider_cost"] == Decimal("0.00123")
    assert PsModelUsageItem.select().first().data["psai"]["providerCost"] == 0.00123


def test_policysynths_cost_manager_on_psais_items(stored, backend, request, tmp_path):
    """PolicySynth's own item cost manager (calcCostsFromItem) on the items
    record_response wrote: the bill, except where its rules cannot say it:
    it prices cache writes as ordinary input (they are part of tokensIn) and
    knows neither web searches nor 1-hour writes (psai's part of the item)."""
    package = request.getfixturevalue("policysynth_package")
    models, agent = stored
    calls = [(models["gpt"], chat_stream()), (models["o3"], responses_response(searches=0)),
             (models["sonnet"], claude_message()), (models["gemini"], gemini_response())]
    bills = []
    with psai.track(agent) as run:
        for model, response in calls:
            bills.append(run.record(response, model=model))
    claude = claude_message()["usage"]
    items = [{"data": item.data, "fallback": None}
             for item in PsModelUsageItem.select().order_by(PsModelUsageItem.id)]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    env = dict(os.environ, PS_AGENTS_DIR=str(package), PSQL_DB_NAME="none", PSQL_DB_USER="none",
               DB_HOST="127.0.0.1", DB_PORT="1", NODE_ENV="test", PSAI_ARGS=str(path))
    theirs = [Decimal(repr(cost)) for cost in run_node(env, "calc")]
    assert theirs[0] == pytest.approx(bills[0]) and theirs[1] == pytest.approx(bills[1])
    assert theirs[3] == pytest.approx(bills[3])
    writes = claude["cache_creation_input_tokens"]
    searches = claude["server_tool_use"]["web_search_requests"]
    # Cache writes at the input rate, not 1.25 times it; web searches not priced.
    assert theirs[2] == pytest.approx(bills[2] - writes * Decimal("0.75") / M - searches * Decimal("0.01"))


def test_a_responses_call_finds_a_model_policysynth_configured_as_openai_responses(db):
    model = PsAiModel.create(user_id=1, organization_id=1, name="o3", configuration=configuration(
        "o3", "openaiResponses", costInTokensPerMillion=2, costOutTokensPerMillion=8,
        costInCachedContextTokensPerMillion=0.5))
    psai.record_response(None, None, responses_response(searches=0))
    assert PsModelUsageItem.select().get().model_id == model.id


def test_audit_apply_with_nothing_to_correct_says_so(stored, backend):
    """Before: `audit --apply` that found nothing said "dry run: nothing changed"."""
    models, agent = stored
    psai.record_response(models["sonnet"], agent, claude_message())  # psai's own item: nothing to correct
    for args in (["audit", "--apply"], ["audit"]):
        shown = CliRunner().invoke(cli, ["--database", backend.url, *args])
        assert shown.exit_code == 0 and shown.output.startswith("nothing to correct: "), shown.output
        assert "dry run" not in shown.output
    policysynth_claude_item(models["sonnet"], agent, {"input_tokens": 1000, "output_tokens": 500,
                                                      "cache_read_input_tokens": 10000})
    assert "dry run: nothing changed" in CliRunner().invoke(cli, ["--database", backend.url, "audit"]).stderr
    applied = CliRunner().invoke(cli, ["--database", backend.url, "audit", "--apply"])
    assert "applied: items and counters corrected" in applied.stderr
