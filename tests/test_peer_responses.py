"""Every response and stream other projects recorded from the providers
(tests/data/peer-responses: pydantic-ai's live cassettes, genai-prices,
Helicone, the anthropic and openai SDKs, LiteLLM; each case's .meta.json
says where it came from and what each peer expected) read as the provider
bills it, by the provider's documentation, or refused only where it is not
a billed call; then recorded on both backends. Below, one focused test per
defect those cases found, each on a documented shape."""
import json
import os
from decimal import Decimal
from pathlib import Path

import pytest
from peewee import IntegrityError

import psai
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem
from psai._responses import load_response, read_response, usage_from_response

DATA = Path(__file__).parent / "data" / "peer-responses"
CASES_DIR = DATA / "cases"
CASES = sorted(p.name.split(".")[0] for p in CASES_DIR.iterdir() if not p.name.endswith(".meta.json"))
M = Decimal(10) ** 6

COUNTS = ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
          "cache_write_12h_tokens", "audio_in_tokens", "reasoning_tokens", "audio_tokens", "image_tokens",
          "web_searches")


def billed(model, provider, tier=None, other_calls=(), **counts):
    return {"model": model, "provider": provider, "tier": tier, "other_calls": list(other_calls),
            "counts": dict(dict.fromkeys(COUNTS, 0), **counts)}


def refused(why):
    return {"refused": why}


