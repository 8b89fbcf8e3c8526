"""A provider's response, read as the counts it is billed for.

``usage_from_response(response)`` takes what a script holds after calling a
model: an SDK's response object (openai, anthropic, google-genai; read
through ``model_dump()`` / ``to_json_dict()``, never imported), its JSON as
a dict or as text, or a stream: the chunks or events the SDK yielded
(objects, dicts, or the lines of the wire), or the SDK's final accumulated
object. It returns a ``ResponseUsage`` with the counts psai records
(``record_usage``'s arguments) and what PolicySynth's own class for that
API would have written (``ResponseUsage.policysynth()``, quirks included).

Only the response itself (its text, or one line of a stream) is ever parsed
as JSON: the strings inside it (an answer "[1] Paris", a tool call's
arguments, structured output) are the model's words, never read.

The APIs and what their usage means (docs/recording.md has the table):

- OpenAI Chat Completions (and Azure OpenAI, OpenRouter, Gemini's
  OpenAI-compatible endpoint): ``prompt_tokens`` includes the cached ones
  and the cache writes, ``completion_tokens`` the reasoning ones; a
  ``total_tokens`` above the two is output the completion count left out
  (Gemini's thinking).
- OpenAI Responses: ``input_tokens`` includes the cached ones and the
  cache writes (30-minute or 12-hour), ``output_tokens`` the reasoning
  ones; web searches are ``web_search_call`` output items.
- Anthropic Messages: ``input_tokens`` excludes cache reads and writes;
  the billed input is all three. Writes are 5-minute or 1-hour
  (``cache_creation``); fast mode is ``usage.speed``. Server-side
  compaction is billed in ``usage.iterations`` outside the top level; an
  advisor iteration is a call of another model (``other_calls``).
- Gemini ``generateContent``: thoughts are billed as output beside
  ``candidatesTokenCount``; tool-use prompt tokens as input beside
  ``promptTokenCount``; the tier that served is ``trafficType`` (Vertex)
  or ``serviceTier``.

A stream that carries no usage (OpenAI without
``stream_options.include_usage``) or was cut off before its final usage (a
Responses stream without ``response.completed``, an Anthropic stream
without ``message_delta``, a Gemini stream without its finishing chunk) is
a ValidationError, never zero tokens.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from itertools import chain
from typing import Any

from ._constants import MAX_INTEGER
from .errors import ValidationError

__all__ = ["ResponseUsage", "usage_from_response", "load_response", "read_response", "PROVIDERS", "API_FAMILIES"]

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
    ``record_usage`` takes. ``cache_write_tokens`` are 5-minute (Anthropic)
    or 30-minute (OpenAI) writes, ``cache_write_1h_tokens`` 1-hour writes
    (Anthropic), ``cache_write_12h_tokens`` 12-hour writes (OpenAI).
    ``audio_in_tokens`` are the input's audio tokens (cached ones included),
    part of ``tokens_in``; ``audio_tokens`` and ``image_tokens`` are output.
    ``other_calls`` are calls of other models the response reports beside
    this one (an Anthropic advisor's iterations), each billed at its own
    model's prices: record each as its own call."""

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
    other_calls: tuple[ResponseUsage, ...] = ()
    # What PolicySynth's class for this API writes as usageNormalized.
    _policysynth: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """``record_usage``'s count arguments (every cache write in ``cache_write_tokens``)."""
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens + self.cache_write_1h_tokens
                + self.cache_write_12h_tokens,
                "reasoning_tokens": self.reasoning_tokens, "audio_tokens": self.audio_tokens,
                "image_tokens": self.image_tokens, "web_searches": self.web_searches}

    def policysynth(self) -> dict[str, Any]:
        """The ``usageNormalized`` PolicySynth 1.3.172's class for this API
        writes for the same response, its quirks included."""
        return dict(self._policysynth)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, other_calls=()))
        data.pop("_policysynth")
        data["other_calls"] = [call.as_dict() for call in self.other_calls]
        return data


def _refuse(message: str, name: str = "response") -> ValidationError:
    return ValidationError({name: [message]})


# -- reading what the caller holds ----------------------------------------------------
#
# Only the response itself (text, bytes, one line of a stream) is parsed: a
# string inside a response is the model's text (an answer "[1] Paris", tool
# arguments, partial_json), never JSON to read.

_JSON_SCALARS = (str, int, float, bool, type(None))


def _parse(text: str | bytes, name: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _refuse("Nested too deep to read.", name) from None
    except UnicodeDecodeError as exc:
        raise _refuse("Not UTF-8 text: %s." % exc, name) from None
    except json.JSONDecodeError as exc:
        raise _refuse("Not JSON: %s." % exc, name) from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise _refuse("Not readable JSON: %s." % exc, name) from None


def _plain(value: Any) -> Any:
    """An SDK object (pydantic, google-genai) as plain JSON values; plain
    values are returned as they are (not copied). Strings are left alone."""
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, dict):
        changed = None
        for key, item in value.items():
            if not isinstance(item, _JSON_SCALARS):
                plain = _plain(item)
                if plain is not item or not isinstance(key, str):
                    changed = changed if changed is not None else dict(value)
                    changed[key] = plain
            if not isinstance(key, str):
                changed = changed if changed is not None else dict(value)
        if changed is not None:
            return {str(k): v for k, v in changed.items()}
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    for method in ("model_dump", "to_json_dict", "to_dict"):
        dump = getattr(value, method, None)
        if callable(dump):
            if method == "model_dump":
                try:
                    return dump(mode="json")  # pydantic's JSON mode: plain JSON values already, not walked again
                except TypeError:
                    pass
            return _plain(dump())
    return value


