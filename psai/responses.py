"""A provider's response, read as the counts it is billed for.

``usage_from_response(response)`` takes what a script holds after calling a
model: an SDK's response object (openai, anthropic, google-genai; read
through ``model_dump()`` / ``to_json_dict()``, never imported), its JSON as
a dict, or a stream: the chunks or events the SDK yielded (objects or
dicts), or the SDK's final accumulated object. It returns a
``ResponseUsage`` with the counts psai records (``record_usage``'s
arguments) and what PolicySynth's own class for that API would have
written (``ResponseUsage.policysynth()``, quirks included).

The APIs and what their usage means (docs/recording.md has the table):

- OpenAI Chat Completions (and Azure OpenAI): ``prompt_tokens`` includes
  the cached ones, ``completion_tokens`` the reasoning ones.
- OpenAI Responses: ``input_tokens`` includes the cached ones,
  ``output_tokens`` the reasoning ones; web searches are ``web_search_call``
  output items.
- Anthropic Messages: ``input_tokens`` excludes cache reads and writes;
  the billed input is all three. Writes are 5-minute or 1-hour
  (``cache_creation``); fast mode is ``usage.speed``.
- Gemini ``generateContent``: thoughts are billed as output beside
  ``candidatesTokenCount``; tool-use prompt tokens as input beside
  ``promptTokenCount``.

A stream that carries no usage (OpenAI without
``stream_options.include_usage``, a Responses stream cut before
``response.completed``) is a ValidationError, never zero tokens.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .constants import MAX_INTEGER
from .errors import ValidationError
from .schemas import load_json

__all__ = ["ResponseUsage", "usage_from_response", "load_response", "PROVIDERS", "API_FAMILIES"]

# The provider names psai records (PolicySynth's configuration values).
PROVIDERS = ("openai", "azure", "anthropic", "google")
# PolicySynth's apiFamily values, by API.
API_FAMILIES = {
    "chat": "openai.chat.completions",
    "responses": "responses",
    "messages": "messages",
    "gemini": "generateContent",
}


@dataclass(frozen=True)
class ResponseUsage:
    """What one call is billed for, read from the provider's response.

    ``tokens_in`` is all billed input (cached and cache writes included),
    ``tokens_out`` all output (reasoning included): the totals
    ``record_usage`` takes. ``cache_write_tokens`` are 5-minute writes,
    ``cache_write_1h_tokens`` 1-hour writes (Anthropic)."""

    tokens_in: int
    tokens_out: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_write_12h_tokens: int = 0
    audio_in_tokens: int = 0
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    image_tokens: int = 0
    web_searches: int = 0
    model: str | None = None
    provider: str | None = None
    api_family: str | None = None
    usage_raw: dict[str, Any] = field(default_factory=dict)
    provider_metadata: dict[str, Any] = field(default_factory=dict)
    # The provider's own cost of the call, where it says one (OpenRouter's usage.cost).
    provider_cost: float | None = None
    # What PolicySynth's class for this API writes as usageNormalized.
    _policysynth: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """``record_usage``'s count arguments."""
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens + self.cache_write_1h_tokens,
                "reasoning_tokens": self.reasoning_tokens, "audio_tokens": self.audio_tokens,
                "image_tokens": self.image_tokens, "web_searches": self.web_searches}

    def policysynth(self) -> dict[str, Any]:
        """The ``usageNormalized`` PolicySynth 1.3.172's class for this API
        writes for the same response, its quirks included."""
        return dict(self._policysynth)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_policysynth")
        return data


# -- reading what the caller holds ----------------------------------------------------