# What each case is billed for, from the provider's documentation; where a
# peer reads a case differently, the comment says who is right and why.
EXPECTED = {
    # Advisor iterations are calls of the advisor model, outside the top-level
    # usage (2390 = the two executor iterations 1128 + 1262): psai exposes the
    # advisor's own call; pydantic-ai and genai-prices leave it out unbilled.
    # thinking_tokens are part of output_tokens, read as reasoning.
    "ant_advisor": billed("claude-sonnet-5", "anthropic", tokens_in=2390, tokens_out=121, reasoning_tokens=28,
                          tier="standard", other_calls=[("claude-opus-4-8", 2518, 22)]),
    "ant_advisor_stream": billed("claude-sonnet-5", "anthropic", tokens_in=2411, tokens_out=145, reasoning_tokens=47,
                                 tier="standard", other_calls=[("claude-opus-4-8", 2543, 18)]),
    "ant_bedrock_invoke_read": billed("claude-haiku-4-5-20251001", "anthropic", tokens_in=9514, tokens_out=1944,
                                      cached_tokens=9511),
    "ant_bedrock_invoke_write": billed("claude-haiku-4-5-20251001", "anthropic", tokens_in=11470, tokens_out=44,
                                       cached_tokens=9511, cache_write_tokens=1956),
    "ant_cache_read": billed("claude-sonnet-4-5-20250929", "anthropic", tokens_in=1114, tokens_out=406,
                             cached_tokens=1111, tier="standard"),
    "ant_cache_write_5m": billed("claude-sonnet-4-5-20250929", "anthropic", tokens_in=1532, tokens_out=33,
                                 cached_tokens=1111, cache_write_tokens=418, tier="standard"),
    "ant_cache_write_5m_b": billed("claude-opus-4-8", "anthropic", tokens_in=1592, tokens_out=4,
                                   cache_write_tokens=1590, tier="standard"),
    # Its code_execution tool's input JSON arrives as partial_json strings: never parsed.
    "ant_code_exec_stream": billed("claude-sonnet-4-6", "anthropic", tokens_in=4714, tokens_out=304, tier="standard"),
    # Compaction is billed outside the top-level usage (the API reference:
    # "A compaction entry's tokens are not included in the top-level usage
    # fields"): 220 + the compaction's 55196 in, 8 + 125 out. genai-prices
    # reads the top level only (220 in, 8 out: 99.6 % short).
    "ant_compaction": billed("claude-sonnet-4-6", "anthropic", tokens_in=55416, tokens_out=133, tier="standard"),
    "ant_compaction_cache": billed("claude-sonnet-4-6", "anthropic", tokens_in=55425, tokens_out=136,
                                   cache_write_tokens=55096, tier="standard"),
    # message_delta's usage replaces message_start's (its cache_read 0 is the
    # message iteration's); the compaction iteration read the 55096.
    "ant_compaction_cache_stream": billed("claude-sonnet-4-6", "anthropic", tokens_in=55377, tokens_out=91,
                                          cached_tokens=55096, tier="standard"),
    "ant_plain": billed("claude-opus-5", "anthropic", tokens_in=13, tokens_out=44, reasoning_tokens=33,
                        tier="standard"),
    "ant_sdk_fallback_credit_stream": billed("claude-sonnet-4-5", "anthropic", tokens_in=25, tokens_out=8),
    # The fallback block hands the call from claude-opus-4-7 to the model that served (and is billed).
    "ant_sdk_fallback_stream": billed("claude-sonnet-4-5", "anthropic", tokens_in=25, tokens_out=8),
    "ant_sdk_refusal_stream": billed("claude-fable-5", "anthropic", tokens_in=28, tokens_out=106,
                                     reasoning_tokens=67, tier="standard"),
    "ant_thinking_stream": billed("claude-sonnet-4-20250514", "anthropic", tokens_in=43, tokens_out=282,
                                  tier="standard"),
    # Anthropic bills each web search ($10 per 1,000); pydantic-ai's snapshot leaves it out.
    "ant_web_search": billed("claude-sonnet-4-20250514", "anthropic", tokens_in=8984, tokens_out=520, web_searches=1,
                             tier="standard"),
    "ant_web_search_stream": billed("claude-sonnet-4-20250514", "anthropic", tokens_in=31772, tokens_out=644,
                                    web_searches=2, tier="standard"),
    "azure_chat": billed("gpt-4o-2024-11-20", "azure", tokens_in=14, tokens_out=9),
    "azure_responses": billed("gpt-5.6-sol", "azure", tokens_in=18, tokens_out=5, tier="default"),
    "chat_audio_in": billed("gpt-4o-audio-preview-2024-12-17", "openai", tokens_in=81, tokens_out=72,
                            audio_in_tokens=69, tier="default"),
    "chat_cache_read": billed("gpt-5.6-sol", "openai", tokens_in=4020, tokens_out=4, cached_tokens=4012,
                              tier="default"),
    "chat_cache_write": billed("gpt-5.6-sol", "openai", tokens_in=4020, tokens_out=4, cache_write_tokens=4012,
                               tier="default"),
    "chat_plain": billed("gpt-5-mini-2025-08-07", "openai", tokens_in=129, tokens_out=19, tier="default"),
    "chat_reasoning": billed("o3-mini-2025-01-31", "openai", tokens_in=577, tokens_out=2320, reasoning_tokens=1792,
                             tier="default"),
    "chat_stream": billed("gpt-4o-mini-2024-07-18", "openai", tokens_in=53, tokens_out=15, tier="default"),
    "gem_audio_in": billed("gemini-2.5-flash", "google", tokens_in=214, tokens_out=17, audio_in_tokens=144),
    "gem_cache_resource": refused("cachedContents resource"),
    "gem_cached": billed("gemini-2.5-flash", "google", tokens_in=3520, tokens_out=44, cached_tokens=3512,
                         reasoning_tokens=42, tier="standard"),
    "gem_image_out": billed("gemini-2.5-flash-image", "google", tokens_in=17, tokens_out=1336, image_tokens=1290),
    "gem_implicit_cache_av": billed("gemini-2.5-flash", "google", tokens_in=17713, tokens_out=889,
                                    cached_tokens=17379, audio_in_tokens=1917, reasoning_tokens=821, tier="standard"),
    "gem_no_candidates": billed("gemini-3-flash-preview", "google", tokens_in=510, tokens_out=18,
                                reasoning_tokens=18),
    "gem_safety_blocked": billed("gemini-1.5-flash", "google", tokens_in=14),
    "gem_stream_live": billed("gemini-2.5-flash", "google", tokens_in=18, tokens_out=115, reasoning_tokens=35,
                              tier="standard"),
    # Its text is JSON ("{\n  \"city\": ..."), split across chunks: never parsed.
    "gem_stream_thinking": billed("gemini-3-flash-preview", "google", tokens_in=128, tokens_out=51,
                                  reasoning_tokens=30),
    "gem_stream_tool_use": billed("gemini-3-flash-preview", "google", tokens_in=507, tokens_out=276,
                                  reasoning_tokens=168),
    "gem_thinking": billed("gemini-3-pro-preview", "google", tokens_in=29, tokens_out=1737, reasoning_tokens=1001),
    "gem_tool_use": billed("gemini-2.5-flash", "google", tokens_in=217, tokens_out=82, reasoning_tokens=54),
    # total_tokens 109 - prompt 35 - completion 12 = 62 thinking tokens, billed
    # as output; genai-prices reads 12 out.
    "gemini_openai_compat": billed("gemini-2.5-pro-preview-05-06", "google", tokens_in=35, tokens_out=74,
                                   reasoning_tokens=62),
    "gp_ant_1h": billed("claude-sonnet-4-20250514", "anthropic", tokens_in=627, tokens_out=97, cache_write_tokens=100,
                        cache_write_1h_tokens=23, tier="standard"),
    "gp_ant_minimal": billed("claude-3-5-haiku", "anthropic", tokens_in=504, tokens_out=97, tier="standard"),
    "gp_bedrock_converse": refused("Bedrock Converse"),
    "gp_gemini_cache_audio": billed("gemini-2.5-flash", "google", tokens_in=14152, tokens_out=129,
                                    cached_tokens=12239, audio_in_tokens=150, reasoning_tokens=69, audio_tokens=10,
                                    tier="standard"),
    "gp_gemini_tool_thoughts": billed("gemini-2.5-flash", "google", tokens_in=100, tokens_out=162,
                                      reasoning_tokens=144, tier="standard"),
    "gp_openai_cache_write_chat": billed("gpt-5.6-sol", "openai", tokens_in=2006, tokens_out=300,
                                         cache_write_tokens=1920),
    "gp_openai_cache_write_responses": billed("gpt-5.6-sol", "openai", tokens_in=2006, tokens_out=300,
                                              cache_write_tokens=1920),
    "gp_openai_chat_nulls": billed("gpt-4.1", "openai", tokens_in=100, tokens_out=200, reasoning_tokens=120),
    "gp_openai_responses_min": billed("gpt-5", "openai", tokens_in=100, tokens_out=200, reasoning_tokens=120),
    "hc_anthropic_json": billed("claude-3-5-sonnet-20241022", "anthropic", tokens_in=242, tokens_out=12,
                                cached_tokens=183, cache_write_tokens=50, tier="standard"),
    # tool_use partial_json deltas ('{"location": ...') and a ping event: neither is usage.
    "hc_anthropic_stream_1h": billed("claude-3-5-haiku-20241022", "anthropic", tokens_in=858, tokens_out=65,
                                     cached_tokens=500, cache_write_1h_tokens=20, tier="standard"),
    "hc_azure_json": billed("gpt-4.1-2025-04-14", "azure", tokens_in=18, tokens_out=100),
    # Azure is told by the first chunk's prompt_filter_results.
    "hc_azure_stream": billed("gpt-4.1-2025-04-14", "azure", tokens_in=18, tokens_out=100),
    "hc_gpt4o_cached": billed("gpt-4o-2024-08-06", "openai", tokens_in=1248, tokens_out=10, cached_tokens=1152,
                              tier="default"),
    "hc_gpt4o_stream": billed("gpt-4o-2024-08-06", "openai", tokens_in=1248, tokens_out=10, tier="default"),
    # null counts read as 0 (genai-prices raises on them).
    "llm_ant_nulls_in": billed("claude-sonnet-4-5-20250929", "anthropic", tokens_out=43),
    "llm_ant_nulls_out": billed("claude-sonnet-4-5-20250929", "anthropic", tokens_in=301, cached_tokens=200,
                                cache_write_tokens=100),
    "llm_ant_write_only": billed("claude-sonnet-4-5-20250929", "anthropic", tokens_in=12307, tokens_out=550,
                                 cache_write_tokens=12304),
    "oai_sdk_stream": billed("gpt-4o-2024-08-06", "openai", tokens_in=79, tokens_out=14),
    "oai_sdk_stream_no_usage": refused("include_usage"),
    # OpenRouter's Claude: prompt_tokens 3329 = 3 fresh + 3211 read + 115 written.
    "openrouter_anthropic_read": billed("anthropic/claude-4.6-sonnet-20260217", "openai", tokens_in=3329,
                                        tokens_out=53, cached_tokens=3211, cache_write_tokens=115),
    "openrouter_anthropic_write": billed("anthropic/claude-4.6-sonnet-20260217", "openai", tokens_in=3214,
                                         tokens_out=100, cache_write_tokens=3211),
    "pai_chat_stream_cache_write": billed("gpt-5.6-sol", "openai", tokens_in=100, tokens_out=10, cached_tokens=20,
                                          cache_write_tokens=30),
    "pai_resp_stream_cache_write": billed("gpt-5.6-sol", "openai", tokens_in=2006, tokens_out=300,
                                          cached_tokens=1920, cache_write_tokens=64, reasoning_tokens=10),
    "resp_background_resume": billed("gpt-4o-2024-08-06", "openai", tokens_in=15, tokens_out=9, tier="default"),
    "resp_background_stream": billed("gpt-4o-2024-08-06", "openai", tokens_in=15, tokens_out=9, tier="default"),
    "resp_cache_write": billed("gpt-5.6-sol", "openai", tokens_in=4020, tokens_out=5, cache_write_tokens=4012,
                               tier="default"),
    "resp_cached": billed("gpt-4o-2024-08-06", "openai", tokens_in=1349, tokens_out=10, cached_tokens=1024),
    "resp_reasoning": billed("gpt-5-2025-08-07", "openai", tokens_in=314, tokens_out=2737, reasoning_tokens=2112,
                             tier="default"),
    "resp_stream_cut": refused("no response.completed"),
    # OpenAI bills each web_search_call; genai-prices' extractor leaves them out.
    "resp_web_search": billed("gpt-5-2025-08-07", "openai", tokens_in=115886, tokens_out=1720, cached_tokens=92160,
                              reasoning_tokens=1472, web_searches=6, tier="default"),
    "resp_web_search_stream": billed("gpt-5-2025-08-07", "openai", tokens_in=9463, tokens_out=582,
                                     cached_tokens=8320, reasoning_tokens=512, web_searches=1, tier="default"),
    "resp_zero": billed("gpt-4o-2024-08-06", "openai"),
    # Blocked by Model Armor before the model ran: 0 tokens, as the response says.
    "vertex_armor_blocked": billed("gemini-2.5-flash", "google", tier="standard"),
    "vertex_flex": billed("gemini-3-flash-preview", "google", tokens_in=5, tokens_out=52, reasoning_tokens=51,
                          tier="flex"),
    # One chunk, one SSE event.
    "vertex_flex_stream": billed("gemini-3-flash-preview", "google", tokens_in=5, tokens_out=101,
                                 reasoning_tokens=100, tier="flex"),
    "vertex_image_out": billed("gemini-2.5-flash-image", "google", tokens_in=9, tokens_out=1290, image_tokens=1290,
                               tier="standard"),
    "vertex_video": billed("gemini-2.0-flash", "google", tokens_in=1569, tokens_out=60, tier="standard"),
}