def _dict_of(value: Any) -> Any:
    """A part of a response as a plain dict where it is an SDK object (a
    dict given is taken as JSON values, not walked: what is read of it is
    checked where it is read)."""
    return value if isinstance(value, dict) or isinstance(value, _JSON_SCALARS) else _plain(value)


def _line_event(line: str | bytes, number: int, name: str) -> Any:
    """One line of a stream as given (JSON, or an SSE ``data:`` line); None
    for what carries no event (blank, ``[DONE]``, SSE comment/event/id)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _refuse("Not UTF-8 text: %s." % exc, "%s line %d" % (name, number)) from None
    line = line.strip()
    if not line or line.startswith(":"):
        return None
    field_name, colon, value = line.partition(":")
    if colon and field_name in ("event", "id", "retry"):
        return None
    if colon and field_name == "data":
        line = value.strip()
        if line == "[DONE]" or not line:
            return None
    return _parse(line, "%s line %d" % (name, number))


def _sse_events(lines: Iterable[str | bytes], name: str, start: int = 1) -> Iterator[Any]:
    """A stream's events from its lines, one at a time: server-sent events
    as captured from the wire (``data:`` lines, an event's several ``data:``
    lines joined; ``event:``, ``id:``, ``retry:`` and ``:`` comment lines
    skipped), or JSON lines."""
    data: list[str] = []
    first = 0

    def dispatch() -> Iterator[Any]:
        text = "\n".join(data).strip()
        if text and text != "[DONE]":
            try:
                yield _parse(text, "%s line %d" % (name, first))
            except ValidationError:
                if len(data) == 1:
                    raise
                # data lines without the blank line between events: one event each
                for offset, part in enumerate(data):
                    if part.strip() and part.strip() != "[DONE]":
                        yield _parse(part, "%s line %d" % (name, first + offset))

    for number, raw in enumerate(lines, start):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _refuse("Not UTF-8 text: %s." % exc, "%s line %d" % (name, number)) from None
        line = raw.rstrip("\r\n")
        if not line.strip():
            if data:
                yield from dispatch()
                data = []
            continue
        if line.startswith(":"):  # an SSE comment (a keep-alive)
            continue
        field_name, colon, value = line.partition(":")
        if colon and field_name in ("data", "event", "id", "retry"):
            if field_name == "data":
                if not data:
                    first = number
                data.append(value[1:] if value.startswith(" ") else value)
            continue
        if data:
            yield from dispatch()
            data = []
        yield _parse(line, "%s line %d" % (name, number))
    if data:
        yield from dispatch()


def load_response(text: str | bytes, name: str = "response") -> Any:
    """A response saved as text: one JSON document (the response, or a list
    of a stream's events), or a stream's events, as server-sent events
    captured from the wire or one JSON per line (as ``psai usage
    record-response --file`` takes them). A stream is a list of its events."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _refuse("Not UTF-8 text: %s." % exc, name) from None
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            return _parse(text, name)
        except ValidationError:
            if "\n" not in text.strip():
                raise
    return list(_sse_events(text.splitlines(), name))


def read_response(source: Iterable[str | bytes], name: str = "response") -> Any:
    """A response from an open file (or any lines): a stream (server-sent
    events, or JSON lines) comes back as an iterator of its events, read a
    line at a time as ``usage_from_response`` consumes it, so a stream is
    never held whole in memory; anything else is read and parsed whole."""
    lines = iter(source)
    first: str | bytes = b""
    number = 0
    for number, first in enumerate(lines, 1):
        if first.strip():
            break
    head = first.strip()
    text_head = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    if text_head.startswith(("data:", "event:", "id:", "retry:", ":")):
        return _sse_events(chain([first], lines), name, number)
    if text_head.startswith("{"):
        try:
            event = _parse(head, "%s line %d" % (name, number))
        except ValidationError:
            event = None  # a document over several lines
        if isinstance(event, dict):
            for number, second in enumerate(lines, number + 1):
                if second.strip():  # JSON lines: one event a line
                    return chain([event], _sse_events(chain([second], lines), name, number))
            return event
    rest = [first, *lines]
    joined = b"".join(rest) if isinstance(first, bytes) else "".join(rest)  # type: ignore[arg-type]
    return load_response(joined, name)


def _get(data: Any, *names: str) -> Any:
    """The first of ``names`` present in ``data`` (camelCase or snake_case)."""
    if not isinstance(data, dict):
        return None
    for name in names:
        if data.get(name) is not None:
            return data[name]
    return None


@lru_cache(maxsize=None)
def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _key(data: Any, name: str) -> Any:
    """``data[name]`` by Gemini's camelCase name or the SDK's snake_case one."""
    if not isinstance(data, dict):
        return None
    value = data.get(name)
    return value if value is not None else data.get(_snake(name))


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
            self.refuse("Not a whole number of tokens: %.60r." % (value,), name)
            return 0
        if value < 0:
            self.refuse("Negative: %.60r." % (value,), name)
            return 0
        if value > MAX_INTEGER:
            self.refuse("Too large for one call: at most %d." % MAX_INTEGER, name)
            return 0
        return int(value)

    def object(self, value: Any, name: str) -> dict[str, Any]:
        """A details object: absent is empty; anything but an object is refused."""
        if value is None:
            return {}
        value = _dict_of(value)
        if not isinstance(value, dict):
            self.refuse("Not an object: %s." % type(value).__name__, name)
            return {}
        return value

    def refuse(self, message: str, name: str) -> None:
        self.errors["%s.%s" % (self.where, name)] = [message]

    def check(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


# -- telling the API from the shape --------------------------------------------------

_ANTHROPIC_EVENTS = frozenset(("message_start", "message_delta", "message_stop", "content_block_start",
                               "content_block_delta", "content_block_stop"))
_GEMINI_KEYS = ("usageMetadata", "usage_metadata", "candidates", "modelVersion", "model_version",
                "promptFeedback", "prompt_feedback")
# Usage keys only Anthropic's usage has.
_ANTHROPIC_USAGE_KEYS = ("cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation",
                         "server_tool_use", "service_tier", "iterations", "speed", "inference_geo")


def _apis_of(data: dict[str, Any]) -> list[str]:
    """The APIs the response's shape fits, the likeliest first: its own
    marks (``object``, ``type``, ``choices``...) before its usage's names."""
    found: list[str] = []
    if any(key in data for key in _GEMINI_KEYS):
        found.append("gemini")
    kind = data.get("object")
    if kind in ("chat.completion", "chat.completion.chunk") or "choices" in data:
        found.append("chat")
    if kind == "response" or ("output" in data and "status" in data):
        found.append("responses")
    if data.get("type") == "message":
        found.append("messages")
    usage = data.get("usage")
    if isinstance(usage, dict):
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            found.append("chat")
        if any(key in usage for key in _ANTHROPIC_USAGE_KEYS) or "content" in data:
            found.append("messages")
        if "input_tokens" in usage or "output_tokens" in usage:
            found += ["responses", "messages"]
    return list(dict.fromkeys(found))


def _event_api(event: dict[str, Any]) -> str | None:
    """The API one stream event belongs to, where it says (None: it does not)."""
    kind = event.get("type")
    if isinstance(kind, str):
        if kind.startswith("response."):
            return "responses"
        if kind in _ANTHROPIC_EVENTS or (kind == "message" and "usage" in event):
            return "messages"
        if kind in ("ping", "error"):
            return None
    if event.get("object") in ("chat.completion.chunk", "chat.completion") or "choices" in event:
        return "chat"
    if event.get("object") == "response":
        return "responses"
    if any(key in event for key in _GEMINI_KEYS):
        return "gemini"
    return None


# OpenAI's and Azure's models answer on two APIs; Gemini models also on an
# OpenAI-compatible Chat Completions endpoint.
_PROVIDER_APIS = {"openai": ("chat", "responses"), "azure": ("chat", "responses"), "anthropic": ("messages",),
                  "google": ("gemini", "chat")}


def _choose_api(candidates: list[str], provider: str | None) -> str | None:
    if provider is None:
        return candidates[0] if candidates else None
    return next((api for api in candidates if api in _PROVIDER_APIS[provider]), None)


def _is_azure(data: dict[str, Any]) -> bool:
    """Azure OpenAI's content-filter results: on a chat completion or any
    chunk of its stream, or a Responses body's ``content_filters``."""
    if "prompt_filter_results" in data or "content_filters" in data:
        return True
    choices = data.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and "content_filter_results" in c
                                             for c in choices)


def _is_gemini_model(model: Any) -> bool:
    return isinstance(model, str) and model.removeprefix("models/").startswith("gemini")


def _provider_of(api: str, data: dict[str, Any], given: str | None, azure: bool = False) -> str:
    if given is not None:
        return given
    if api == "messages":
        return "anthropic"
    if api == "gemini" or (api == "chat" and _is_gemini_model(data.get("model"))):
        return "google"
    return "azure" if azure or _is_azure(data) else "openai"


# -- streams: the response the SDK would have accumulated, one event at a time ------------

class _Stream:
    """Reads one call's stream event by event, keeping only what it needs.
    ``finish`` gives the response as the SDK would have accumulated it."""

    def __init__(self) -> None:
        self.azure = False
        self.call_id: Any = None

    def same_call(self, call_id: Any, number: int) -> None:
        """Two calls' streams in one are refused, never read as one call."""
        if not call_id:
            return
        if self.call_id is None:
            self.call_id = call_id
        elif call_id != self.call_id:
            raise _refuse("Event %d starts another call (%s after %s): give one call's stream at a time."
                          % (number, call_id, self.call_id))

    def add(self, event: dict[str, Any], number: int) -> None:
        raise NotImplementedError

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        raise NotImplementedError


class _ChatStream(_Stream):
    """OpenAI chat chunks: usage comes on the last chunk (only with
    ``stream_options.include_usage``)."""


    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, Any] | None = None
        self.kept: dict[str, Any] = {}
        self.finished = False
        # PolicySynth's view: the openai SDK's ChatCompletionStream starts its
        # snapshot with the first chunk; each later chunk with an id
        # overwrites what it carries (a null usage too).
        self.snapshot_usage: Any = None
        self.snapshot_started = False

    def add(self, event: dict[str, Any], number: int) -> None:
        self.same_call(event.get("id"), number)
        if _is_azure(event):
            self.azure = True
        choices = event.get("choices")
        if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
            self.finished = True
        for key in ("id", "model", "service_tier", "system_fingerprint"):
            if not self.kept.get(key) and event.get(key):
                self.kept[key] = event[key]
        if isinstance(event.get("usage"), dict):
            self.last = event
        if not self.snapshot_started:
            self.snapshot_started = True
            self.snapshot_usage = event.get("usage")
        elif event.get("id"):
            if "usage" in event:
                self.snapshot_usage = event["usage"]

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.last is None:
            raise _refuse("This chat completion stream carries no usage: request it with "
                          "stream_options={'include_usage': True}; psai never records a streamed call as 0 tokens.")
        if not self.finished:
            raise _refuse("This chat completion stream has no finish_reason: it was cut off, so its usage is "
                          "not the call's; psai never records part of a call.")
        data = dict(self.last)
        for key, value in self.kept.items():
            if not data.get(key):
                data[key] = value
        data["object"] = "chat.completion"
        usage = self.snapshot_usage
        return data, _openai_chat_policysynth(usage if isinstance(usage, dict) else {}, True)


