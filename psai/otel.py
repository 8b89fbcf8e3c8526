"""``psai.otel``: record the calls a GenAI instrumentation traces.

``SpanProcessor`` is an OpenTelemetry SDK span processor (extra
``psai[otel]``): added to a ``TracerProvider``, it records every inference
span the instrumentations in use emit (the OTel GenAI conventions, their
legacy names, OpenLLMetry's, OpenInference's, pydantic-ai's) as a call
through ``record_response``'s path: the response id keeps a call wrapped by
two instrumentations from counting twice, a model name no configured model
matches is recorded unpriced on a placeholder. docs/otel.md has the table of
the attribute names read and what each family's counts mean."""
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span
from opentelemetry.sdk.trace import SpanProcessor as SdkSpanProcessor

from ._arguments import tags_arg
from .db import connect, using
from .errors import ValidationError
from .models import AgentRef
from ._recording import RecordedCall, record_response_data
from ._responses import ResponseUsage
from .writer import enqueue, flush

__all__ = ["SpanProcessor", "span_usage", "ATTRIBUTES", "INFERENCE_OPERATIONS"]

LOG = logging.getLogger(__name__)

# The names each count is read from, first found wins: the current OTel GenAI
# name, its legacy one, OpenLLMetry's (llm.usage.*), OpenInference's
# (llm.token_count.*), pydantic-ai's (gen_ai.usage.details.*).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "input": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.usage.prompt_tokens",
              "llm.token_count.prompt"),
    "output": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.usage.completion_tokens",
               "llm.token_count.completion"),
    "total": ("gen_ai.usage.total_tokens", "llm.usage.total_tokens", "llm.token_count.total"),
    "cache_read": ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                   "llm.usage.cache_read_input_tokens", "llm.token_count.prompt_details.cache_read",
                   "gen_ai.usage.details.cache_read_tokens"),
    "cache_write": ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens",
                    "llm.usage.cache_creation_input_tokens", "llm.token_count.prompt_details.cache_write",
                    "gen_ai.usage.details.cache_write_tokens"),
    "reasoning": ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens",
                  "llm.usage.reasoning_tokens", "llm.token_count.completion_details.reasoning",
                  "gen_ai.usage.details.reasoning_tokens"),
    "audio_in": ("llm.token_count.prompt_details.audio", "gen_ai.usage.details.input_audio_tokens"),
    "audio_out": ("llm.token_count.completion_details.audio", "gen_ai.usage.details.output_audio_tokens"),
    # The model billed: the response's, else the request's.
    "model": ("gen_ai.response.model", "llm.response.model", "llm.model_name", "gen_ai.request.model",
              "llm.request.model"),
    "provider": ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"),
    "response_id": ("gen_ai.response.id",),
    "operation": ("gen_ai.operation.name", "llm.request.type"),
    "service_tier": ("openai.response.service_tier", "gen_ai.openai.response.service_tier"),
    "conversation": ("gen_ai.conversation.id", "session.id"),
    "user": ("user.id", "enduser.id"),
    "agent_name": ("gen_ai.agent.name",),
}

# gen_ai.operation.name (and OpenLLMetry's llm.request.type) of a model call;
# any other (invoke_agent, execute_tool, embeddings, ...) is not recorded.
INFERENCE_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "completion"})

# Provider names as instrumentations write them -> psai's (responses.PROVIDERS).
_PROVIDERS = {"openai": "openai", "azure.ai.openai": "azure", "az.ai.openai": "azure", "azure": "azure",
              "anthropic": "anthropic", "gcp.gemini": "google", "gcp.vertex_ai": "google", "gcp.gen_ai": "google",
              "gemini": "google", "vertex_ai": "google", "vertexai": "google", "google": "google"}

