"""psai.usage_from_response against PolicySynth's own model classes.

Each scenario is one canned provider response (or stream). PolicySynth
1.3.172's class for that API receives it from a mock server on 127.0.0.1,
through its own PsAiModelManager.callModel, and the usage item it would
write is captured (tests/interop/recording.mjs, one Node process for all
scenarios). psai reads the same response (for a stream, the same chunks or
events as dicts) and must give:

1. ``.policysynth()``: exactly PolicySynth's ``usageNormalized`` (its
   quirks included: Claude's weighted fractional input, cache writes as
   ``cachedInTokens``, ...);
2. ``.api_family``: PolicySynth's ``apiFamily`` for that class;
3. its own counts: what the provider bills (Anthropic's input is fresh +
   cache writes + cache reads, Gemini's output is candidates + thoughts, ...).

No database, but for the audit of the items those classes wrote (both backends).
Runs wherever Node.js is; with CI=true it must run."""
import copy
import json
from decimal import Decimal
import os
import pathlib
import subprocess

import pytest

import psai
from psai import PsAiModel, PsModelUsageItem
from psai._items import item_cost

from test_policysynth import PACKAGE_DIR, policysynth_package  # noqa: F401  (the session fixture)

SCRIPT = pathlib.Path(__file__).parent / "interop" / "recording.mjs"
NODE_TIMEOUT = 120  # seconds, for all scenarios; the script stops itself a little earlier

# The environment the classes must not see: each would send a call elsewhere than the mock,
# or stop it being recorded (the script removes them too).
UNSET = ("PS_AGENT_OVERRIDE_OPENAI_API_KEY", "OPENAI_ENFORCE_EU_REGION", "AZURE_OPENAI_KEY", "AZURE_ENDPOINT",
         "AZURE_DEPLOYMENT_NAME", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "AWS_BEARER_TOKEN_BEDROCK",
         "USE_VERTEX_FOR_CLAUDE", "USE_GOOGLE_VERTEX_AI_FOR_CLAUDE", "USE_CLAUDE_1M_CONTEXT_BETA_FLAG",
         "USE_GOOGLE_VERTEX_AI", "USE_GOOGLE_VERTEX_AI_FOR_MODELS", "DISABLE_DB_USAGE_TRACKING", "DISABLE_DB_INIT",
         "PS_AGENT_GEMINI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL")


# -- the canned responses ------------------------------------------------------------------

def _chat_usage(prompt, completion, cached, reasoning, audio=0):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": audio,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _chat_chunk(chunk_id, delta=None, finish=None, usage=None, **extra):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": 1764500000, "model": "gpt-5-mini-2025-08-07",
            "service_tier": "default", "system_fingerprint": None, "choices": choices, "usage": usage, **extra}


CHAT_USAGE = _chat_usage(2006, 300, 1920, 192)
CHAT_STREAM_USAGE = _chat_usage(1500, 420, 1024, 256, audio=12)

OPENAI_CHAT = {
    "id": "chatcmpl-psai1", "object": "chat.completion", "created": 1764500000, "model": "gpt-5-mini-2025-08-07",
    "service_tier": "default", "system_fingerprint": None,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello.", "refusal": None,
                                         "annotations": []}, "logprobs": None, "finish_reason": "stop"}],
    "usage": CHAT_USAGE}

OPENAI_CHAT_STREAM = [
    _chat_chunk("chatcmpl-psai2", {"role": "assistant", "content": "", "refusal": None}),
    _chat_chunk("chatcmpl-psai2", {"content": "Hel"}),
    _chat_chunk("chatcmpl-psai2", {"content": "lo."}),
    _chat_chunk("chatcmpl-psai2", {}, finish="stop"),
    _chat_chunk("chatcmpl-psai2", usage=CHAT_STREAM_USAGE),
]

RESPONSES_USAGE = {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 2048}, "output_tokens": 900,
                   "output_tokens_details": {"reasoning_tokens": 640}, "total_tokens": 3900}


