"""``psai.instrument(client)``: every call an SDK client makes, recorded.

psai imports no SDK: it works on the client object it is given. It finds
the client's resources by their attributes (openai and Azure OpenAI:
``chat.completions``, ``responses``, and their ``beta`` twins; anthropic:
``messages``, ``beta.messages``; google-genai: ``models``, ``aio.models``)
and replaces the calling methods on those resource *instances* with
wrappers, keeping the originals on the client so that
``uninstrument(client)`` puts them back. Nothing is patched on a class:
another client of the same SDK is untouched.

A wrapper calls the SDK, then records the call from its response
(``psai.record_response``): inline for a sync client, on the background
writer (``psai.writer``) for an async one, so the event loop never waits on
the database. A stream is recorded when it ends, from the events that
carry usage or show the call's end (kept as they pass; the others are not
held); one abandoned early is recorded only when what the provider
reported is the whole call, else named as not recorded. With
``budget=True`` each call's estimate (``request_estimate``) is reserved
before it (``check_before_call``, as ``psai.track`` reserves) and settled
by its recording; a call that fails, or cannot be recorded, gives it
back. psai never
breaks the user's call: a recording that fails is logged on the ``psai``
logger and the response returned (``strict=True`` raises instead).
"""
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from peewee import Database

from ._arguments import agent_arg, attribution_arg, model_arg
from .budget import check_before_call
from .db import current_db, write_transaction
from .errors import BudgetExceededError, NotFoundError, ValidationError
from .models import AgentRef, ModelRef, PsAgent, PsAiModel, Reservation
from .query import resolve_model
from ._recording import model_cost, record_response_data
from .writer import LOG, enqueue, run_in

__all__ = ["instrument", "uninstrument", "request_estimate", "CHARACTERS_PER_TOKEN"]

# Where the originals live on an instrumented client.
_STATE = "_psai_instrumented"

# (resource path from the client, method, how its calls are made). The
# first entry of each SDK tells it apart: openai and Azure OpenAI have
# ``chat.completions``, anthropic ``messages``, google-genai ``models`` with
# ``generate_content``.
_CALL, _STREAM_HELPER, _ALWAYS_STREAM = "call", "stream helper", "always stream"
_SDKS: dict[str, list[tuple[str, str, str]]] = {
    "openai": [("chat.completions", "create", _CALL), ("chat.completions", "parse", _CALL),
               ("responses", "create", _CALL), ("responses", "parse", _CALL),
               ("beta.chat.completions", "create", _CALL), ("beta.chat.completions", "parse", _CALL),
               ("beta.responses", "create", _CALL)],
    "anthropic": [("messages", "create", _CALL), ("messages", "parse", _CALL), ("messages", "stream", _STREAM_HELPER),
                  ("beta.messages", "create", _CALL), ("beta.messages", "parse", _CALL),
                  ("beta.messages", "stream", _STREAM_HELPER)],
    "google": [("models", "generate_content", _CALL), ("models", "generate_content_stream", _ALWAYS_STREAM),
               ("aio.models", "generate_content", _CALL), ("aio.models", "generate_content_stream", _ALWAYS_STREAM)],
}
_MARKERS = {"openai": ("chat.completions", "create"), "anthropic": ("messages", "create"),
            "google": ("models", "generate_content")}
# The stored models a request's model name is looked up among, as recording looks up a response's
# (PolicySynth configures the Responses API's models as provider "openaiResponses").
_STORED_PROVIDERS: dict[str, str | list[str]] = {"openai": ["openai", "openaiResponses"],
                                                 "anthropic": "anthropic", "google": "google"}

# Stream events kept because they carry usage (or end a Responses stream).
_START_EVENTS = frozenset({"message_start"})
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class _Options:
    """What ``instrument`` was given, resolved once."""

    __slots__ = ("agent", "model", "budget", "strict", "provider", "attribution", "stored_providers")

    def __init__(self, agent: PsAgent | None, model: PsAiModel | None, budget: bool, strict: bool,
                 provider: str | None, attribution: dict[str, Any], stored_providers: str | list[str]) -> None:
        self.agent, self.model, self.budget, self.strict, self.provider = agent, model, budget, strict, provider
        self.attribution = attribution
        self.stored_providers = stored_providers  # whose models a request's model name is looked up among

    def record(self, response: Any, reservation: Reservation | None = None) -> Any:
        """Record one call (``record_response``, its attribution checked
        already), settling its reservation."""
        return record_response_data(self.model, self.agent, response, self.provider, None, None, reservation,
                                    attribution=self.attribution)


