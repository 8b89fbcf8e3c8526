"""Arguments callers give psai's recording and report functions, checked
one way everywhere: models and agents by row, id, uuid or name (the one
rule of ``psai.models.find_model``); counts and ids
that fit PolicySynth's INTEGER columns; periods as aware datetimes."""
import datetime
import math
import re
from collections.abc import Mapping
from typing import Any, cast

from ._constants import MAX_INTEGER, time_range_problem
from .errors import ValidationError
from .fields import UTC
from .models import AgentRef, ModelRef, PsAgent, PsAiModel, find_agent, find_model
from .schemas import MAX_ATTRIBUTE_LENGTH, MAX_TAG_KEY_LENGTH, TAG_KEY_PATTERN

__all__ = ["model_arg", "agent_arg", "check_counts", "check_ids", "as_datetime", "tags_arg", "attribution_arg",
           "tag_key_problem", "ATTRIBUTES", "MAX_ATTRIBUTE_LENGTH", "MAX_TAGS"]


def model_arg(model: ModelRef) -> PsAiModel:
    """The model row: a row given (refused if it came from another
    database than the one bound here), else the row this id, uuid or name
    names (``find_model``)."""
    return find_model(model)


def agent_arg(agent: AgentRef | None) -> PsAgent | None:
    """The agent row, as ``model_arg`` finds a model; None stays None."""
    return None if agent is None else find_agent(agent)


def check_counts(counts: Mapping[str, object]) -> None:
    """One rule for every count a caller gives (record_usage, model_cost): a
    number, finite, 0 or more, at most what one counter column holds."""
    errors: dict[str, list[str]] = {}
    for name, value in counts.items():
        if type(value) is int and 0 <= value <= MAX_INTEGER:
            continue  # a whole count in range (not a bool: its type is bool), as most are
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors[name] = ["Not a number."]
        elif isinstance(value, float) and not math.isfinite(value) or value < 0:
            errors[name] = ["Must be a finite number, 0 or more."]
        elif value > MAX_INTEGER:  # compared as given: math.isfinite(10**400) would overflow
            errors[name] = ["Too large for one call: at most %d." % MAX_INTEGER]
    if not errors:
        # The totals hold their parts, as every provider reports them (and
        # record_response refuses a response whose parts are above them).
        for total, parts in (("tokens_in", ("cached_tokens", "cache_write_tokens")),
                             ("tokens_out", ("reasoning_tokens", "audio_tokens", "image_tokens"))):
            given = [name for name in parts if counts.get(name)]
            held = sum(cast(float, counts[name]) for name in given)
            if held > cast(float, counts.get(total, 0)):
                errors[given[0]] = ["%s (%s) above %s (%s): %s is the call's total, which holds them." % (
                    " and ".join(given), _number(held), total, _number(cast(float, counts.get(total, 0))), total)]
    if errors:
        raise ValidationError(errors)


def _number(value: float) -> str:
    return "%d" % value if float(value).is_integer() else repr(value)


def check_ids(ids: Mapping[str, object]) -> None:
    """Ids a caller gives for columns: integers that fit PostgreSQL's INTEGER
    (SQLite would store text or huge numbers where PolicySynth cannot read them)."""
    errors: dict[str, list[str]] = {}
    for name, value in ids.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            errors[name] = ["Not an integer."]
        elif not -MAX_INTEGER - 1 <= value <= MAX_INTEGER:
            errors[name] = ["Out of range for an INTEGER column (at most %d)." % MAX_INTEGER]
    if errors:
        raise ValidationError(errors)


def as_datetime(value: datetime.date | str | None, end: bool = False,
                name: str | None = None) -> datetime.datetime | None:
    """A since/until as an aware datetime: a date, a datetime or their ISO
    text (a date ``until`` is inclusive). None stays None."""
    name = name or ("until" if end else "since")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value) if "T" in value or " " in value \
                else datetime.date.fromisoformat(value)
        except ValueError as exc:
            raise ValidationError({name: ["Not a date or time (YYYY-MM-DD or ISO 8601): %s." % exc]}) from None
    if not isinstance(value, datetime.date):
        raise ValidationError({name: ["Not a date or time: %r." % (value,)]})
    if not isinstance(value, datetime.datetime):
        day = value
        value = datetime.datetime(day.year, day.month, day.day, tzinfo=UTC)
        if end:
            if day == datetime.date.max:
                return None  # until the end of time
            value += datetime.timedelta(days=1)  # a date until is inclusive
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    problem = time_range_problem(value)
    if problem:  # PostgreSQL would store it (a correction's period) where nothing can read it
        raise ValidationError({name: [problem]})
    return value