def _response(response_id, status="completed", usage=RESPONSES_USAGE, output=None):
    if output is None:
        output = [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "web_search_call", "id": "ws_1", "status": "completed",
             "action": {"type": "search", "query": "psai"}},
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]}]
    return {"id": response_id, "object": "response", "created_at": 1764500000, "status": status,
            "model": "gpt-5-2025-08-07", "service_tier": "default", "previous_response_id": None, "store": True,
            "output": output, "usage": usage}


OPENAI_RESPONSES = _response("resp_psai1")
_completed = _response("resp_psai2")
OPENAI_RESPONSES_STREAM = [
    {"type": "response.created", "sequence_number": 0,
     "response": _response("resp_psai2", status="in_progress", usage=None, output=[])},
    {"type": "response.in_progress", "sequence_number": 1,
     "response": _response("resp_psai2", status="in_progress", usage=None, output=[])},
    {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
     "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}},
    {"type": "response.content_part.added", "sequence_number": 3, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
    {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "delta": "Hel"},
    {"type": "response.output_text.delta", "sequence_number": 5, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "delta": "lo."},
    {"type": "response.output_text.done", "sequence_number": 6, "item_id": "msg_1", "output_index": 0,
     "content_index": 0, "text": "Hello."},
    {"type": "response.output_item.done", "sequence_number": 7, "output_index": 0,
     "item": _completed["output"][2]},
    {"type": "response.completed", "sequence_number": 8, "response": _completed},
]

# 1001 cache writes (1 for 5 minutes, 1000 for an hour) and 3 reads: PolicySynth's
# 100 + 1001 * 1.25 + 3 * 0.1 is 1351.55 (a fraction).
CLAUDE_USAGE = {"input_tokens": 100, "cache_creation_input_tokens": 1001, "cache_read_input_tokens": 3,
                "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 1000},
                "output_tokens": 50, "service_tier": "standard"}
CLAUDE_FAST_USAGE = dict(CLAUDE_USAGE, speed="fast")


def _message(message_id, usage, model="claude-sonnet-4-5-20250929"):
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello."}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage}


def _message_stream(message_id, usage, model="claude-sonnet-4-5-20250929"):
    start = dict(_message(message_id, dict(usage, output_tokens=1), model), content=[], stop_reason=None)
    # message_delta's usage is cumulative: Anthropic repeats the input counts.
    delta_usage = {key: usage[key] for key in ("input_tokens", "cache_creation_input_tokens",
                                               "cache_read_input_tokens", "output_tokens")}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": delta_usage},
        {"type": "message_stop"},
    ]


GEMINI_USAGE = {"promptTokenCount": 1200, "candidatesTokenCount": 180, "thoughtsTokenCount": 420,
                "toolUsePromptTokenCount": 64, "cachedContentTokenCount": 1024, "totalTokenCount": 1864,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}],
                "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
                "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 180}]}


def _gemini(text, usage, finish="STOP", response_id="gemini-psai1"):
    candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "gemini-2.5-pro",
            "responseId": response_id}


GEMINI = _gemini("Hello.", GEMINI_USAGE)
GEMINI_STREAM = [
    _gemini("Hel", {"promptTokenCount": 1200, "toolUsePromptTokenCount": 64, "totalTokenCount": 1264},
            finish=None, response_id="gemini-psai2"),
    _gemini("lo", {"promptTokenCount": 1200, "toolUsePromptTokenCount": 64, "thoughtsTokenCount": 420,
                   "candidatesTokenCount": 90, "totalTokenCount": 1774}, finish=None, response_id="gemini-psai2"),
    _gemini(".", GEMINI_USAGE, response_id="gemini-psai2"),
]

AZURE_FILTERS = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
                 "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}