# What a span cannot say, named in the item's data.psai.approximate.
APPROXIMATE_WEB_SEARCHES = "webSearches"  # server-side tool calls are not counted on spans
APPROXIMATE_SERVICE_TIER = "serviceTier"  # no tier attribute: priced at the standard tier
APPROXIMATE_CACHE_WRITE_DURATION = "cacheWriteDuration"  # writes priced as 5-minute ones: 1-hour ones not told apart

_COUNT_NAMES = ("input", "output", "total", "cache_read", "cache_write", "reasoning", "audio_in", "audio_out")


def _first(attributes: Mapping[str, Any], kind: str) -> Any:
    for name in ATTRIBUTES[kind]:
        value = attributes.get(name)
        if value is not None:
            return value
    return None


def _count(attributes: Mapping[str, Any], kind: str) -> int:
    value = _first(attributes, kind)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValidationError({ATTRIBUTES[kind][0]: ["Not a token count: %r." % (value,)]})
    return int(value)


def is_inference(attributes: Mapping[str, Any]) -> bool:
    """True for a span of one model call: an inference operation (or none
    named) of an LLM span kind (or none named) that says its model and
    carries token counts. Agent, workflow, tool and embedding spans are
    not, whatever usage they add up."""
    operation = _first(attributes, "operation")
    if operation is not None and operation not in INFERENCE_OPERATIONS:
        return False
    kind = attributes.get("openinference.span.kind")
    if kind is not None and str(kind).upper() != "LLM":
        return False
    if attributes.get("traceloop.span.kind") is not None:  # OpenLLMetry's workflow, task, agent and tool spans
        return False
    return _first(attributes, "model") is not None and (
        _first(attributes, "input") is not None or _first(attributes, "output") is not None)


def span_usage(attributes: Mapping[str, Any]) -> tuple[ResponseUsage, list[str]]:
    """The billed counts of one inference span (``ResponseUsage``, as
    ``record_response`` takes it) and what about them is approximate.

    Input tokens are taken to include cache reads and writes, as the OTel
    GenAI conventions define them and OpenLLMetry, OpenInference and
    pydantic-ai report them (Anthropic's API reports them apart and these
    instrumentations add them in); a span whose input is smaller than its
    cache tokens, or whose total is input + cache + output, reports them
    apart, and they are added."""
    counts = {kind: _count(attributes, kind) for kind in _COUNT_NAMES}
    model = _first(attributes, "model")
    named = _first(attributes, "provider")
    provider = _PROVIDERS.get(str(named).lower()) if named is not None else None
    tokens_in, cached, written = counts["input"], counts["cache_read"], counts["cache_write"]
    if cached + written and (tokens_in < cached + written
                             or counts["total"] == tokens_in + cached + written + counts["output"]):
        tokens_in += cached + written
    approximate = [APPROXIMATE_WEB_SEARCHES]
    metadata: dict[str, Any] = {}
    tier = _first(attributes, "service_tier")
    if isinstance(tier, str) and tier:
        metadata["appliedServiceTier"] = tier
    else:
        approximate.append(APPROXIMATE_SERVICE_TIER)
    if written and provider in ("anthropic", None):
        approximate.append(APPROXIMATE_CACHE_WRITE_DURATION)
    response_id = _first(attributes, "response_id")
    if isinstance(response_id, str) and response_id:
        metadata["responseId"] = response_id
    raw = {name: attributes[name] for kind in _COUNT_NAMES for name in ATTRIBUTES[kind] if name in attributes}
    usage = ResponseUsage(tokens_in=tokens_in, tokens_out=counts["output"], cached_tokens=cached,
                          cache_write_tokens=written, reasoning_tokens=counts["reasoning"],
                          audio_in_tokens=min(counts["audio_in"], tokens_in), audio_tokens=counts["audio_out"],
                          model=str(model), provider=provider, usage_raw=raw, provider_metadata=metadata)
    return usage, approximate


def _describe(attributes: Mapping[str, Any], context: Any) -> str:
    """A span in a log line: its model and ids."""
    ids = " (trace %032x, span %016x)" % (context.trace_id, context.span_id) if context is not None else ""
    return "of model %r%s" % (_first(attributes, "model"), ids)