# The attribution a call carries, as ``data.psai`` keys (text each but ``tags``, a dict, and ``trace``).
ATTRIBUTES = ("user", "session", "trace", "tags", "environment")
MAX_TAGS = 32
_TAG_KEY = re.compile(TAG_KEY_PATTERN)


def _text_problem(value: object, example: str) -> str | None:
    if not isinstance(value, str):
        return "Not text (got %s): give e.g. %r." % (type(value).__name__, example)
    if not value.strip():
        return "Empty: give e.g. %r, or leave it out." % example
    if len(value) > MAX_ATTRIBUTE_LENGTH:
        return "Too long: %d characters, at most %d." % (len(value), MAX_ATTRIBUTE_LENGTH)
    return None


def tag_key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a tag's key (a sentence), or None."""
    if not isinstance(key, str) or not key:
        return "A tag's key is text, e.g. 'team': got %r." % (key,)
    if len(key) > MAX_TAG_KEY_LENGTH or not _TAG_KEY.match(key):
        return ("Tag key %r: use at most %d letters, digits and _ . : / - (it is named in reports, "
                "by='tag:KEY', and on the command line, --tag KEY=VALUE)." % (key, MAX_TAG_KEY_LENGTH))
    return None


def tags_arg(tags: Mapping[str, str] | None) -> dict[str, str] | None:
    """Tags a caller gives (kept in an item's ``psai`` part): text keys and
    values, or None."""
    if tags is None:
        return None
    if not isinstance(tags, Mapping):
        raise ValidationError({"tags": ["Give text keys and values, e.g. {'team': 'search'}: got %s."
                                        % type(tags).__name__]})
    problems = []
    if len(tags) > MAX_TAGS:
        problems.append("%d tags: at most %d." % (len(tags), MAX_TAGS))
    for key, value in tags.items():
        problem = tag_key_problem(key)
        if problem is None:
            value_problem = _text_problem(value, "search")
            problem = value_problem and "Tag %r: %s" % (key, value_problem)
        if problem:
            problems.append(problem)
    if problems:
        raise ValidationError({"tags": problems})
    return dict(tags) if tags else None


def _trace_arg(trace: object) -> dict[str, str]:
    """A trace id (text), or ``{"traceId": ..., "spanId": ...}`` (the span id
    optional): as spans' items keep it."""
    if isinstance(trace, str):
        trace = {"traceId": trace}
    if not isinstance(trace, Mapping) or not trace or set(trace) - {"traceId", "spanId"} or "traceId" not in trace:
        raise ValidationError({"trace": ["Give the trace id (text), or {'traceId': ..., 'spanId': ...}: got %r."
                                         % (trace,)]})
    for key, value in trace.items():
        problem = _text_problem(value, "4bf92f3577b34da6a3ce929d0e0e4736")
        if problem:
            raise ValidationError({"trace": ["%s: %s" % (key, problem)]})
    return dict(trace)


def attribution_arg(*, user: str | None = None, session: str | None = None, trace: Any = None,
                    tags: Mapping[str, str] | None = None, environment: str | None = None) -> dict[str, Any]:
    """The attribution a caller gives a call, checked (each error names its
    argument), as its item's ``data.psai`` keeps it: ``user`` (the
    application's end user), ``session`` (the conversation), ``environment``
    (text, at most 255 characters each), ``trace`` (a trace id, or
    ``{"traceId", "spanId"}``), ``tags`` (text keys and values). Only those
    given are in it."""
    found: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for name, value, example in (("user", user, "user-42"), ("session", session, "conversation-7"),
                                 ("environment", environment, "prod")):
        if value is None:
            continue
        problem = _text_problem(value, example)
        if problem:
            errors[name] = [problem]
        else:
            found[name] = value
    try:
        if trace is not None:
            found["trace"] = _trace_arg(trace)
    except ValidationError as exc:
        errors["trace"] = exc.messages["trace"] if isinstance(exc.messages, dict) else [str(exc)]
    try:
        checked_tags = tags_arg(tags)
        if checked_tags:
            found["tags"] = checked_tags
    except ValidationError as exc:
        errors["tags"] = exc.messages["tags"] if isinstance(exc.messages, dict) else [str(exc)]
    if errors:
        raise ValidationError(errors)
    return found