def meta(case):
    return json.loads((CASES_DIR / (case + ".meta.json")).read_text())


def case_file(case):
    return CASES_DIR / meta(case)["file"]


def read(case, as_text=False):
    raw = case_file(case).read_bytes()
    return usage_from_response(raw.decode() if as_text else load_response(raw),
                               provider=meta(case).get("provider_hint"))


def as_expected(usage):
    return {"model": usage.model, "provider": usage.provider, "tier": usage.provider_metadata.get("appliedServiceTier"),
            "other_calls": [(call.model, call.tokens_in, call.tokens_out) for call in usage.other_calls],
            "counts": {name: getattr(usage, name) for name in COUNTS}}


def test_the_table_covers_every_case_and_agrees_with_what_the_cases_say():
    assert len(CASES) == 77 and set(EXPECTED) == set(CASES)
    for case in CASES:
        expect = meta(case).get("expect") or {}
        if expect.get("refuse"):
            assert "refused" in EXPECTED[case], case
            continue
        assert "refused" not in EXPECTED[case], case
        for key in ("model", "provider"):
            if key in expect:
                assert EXPECTED[case][key] == expect[key], case
        for name, value in (expect.get("counts") or {}).items():
            assert EXPECTED[case]["counts"][name] == value, case


@pytest.mark.parametrize("case", CASES)
def test_each_case_is_read_as_billed_or_refused_saying_why(case):
    expected = EXPECTED[case]
    if "refused" in expected:
        with pytest.raises(psai.ValidationError, match=expected["refused"]):
            read(case)
        return
    usage = read(case)
    assert as_expected(usage) == expected
    assert as_expected(read(case, as_text=True)) == expected  # the text itself, as given


def test_the_in_repo_copy_is_the_shared_folder():
    """tests/data/peer-responses is a copy of ../shared/peer-responses (or
    $PSAI_PEER_RESPONSES): where that folder is at hand, they agree."""
    given = os.environ.get("PSAI_PEER_RESPONSES")
    shared = Path(given) if given else Path(__file__).resolve().parents[2] / "shared" / "peer-responses"
    if not (shared / "cases").is_dir():
        pytest.skip("the shared folder is not beside this clone: the in-repo copy is what the tests read")
    for path in (shared / "cases").iterdir():
        assert (CASES_DIR / path.name).read_bytes() == path.read_bytes(), path.name