AZURE_USAGE = _chat_usage(2500, 700, 1280, 512)
AZURE_CHAT = {
    "id": "chatcmpl-psai3", "object": "chat.completion", "created": 1764500000, "model": "o4-mini-2025-04-16",
    "system_fingerprint": None,
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}],
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello.", "refusal": None},
                 "finish_reason": "stop", "logprobs": None, "content_filter_results": AZURE_FILTERS}],
    "usage": AZURE_USAGE}


def _azure_chunk(delta=None, finish=None, usage=None):
    chunk = {"id": "chatcmpl-psai4", "object": "chat.completion.chunk", "created": 1764500000,
             "model": "o4-mini-2025-04-16", "system_fingerprint": None, "choices": [], "usage": usage}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None,
                             "content_filter_results": {} if finish else AZURE_FILTERS}]
    return chunk


AZURE_STREAM = [
    # Azure's first chunk: no id, no model, only the prompt's filter results.
    {"id": "", "object": "", "created": 0, "model": "", "choices": [],
     "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}]},
    _azure_chunk({"role": "assistant", "content": "", "refusal": None}),
    _azure_chunk({"content": "Hello."}),
    _azure_chunk({}, finish="stop"),
    _azure_chunk(usage=AZURE_USAGE),
]


def _expect(tokens_in, tokens_out, cached=0, write_5m=0, write_1h=0, reasoning=0, audio=0, web_searches=0):
    return {"tokens_in": tokens_in, "tokens_out": tokens_out, "cached_tokens": cached, "cache_write_tokens": write_5m,
            "cache_write_1h_tokens": write_1h, "reasoning_tokens": reasoning, "audio_tokens": audio,
            "web_searches": web_searches}


# name: (PolicySynth's model configuration, the path the class calls, psai's provider,
#        the response, psai's counts by the provider's documented billing)
SCENARIOS = {
    "openai_chat": (
        {"provider": "openai", "model": "gpt-5-mini", "response": OPENAI_CHAT},
        "/v1/chat/completions", "openai",
        # prompt_tokens includes the cached, completion_tokens the reasoning.
        _expect(2006, 300, cached=1920, reasoning=192)),
    "openai_chat_stream": (
        {"provider": "openai", "model": "gpt-5-mini", "events": OPENAI_CHAT_STREAM, "done": True},
        "/v1/chat/completions", "openai",
        _expect(1500, 420, cached=1024, reasoning=256, audio=12)),
    "openai_responses": (
        {"provider": "openaiResponses", "model": "gpt-5", "response": OPENAI_RESPONSES},
        "/v1/responses", "openai",
        # input_tokens includes the cached, output_tokens the reasoning; a web_search_call is one search.
        _expect(3000, 900, cached=2048, reasoning=640, web_searches=1)),
    "openai_responses_stream": (
        {"provider": "openaiResponses", "model": "gpt-5", "events": OPENAI_RESPONSES_STREAM, "named": True},
        "/v1/responses", "openai",
        _expect(3000, 900, cached=2048, reasoning=640, web_searches=1)),
    "anthropic_messages": (
        {"provider": "anthropic", "model": "claude-sonnet-4-5-20250929", "response": _message("msg_psai1",
                                                                                            CLAUDE_USAGE)},
        "/v1/messages", "anthropic",
        # input_tokens excludes cache writes and reads: billed input is all three.
        _expect(100 + 1001 + 3, 50, cached=3, write_5m=1, write_1h=1000)),
    "anthropic_messages_stream": (
        {"provider": "anthropic", "model": "claude-sonnet-4-5-20250929", "named": True,
         "events": _message_stream("msg_psai2", CLAUDE_USAGE)},
        "/v1/messages", "anthropic",
        _expect(1104, 50, cached=3, write_5m=1, write_1h=1000)),
    # Fast mode (claude-opus-4-6, inferenceType "fast"): PolicySynth's beta messages path.
    "anthropic_messages_fast": (
        {"provider": "anthropic", "model": "claude-opus-4-6", "config": {"inferenceType": "fast"},
         "response": _message("msg_psai3", CLAUDE_FAST_USAGE, model="claude-opus-4-6")},
        "/v1/messages?beta=true", "anthropic",
        _expect(1104, 50, cached=3, write_5m=1, write_1h=1000)),
    "anthropic_messages_fast_stream": (
        {"provider": "anthropic", "model": "claude-opus-4-6", "config": {"inferenceType": "fast"}, "named": True,
         "events": _message_stream("msg_psai4", CLAUDE_FAST_USAGE, model="claude-opus-4-6")},
        "/v1/messages?beta=true", "anthropic",
        _expect(1104, 50, cached=3, write_5m=1, write_1h=1000)),
    "gemini": (
        {"provider": "google", "model": "gemini-2.5-pro", "response": GEMINI},
        "/v1beta/models/gemini-2.5-pro:generateContent", "google",
        # Thoughts are output beside candidates; tool-use prompt tokens input beside the prompt.
        _expect(1200 + 64, 180 + 420, cached=1024, reasoning=420)),
    "gemini_stream": (
        {"provider": "google", "model": "gemini-2.5-pro", "events": GEMINI_STREAM},
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "google",
        _expect(1264, 600, cached=1024, reasoning=420)),
    "azure_chat": (
        {"provider": "azure", "model": "o4-mini", "config": {"deploymentName": "psai-dep"}, "response": AZURE_CHAT},
        "/v1/deployments/psai-dep/chat/completions?api-version=2024-10-21", "azure",
        _expect(2500, 700, cached=1280, reasoning=512)),
    "azure_chat_stream": (
        {"provider": "azure", "model": "o4-mini", "config": {"deploymentName": "psai-dep"}, "events": AZURE_STREAM,
         "done": True},
        "/v1/deployments/psai-dep/chat/completions?api-version=2024-10-21", "azure",
        _expect(2500, 700, cached=1280, reasoning=512)),
}

# PolicySynth's quirks psai says it reproduces, each on a response a little off the usual.
OPENAI_CHAT_STREAM_USAGE_WITHOUT_ID = OPENAI_CHAT_STREAM[:-1] + [dict(OPENAI_CHAT_STREAM[-1], id="")]
OPENAI_CHAT_STREAM_NULL_USAGE_AFTER = OPENAI_CHAT_STREAM + [_chat_chunk("chatcmpl-psai2", usage=None)]
CLAUDE_STREAM_READS_UPDATED = _message_stream("msg_psai5", CLAUDE_USAGE)
CLAUDE_STREAM_READS_UPDATED[5]["usage"]["cache_read_input_tokens"] = 13
GEMINI_THOUGHTS_ONLY = {
    "candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}],
    "usageMetadata": {"promptTokenCount": 1000, "thoughtsTokenCount": 300, "totalTokenCount": 1300},
    "modelVersion": "gemini-2.5-pro", "responseId": "gemini-psai3"}

SCENARIOS.update({
    # Usage on a chunk without an id: the openai SDK's accumulator keeps only the first
    # chunk's and id-bearing chunks' fields, so PolicySynth writes zeros.
    "openai_chat_stream_usage_without_id": (
        {"provider": "openai", "model": "gpt-5-mini", "events": OPENAI_CHAT_STREAM_USAGE_WITHOUT_ID, "done": True},
        "/v1/chat/completions", "openai",
        _expect(1500, 420, cached=1024, reasoning=256, audio=12)),
    # A chunk with an id and "usage": null after the usage chunk: Object.assign overwrites the
    # accumulated usage with null.
    "openai_chat_stream_null_usage_after": (
        {"provider": "openai", "model": "gpt-5-mini", "events": OPENAI_CHAT_STREAM_NULL_USAGE_AFTER, "done": True},
        "/v1/chat/completions", "openai",
        _expect(1500, 420, cached=1024, reasoning=256, audio=12)),
    # No completion_tokens: OpenAiChat's non-streaming path has no default, so no tokensOut key.
    "openai_chat_without_completion_tokens": (
        {"provider": "openai", "model": "gpt-5-mini",
         "response": dict(OPENAI_CHAT, usage={"prompt_tokens": 5, "total_tokens": 5})},
        "/v1/chat/completions", "openai",
        _expect(5, 0)),
    # message_delta's cumulative counts replace message_start's (13 reads, not 3).
    "anthropic_messages_stream_reads_updated": (
        {"provider": "anthropic", "model": "claude-sonnet-4-5-20250929", "named": True,
         "events": CLAUDE_STREAM_READS_UPDATED},
        "/v1/messages", "anthropic",
        _expect(100 + 1001 + 13, 50, cached=13, write_5m=1, write_1h=1000)),
    # Thinking ran out of tokens: no candidatesTokenCount; PolicySynth takes total - prompt.
    "gemini_thoughts_only": (
        {"provider": "google", "model": "gemini-2.5-pro", "response": GEMINI_THOUGHTS_ONLY},
        "/v1beta/models/gemini-2.5-pro:generateContent", "google",
        _expect(1000, 300, reasoning=300)),
})

# Where PolicySynth builds the item but writes no row (no usage at all: usageRaw undefined and
# every count 0, so shouldPersistUsageItem is false); its usageNormalized is still compared.
NOT_WRITTEN = {"openai_chat_stream_usage_without_id", "openai_chat_stream_null_usage_after"}

def _response_of(scenario):
    spec = SCENARIOS[scenario][0]
    return copy.deepcopy(spec["events"] if "events" in spec else spec["response"])


# -- PolicySynth's side: one Node process for every scenario --------------------------------

@pytest.fixture(scope="module")
def recorded(request):
    package = request.getfixturevalue("policysynth_package")
    scenarios = [dict(spec, name=name, stream="events" in spec) for name, (spec, *_) in SCENARIOS.items()]
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env.update(PS_AGENTS_DIR=str(package), PSAI_ARGS=json.dumps(scenarios),
               PSAI_NODE_TIMEOUT_MS=str((NODE_TIMEOUT - 10) * 1000))
    result = subprocess.run(["node", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT,
                            cwd=str(PACKAGE_DIR))
    assert result.returncode == 0, result.stderr[-3000:]
    return {entry["name"]: entry for entry in json.loads(result.stdout.split("@@psai-result@@", 1)[1])}


def _item(recorded, name):
    """The one usage item PolicySynth's class built for the scenario (and wrote, unless
    the scenario is one of NOT_WRITTEN)."""
    entry = recorded[name]
    assert entry["error"] is None, entry["error"]
    assert len(entry["items"]) == 1, entry
    assert entry["items"][0]["persist"] is (name not in NOT_WRITTEN), entry
    return entry["items"][0]["data"]


def _psai(name):
    _, _, provider, _ = SCENARIOS[name]
    return psai.usage_from_response(_response_of(name), provider=provider)


def _json(value):
    """As JSON prints it: 100 and 100.0 differ, as do a missing key and a null."""
    return json.dumps(value, sort_keys=True)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_policysynth_ran_its_class_on_the_canned_response(recorded, name):
    spec, path, _, _ = SCENARIOS[name]
    entry = recorded[name]
    assert [request["url"] for request in entry["requests"]] == [path], entry["requests"]
    item = _item(recorded, name)
    assert item["request"]["streaming"] is ("events" in spec)
    assert (item.get("usageRaw") is not None) is (name not in NOT_WRITTEN)
    # The counters get the same numbers as the item.
    normalized = item["usageNormalized"]
    assert entry["counters"] == [[normalized.get(key) for key in ("tokensIn", "cachedInTokens", "tokensOut")]]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_policysynth_view_is_what_policysynth_wrote(recorded, name):
    written = _item(recorded, name)["usageNormalized"]
    assert _json(_psai(name).policysynth()) == _json(written)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_api_family_is_policysynths(recorded, name):
    assert _psai(name).api_family == _item(recorded, name)["apiFamily"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_psai_counts_are_what_the_provider_bills(name):
    *_, provider, expected = SCENARIOS[name]
    usage = _psai(name)
    counts = {key: getattr(usage, key) for key in expected}
    assert counts == expected
    assert usage.provider == provider
    assert all(type(value) is int for value in counts.values())


def test_the_anthropic_scenarios_give_policysynth_a_fractional_input(recorded):
    # The point of 1001 writes and 3 reads: PolicySynth's weighted input is not whole.
    for name in ("anthropic_messages", "anthropic_messages_stream", "anthropic_messages_fast",
                 "anthropic_messages_fast_stream"):
        normalized = _item(recorded, name)["usageNormalized"]
        assert normalized["tokensIn"] == 100 + 1001 * 1.25 + 3 * 0.1 == 1351.55
        assert normalized["cachedInTokens"] == 1001 and normalized["cacheReadInputTokens"] == 3


def test_anthropic_fast_mode_is_said(recorded):
    for name in ("anthropic_messages_fast", "anthropic_messages_fast_stream"):
        assert _psai(name).provider_metadata["appliedSpeed"] == "fast"
        assert recorded[name]["requests"][0]["speed"] == "fast"
    for name in ("anthropic_messages", "anthropic_messages_stream"):
        assert _psai(name).provider_metadata["appliedSpeed"] == "standard"


# -- psai audit on the items PolicySynth's own classes wrote (both backends) ------------------

def test_audit_corrects_policysynths_own_claude_items_to_the_bill(recorded, db):
    prices = {"costInTokensPerMillion": 1, "costOutTokensPerMillion": 2, "costInCachedContextTokensPerMillion": 0.5,
              "cacheWriteInputCostMultiplier": 1.25, "cacheWrite1hInputCostMultiplier": 2,
              "fastTokensIn": 6, "fastTokensCachedIn": 3, "fastTokensOut": 12, "currency": "USD"}
    model = PsAiModel.create(user_id=1, organization_id=1, name="Claude", configuration={
        "type": "text", "modelSize": "medium", "model": "claude-sonnet-4-5", "provider": "anthropic", "active": True,
        "prices": prices, "maxTokensOut": 4096, "defaultTemperature": 0.7})
    names = ("anthropic_messages", "anthropic_messages_stream", "anthropic_messages_fast",
             "anthropic_messages_fast_stream", "openai_chat", "gemini")
    ids = {}
    for name in names:
        data = copy.deepcopy(_item(recorded, name))
        data["pricing"]["configuredPrices"] = prices  # PolicySynth's item as written, with a currency to price it
        ids[name] = PsModelUsageItem.create(user_id=1, model_id=model.id, agent_id=0, data=data).id
    result = psai.audit(dry_run=False)
    assert sorted(f["item_id"] for f in result["findings"]) == sorted(ids[n] for n in names[:4])
    million = Decimal(10) ** 6
    standard = (100 * 1 + 1 * Decimal("1.25") + 1000 * 2 + 3 * Decimal("0.5") + 50 * 2) / million
    fast = (100 * 6 + 1 * 6 * Decimal("1.25") + 1000 * 6 * 2 + 3 * 3 + 50 * 12) / million
    for name, bill in zip(names[:4], (standard, standard, fast, fast)):
        data = PsModelUsageItem.get_by_id(ids[name]).data
        assert item_cost(data) == bill, name
        assert data["usageNormalized"]["tokensIn"] == 1104 and data["psai"]["cacheWrite1hTokens"] == 1000
        finding = next(f for f in result["findings"] if f["item_id"] == ids[name])
        assert finding["cost_billed"] == bill and finding["cost_recorded"] < bill
    assert psai.audit()["findings"] == []