class _ResponsesStream(_Stream):
    """Responses events: the response of ``response.completed`` (or
    ``response.incomplete`` / ``response.failed``, billed as they ran)."""

    final_events = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self) -> None:
        super().__init__()
        self.final: dict[str, Any] | None = None

    def add(self, event: dict[str, Any], number: int) -> None:
        response = event.get("response")
        if isinstance(response, dict):
            self.same_call(response.get("id"), number)
            if event.get("type") in self.final_events:
                self.final = response
        elif event.get("object") == "response" and isinstance(event.get("usage"), dict):
            self.same_call(event.get("id"), number)
            self.final = event  # the SDK's final object among the events
        if _is_azure(event):
            self.azure = True

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.final is None:
            raise _refuse("This Responses stream has no response.completed event (cut off, or failed): "
                          "its usage is unknown; psai never records a streamed call as 0 tokens.")
        return self.final, None


class _MessagesStream(_Stream):
    """Anthropic events: ``message_start``'s message, its usage overwritten
    by each ``message_delta`` (cumulative counts; it also resets
    ``cache_read_input_tokens`` and brings ``iterations``), as the SDK
    accumulates it; a ``fallback`` block names the model that served."""


    def __init__(self) -> None:
        super().__init__()
        self.message: dict[str, Any] | None = None
        self.complete = False
        self.fallback: Any = None

    def add(self, event: dict[str, Any], number: int) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            if self.message is not None:
                raise _refuse("Event %d starts another message: give one call's stream at a time." % number)
            self.message = dict(event["message"])
            self.same_call(self.message.get("id"), number)
            usage = self.message.get("usage")
            self.message["usage"] = dict(usage) if isinstance(usage, dict) else {}
        elif kind == "message_delta" and self.message is not None:
            usage = event.get("usage")
            if isinstance(usage, dict):
                for key, value in usage.items():
                    if value is not None:
                        self.message["usage"][key] = value
                self.complete = True
            delta = event.get("delta")
            if isinstance(delta, dict):
                for key in ("stop_reason", "stop_sequence"):
                    if key in delta:
                        self.message[key] = delta[key]
        elif kind == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") == "fallback" and isinstance(block.get("to"), dict):
                self.fallback = block["to"].get("model") or self.fallback
        elif kind == "message" and isinstance(event.get("usage"), dict):
            self.same_call(event.get("id"), number)
            self.message, self.complete = event, True  # the SDK's final message

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.message is None:
            raise _refuse("This Anthropic stream has no message_start event: its usage is unknown; "
                          "psai never records a streamed call as 0 tokens.")
        if not self.complete:
            raise _refuse("This Anthropic stream has no message_delta event (cut off): its output is unknown; "
                          "psai never records part of a call.")
        if self.fallback:
            return dict(self.message, model=self.fallback), None
        return self.message, None