# -- recorded, on both backends --------------------------------------------------------------------

PRICES = {"costInTokensPerMillion": 2, "costOutTokensPerMillion": 8, "costInCachedContextTokensPerMillion": 0.5,
          "cacheWriteInputCostMultiplier": 1.25, "costPerThousandWebSearches": 10, "currency": "USD"}
STORED_PROVIDER = {"openai": "openai", "azure": "azure", "anthropic": "anthropic", "google": "google"}


def test_every_billed_case_is_recorded_with_its_counts(db):
    agent = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "Peer cases"})
    recorded = 0
    for case in CASES:
        expected = EXPECTED[case]
        if "refused" in expected:
            with pytest.raises(psai.ValidationError):
                psai.record_response(None, agent, load_response(case_file(case).read_bytes()))
            continue
        model = PsAiModel.create(user_id=1, organization_id=1, name="model of " + case, configuration={
            "type": "text", "modelSize": "large", "model": expected["model"], "active": True,
            "provider": STORED_PROVIDER[expected["provider"]], "maxTokensOut": 4096, "defaultTemperature": 0.7,
            "prices": PRICES})
        row = psai.record_response(model, agent, load_response(case_file(case).read_bytes()),
                                   provider=meta(case).get("provider_hint"))
        recorded += 1
        counts = expected["counts"]
        item = PsModelUsageItem.select().where(PsModelUsageItem.model_id == model.id).get()
        normalized = item.data["usageNormalized"]
        assert (normalized["tokensIn"], normalized["tokensOut"], normalized["cachedInTokens"],
                normalized["reasoningTokens"], normalized["audioTokens"], normalized["imageTokens"]) == (
            counts["tokens_in"], counts["tokens_out"], counts["cached_tokens"], counts["reasoning_tokens"],
            counts["audio_tokens"], counts["image_tokens"]), case
        extras = item.data.get("psai", {})
        writes = counts["cache_write_tokens"] + counts["cache_write_1h_tokens"] + counts["cache_write_12h_tokens"]
        assert extras.get("cacheWriteTokens", 0) == writes, case
        assert extras.get("webSearches", 0) == counts["web_searches"], case
        # Each other call is an item of its own, on its model (here its placeholder: none is configured).
        others = [PsModelUsageItem.get(PsModelUsageItem.model_id == other.model_id,
                                       PsModelUsageItem.created_at == other.usage_row.updated_at).data
                  for other in row.other_calls]
        assert [(data["model"]["name"], data["usageNormalized"]["tokensIn"], data["usageNormalized"]["tokensOut"])
                for data in others] == expected["other_calls"], case
        assert [other["model"] for other in extras.get("otherCalls", [])] \
            == [name for name, _in, _out in expected["other_calls"]], case
        assert item.data.get("providerMetadata", {}).get("appliedServiceTier") == expected["tier"], case
        counters = PsModelUsage.get_by_id(row.usage_row.id)
        assert counters.token_in_count + counters.token_in_cached_context_count \
            + counters.token_in_cache_write_count + counters.long_context_token_in_count == counts["tokens_in"], case
    assert recorded == 73 and PsModelUsageItem.select().count() == 75  # and the two advisor calls


# -- one test per defect class, each on a documented shape ------------------------------------------

def chat(content="hi", usage=None, **extra):
    return dict({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}],
                 "usage": usage if usage is not None else {"prompt_tokens": 100, "completion_tokens": 20,
                                                          "total_tokens": 120}}, **extra)


def chat_chunks(usage=None, first=None):
    chunks = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
               "choices": [{"index": 0, "delta": {"content": "[1] Paris"}, "finish_reason": None}]},
              {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
               "usage": usage or {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}]
    return ([first] if first else []) + chunks


def claude_events(start_usage=None, delta_usage=None, blocks=()):
    events = [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-7", "content": [],
        "usage": start_usage or {"input_tokens": 25, "output_tokens": 1}}}]
    for index, block in enumerate(blocks):
        events += [{"type": "content_block_start", "index": index, "content_block": block},
                   {"type": "content_block_stop", "index": index}]
    if delta_usage is not False:
        events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": delta_usage or {"output_tokens": 8}})
    return events + [{"type": "message_stop"}]