def _resolve(root: Any, path: str) -> Any:
    value = root
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except Exception:  # a client without that resource (an older SDK), or one that fails to build it
            return None
    return value


def _is_async(resource: Any, method: Callable[..., Any]) -> bool:
    # The SDKs' async resources are Async* classes; their decorated methods
    # do not always look like coroutine functions.
    return type(resource).__name__.startswith("Async") or inspect.iscoroutinefunction(method)


def _sdk_of(client: Any) -> str | None:
    for sdk, (path, method) in _MARKERS.items():
        if callable(getattr(_resolve(client, path), method, None)):
            return sdk
    return None


def instrument(client: Any, *, agent: AgentRef | None = None, model: ModelRef | None = None, budget: bool = False,
               strict: bool = False, user: str | None = None, session: str | None = None,
               trace: str | dict[str, str] | None = None, tags: dict[str, str] | None = None,
               environment: str | None = None) -> Any:
    """Return ``client`` (openai ``OpenAI``/``AsyncOpenAI``/``AzureOpenAI``,
    anthropic ``Anthropic``/``AsyncAnthropic``, google-genai ``Client``)
    with every call it makes recorded (``psai.record_response``) for
    ``agent`` and ``model`` (``model=None``: the stored model each
    response's model name means). ``budget=True``: before each call, an
    estimate of its cost (its output bound and its text, priced with the
    model's prices; docs/capture.md) is reserved against the hard budgets
    covering it (``psai.check_budget(..., reserve=True)``) and the call's
    recording settles it: a budget the call would pass raises
    BudgetExceededError instead of calling. ``strict=True``: a call that cannot be recorded
    raises; by default it is logged on the ``psai`` logger and the response
    returned. ``user``, ``session``, ``trace``, ``tags``, ``environment``:
    whose the client's calls are, kept in each one's item (as
    ``record_response`` keeps them). Instrumenting again replaces the options;
    ``uninstrument(client)`` restores the SDK's methods."""
    sdk = _sdk_of(client)
    if sdk is None:
        raise ValidationError({"client": ["Not an SDK client psai can instrument (openai OpenAI/AsyncOpenAI/"
                                          "AzureOpenAI, anthropic Anthropic/AsyncAnthropic, google-genai "
                                          "Client): got %s." % type(client).__name__]})
    attribution = attribution_arg(user=user, session=session, trace=trace, tags=tags, environment=environment)
    provider = "azure" if sdk == "openai" and "Azure" in type(client).__name__ else None
    options = _Options(agent_arg(agent), model_arg(model) if model is not None else None, bool(budget),
                       bool(strict), provider, attribution, provider or _STORED_PROVIDERS[sdk])
    uninstrument(client)
    patched: list[tuple[Any, str]] = []
    for path, name, how in _SDKS[sdk]:
        resource = _resolve(client, path)
        original = getattr(resource, name, None)
        if resource is None or not callable(original) or any(r is resource and n == name for r, n in patched):
            continue
        asynchronous = _is_async(resource, original)
        if how == _STREAM_HELPER:
            wrapper = _stream_helper(original, options)
        else:
            wrapper = (_async_call if asynchronous else _sync_call)(
                original, options, always_stream=how == _ALWAYS_STREAM,
                chat=sdk == "openai" and path.endswith("chat.completions"))
        vars(resource)[name] = wrapper  # on the instance: the class and other clients are untouched
        patched.append((resource, name))
    vars(client)[_STATE] = patched
    return client


def uninstrument(client: Any) -> Any:
    """Restore the SDK's own methods on a client ``instrument`` changed
    (nothing happens to one it did not); returns the client."""
    patched = vars(client).pop(_STATE, None) or []
    for resource, name in patched:
        vars(resource).pop(name, None)
    return client


# -- the budget, before the call ------------------------------------------------------------

