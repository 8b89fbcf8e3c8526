"""``psai.openai_agents``: record the model calls the OpenAI Agents SDK
traces (extra ``psai[agents]``).

``TracingProcessor`` is a trace processor for the Agents SDK
(``agents.add_trace_processor``): each response span (the Responses API:
the provider's own response, read by ``usage_from_response``, so priced as
``record_response`` prices it, once per response id) and each generation
span (Chat Completions and other models: the usage the SDK reports) is
recorded as one call. Agent, turn and task spans, whose usage adds up
those calls, are not. It follows the SDK's processor interface without
importing the SDK (psai imports no provider SDK)."""
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from ._arguments import tags_arg
from .db import connect, using
from .errors import ValidationError
from .models import AgentRef
from ._recording import RecordedCall, record_response_data
from ._responses import ResponseUsage
from .writer import enqueue, flush

__all__ = ["TracingProcessor", "generation_usage"]

LOG = logging.getLogger(__name__)


def _count(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValidationError({name: ["Not a token count: %r." % (value,)]})
    return int(value)


def generation_usage(model: Any, usage: Mapping[str, Any]) -> ResponseUsage:
    """A generation span's call: the SDK's usage (``input_tokens``, cached
    ones among them in ``input_tokens_details.cached_tokens``,
    ``output_tokens``, reasoning ones among them in
    ``output_tokens_details.reasoning_tokens``) of ``model``."""
    if not isinstance(model, str) or not model:
        raise ValidationError({"model": ["The generation span names no model."]})
    details = usage.get("input_tokens_details") or {}
    out_details = usage.get("output_tokens_details") or {}
    tokens_in = _count(usage.get("input_tokens"), "input_tokens")
    return ResponseUsage(
        tokens_in=tokens_in, tokens_out=_count(usage.get("output_tokens"), "output_tokens"),
        cached_tokens=min(_count(details.get("cached_tokens"), "input_tokens_details.cached_tokens"), tokens_in),
        reasoning_tokens=_count(out_details.get("reasoning_tokens"), "output_tokens_details.reasoning_tokens"),
        model=model, usage_raw=dict(usage))


class TracingProcessor:
    """Records the Agents SDK's response and generation spans, when they
    end, as calls: of ``agent`` (a PsAgent, its id, uuid or name; None: no
    agent), in ``database`` (a database or URL; None: the one psai is bound
    to in the thread that ends the span), with ``tags`` kept in each item's
    ``psai`` part beside the trace and span ids (``trace``) and the trace's
    group id (the SDK's conversation, as ``session``). A generation span
    cannot say its tier or web searches: its item names them in
    ``data.psai.approximate``.

    ``on_span_end`` never raises into the agent run (a span it cannot record
    is logged, logger ``psai.openai_agents``); it hands the recording to
    ``submit``: by default psai's background writer, as ``psai.otel``'s
    (``force_flush``, ``shutdown`` and ``psai.flush()`` wait for it)."""

    def __init__(self, *, agent: AgentRef | None = None, database: Any = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self.tags = tags_arg(tags)
        self.agent = agent
        self.database = connect(database, bind=False) if isinstance(database, str) else database
        self.submit: Callable[[Callable[[], Any]], None] = self._to_writer
        self._groups: dict[str, str] = {}  # trace id -> group id, while the trace runs

    def _to_writer(self, job: Callable[[], Any]) -> None:
        # The database bound on the thread that ends the span, when the processor has none.
        enqueue(self.database, "a span", job)

    def on_trace_start(self, trace: Any) -> None:
        group = getattr(trace, "group_id", None)
        if isinstance(group, str) and group:
            self._groups[trace.trace_id] = group

    def on_trace_end(self, trace: Any) -> None:
        self._groups.pop(getattr(trace, "trace_id", None), None)  # type: ignore[arg-type]

    def on_span_start(self, span: Any) -> None:
        pass

    def on_span_end(self, span: Any) -> None:
        try:
            data = span.span_data
            kind = data.type
            if kind == "response" and data.response is not None:
                call: Any = data.response
            elif kind == "generation" and data.usage:
                call = (data.model, data.usage)
            else:
                return
            # The trace's group now: the trace may have ended when the writer records.
            self.submit(partial(self._record_span, kind, call, span.trace_id, span.span_id,
                                self._groups.get(span.trace_id)))
        except Exception:  # never into the agent run: the call has happened
            LOG.warning("psai could not read span %r", span, exc_info=True)

    def _record_span(self, kind: str, call: Any, trace_id: str, span_id: str, group: str | None
                     ) -> RecordedCall | None:
        try:
            kept: dict[str, Any] = {"source": "openai-agents", "trace": {"traceId": trace_id, "spanId": span_id}}
            if kind == "generation":
                usage: Any = generation_usage(*call)
                kept["approximate"] = ["webSearches", "serviceTier"]
            else:
                usage = call  # the Responses API's own response: record_response reads it
            if group is not None:
                kept["session"] = group  # the key record_response's session has
            if self.tags:
                kept["tags"] = self.tags
            if self.database is None:
                return record_response_data(None, self.agent, usage, None, None, None, kept=kept)
            with using(self.database):
                return record_response_data(None, self.agent, usage, None, None, None, kept=kept)
        except Exception:  # never into the agent run, nor into a writer's other jobs
            LOG.warning("psai could not record the %s span %s of trace %s", kind, span_id, trace_id, exc_info=True)
            return None

    def shutdown(self) -> None:
        flush()

    def force_flush(self) -> None:
        flush()