def gemini_chunks(last_finishes=True, **usage):
    usage = dict({"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}, **usage)
    last = {"candidates": [{"content": {"parts": [{"text": "]"}]}}], "usageMetadata": usage,
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    if last_finishes:
        last["candidates"][0]["finishReason"] = "STOP"
    return [{"candidates": [{"content": {"parts": [{"text": "[1"}]}}], "modelVersion": "gemini-2.5-flash",
             "responseId": "r1"}, last]


def sse(events):
    return "".join("data: %s\n\n" % json.dumps(event) for event in events)


def test_strings_inside_a_response_are_the_models_words_never_parsed():
    # An answer that reads like JSON, tool arguments cut mid-value, structured output.
    for content in ("[1] Paris", '{"city": "Par', "[", '{"a": 1}'):
        assert usage_from_response(chat(content)).tokens_in == 100
        assert usage_from_response(json.dumps(chat(content))).tokens_in == 100
    tool_call = chat(None)
    tool_call["choices"][0]["message"]["tool_calls"] = [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": '{"q": [1, 2'}}]
    assert usage_from_response(tool_call).tokens_out == 20
    assert usage_from_response(chat_chunks()).tokens_in == 100
    assert usage_from_response(load_response(sse(chat_chunks()))).tokens_in == 100
    partial = claude_events(blocks=[{"type": "tool_use", "id": "t", "name": "f", "input": {}}])
    partial.insert(2, {"type": "content_block_delta", "index": 0,
                       "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'}})
    assert usage_from_response(partial).tokens_out == 8
    assert usage_from_response(gemini_chunks()).tokens_in == 10
    # Lines of a stream as the wire gave them are the one place text is read.
    assert usage_from_response(sse(chat_chunks()).splitlines()).tokens_in == 100


def test_a_one_event_sse_transcript_is_a_stream_of_one_event():
    chunk = gemini_chunks()[1]
    assert load_response("data: %s\n\n" % json.dumps(chunk)) == [chunk]
    assert load_response(("data: %s\r\n\r\n" % json.dumps(chunk)).encode()) == [chunk]
    assert usage_from_response("data: %s\n" % json.dumps(chunk)).tokens_in == 10


def test_anthropic_compaction_is_billed_outside_the_top_level_usage():
    compaction = {"type": "compaction", "input_tokens": 100, "output_tokens": 131,
                  "cache_creation_input_tokens": 55096, "cache_read_input_tokens": 0,
                  "cache_creation": {"ephemeral_5m_input_tokens": 55096, "ephemeral_1h_input_tokens": 0}}
    message = {"type": "message", "input_tokens": 229, "output_tokens": 5, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0}
    body = {"id": "msg_1", "type": "message", "model": "claude-sonnet-4-6", "content": [],
            "usage": {"input_tokens": 229, "output_tokens": 5, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "iterations": [compaction, message]}}
    usage = usage_from_response(body)
    assert (usage.tokens_in, usage.tokens_out, usage.cache_write_tokens) == (229 + 100 + 55096, 136, 55096)
    # Streamed: message_start's usage is the compaction's; message_delta brings
    # the iterations and resets cache_read_input_tokens to the message's 0.
    events = claude_events(
        start_usage={"input_tokens": 100, "output_tokens": 7, "cache_read_input_tokens": 55096,
                     "cache_creation_input_tokens": 0},
        delta_usage={"input_tokens": 181, "output_tokens": 8, "cache_read_input_tokens": 0,
                     "cache_creation_input_tokens": 0, "iterations": [
                         dict(compaction, output_tokens=83, cache_creation_input_tokens=0, cache_creation=None,
                              cache_read_input_tokens=55096),
                         dict(message, input_tokens=181, output_tokens=8)]})
    streamed = usage_from_response(events)
    assert (streamed.tokens_in, streamed.cached_tokens, streamed.tokens_out) == (181 + 100 + 55096, 55096, 91)


def test_an_advisor_iteration_is_another_models_call_never_dropped(db):
    advisor = {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 2518, "output_tokens": 22,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    body = {"id": "msg_1", "type": "message", "model": "claude-sonnet-5", "content": [],
            "usage": {"input_tokens": 2390, "output_tokens": 121, "iterations": [
                {"type": "message", "input_tokens": 1128, "output_tokens": 110}, advisor,
                {"type": "message", "input_tokens": 1262, "output_tokens": 11}]}}
    usage = usage_from_response(body)
    assert (usage.model, usage.tokens_in, usage.tokens_out) == ("claude-sonnet-5", 2390, 121)
    [call] = usage.other_calls
    assert (call.model, call.tokens_in, call.tokens_out, call.provider) == ("claude-opus-4-8", 2518, 22, "anthropic")
    assert call.provider_metadata["parentResponseId"] == "msg_1"
    assert usage.as_dict()["other_calls"][0]["model"] == "claude-opus-4-8"
    with pytest.raises(psai.ValidationError, match="names no model"):
        usage_from_response(dict(body, usage=dict(body["usage"], iterations=[dict(advisor, model=None)])))
    model = PsAiModel.create(user_id=1, organization_id=1, name="Sonnet 5", configuration={
        "type": "text", "modelSize": "large", "model": "claude-sonnet-5", "provider": "anthropic", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": PRICES})
    recorded = psai.record_response(model, None, body)
    [other] = recorded.other_calls
    main = PsModelUsageItem.get(PsModelUsageItem.model_id == model.id)
    assert main.data["psai"]["otherCalls"] == [
        {"model": "claude-opus-4-8", "modelId": other.model_id, "responseId": "msg_1#advisor-1"}]


OPUS_PRICES = dict(PRICES, costInTokensPerMillion=5, costOutTokensPerMillion=25)


@pytest.mark.parametrize("case, advisor_in, advisor_out", [("ant_advisor", 2518, 22),
                                                           ("ant_advisor_stream", 2543, 18)])
def test_an_advisor_call_is_recorded_as_its_own_item_on_its_model(db, case, advisor_in, advisor_out):
    agent = PsAgent.create(user_id=7, class_id=1, group_id=1, configuration={"name": "Advised"})
    sonnet, opus = (PsAiModel.create(user_id=1, organization_id=1, name=name, configuration={
        "type": "text", "modelSize": "large", "model": model, "provider": "anthropic", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": prices})
        for name, model, prices in [("Sonnet 5", "claude-sonnet-5", PRICES),
                                    ("Opus 4.8", "claude-opus-4-8", OPUS_PRICES)])
    response = load_response(case_file(case).read_bytes())
    call = psai.record_response(None, agent, response, connector_id=3)
    [advisor] = call.other_calls
    assert (call.model_id, advisor.model_id, advisor.duplicate) == (sonnet.id, opus.id, False)
    assert advisor.response_id == call.response_id + "#advisor-1"
    assert (advisor.cost, advisor.currency) == ((advisor_in * 5 + advisor_out * 25) / M, "USD")
    items = {item.model_id: item for item in PsModelUsageItem.select()}
    assert set(items) == {sonnet.id, opus.id}
    assert {(item.agent_id, item.user_id, item.connector_id) for item in items.values()} == {(agent.id, 7, 3)}
    assert items[sonnet.id].data["psai"]["otherCalls"] == [
        {"model": "claude-opus-4-8", "modelId": opus.id, "responseId": advisor.response_id}]
    assert items[opus.id].data["psai"]["parentResponseId"] == call.response_id
    by_model = {row["model_id"]: (row["calls"], row["tokens_in"], row["tokens_out"], row["cost"])
                for row in psai.cost_report("model")}
    assert by_model[opus.id] == (1, advisor_in, advisor_out, advisor.cost)
    assert by_model[sonnet.id][::3] == (1, call.cost)
    again = psai.record_response(None, agent, response)  # the same response: nothing recorded twice
    assert again.duplicate and [(other.model_id, other.response_id, other.duplicate, other.cost)
                                for other in again.other_calls] == [(opus.id, advisor.response_id, True, advisor.cost)]
    assert PsModelUsageItem.select().count() == 2


def test_an_advisor_on_no_configured_model_goes_on_its_placeholder_unpriced(db):
    sonnet = PsAiModel.create(user_id=1, organization_id=1, name="Sonnet 5", configuration={
        "type": "text", "modelSize": "large", "model": "claude-sonnet-5", "provider": "anthropic", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": PRICES})
    call = psai.record_response(None, None, load_response(case_file("ant_advisor").read_bytes()))
    [advisor] = call.other_calls
    placeholder = PsAiModel.get_by_id(advisor.model_id)
    assert call.cost is not None and call.model_id == sonnet.id
    assert placeholder.configuration["model"] == "claude-opus-4-8" and not placeholder.configuration["active"]
    assert advisor.cost is None and advisor.unpriced_reason
    [row] = [row for row in psai.cost_report("model") if row["model_id"] == placeholder.id]
    assert (row["cost"], row["unpriced_tokens"], bool(row["unpriced_reason"])) == (None, 2518 + 22, True)


def test_track_and_the_command_line_count_and_show_the_advisor_call(db, backend):
    from click.testing import CliRunner
    from psai.cli import cli
    for name, model, prices in [("Sonnet 5", "claude-sonnet-5", PRICES), ("Opus 4.8", "claude-opus-4-8", OPUS_PRICES)]:
        PsAiModel.create(user_id=1, organization_id=1, name=name, configuration={
            "type": "text", "modelSize": "large", "model": model, "provider": "anthropic", "active": True,
            "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": prices})
    with psai.track(None) as run:
        main_cost = run.record(load_response(case_file("ant_advisor").read_bytes()))
    assert (run.calls, run.unpriced_calls, run.cost) == (2, 0, {"USD": main_cost + (2518 * 5 + 22 * 25) / M})
    result = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record-response", "--json",
                                      "--file", str(case_file("ant_advisor_stream"))])
    assert result.exit_code == 0, result.output
    [other] = json.loads(result.output)["other_calls"]
    assert (other["model"], other["response_id"].endswith("#advisor-1"), other["duplicate"], Decimal(other["cost"])) \
        == ("claude-opus-4-8", True, False, (2543 * 5 + 18 * 25) / M)
    result = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record-response",
                                      "--file", str(case_file("ant_advisor_stream"))])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 2, result.output
    assert "already recorded" in result.output and "claude-opus-4-8" in result.output.splitlines()[1]
    assert PsModelUsageItem.select().count() == 4


def test_a_response_and_its_advisor_calls_are_recorded_all_or_nothing(db):
    for name, model in [("Sonnet 5", "claude-sonnet-5"), ("Opus 4.8", "claude-opus-4-8")]:
        PsAiModel.create(user_id=1, organization_id=1, name=name, configuration={
            "type": "text", "modelSize": "large", "model": model, "provider": "anthropic", "active": True,
            "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": PRICES})
    response = json.loads(case_file("ant_advisor").read_text())
    # An item holding the advisor's derived id already: its insert fails, and the main call's goes with it.
    taken = psai.record_response(None, None, dict(response, id=response["id"] + "#advisor-1", usage={
        "input_tokens": 1, "output_tokens": 1}))
    with pytest.raises(IntegrityError):
        psai.record_response(None, None, response)
    assert [item.data["psai"]["responseId"] for item in PsModelUsageItem.select()] == [taken.response_id]
    assert PsModelUsage.select().count() == 1


def test_openai_cache_writes_thirty_minutes_and_twelve_hours():
    usage = usage_from_response(chat(usage={"prompt_tokens": 4020, "completion_tokens": 4, "prompt_tokens_details": {
        "cached_tokens": 0, "cache_write_tokens": 4012}}))
    assert (usage.cache_write_tokens, usage.cache_write_12h_tokens, usage.counts()["cache_write_tokens"]) \
        == (4012, 0, 4012)
    response = {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-5.6-sol", "output": [],
                "usage": {"input_tokens": 5000, "output_tokens": 5, "input_tokens_details": {
                    "cached_tokens": 100, "cache_write_tokens": 4000,
                    "cache_write_tokens_details": {"ttl_30m_tokens": 1000, "ttl_12h_tokens": 3000}}}}
    usage = usage_from_response(response)
    assert (usage.tokens_in, usage.cached_tokens, usage.cache_write_tokens, usage.cache_write_12h_tokens) \
        == (5000, 100, 1000, 3000)
    assert usage.counts()["cache_write_tokens"] == 4000  # every write is a write; 12 hours priced apart
    response["usage"]["input_tokens_details"]["cache_write_tokens"] = 3999
    with pytest.raises(psai.ValidationError, match="differ from cache_write_tokens"):
        usage_from_response(response)
    with pytest.raises(psai.ValidationError, match="above the input"):
        usage_from_response(chat(usage={"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {
            "cached_tokens": 5, "cache_write_tokens": 6}}))


def test_an_anthropic_fallback_is_priced_at_the_model_that_served():
    fallback = {"type": "fallback", "from": {"model": "claude-opus-4-7"}, "to": {"model": "claude-sonnet-4-5"},
                "trigger": {"type": "refusal"}}
    assert usage_from_response(claude_events(blocks=[fallback])).model == "claude-sonnet-4-5"
    body = {"id": "msg_1", "type": "message", "model": "claude-opus-4-7", "content": [fallback],
            "usage": {"input_tokens": 25, "output_tokens": 8}}
    assert usage_from_response(body).model == "claude-sonnet-4-5"
    served = dict(body, content=[], usage=dict(body["usage"], iterations=[
        {"type": "fallback_message", "model": "claude-haiku-4-5", "input_tokens": 25, "output_tokens": 8}]))
    assert usage_from_response(served).model == "claude-haiku-4-5"


def test_azure_is_told_from_any_chunk_and_from_a_responses_content_filters():
    first = {"id": "", "object": "", "model": "", "choices": [], "prompt_filter_results": [
        {"prompt_index": 0, "content_filter_results": {}}]}
    assert usage_from_response(chat_chunks(first=first)).provider == "azure"
    assert usage_from_response(chat_chunks()).provider == "openai"
    response = {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-5", "output": [],
                "content_filters": [{"blocked": False, "source_type": "prompt"}],
                "usage": {"input_tokens": 18, "output_tokens": 5}}
    assert usage_from_response(response).provider == "azure"


def test_gemini_through_the_openai_endpoint_bills_its_hidden_thinking_as_output():
    body = chat(usage={"prompt_tokens": 35, "completion_tokens": 12, "total_tokens": 109},
                model="gemini-2.5-pro")
    usage = usage_from_response(body)
    assert (usage.tokens_out, usage.reasoning_tokens, usage.provider) == (74, 62, "google")
    assert usage_from_response(body, provider="google").api_family == "openai.chat.completions"


def test_the_callers_provider_decides_the_api_over_the_shape():
    bare = {"model": "claude-3-5-haiku", "usage": {"input_tokens": 504, "output_tokens": 97}}
    assert usage_from_response(bare).api_family == "responses"  # the shape alone: OpenAI's names
    read = usage_from_response(bare, provider="anthropic")
    assert (read.api_family, read.provider, read.tokens_in) == ("messages", "anthropic", 504)
    with pytest.raises(psai.ValidationError, match="not anthropic's"):
        usage_from_response(chat(), provider="anthropic")


def test_gemini_and_vertex_tiers_are_kept_and_priced(db):
    model = PsAiModel.create(user_id=1, organization_id=1, name="Flash", configuration={
        "type": "text", "modelSize": "large", "model": "gemini-3-flash-preview", "provider": "google",
        "active": True, "maxTokensOut": 4096, "defaultTemperature": 0.7,
        "prices": dict(PRICES, flexTokensIn=1, flexTokensOut=4, flexTokensCachedIn=0.25)})
    body = {"candidates": [{"finishReason": "STOP"}], "modelVersion": "gemini-3-flash-preview", "responseId": "r",
            "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 500,
                              "trafficType": "ON_DEMAND_FLEX"}}
    usage = usage_from_response(body)
    assert usage.provider_metadata == {"responseId": "r", "trafficType": "ON_DEMAND_FLEX",
                                       "appliedServiceTier": "flex"}
    with psai.track(None, model) as run:
        flex = run.record(body)
        # Three calls: three response ids (one response recorded twice is one call).
        standard = run.record(dict(body, responseId="r2",
                                   usageMetadata=dict(body["usageMetadata"], trafficType="ON_DEMAND")))
        service_tier = run.record(dict(body, responseId="r3", usageMetadata=dict(
            {"promptTokenCount": 1000, "candidatesTokenCount": 500}, serviceTier="flex")))
    assert flex == (1000 * 1 + 500 * 4) / M == service_tier
    assert standard == (1000 * 2 + 500 * 8) / M


def test_cut_off_streams_are_refused_alike_for_every_api():
    with pytest.raises(psai.ValidationError, match="no message_delta"):
        usage_from_response(claude_events(delta_usage=False))
    with pytest.raises(psai.ValidationError, match="no finishing chunk"):
        usage_from_response(gemini_chunks(last_finishes=False))
    chunks = chat_chunks()
    del chunks[1]  # the chunk with the finish_reason
    with pytest.raises(psai.ValidationError, match="no finish_reason"):
        usage_from_response(chunks)
    with pytest.raises(psai.ValidationError, match="no response.completed"):
        usage_from_response([{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}])
    # A Responses stream that ran out of output tokens is billed as it ran.
    incomplete = {"id": "resp_1", "object": "response", "status": "incomplete", "model": "gpt-5", "output": [],
                  "usage": {"input_tokens": 10, "output_tokens": 100}}
    assert usage_from_response([{"type": "response.incomplete", "response": incomplete}]).tokens_out == 100


# -- hostile and odd input (issue 34): refused in one line, never a traceback or a 0-token call ---------

@pytest.mark.parametrize("response, why", [
    (chat(usage={}), "no counts"),
    (chat(usage={"total_tokens": 120}), "no counts"),
    ({"id": "resp_1", "object": "response", "status": "completed", "output": [], "usage": {"total_tokens": 5}},
     "no counts"),
    ({"id": "msg_1", "type": "message", "content": [], "usage": {}}, "no counts"),
    ({"candidates": [{"finishReason": "STOP"}], "usageMetadata": {"totalTokenCount": 5}}, "no counts"),
])
def test_a_usage_without_counts_is_refused_naming_why(response, why):
    with pytest.raises(psai.ValidationError, match=why):
        usage_from_response(response)


def test_a_stream_mixing_calls_or_providers_is_refused_never_merged():
    claude = claude_events()
    with pytest.raises(psai.ValidationError, match="another provider's"):
        usage_from_response(chat_chunks() + [claude[0]])
    with pytest.raises(psai.ValidationError, match="another provider's"):
        usage_from_response(claude + [gemini_chunks()[1]])
    other = [dict(chunk, id="chatcmpl-2") for chunk in chat_chunks()]
    with pytest.raises(psai.ValidationError, match="another call"):
        usage_from_response(chat_chunks() + other)
    with pytest.raises(psai.ValidationError, match="another message"):
        usage_from_response(claude + claude)
    with pytest.raises(psai.ValidationError, match="another call"):
        usage_from_response(gemini_chunks() + [dict(gemini_chunks()[1], responseId="r2")])
    done = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
            "usage": {"input_tokens": 1, "output_tokens": 1}}
    with pytest.raises(psai.ValidationError, match="another call"):
        usage_from_response([{"type": "response.completed", "response": done},
                             {"type": "response.completed", "response": dict(done, id="resp_2")}])


def test_sse_comments_ids_and_retries_are_part_of_the_wire_format():
    text = ": keep-alive\nretry: 1000\n" + "".join(
        "id: %d\nevent: chunk\ndata: %s\n\n" % (n, json.dumps(event)) for n, event in enumerate(chat_chunks()))
    assert load_response(text) == chat_chunks()
    assert usage_from_response(text).tokens_in == 100


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 1, "completion_tokens": 1, "prompt_tokens_details": [1]},
    {"prompt_tokens": 1, "completion_tokens": 1, "completion_tokens_details": "many"},
    {"prompt_tokens": 1, "completion_tokens": 1, "cost": 10 ** 400},
    {"prompt_tokens": "1", "completion_tokens": 1},
])
def test_wrongly_shaped_chat_usage_is_a_validation_error(usage):
    with pytest.raises(psai.ValidationError):
        usage_from_response(chat(usage=usage))


def test_wrongly_shaped_responses_are_validation_errors():
    for body in ({"id": "msg_1", "type": "message", "content": [],
                  "usage": {"input_tokens": 1, "output_tokens": 1, "server_tool_use": [1]}},
                 {"id": "msg_1", "type": "message", "content": [], "usage": {"input_tokens": 1, "iterations": 5}},
                 {"candidates": [], "usageMetadata": {"promptTokenCount": 1, "promptTokensDetails": "AUDIO"}},
                 {"id": "resp_1", "object": "response", "status": "completed", "output": 5,
                  "usage": {"input_tokens": 1, "output_tokens": 1, "input_tokens_details": [0]}},
                 "[" * 5000 + "]" * 5000, b"\xff\xfe{}", '{"usage": {"prompt_tokens": 1%s}}' % ("0" * 5000)):
        with pytest.raises(psai.ValidationError):
            usage_from_response(body)
    assert usage_from_response(dict(chat(), choices=5)).tokens_in == 100  # choices are not usage
    with pytest.raises(psai.ValidationError):
        usage_from_response([dict(chunk, choices=5) for chunk in chat_chunks()])  # no finish_reason


@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe not text", "UTF-8"),
    (('{"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1%s}}' % ("0" * 5000)).encode(),
     "digits"),
    (json.dumps(chat(usage={"prompt_tokens": 1, "completion_tokens": 1, "cost": 10 ** 400})).encode(), "cost"),
    (("[" * 5000 + "]" * 5000).encode(), "deep"),
    (json.dumps(chat(usage={"prompt_tokens": 1, "completion_tokens_details": [1]})).encode(), "Not an object"),
    (sse(chat_chunks() + claude_events()[:1]).encode(), "another provider's"),
])
def test_record_response_from_the_command_line_refuses_hostile_files_in_one_line(db, backend, tmp_path,
                                                                                 content, why):
    from click.testing import CliRunner
    from psai.cli import cli
    path = tmp_path / "response"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record-response", "gpt-4o",
                                      "--file", str(path)])
    assert result.exit_code == 2, result.output
    assert why in result.output and "Traceback" not in result.output and len(result.output.splitlines()) <= 2
    assert PsModelUsageItem.select().count() == 0