class SpanProcessor(SdkSpanProcessor):
    """Records each inference span, when it ends, as one call
    (``record_response``'s path): of ``agent`` (a PsAgent, its id, uuid or
    name; None: no agent), in ``database`` (a database or URL; None: the
    one psai is bound to in the thread that ends the span), with ``tags``
    (text keys and values) kept in the item's ``psai`` part, beside the
    span's trace and span ids (``trace``), its conversation id (``session``),
    end user (``user``, from ``user.id`` or ``enduser.id``) and agent name, and what
    about its cost is approximate (``data.psai.approximate``).

    ``on_end`` never raises into the application: a span it cannot record
    is logged (logger ``psai.otel``) and skipped. It only tells whether
    the span is a call on the thread that ends it, and hands the recording
    to ``submit`` (a callable taking a job of no arguments): by default
    psai's background writer (``psai.writer``, as instrumented async clients
    use; ``force_flush``, ``shutdown`` and ``psai.flush()`` wait for it).
    ``processor.submit = lambda job: job()`` records on that thread instead."""

    def __init__(self, *, agent: AgentRef | None = None, database: Any = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self.tags = tags_arg(tags)
        self.agent = agent
        self.database = connect(database, bind=False) if isinstance(database, str) else database
        self.submit: Callable[[Callable[[], Any]], None] = self._to_writer
        # (trace id, span id) of spans with an inference span below them: their
        # usage, if any, is their children's again.
        self._covered: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def _to_writer(self, job: Callable[[], Any]) -> None:
        # The database bound on the thread that ends the span, when the processor has none.
        enqueue(self.database, "a span", job)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception:  # never into the application: the call it traced has happened
            LOG.warning("psai could not read span %r", getattr(span, "name", None), exc_info=True)

    def _on_end(self, span: ReadableSpan) -> None:
        attributes = span.attributes or {}
        context, parent = span.context, span.parent
        key = (context.trace_id, context.span_id) if context is not None else None
        inference = is_inference(attributes)
        with self._lock:
            covered = key is not None and key in self._covered
            if key is not None and covered:
                del self._covered[key]
            if (covered or inference) and parent is not None:
                self._covered[(parent.trace_id, parent.span_id)] = None
                if len(self._covered) > 10000:  # parents that never end: forget the oldest
                    self._covered.popitem(last=False)
        if covered or not inference:
            return
        # The rest is the writer's: the span has ended, its attributes no longer change.
        self.submit(partial(self._record_span, attributes, context))

    def _record_span(self, attributes: Mapping[str, Any], context: Any) -> RecordedCall | None:
        try:
            usage, approximate = span_usage(attributes)
            kept: dict[str, Any] = {"source": "otel", "approximate": approximate}
            if context is not None:
                kept["trace"] = {"traceId": "%032x" % context.trace_id, "spanId": "%016x" % context.span_id}
            # The conversation and the end user under the keys record_response's session and user have.
            for kind, name in (("conversation", "session"), ("user", "user"), ("agent_name", "agentName"),
                               ("provider", "providerName")):
                value = _first(attributes, kind)
                if value is not None:
                    kept[name] = str(value)
            if self.tags:
                kept["tags"] = self.tags
            return self.record(usage, kept)
        except Exception:  # never into the application (nor into the writer's other jobs)
            LOG.warning("psai could not record span %s", _describe(attributes, context), exc_info=True)
            return None

    def record(self, usage: ResponseUsage, kept: dict[str, Any]) -> RecordedCall:
        """Record one span's call."""
        if self.database is None:
            return record_response_data(None, self.agent, usage, None, None, None, kept=kept)
        with using(self.database):
            return record_response_data(None, self.agent, usage, None, None, None, kept=kept)

    def shutdown(self) -> None:
        flush()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until what was handed to the writer is written (True), or ``timeout_millis`` passes (False)."""
        return flush(timeout_millis / 1000)