class _GeminiStream(_Stream):
    """Gemini chunks: the last chunk's usageMetadata (cumulative); the
    stream must have finished (a finishReason, or a blocked prompt)."""


    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, Any] | None = None
        self.last_event: dict[str, Any] = {}
        self.kept: dict[str, Any] = {}
        self.finished = False

    def add(self, event: dict[str, Any], number: int) -> None:
        self.same_call(_key(event, "responseId"), number)
        self.last_event = event
        if _key(event, "usageMetadata") is not None:
            self.last = event
        if _finished(event):
            self.finished = True
        for name in ("modelVersion", "responseId"):
            if name not in self.kept and _key(event, name) is not None:
                self.kept[name] = _key(event, name)

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.last is None:
            raise _refuse("This Gemini stream carries no usageMetadata: its usage is unknown.")
        if not self.finished:
            raise _refuse("This Gemini stream has no finishing chunk (no finishReason): it was cut off, so its "
                          "usage is not the call's; psai never records part of a call.")
        data = dict(self.last)
        for name, value in self.kept.items():
            if _key(data, name) is None:
                data[name] = value
        # PolicySynth reads the usage of the stream's last chunk only.
        usage = _key(self.last_event, "usageMetadata")
        return data, _gemini_policysynth(usage if isinstance(usage, dict) else {})


def _finished(data: dict[str, Any]) -> bool:
    """A Gemini response that ran to its end: a candidate's finishReason, or a blocked prompt."""
    candidates = data.get("candidates")
    if isinstance(candidates, list) and any(isinstance(c, dict) and _key(c, "finishReason") for c in candidates):
        return True
    return bool(_key(_key(data, "promptFeedback"), "blockReason"))


_STREAMS: dict[str, type[_Stream]] = {"chat": _ChatStream, "responses": _ResponsesStream,
                                      "messages": _MessagesStream, "gemini": _GeminiStream}