# The request's bound on the call's output (openai Chat, Responses, anthropic): the first one given.
_OUTPUT_BOUNDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
# The request's text: in these arguments, under these keys (or SDK objects' attributes) within them.
_TEXT_ARGUMENTS = ("messages", "system", "instructions", "input", "contents")
_TEXT_KEYS = ("content", "text", "parts")
# A rough count of the input: a token is about four characters of English text.
CHARACTERS_PER_TOKEN = 4
_DEEPEST = 8  # how far into a request its text is looked for (a message's parts' parts)


def _field(value: Any, name: str) -> Any:
    """A dict's key or an SDK object's attribute (google-genai's config, Content, Part)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _output_bound(request: Mapping[str, Any], model: PsAiModel) -> int | None:
    """The most tokens the call may answer with: the request's bound, else the model's ``maxTokensOut``."""
    for name in _OUTPUT_BOUNDS:
        given = _count(request.get(name))
        if given is not None:
            return given
    given = _count(_field(request.get("config"), "max_output_tokens"))  # google-genai's generation config
    if given is not None:
        return given
    return _count(_field(model.configuration, "maxTokensOut"))


def _characters(value: Any, depth: int = 0) -> int:
    """The characters of text in a request's argument: strings, and what the
    text keys hold (a message's ``content``, a part's ``text``); images,
    files and audio (other keys) are not counted."""
    if isinstance(value, str):
        return len(value)
    if value is None or depth > _DEEPEST or isinstance(value, (bytes, int, float)):
        return 0
    if isinstance(value, (list, tuple)):
        return sum(_characters(each, depth + 1) for each in value)
    return sum(_characters(_field(value, key), depth + 1) for key in _TEXT_KEYS)


def request_estimate(request: Mapping[str, Any], model: PsAiModel) -> dict[str, int] | None:
    """What ``instrument(..., budget=True)`` reserves for a call to ``model``
    with these keyword arguments, as counts ``check_budget`` prices with
    the model's prices: ``tokens_out``, the request's output bound
    (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, or
    google-genai's ``config.max_output_tokens``), else the model's
    ``maxTokensOut``; ``tokens_in``, the characters of the request's text
    (messages, system, instructions, input, contents, and the config's
    system_instruction) over ``CHARACTERS_PER_TOKEN``, rounded up. None when
    there is no bound or the model's prices cannot price the call."""
    tokens_out = _output_bound(request, model)
    if tokens_out is None:
        return None
    characters = sum(_characters(request.get(name)) for name in _TEXT_ARGUMENTS)
    characters += _characters(_field(request.get("config"), "system_instruction"))
    counts = {"tokens_in": -(-characters // CHARACTERS_PER_TOKEN), "tokens_out": tokens_out}
    try:
        model_cost(model, **counts)
    except ValidationError:  # prices that cannot price it (a placeholder's, none at all)
        return None
    return counts


def _request_model(options: _Options, request: Mapping[str, Any]) -> PsAiModel | None:
    """The model a call is made for: ``instrument``'s, else the stored model
    the request's model name means (as recording finds the response's), else None."""
    if options.model is not None:
        return options.model
    name = request.get("model")
    if not isinstance(name, str):
        return None
    try:
        return resolve_model(name, provider=options.stored_providers)
    except (NotFoundError, ValidationError):
        return None


def _reserve(options: _Options, request: Mapping[str, Any]) -> Reservation | None:
    """With ``budget=True``, before the call: the call's estimate reserved
    against the hard budgets covering it (``check_before_call``, as
    ``psai.track``'s ``run.check`` does), the Reservation returned for its
    recording to settle. Without an estimate (no model known before the
    call, no output bound, prices that cannot price it) the budgets are
    checked and None returned. A budget refusal raises; a failure of the
    check itself is logged and the call goes ahead (strict: raises)."""
    try:
        model = _request_model(options, request)
        estimate = request_estimate(request, model) if model is not None else None
        return check_before_call(options.agent, model, estimate=estimate, reserve=True,
                                 user=options.attribution.get("user"), session=options.attribution.get("session"),
                                 tags=options.attribution.get("tags"))
    except BudgetExceededError:
        raise
    except Exception:
        if options.strict:
            raise
        LOG.warning("psai: the budget check before a call failed; the call goes ahead", exc_info=True)
        return None


def _release(reservation: Reservation | None) -> None:
    """Give back the reservation of a call that was not made (or cannot be
    recorded); one that cannot be released is logged, and expires."""
    if reservation is None:
        return
    try:
        reservation.release()
    except Exception:
        LOG.warning("psai: a budget reservation was not released (it expires after "
                    "psai.budget.RESERVATION_TTL)", exc_info=True)


def _release_later(db: Database | None, reservation: Reservation | None) -> None:
    """``_release`` on the writer (an async call): after what is queued before it, before what comes next."""
    if reservation is not None and db is not None:
        enqueue(db, "a budget reservation's release", _release, reservation)


# -- after the call -------------------------------------------------------------------------

def _record(options: _Options, response: Any, reservation: Reservation | None = None,
            what: str = "an instrumented call", *, quiet: bool = False) -> None:
    """Record one call, settling its reservation. One that cannot be
    recorded gives the reservation back and is logged (strict: raised,
    unless ``quiet``: an exception is on its way already)."""
    try:
        options.record(response, reservation)
    except Exception:
        _release(reservation)
        if options.strict and not quiet:
            raise
        LOG.warning("psai: %s was not recorded", what, exc_info=True)


def _record_on_writer(options: _Options, response: Any, reservation: Reservation, what: str) -> None:
    """``_record`` in the writer's batch: in a savepoint of its own, so that
    a call that cannot be recorded leaves nothing but its release."""
    try:
        with write_transaction():
            options.record(response, reservation)
    except Exception:
        _release(reservation)
        LOG.warning("psai: %s was not recorded", what, exc_info=True)


def _database(options: _Options) -> Database | None:
    """The database bound here, where the call will be recorded; None (logged)
    when psai is not connected: the call still goes ahead (strict: raises)."""
    try:
        return current_db()
    except Exception:
        if options.strict:
            raise
        LOG.warning("psai: no database is bound here: an instrumented call is not recorded", exc_info=True)
        return None


def _record_later(db: Database | None, options: _Options, response: Any, reservation: Reservation | None = None,
                  what: str = "an instrumented call") -> None:
    if db is None:
        return  # logged when the call began
    if reservation is None:
        enqueue(db, what, options.record, response)
    else:
        enqueue(db, what, _record_on_writer, options, response, reservation, what)


def _ask_for_usage(kwargs: dict[str, Any]) -> bool:
    """OpenAI Chat streams carry usage only when asked: ask, unless the
    caller said; True when psai asked (its usage-only chunk is then hidden)."""
    if kwargs.get("stream") is not True:
        return False
    given = kwargs.get("stream_options")
    if isinstance(given, Mapping):
        if "include_usage" in given:
            return False
        kwargs["stream_options"] = dict(given, include_usage=True)
    else:  # None, or the SDK's "not given" sentinel
        kwargs["stream_options"] = {"include_usage": True}
    return True


def _sync_call(original: Callable[..., Any], options: _Options, *, always_stream: bool,
               chat: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        reservation = _reserve(options, kwargs) if options.budget else None
        try:
            hide = chat and _ask_for_usage(kwargs)
            result = original(*args, **kwargs)
        except BaseException:
            _release(reservation)  # the call failed: nothing to settle
            raise
        if always_stream or kwargs.get("stream") is True:
            return _Stream(result, _Call(options, hide, _database(options), reservation))
        _record(options, result, reservation)
        return result
    return call


def _async_call(original: Callable[..., Any], options: _Options, *, always_stream: bool,
                chat: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    async def call(*args: Any, **kwargs: Any) -> Any:
        db = _database(options)
        reservation = await run_in(db, _reserve, options, kwargs) if options.budget and db is not None else None
        try:
            hide = chat and _ask_for_usage(kwargs)
            result = await original(*args, **kwargs)
        except BaseException:
            _release_later(db, reservation)
            raise
        if always_stream or kwargs.get("stream") is True:
            return _AsyncStream(result, _Call(options, hide, db, reservation))
        if options.strict and db is not None:
            await run_in(db, _record, options, result, reservation)
        else:
            _record_later(db, options, result, reservation)
        return result
    return call


def _stream_helper(original: Callable[..., Any], options: _Options) -> Callable[..., Any]:
    """anthropic's ``messages.stream()``: a context manager whose stream
    accumulates the message; recorded from that message when the block ends.
    (openai's ``.stream()`` helpers call ``create``, wrapped already.)"""
    @functools.wraps(original)
    def stream(*args: Any, **kwargs: Any) -> Any:
        return _StreamManager(original(*args, **kwargs), options, kwargs)
    return stream


# -- streams ----------------------------------------------------------------------------------

class _Call:
    """One streamed call: the events the reader needs (those that carry its
    usage, and those that show it ended), kept as they pass, and the
    reservation its recording settles."""

    __slots__ = ("options", "hide", "db", "reservation", "first", "start", "finished", "last", "done")

    def __init__(self, options: _Options, hide: bool, db: Database | None,
                 reservation: Reservation | None = None) -> None:
        self.options, self.hide, self.db, self.reservation = options, hide, db, reservation
        self.first: Any = None
        self.start: Any = None
        self.finished: Any = None  # the chunk with a finish_reason (Chat, Gemini): the reader's proof the call ended
        self.last: Any = None
        self.done = False

    def observe(self, event: Any) -> bool:
        """Keep what ``event`` says of usage and of the call's end; False
        when the caller should not see it (the usage-only chunk psai asked for)."""
        if self.first is None and getattr(event, "object", None) == "chat.completion.chunk":
            self.first = event  # the SDK's chat accumulator starts from it (PolicySynth's view of the usage)
        if _ends_the_call(event):
            self.finished = event
        kind = getattr(event, "type", None)
        if kind in _START_EVENTS:
            self.start = event
        elif kind in _FINAL_EVENTS or getattr(event, "usage", None) is not None \
                or getattr(event, "usage_metadata", None) is not None:
            self.last = event  # Chat's usage chunk, Anthropic's message_delta, Responses' final event
            if self.hide and getattr(event, "choices", None) == []:
                return False
        return True

    def events(self) -> list[Any]:
        kept: list[Any] = []
        for event in (self.first, self.start, self.finished, self.last):
            if event is not None and not any(event is seen for seen in kept):
                kept.append(event)
        return kept

    def ending(self) -> list[Any] | None:
        """The events to record, once (None: recorded already)."""
        if self.done:
            return None
        self.done = True
        return self.events()

    def finish(self, complete: bool, *, failing: bool = False) -> None:
        """Record the call, settling its reservation. One that did not run to
        its end is recorded only when what the provider reported is the
        whole call (the reader says); else it is logged as not recorded and
        its reservation released (strict: raises, unless the stream itself
        ``failing`` already raises)."""
        events = self.ending()
        if events is None:
            return
        _record(self.options, events, self.reservation, _WHAT[complete], quiet=failing)

    async def afinish(self, complete: bool, *, failing: bool = False) -> None:
        events = self.ending()
        if events is None:
            return
        if self.options.strict and not failing and self.db is not None:
            await run_in(self.db, _record, self.options, events, self.reservation, _WHAT[complete])
        else:
            _record_later(self.db, self.options, events, self.reservation, _WHAT[complete])

    def abandoned(self) -> None:
        """Garbage-collected before its end: on the writer, never here (a
        collection can happen anywhere)."""
        try:
            events = self.ending()
            if events is not None:
                _record_later(self.db, self.options, events, self.reservation, _WHAT[False])
        except Exception:
            pass  # nothing may escape a finalizer


_WHAT = {True: "an instrumented stream", False: "a stream closed before its end"}


def _ends_the_call(event: Any) -> bool:
    """A Chat chunk with a finish_reason, or a Gemini chunk with a
    candidate's finish_reason (or a blocked prompt): the call ran to its end."""
    candidates = getattr(event, "choices", None) or getattr(event, "candidates", None)
    if candidates and any(getattr(candidate, "finish_reason", None) for candidate in candidates):
        return True
    return getattr(getattr(event, "prompt_feedback", None), "block_reason", None) is not None


class _Stream:
    """A sync stream, handed to the caller as it came, recorded at its end."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream, self._call = stream, call
        self._iterator = iter(stream)

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                event = next(self._iterator)
            except StopIteration:
                self._call.finish(True)
                raise
            except BaseException:
                self._call.finish(False, failing=True)
                raise
            if self._call.observe(event):
                return event

    def close(self) -> None:
        try:
            closing = getattr(self._stream, "close", None)
            if closing is not None:
                closing()
        finally:
            self._call.finish(False)

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        call = self.__dict__.get("_call")
        if call is not None and not call.done:
            call.abandoned()


class _AsyncStream:
    """An async stream, handed to the caller as it came, recorded at its end
    on the background writer."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream, self._call = stream, call
        self._iterator = stream.__aiter__()

    def __aiter__(self) -> "_AsyncStream":
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                event = await self._iterator.__anext__()
            except StopAsyncIteration:
                await self._call.afinish(True)
                raise
            except BaseException:
                await self._call.afinish(False, failing=True)
                raise
            if self._call.observe(event):
                return event

    async def close(self) -> None:
        try:
            closing = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
            if closing is not None:
                result = closing()
                if inspect.isawaitable(result):
                    await result
        finally:
            await self._call.afinish(False)

    async def __aenter__(self) -> "_AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        call = self.__dict__.get("_call")
        if call is not None and not call.done:
            call.abandoned()


class _StreamManager:
    """anthropic's stream manager, recorded from its accumulated message
    when the ``with`` (or ``async with``) block ends (its reservation
    settled then, or released when there is nothing to record)."""

    def __init__(self, manager: Any, options: _Options, request: dict[str, Any]) -> None:
        self._manager, self._options, self._request = manager, options, request
        self._stream: Any = None
        self._reservation: Reservation | None = None
        self._db = _database(options)

    def _snapshot(self, exc: tuple[Any, ...]) -> Any:
        """The accumulated message, or None (logged; strict raises unless the
        block raises already) when the stream did not reach message_delta:
        its output is unknown, and psai never records part of a call."""
        try:
            snapshot = self._stream.current_message_snapshot
        except Exception:  # no message_start came: nothing was reported
            snapshot = None
        if snapshot is not None and getattr(snapshot, "stop_reason", None) is not None:
            return snapshot  # message_delta came (it brings the stop_reason and the final usage)
        problem = "a stream closed before its end (no message_delta) was not recorded"
        if self._options.strict and exc[0] is None:
            raise ValidationError({"response": ["This Anthropic stream was closed before its end: %s." % problem]})
        LOG.warning("psai: %s", problem)
        return None

    def _snapshot_or_release(self, exc: tuple[Any, ...], release: Callable[[], None]) -> Any:
        """``_snapshot``; when there is none (or it raises), nothing settles the
        reservation: ``release`` gives it back."""
        snapshot = None
        try:
            snapshot = self._snapshot(exc)
            return snapshot
        finally:
            if snapshot is None:
                release()

    def __enter__(self) -> Any:
        self._reservation = _reserve(self._options, self._request) if self._options.budget else None
        try:
            self._stream = self._manager.__enter__()
        except BaseException:
            _release(self._reservation)
            raise
        return self._stream

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._manager.__exit__(*exc)
        finally:
            snapshot = self._snapshot_or_release(exc, lambda: _release(self._reservation))
            if snapshot is not None:
                _record(self._options, snapshot, self._reservation)

    async def __aenter__(self) -> Any:
        if self._options.budget and self._db is not None:
            self._reservation = await run_in(self._db, _reserve, self._options, self._request)
        try:
            self._stream = await self._manager.__aenter__()
        except BaseException:
            _release_later(self._db, self._reservation)
            raise
        return self._stream

    async def __aexit__(self, *exc: Any) -> Any:
        try:
            return await self._manager.__aexit__(*exc)
        finally:
            snapshot = self._snapshot_or_release(exc, lambda: _release_later(self._db, self._reservation))
            if snapshot is not None and self._options.strict and self._db is not None:
                await run_in(self._db, _record, self._options, snapshot, self._reservation)
            elif snapshot is not None:
                _record_later(self._db, self._options, snapshot, self._reservation)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)