def _plain(value: Any) -> Any:
    """An SDK object (pydantic, google-genai) or JSON text as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for method in ("model_dump", "to_json_dict", "to_dict"):
        dump = getattr(value, method, None)
        if callable(dump):
            try:
                dumped = dump(mode="json") if method == "model_dump" else dump()
            except TypeError:
                dumped = dump()
            return _plain(dumped)
    if isinstance(value, (str, bytes)) and value[:1] in ("{", b"{", "[", b"["):
        return _plain(load_json(value, "response"))
    return value


def _get(data: Any, *names: str) -> Any:
    """The first of ``names`` present in ``data`` (camelCase or snake_case)."""
    if not isinstance(data, dict):
        return None
    for name in names:
        if data.get(name) is not None:
            return data[name]
    return None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _key(data: Any, name: str) -> Any:
    """``data[name]`` by Gemini's camelCase name or the SDK's snake_case one."""
    return _get(data, name, _snake(name))


class _Counts:
    """Counts read from one usage object, each checked: a whole number,
    0 or more, within what one counter holds; absent reads as 0."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.errors: dict[str, list[str]] = {}

    def __call__(self, value: Any, name: str) -> int:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            self.errors["%s.%s" % (self.where, name)] = ["Not a whole number of tokens: %r." % (value,)]
            return 0
        if value < 0:
            self.errors["%s.%s" % (self.where, name)] = ["Negative: %r." % (value,)]
            return 0
        if value > MAX_INTEGER:
            self.errors["%s.%s" % (self.where, name)] = ["Too large for one call: at most %d." % MAX_INTEGER]
            return 0
        return int(value)

    def refuse(self, message: str, name: str) -> None:
        self.errors["%s.%s" % (self.where, name)] = [message]

    def check(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


def _stream_or_response(response: Any) -> tuple[Any, list[Any] | None]:
    """(the response as plain JSON, or None; the stream's events, or None)."""
    if isinstance(response, (dict, str, bytes)) or hasattr(response, "model_dump") \
            or hasattr(response, "to_json_dict"):
        data = _plain(response)
        if isinstance(data, list):
            return None, data
        return data, None
    if isinstance(response, Iterable):
        return None, [_plain(event) for event in response]
    raise ValidationError({"response": ["Not a provider response: give the SDK's response, its JSON as a "
                                        "dict, or the list of a stream's chunks or events (got %s)."
                                        % type(response).__name__]})


# -- telling the API from the shape --------------------------------------------------

def _api_of(data: dict[str, Any]) -> str | None:
    if _get(data, "usageMetadata", "usage_metadata") is not None or "candidates" in data \
            or "modelVersion" in data or "model_version" in data:
        return "gemini"
    kind = data.get("object")
    if kind in ("chat.completion", "chat.completion.chunk") or "choices" in data:
        return "chat"
    if kind == "response" or ("output" in data and "status" in data):
        return "responses"
    if data.get("type") == "message" or (isinstance(data.get("usage"), dict)
                                         and "input_tokens" in data["usage"] and "content" in data):
        return "messages"
    usage = data.get("usage")
    if isinstance(usage, dict):
        if "prompt_tokens" in usage:
            return "chat"
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            return "messages"
        if "input_tokens" in usage:
            return "responses"
    return None


def _api_of_stream(events: list[Any]) -> str | None:
    for event in events:
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            return "responses"
        if kind in ("message_start", "message_delta", "message_stop", "content_block_delta",
                    "content_block_start", "content_block_stop"):
            return "messages"
        found = _api_of(event)
        if found:
            return found
    return None


_PROVIDER_APIS = {"openai": ("chat", "responses"), "azure": ("chat", "responses"), "anthropic": ("messages",),
                  "google": ("gemini",)}


def _provider_of(api: str, data: dict[str, Any], given: str | None) -> str:
    if given is not None:
        return given
    if api == "messages":
        return "anthropic"
    if api == "gemini":
        return "google"
    # Azure's chat completions carry content-filter results; OpenAI's do not.
    if "prompt_filter_results" in data or any(isinstance(c, dict) and "content_filter_results" in c
                                              for c in data.get("choices") or []):
        return "azure"
    return "openai"


# -- streams: the response the SDK would have accumulated ------------------------------

def _chat_from_stream(events: list[Any]) -> dict[str, Any]:
    """OpenAI chat chunks: the last chunk with usage (only sent with
    ``stream_options.include_usage``)."""
    with_usage = [e for e in events if isinstance(e, dict) and isinstance(e.get("usage"), dict)]
    if not with_usage:
        raise ValidationError({"response": [
            "This chat completion stream carries no usage: request it with "
            "stream_options={'include_usage': True}; psai never records a streamed call as 0 tokens."]})
    last = dict(with_usage[-1])
    for event in events:  # the id, model and tier are on every chunk
        if isinstance(event, dict):
            for key in ("id", "model", "service_tier", "system_fingerprint"):
                if last.get(key) is None and event.get(key) is not None:
                    last[key] = event[key]
    last["object"] = "chat.completion"
    return last


def _responses_from_stream(events: list[Any]) -> dict[str, Any]:
    for event in reversed(events):
        if isinstance(event, dict) and event.get("type") == "response.completed" \
                and isinstance(event.get("response"), dict):
            return event["response"]
    for event in reversed(events):  # the SDK's final object among the events
        if isinstance(event, dict) and event.get("object") == "response" and isinstance(event.get("usage"), dict):
            return event
    raise ValidationError({"response": [
        "This Responses stream has no response.completed event (cut off, or failed): "
        "its usage is unknown; psai never records a streamed call as 0 tokens."]})


def _messages_from_stream(events: list[Any]) -> dict[str, Any]:
    """Anthropic events: ``message_start``'s message, its usage updated by
    each ``message_delta`` (cumulative counts), as the SDK accumulates it."""
    message: dict[str, Any] | None = None
    for event in events:
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = dict(event["message"])
            message["usage"] = dict(message.get("usage") or {})
        elif kind == "message_delta" and message is not None:
            usage = event.get("usage") or {}
            for key, value in usage.items():
                if value is not None:
                    message["usage"][key] = value
            delta = event.get("delta") or {}
            for key in ("stop_reason", "stop_sequence"):
                if key in delta:
                    message[key] = delta[key]
        elif kind == "message" and isinstance(event.get("usage"), dict):
            message = event  # the SDK's final message
    if message is None:
        raise ValidationError({"response": [
            "This Anthropic stream has no message_start event: its usage is unknown; "
            "psai never records a streamed call as 0 tokens."]})
    return message


def _gemini_from_stream(events: list[Any]) -> dict[str, Any]:
    found = [e for e in events if isinstance(e, dict) and _key(e, "usageMetadata") is not None]
    if not found:
        raise ValidationError({"response": ["This Gemini stream carries no usageMetadata: its usage is unknown."]})
    last = dict(found[-1])
    for event in events:
        if isinstance(event, dict):
            for name in ("modelVersion", "responseId"):
                if _key(last, name) is None and _key(event, name) is not None:
                    last[name] = _key(event, name)
    return last


_FROM_STREAM = {"chat": _chat_from_stream, "responses": _responses_from_stream,
                "messages": _messages_from_stream, "gemini": _gemini_from_stream}


# -- each API's usage ---------------------------------------------------------------------

def _openai_counts(usage: dict[str, Any], prefix: str) -> tuple[int, int, int, int, int]:
    """(input, output, cached, reasoning, audio) of an OpenAI usage object:
    Chat Completions' (``prefix`` "prompt"/"completion" names) or the
    Responses API's ("input"/"output"); the totals hold the parts."""
    names = ("prompt", "completion") if prefix == "chat" else ("input", "output")
    count = _Counts("usage")
    total_in = count(usage.get(names[0] + "_tokens"), names[0] + "_tokens")
    total_out = count(usage.get(names[1] + "_tokens"), names[1] + "_tokens")
    in_details = usage.get(names[0] + "_tokens_details") or {}
    out_details = usage.get(names[1] + "_tokens_details") or {}
    cached = count(in_details.get("cached_tokens"), names[0] + "_tokens_details.cached_tokens")
    reasoning = count(out_details.get("reasoning_tokens"), names[1] + "_tokens_details.reasoning_tokens")
    audio = count(out_details.get("audio_tokens"), names[1] + "_tokens_details.audio_tokens")
    if cached > total_in:
        count.refuse("Cached tokens (%d) above the input's (%d)." % (cached, total_in),
                     names[0] + "_tokens_details.cached_tokens")
    if reasoning + audio > total_out:
        count.refuse("Reasoning and audio tokens (%d) above the output's (%d)." % (reasoning + audio, total_out),
                     names[1] + "_tokens_details")
    count.check()
    return total_in, total_out, cached, reasoning, audio


def _chat(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        raise ValidationError({"response.usage": ["This chat completion has no usage."]})
    tokens_in, tokens_out, cached, reasoning, audio = _openai_counts(usage, "chat")
    # Azure's class says "chat.completions" and defaults missing counts to 0.
    family = "chat.completions" if provider == "azure" else API_FAMILIES["chat"]
    return ResponseUsage(
        tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached, reasoning_tokens=reasoning,
        audio_tokens=audio, model=data.get("model"), provider=provider, api_family=family, usage_raw=usage,
        provider_metadata=_metadata(data.get("id"), data.get("service_tier")), provider_cost=_provider_cost(usage),
        _policysynth=_openai_chat_policysynth(usage, streamed or provider == "azure"))


def _responses(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        raise ValidationError({"response.usage": ["This response has no usage (not completed?)."]})
    tokens_in, tokens_out, cached, reasoning, audio = _openai_counts(usage, "responses")
    searches = sum(1 for item in data.get("output") or [] if isinstance(item, dict)
                   and item.get("type") == "web_search_call")
    return ResponseUsage(
        tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached, reasoning_tokens=reasoning,
        audio_tokens=audio, web_searches=searches, model=data.get("model"), provider=provider,
        api_family=API_FAMILIES["responses"], usage_raw=usage,
        provider_metadata=_metadata(data.get("id"), data.get("service_tier")),
        provider_cost=_provider_cost(usage), _policysynth=_openai_responses_policysynth(usage))


def _messages(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        raise ValidationError({"response.usage": ["This message has no usage."]})
    count = _Counts("usage")
    fresh = count(usage.get("input_tokens"), "input_tokens")
    output = count(usage.get("output_tokens"), "output_tokens")
    writes = count(usage.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    reads = count(usage.get("cache_read_input_tokens"), "cache_read_input_tokens")
    split = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else None
    if split is not None:
        five = count(split.get("ephemeral_5m_input_tokens"), "cache_creation.ephemeral_5m_input_tokens")
        hour = count(split.get("ephemeral_1h_input_tokens"), "cache_creation.ephemeral_1h_input_tokens")
        if usage.get("cache_creation_input_tokens") is None:
            writes = five + hour
        elif five + hour != writes:
            count.refuse("The 5-minute and 1-hour writes (%d) differ from cache_creation_input_tokens (%d)."
                         % (five + hour, writes), "cache_creation")
    else:
        five, hour = writes, 0
    searches = count((usage.get("server_tool_use") or {}).get("web_search_requests"),
                     "server_tool_use.web_search_requests")
    count.check()
    tier = usage.get("service_tier") if usage.get("service_tier") is not None else data.get("service_tier")
    metadata = _metadata(data.get("id"), tier)
    # Always said: without a speed, the call was served at standard speed
    # (and a "priority" service tier is not fast mode, which PolicySynth's
    # cost manager would take it for when no speed is given).
    metadata["appliedSpeed"] = usage.get("speed") or "standard"
    return ResponseUsage(
        tokens_in=fresh + writes + reads, tokens_out=output, cached_tokens=reads, cache_write_tokens=five,
        cache_write_1h_tokens=hour, web_searches=searches, model=data.get("model"), provider=provider,
        api_family=API_FAMILIES["messages"], usage_raw=usage, provider_metadata=metadata,
        provider_cost=_provider_cost(usage), _policysynth=_claude_policysynth(usage))


def _modality_tokens(details: Any, modality: str) -> int:
    total = 0
    for entry in details or []:
        if isinstance(entry, dict) and str(_key(entry, "modality") or "").upper() == modality:
            value = _key(entry, "tokenCount")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                total += value
    return total


def _gemini(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = _key(data, "usageMetadata")
    if not isinstance(usage, dict):
        raise ValidationError({"response.usageMetadata": ["This Gemini response has no usageMetadata."]})
    count = _Counts("usageMetadata")
    prompt = count(_key(usage, "promptTokenCount"), "promptTokenCount")
    tool_prompt = count(_key(usage, "toolUsePromptTokenCount"), "toolUsePromptTokenCount")
    candidates = count(_key(usage, "candidatesTokenCount"), "candidatesTokenCount")
    thoughts = count(_key(usage, "thoughtsTokenCount"), "thoughtsTokenCount")
    cached = count(_key(usage, "cachedContentTokenCount"), "cachedContentTokenCount")
    if cached > prompt + tool_prompt:
        count.refuse("Cached tokens (%d) above the prompt's (%d)." % (cached, prompt + tool_prompt),
                     "cachedContentTokenCount")
    count.check()
    details = _key(usage, "candidatesTokensDetails")
    return ResponseUsage(
        tokens_in=prompt + tool_prompt, tokens_out=candidates + thoughts, cached_tokens=cached,
        reasoning_tokens=thoughts, audio_tokens=_modality_tokens(details, "AUDIO"),
        image_tokens=_modality_tokens(details, "IMAGE"), model=_key(data, "modelVersion"), provider=provider,
        api_family=API_FAMILIES["gemini"], usage_raw=usage,
        provider_metadata=_metadata(_key(data, "responseId"), None), _policysynth=_gemini_policysynth(usage))


_READERS = {"chat": _chat, "responses": _responses, "messages": _messages, "gemini": _gemini}


def _metadata(response_id: Any, tier: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if response_id is not None:
        metadata["responseId"] = response_id
    if tier is not None:
        metadata["appliedServiceTier"] = tier
    return metadata


def _provider_cost(usage: dict[str, Any]) -> float | None:
    cost = usage.get("cost")
    return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None


# -- what PolicySynth 1.3.172 writes -------------------------------------------------------
#
# Each class's usageNormalized, as its compiled JS computes it (aiModels/*.js).
# JavaScript's ``??`` takes only null/undefined as missing; a key whose value
# is undefined is dropped when the item is serialised (None here drops it).

def _js(value: Any, default: Any = None) -> Any:
    """``value ?? default``."""
    return default if value is None else value


def _js_number(value: Any) -> Any:
    """A JavaScript number as JSON prints it: 100, not 100.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _defined(values: dict[str, Any]) -> dict[str, Any]:
    return {key: _js_number(value) for key, value in values.items() if value is not None}


def _openai_chat_policysynth(usage: dict[str, Any], streamed: bool) -> dict[str, Any]:
    """openAiChat.js (and azureOpenAiChat.js, which defaults every count to 0):
    the counts as the API gives them; without a stream, missing totals stay missing."""
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return _defined({
        "tokensIn": _js(usage.get("prompt_tokens"), 0 if streamed else None),
        "tokensOut": _js(usage.get("completion_tokens"), 0 if streamed else None),
        "cachedInTokens": _js(prompt.get("cached_tokens"), 0),
        "reasoningTokens": _js(completion.get("reasoning_tokens"), 0),
        "audioTokens": _js(completion.get("audio_tokens"), 0)})


def _openai_responses_policysynth(usage: dict[str, Any]) -> dict[str, Any]:
    """openAiResponses.js: Chat Completions' names as fallbacks, every count 0 when missing."""
    return _defined({
        "tokensIn": _js(usage.get("input_tokens"), _js(usage.get("prompt_tokens"), 0)),
        "tokensOut": _js(usage.get("output_tokens"), _js(usage.get("completion_tokens"), 0)),
        "cachedInTokens": _js((usage.get("input_tokens_details") or {}).get("cached_tokens"),
                              _js((usage.get("prompt_tokens_details") or {}).get("cached_tokens"), 0)),
        "reasoningTokens": _js((usage.get("output_tokens_details") or {}).get("reasoning_tokens"), 0),
        "audioTokens": _js((usage.get("output_tokens_details") or {}).get("audio_tokens"), 0)})


def _claude_policysynth(usage: dict[str, Any]) -> dict[str, Any]:
    """claudeChat.js: cache writes weighted 1.25 and reads 0.1 into tokensIn
    (fractional, in this order of operations), the writes as cachedInTokens;
    1-hour writes, web searches and usage.speed not read."""
    tokens_in = _js(usage.get("input_tokens"), 0)
    writes = usage.get("cache_creation_input_tokens")
    reads = _js(usage.get("cache_read_input_tokens"), 0)
    if writes is not None:
        tokens_in = tokens_in + writes * 1.25
    if reads != 0:
        tokens_in = tokens_in + reads * 0.1
    return _defined({"tokensIn": tokens_in, "tokensOut": _js(usage.get("output_tokens"), 0),
                     "cachedInTokens": _js(writes, 0), "cacheReadInputTokens": reads})


def _gemini_policysynth(usage: dict[str, Any]) -> dict[str, Any]:
    """googleGeminiChat.js: prompt plus tool-use prompt in; candidates plus
    thoughts out (or the total less the prompts when candidates is missing)."""
    prompt, tool = _key(usage, "promptTokenCount"), _key(usage, "toolUsePromptTokenCount")
    candidates, thoughts, total = (_key(usage, "candidatesTokenCount"), _js(_key(usage, "thoughtsTokenCount"), 0),
                                   _key(usage, "totalTokenCount"))
    if candidates is not None:
        tokens_out = candidates + thoughts
    elif total is not None and prompt is not None:
        tokens_out = total - prompt - _js(tool, 0)
    else:
        tokens_out = 0
    return _defined({"tokensIn": _js(prompt, 0) + _js(tool, 0), "tokensOut": tokens_out,
                     "cachedInTokens": _js(_key(usage, "cachedContentTokenCount"), 0),
                     "reasoningTokens": _js(_key(usage, "thoughtsTokenCount"), 0)})


def _policysynth_of_stream(api: str, events: list[Any], provider: str | None) -> dict[str, Any] | None:
    """Where PolicySynth's stream handling loses what the stream carried:
    OpenAI chat usage on a chunk without an id (the SDK's accumulator drops
    it; Azure's class reads every chunk), Gemini usage on any chunk but the
    last. None: as for the whole response."""
    if api == "chat" and provider != "azure":
        # The openai SDK's ChatCompletionStream: the first chunk starts the
        # snapshot, each later chunk with an id overwrites what it carries
        # (a null usage too).
        snapshot: dict[str, Any] | None = None
        for event in events:
            if not isinstance(event, dict):
                continue
            rest = {key: value for key, value in event.items() if key != "choices"}
            if snapshot is None:
                snapshot = rest
            elif event.get("id"):
                snapshot.update(rest)
        usage = (snapshot or {}).get("usage")
        return _openai_chat_policysynth(usage if isinstance(usage, dict) else {}, True)
    if api == "gemini":
        last = next((e for e in reversed(events) if isinstance(e, dict)), {})
        return _gemini_policysynth(_key(last, "usageMetadata") or {})
    return None


# -----------------------------------------------------------------------------------------

def load_response(text: str | bytes, name: str = "response") -> Any:
    """A response saved as JSON text: one JSON document (the response, or a
    list of a stream's events), or a stream's events one per line (JSON
    lines, as ``psai usage record-response --file`` takes them)."""
    try:
        return load_json(text, name)
    except ValidationError:
        lines = [line for line in (text.decode() if isinstance(text, bytes) else text).splitlines() if line.strip()]
        if len(lines) < 2:
            raise
    events = []
    for number, line in enumerate(lines, 1):
        if line.startswith("data:"):  # server-sent events as captured from the wire
            line = line[len("data:"):].strip()
            if line == "[DONE]":
                continue
        elif line.startswith("event:"):
            continue
        events.append(load_json(line, "%s line %d" % (name, number)))
    return events


def usage_from_response(response: Any, *, provider: str | None = None) -> ResponseUsage:
    """The billed counts of one call from the provider's response (see the
    module's docstring for what is accepted; a ResponseUsage read before is
    returned as it is). ``provider``: ``openai``,
    ``azure``, ``anthropic`` or ``google``; told from the shape when not given."""
    if provider is not None and provider not in PROVIDERS:
        raise ValidationError({"provider": ["Must be one of: %s." % ", ".join(PROVIDERS)]})
    if isinstance(response, ResponseUsage):  # read already (the command line shows it, then records it)
        if provider is not None and response.provider != provider:
            raise ValidationError({"provider": ["This is %s's response, not %s's." % (response.provider, provider)]})
        return response
    data, events = _stream_or_response(response)
    if events is not None:
        api = _api_of_stream(events)
        if api is None:
            raise ValidationError({"response": ["Not a stream psai knows (OpenAI chat chunks, Responses events, "
                                                "Anthropic message events, Gemini chunks)."]})
        data = _FROM_STREAM[api](events)
    else:
        if not isinstance(data, dict):
            raise ValidationError({"response": ["Not a provider response: %s." % type(data).__name__]})
        api = _api_of(data)
        if api is None:
            raise ValidationError({"response": ["Not a response psai can read: no usage of OpenAI, Anthropic "
                                                "or Gemini found."]})
    if provider is not None and api not in _PROVIDER_APIS[provider]:
        raise ValidationError({"provider": ["This is a %s response, not %s's." % (API_FAMILIES[api], provider)]})
    usage = _READERS[api](data, _provider_of(api, data, provider), events is not None)
    if events is not None:
        streamed_view = _policysynth_of_stream(api, events, usage.provider)
        if streamed_view is not None:
            usage = replace(usage, _policysynth=streamed_view)
    return usage