def _read_stream(events: Iterator[Any], provider: str | None) -> tuple[str, dict[str, Any], _Stream,
                                                                       dict[str, Any] | None]:
    """(api, the accumulated response, the reader, PolicySynth's view or None)."""
    pending: list[tuple[int, dict[str, Any]]] = []
    api = None
    number = 0
    for number, event in enumerate(events, 1):
        if event is None:
            continue
        if not isinstance(event, dict):
            raise _refuse("Event %d of the stream is not an object (%s)." % (number, type(event).__name__))
        pending.append((number, event))
        api = _event_api(event)
        if api is not None:
            break
    if api is None:
        raise _refuse("Not a stream psai knows (OpenAI chat chunks, Responses events, Anthropic message "
                      "events, Gemini chunks)." if pending else "An empty stream: no events.")
    if provider is not None and api not in _PROVIDER_APIS[provider]:
        raise _refuse("This is a %s stream, not %s's." % (API_FAMILIES[api], provider), "provider")
    reader = _STREAMS[api]()
    start = number
    for number, event in chain(pending, ((start + n, e) for n, e in enumerate(events, 1))):
        if event is None:
            continue
        if not isinstance(event, dict):
            raise _refuse("Event %d of the stream is not an object (%s)." % (number, type(event).__name__))
        other = _event_api(event)
        if other is not None and other != api:
            raise _refuse("Event %d is a %s event in a %s stream: another provider's or API's stream is "
                          "mixed in." % (number, API_FAMILIES[other], API_FAMILIES[api]))
        reader.add(event, number)
    data, view = reader.finish()
    return api, data, reader, view


# -- each API's usage ---------------------------------------------------------------------

def _no_counts(usage: dict[str, Any], names: tuple[str, ...], what: str) -> ValidationError:
    return _refuse("This %s's usage has no counts (none of %s): psai never records a call as 0 tokens "
                   "without the provider saying so." % (what, ", ".join(names)), "response.usage")


def _openai_usage(usage: dict[str, Any], api: str) -> dict[str, Any]:
    """The counts of an OpenAI usage object: Chat Completions' names
    (``prompt``/``completion``) or the Responses API's (``input``/``output``);
    the totals hold the parts."""
    inp, out = ("prompt", "completion") if api == "chat" else ("input", "output")
    if usage.get(inp + "_tokens") is None and usage.get(out + "_tokens") is None:
        raise _no_counts(usage, (inp + "_tokens", out + "_tokens"),
                         "chat completion" if api == "chat" else "response")
    count = _Counts("usage")
    total_in = count(usage.get(inp + "_tokens"), inp + "_tokens")
    total_out = count(usage.get(out + "_tokens"), out + "_tokens")
    in_details = count.object(usage.get(inp + "_tokens_details"), inp + "_tokens_details")
    out_details = count.object(usage.get(out + "_tokens_details"), out + "_tokens_details")
    where_in = inp + "_tokens_details."
    cached = count(in_details.get("cached_tokens"), where_in + "cached_tokens")
    # 30-minute and 12-hour writes (the Responses API says which); a write
    # without the split is a 30-minute one (OpenAI's default retention, and
    # OpenRouter's Claude writes, which are 5-minute).
    writes = count(in_details.get("cache_write_tokens"), where_in + "cache_write_tokens")
    writes, half_hour, twelve_hours = _writes_by_retention(
        count, in_details, writes, where_in, "cache_write_tokens", "cache_write_tokens_details",
        ("ttl_30m_tokens", "ttl_12h_tokens"), "30-minute and 12-hour")
    audio_in = count(in_details.get("audio_tokens"), where_in + "audio_tokens")
    reasoning = count(out_details.get("reasoning_tokens"), out + "_tokens_details.reasoning_tokens")
    audio = count(out_details.get("audio_tokens"), out + "_tokens_details.audio_tokens")
    image = count(out_details.get("image_tokens"), out + "_tokens_details.image_tokens") if api == "chat" else 0
    total = count(usage.get("total_tokens"), "total_tokens")
    if cached + writes > total_in:
        count.refuse("Cached tokens and cache writes (%d) above the input's (%d)." % (cached + writes, total_in),
                     where_in + "cached_tokens")
    if audio_in > total_in:
        count.refuse("Audio tokens (%d) above the input's (%d)." % (audio_in, total_in), where_in + "audio_tokens")
    if reasoning + audio + image > total_out:
        count.refuse("Reasoning, audio and image tokens (%d) above the output's (%d)."
                     % (reasoning + audio + image, total_out), out + "_tokens_details")
    count.check()
    # Gemini's OpenAI-compatible endpoint leaves thinking out of
    # completion_tokens; the total holds it (OpenAI's total is the two parts).
    hidden = total - total_in - total_out if api == "chat" and total > total_in + total_out else 0
    return {"tokens_in": total_in, "tokens_out": total_out + hidden, "cached_tokens": cached,
            "cache_write_tokens": half_hour, "cache_write_12h_tokens": twelve_hours, "audio_in_tokens": audio_in,
            "reasoning_tokens": reasoning + hidden, "audio_tokens": audio, "image_tokens": image}