def test_a_stream_is_read_in_bounded_memory():
    import tracemalloc
    chunk = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
                        "choices": [{"index": 0, "delta": {"content": "x" * 200}, "finish_reason": None}]})
    count = 20000

    def lines():
        for _ in range(count):
            yield "data: %s\n" % chunk
            yield "\n"
        for event in chat_chunks()[1:]:
            yield "data: %s\n\n" % json.dumps(event)
        yield "data: [DONE]\n"

    tracemalloc.start()
    try:
        usage = usage_from_response(read_response(lines()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert usage.tokens_in == 100
    assert peak < len(chunk) * count / 20  # the stream is ~5 MB; a few events are held at a time


def _sdk_objects(kind, data):
    """The case as the provider's SDK hands it over: its own typed objects,
    built the SDK's way from what the API sent (anthropic and openai build
    responses leniently, with construct_type; google-genai drops the fields
    it does not know, then validates)."""
    from anthropic._models import construct_type as anthropic_construct
    from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent
    from google.genai.types import GenerateContentResponse
    from openai._models import construct_type as openai_construct
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    built = {"anthropic": lambda value: anthropic_construct(type_=BetaMessage, value=value),
             "anthropic_stream": lambda value: anthropic_construct(type_=BetaRawMessageStreamEvent, value=value),
             "openai_chat": lambda value: openai_construct(type_=ChatCompletion, value=value),
             "openai_chat_stream": lambda value: openai_construct(type_=ChatCompletionChunk, value=value),
             "openai_responses": lambda value: openai_construct(type_=Response, value=value),
             "openai_responses_stream": lambda value: openai_construct(type_=ResponseStreamEvent, value=value),
             "genai": lambda value: GenerateContentResponse._from_response(response=value, kwargs={}),
             "genai_stream": lambda value: GenerateContentResponse._from_response(response=value, kwargs={})}
    if isinstance(data, list):
        return [built[kind](event) for event in data]
    return built[kind](data)


SDK_CASES = [case for case in CASES if meta(case).get("sdk")]


@pytest.mark.parametrize("case", SDK_CASES)
def test_the_sdks_own_objects_read_as_their_json(case):
    objects = _sdk_objects(meta(case)["sdk"], load_response(case_file(case).read_bytes()))
    read = as_expected(usage_from_response(objects, provider=meta(case).get("provider_hint")))
    if meta(case)["sdk"].startswith("genai") and read["tier"] is None:
        read["tier"] = EXPECTED[case]["tier"]  # google-genai 3.6 drops usageMetadata.serviceTier, unknown to it
    assert read == EXPECTED[case]