def _writes_by_retention(count: _Counts, usage: dict[str, Any], writes: int, where: str, total: str, split: str,
                         parts: tuple[str, str], retentions: str) -> tuple[int, int, int]:
    """(all cache writes, the shorter retention's, the longer's) of a usage
    object whose count ``total`` (read as ``writes``) may be split by
    retention in its object ``split`` of the two counts ``parts``: without
    the split every write is a shorter one; with it and the total, the
    parts must add up to the total (``retentions`` names them for the error)."""
    details = count.object(usage.get(split), where + split)
    if not details:
        return writes, writes, 0
    shorter, longer = (count(details.get(part), "%s%s.%s" % (where, split, part)) for part in parts)
    if usage.get(total) is None:
        writes = shorter + longer
    elif shorter + longer != writes:
        count.refuse("The %s writes (%d) differ from %s (%d)." % (retentions, shorter + longer, total, writes),
                     where + split)
    return writes, shorter, longer


def _usage_of(data: dict[str, Any], what: str) -> dict[str, Any]:
    usage = _dict_of(data.get("usage"))
    if usage is None:
        raise _refuse("This %s has no usage." % what, "response.usage")
    if not isinstance(usage, dict):
        raise _refuse("Not an object: %s." % type(usage).__name__, "response.usage")
    return usage


def _chat(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = _usage_of(data, "chat completion")
    counts = _openai_usage(usage, "chat")
    # Azure's class says "chat.completions" and defaults missing counts to 0.
    family = "chat.completions" if provider == "azure" else API_FAMILIES["chat"]
    return ResponseUsage(
        **counts, model=data.get("model"), provider=provider, api_family=family, usage_raw=usage,
        provider_metadata=_metadata(data.get("id"), data.get("service_tier")), provider_cost=_provider_cost(usage),
        _policysynth=_openai_chat_policysynth(usage, streamed or provider == "azure"))


def _responses(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = _usage_of(data, "response (not completed?)")
    counts = _openai_usage(usage, "responses")
    output = data.get("output")
    searches = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call") \
        if isinstance(output, list) else 0
    return ResponseUsage(
        **counts, web_searches=searches, model=data.get("model"), provider=provider,
        api_family=API_FAMILIES["responses"], usage_raw=usage,
        provider_metadata=_metadata(data.get("id"), data.get("service_tier")),
        provider_cost=_provider_cost(usage), _policysynth=_openai_responses_policysynth(usage))


def _claude_parts(usage: dict[str, Any], count: _Counts, where: str) -> list[int]:
    """[fresh input, 5-minute writes, 1-hour writes, reads, output] of one Anthropic usage object."""
    fresh = count(usage.get("input_tokens"), where + "input_tokens")
    output = count(usage.get("output_tokens"), where + "output_tokens")
    writes = count(usage.get("cache_creation_input_tokens"), where + "cache_creation_input_tokens")
    reads = count(usage.get("cache_read_input_tokens"), where + "cache_read_input_tokens")
    _, five, hour = _writes_by_retention(
        count, usage, writes, where, "cache_creation_input_tokens", "cache_creation",
        ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"), "5-minute and 1-hour")
    return [fresh, five, hour, reads, output]


_CLAUDE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _messages(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    usage = _usage_of(data, "message")
    if "iterations" not in usage and all(usage.get(name) is None for name in _CLAUDE_COUNTS) \
            and "cache_creation" not in usage:
        raise _no_counts(usage, _CLAUDE_COUNTS, "message")
    count = _Counts("usage")
    parts = _claude_parts(usage, count, "")
    iterations = usage.get("iterations")
    advisors: list[tuple[int, dict[str, Any]]] = []
    serving = None
    if iterations is not None and not isinstance(iterations, list):
        count.refuse("Not a list: %s." % type(iterations).__name__, "iterations")
    for index, iteration in enumerate(iterations if isinstance(iterations, list) else []):
        where = "iterations[%d]." % index
        if not isinstance(iteration, dict):
            count.refuse("Not an object: %s." % type(iteration).__name__, where[:-1])
            continue
        kind = iteration.get("type")
        if kind == "compaction":
            # Server-side compaction is billed outside the top-level usage.
            parts = [a + b for a, b in zip(parts, _claude_parts(iteration, count, where))]
        elif kind == "advisor_message":
            advisors.append((index, iteration))
        elif kind == "fallback_message" and iteration.get("model"):
            serving = iteration["model"]
    server_tools = count.object(usage.get("server_tool_use"), "server_tool_use")
    searches = count(server_tools.get("web_search_requests"), "server_tool_use.web_search_requests")
    thinking = count(count.object(usage.get("output_tokens_details"), "output_tokens_details").get(
        "thinking_tokens"), "output_tokens_details.thinking_tokens")
    fresh, five, hour, reads, output = parts
    if thinking > output:
        count.refuse("Thinking tokens (%d) above the output's (%d)." % (thinking, output),
                     "output_tokens_details.thinking_tokens")
    others = tuple(_advisor_call(data, index, iteration, provider, count) for index, iteration in advisors)
    count.check()
    tier = usage.get("service_tier") if usage.get("service_tier") is not None else data.get("service_tier")
    metadata = _metadata(data.get("id"), tier)
    # Always said: without a speed, the call was served at standard speed
    # (and a "priority" service tier is not fast mode, which PolicySynth's
    # cost manager would take it for when no speed is given).
    metadata["appliedSpeed"] = usage.get("speed") or "standard"
    return ResponseUsage(
        tokens_in=fresh + five + hour + reads, tokens_out=output, cached_tokens=reads, cache_write_tokens=five,
        cache_write_1h_tokens=hour, reasoning_tokens=thinking, web_searches=searches,
        model=serving or _fallback_model(data) or data.get("model"), provider=provider,
        api_family=API_FAMILIES["messages"], usage_raw=usage, provider_metadata=metadata,
        provider_cost=_provider_cost(usage), other_calls=others, _policysynth=_claude_policysynth(usage))


def _fallback_model(data: dict[str, Any]) -> Any:
    """The model a server-side fallback handed the call to (the last ``fallback`` block's ``to``)."""
    model = None
    content = data.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "fallback" and isinstance(block.get("to"), dict):
            model = block["to"].get("model") or model
    return model


def _advisor_call(data: dict[str, Any], index: int, iteration: dict[str, Any], provider: str,
                  count: _Counts) -> ResponseUsage:
    """An advisor iteration: a call of the advisor model, billed at its
    prices and left out of the top-level usage."""
    where = "iterations[%d]." % index
    fresh, five, hour, reads, output = _claude_parts(iteration, count, where)
    model = iteration.get("model")
    if not isinstance(model, str) or not model:
        count.refuse("An advisor iteration names no model: it cannot be priced.", where + "model")
    metadata: dict[str, Any] = {"appliedSpeed": "standard", "advisorIteration": index}
    if data.get("id") is not None:
        metadata["parentResponseId"] = data["id"]
    return ResponseUsage(
        tokens_in=fresh + five + hour + reads, tokens_out=output, cached_tokens=reads, cache_write_tokens=five,
        cache_write_1h_tokens=hour, model=model if isinstance(model, str) else None, provider=provider,
        api_family=API_FAMILIES["messages"], usage_raw=iteration, provider_metadata=metadata,
        _policysynth=_claude_policysynth(iteration) if not count.errors else {})


def _modality_tokens(details: Any, modality: str, count: _Counts, where: str) -> int:
    if details is None:
        return 0
    if not isinstance(details, list):
        count.refuse("Not a list: %s." % type(details).__name__, where)
        return 0
    total = 0
    for entry in details:
        if isinstance(entry, dict) and str(_key(entry, "modality") or "").upper() == modality:
            total += count(_key(entry, "tokenCount"), where)
    return total


# Vertex's trafficType, as the tier PolicySynth's prices name.
_TRAFFIC_TIERS = {"ON_DEMAND": "standard", "ON_DEMAND_FLEX": "flex", "ON_DEMAND_PRIORITY": "priority",
                  "PROVISIONED_THROUGHPUT": "provisioned"}
_GEMINI_COUNTS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "toolUsePromptTokenCount")


def _gemini_tier(data: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """The tier that served (``trafficType`` on Vertex, ``serviceTier`` on
    the Gemini API), kept as it came and as ``appliedServiceTier``."""
    metadata: dict[str, Any] = {}
    traffic = _key(usage, "trafficType")
    tier = _get(usage, "serviceTier", "service_tier") or _get(data, "serviceTier", "service_tier")
    if isinstance(traffic, str):
        metadata["trafficType"] = traffic
    if isinstance(tier, str):
        metadata["serviceTier"] = tier
    applied = _TRAFFIC_TIERS.get(traffic.upper()) if isinstance(traffic, str) else None
    if isinstance(tier, str) and applied in (None, "standard"):
        applied = tier.lower().removeprefix("service_tier_")
    if applied:
        metadata["appliedServiceTier"] = applied
    return metadata


def _gemini(data: dict[str, Any], provider: str, streamed: bool) -> ResponseUsage:
    name = data.get("name")
    if isinstance(name, str) and name.startswith("cachedContents/"):
        raise _refuse("A cachedContents resource (%s), not a generateContent response: creating a cache is "
                      "no call; its tokens are billed where a call reads them (cachedContentTokenCount)." % name)
    usage = _dict_of(_key(data, "usageMetadata"))
    if usage is None:
        raise _refuse("This Gemini response has no usageMetadata.", "response.usageMetadata")
    if not isinstance(usage, dict):
        raise _refuse("Not an object: %s." % type(usage).__name__, "response.usageMetadata")
    blocked = _key(_key(data, "promptFeedback"), "blockReason")
    if not blocked and all(_key(usage, name) is None for name in _GEMINI_COUNTS):
        raise _refuse("This Gemini response's usageMetadata has no counts (none of %s): psai never records a "
                      "call as 0 tokens without the provider saying so." % ", ".join(_GEMINI_COUNTS),
                      "response.usageMetadata")
    count = _Counts("usageMetadata")
    prompt = count(_key(usage, "promptTokenCount"), "promptTokenCount")
    tool_prompt = count(_key(usage, "toolUsePromptTokenCount"), "toolUsePromptTokenCount")
    candidates = count(_key(usage, "candidatesTokenCount"), "candidatesTokenCount")
    thoughts = count(_key(usage, "thoughtsTokenCount"), "thoughtsTokenCount")
    cached = count(_key(usage, "cachedContentTokenCount"), "cachedContentTokenCount")
    audio_in = _modality_tokens(_key(usage, "promptTokensDetails"), "AUDIO", count, "promptTokensDetails")
    out_details = _key(usage, "candidatesTokensDetails")
    audio = _modality_tokens(out_details, "AUDIO", count, "candidatesTokensDetails")
    image = _modality_tokens(out_details, "IMAGE", count, "candidatesTokensDetails")
    if cached > prompt + tool_prompt:
        count.refuse("Cached tokens (%d) above the prompt's (%d)." % (cached, prompt + tool_prompt),
                     "cachedContentTokenCount")
    if audio + image > candidates + thoughts:
        count.refuse("Audio and image tokens (%d) above the output's (%d)." % (audio + image, candidates + thoughts),
                     "candidatesTokensDetails")
    count.check()
    metadata = _metadata(_key(data, "responseId"), None)
    metadata.update(_gemini_tier(data, usage))
    return ResponseUsage(
        tokens_in=prompt + tool_prompt, tokens_out=candidates + thoughts, cached_tokens=cached,
        audio_in_tokens=min(audio_in, prompt + tool_prompt), reasoning_tokens=thoughts, audio_tokens=audio,
        image_tokens=image, model=_key(data, "modelVersion"), provider=provider,
        api_family=API_FAMILIES["gemini"], usage_raw=usage, provider_metadata=metadata,
        _policysynth=_gemini_policysynth(usage))


_READERS = {"chat": _chat, "responses": _responses, "messages": _messages, "gemini": _gemini}


def _metadata(response_id: Any, tier: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if response_id is not None:
        metadata["responseId"] = response_id
    if tier is not None:
        metadata["appliedServiceTier"] = tier
    return metadata


def _provider_cost(usage: dict[str, Any]) -> float | None:
    """OpenRouter's ``usage.cost`` (what it charged); one no float holds is refused."""
    cost = usage.get("cost")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool):
        return None
    try:
        value = float(cost)
    except OverflowError:
        value = float("inf")
    if not (0 <= value < 1e15):
        raise _refuse("Not a usable cost: %.40r." % (cost,), "response.usage.cost")
    return value


# -- what PolicySynth 1.3.172 writes -------------------------------------------------------
#
# Each class's usageNormalized, as its compiled JS computes it (aiModels/*.js).
# JavaScript's ``??`` takes only null/undefined as missing; a key whose value
# is undefined is dropped when the item is serialised (None here drops it).

def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


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
    prompt = _obj(usage.get("prompt_tokens_details"))
    completion = _obj(usage.get("completion_tokens_details"))
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
        "cachedInTokens": _js(_obj(usage.get("input_tokens_details")).get("cached_tokens"),
                              _js(_obj(usage.get("prompt_tokens_details")).get("cached_tokens"), 0)),
        "reasoningTokens": _js(_obj(usage.get("output_tokens_details")).get("reasoning_tokens"), 0),
        "audioTokens": _js(_obj(usage.get("output_tokens_details")).get("audio_tokens"), 0)})


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



# -----------------------------------------------------------------------------------------

def _events_of(response: Any, name: str = "response") -> Iterator[Any]:
    """A stream's events, converted one at a time: SDK objects dumped,
    lines of text parsed (an SSE ``data:`` line, or JSON)."""
    for number, event in enumerate(response, 1):
        if isinstance(event, (str, bytes)):
            yield _line_event(event, number, name)
        else:
            yield _dict_of(event)


def usage_from_response(response: Any, *, provider: str | None = None) -> ResponseUsage:
    """The billed counts of one call from the provider's response (see the
    module's docstring for what is accepted; a ResponseUsage read before is
    returned as it is). ``provider``: ``openai``, ``azure``, ``anthropic``
    or ``google``; told from the shape when not given. Given, it decides
    which of its APIs the response is read as (a bare ``usage`` of
    ``input_tokens``/``output_tokens`` is Anthropic's for ``anthropic``)."""
    if provider is not None and provider not in PROVIDERS:
        raise ValidationError({"provider": ["Must be one of: %s." % ", ".join(PROVIDERS)]})
    if isinstance(response, ResponseUsage):  # read already (the command line shows it, then records it)
        if provider is not None and response.provider != provider:
            raise ValidationError({"provider": ["This is %s's response, not %s's." % (response.provider, provider)]})
        return response
    try:
        return _usage_from_response(response, provider)
    except RecursionError:
        raise _refuse("Nested too deep to read.") from None


def _usage_from_response(response: Any, provider: str | None) -> ResponseUsage:
    if isinstance(response, (str, bytes)):
        response = load_response(response)
    elif not isinstance(response, (dict, list, tuple)) and (
            hasattr(response, "model_dump") or hasattr(response, "to_json_dict")):
        response = _plain(response)
    if isinstance(response, Mapping):
        data = response if isinstance(response, dict) else _plain(response)
        candidates = _apis_of(data)
        api = _choose_api(candidates, provider)
        if api is None:
            if provider is not None and candidates:
                raise ValidationError({"provider": ["This is a %s response, not %s's."
                                                    % (API_FAMILIES[candidates[0]], provider)]})
            usage = data.get("usage")
            if isinstance(usage, dict) and ("inputTokens" in usage or "outputTokens" in usage):
                raise _refuse("A Bedrock Converse body (usage.inputTokens): not an API psai reads; record its "
                              "counts with record_usage.")
            raise _refuse("Not a response psai can read: no usage of OpenAI, Anthropic or Gemini found.")
        return _READERS[api](data, _provider_of(api, data, provider), False)
    if isinstance(response, (str, bytes)) or not isinstance(response, Iterable):
        raise _refuse("Not a provider response: give the SDK's response, its JSON as a dict or text, or a "
                      "stream's chunks or events (got %s)." % type(response).__name__)
    api, data, reader, view = _read_stream(_events_of(response), provider)
    usage = _READERS[api](data, _provider_of(api, data, provider, reader.azure), True)
    # Where PolicySynth's stream handling loses what the stream carried:
    # OpenAI chat usage on a chunk without an id (the SDK's accumulator drops
    # it; Azure's class reads every chunk), Gemini usage on any chunk but the last.
    if view is not None and not (api == "chat" and usage.provider == "azure"):
        usage = replace(usage, _policysynth=view)
    return usage
