"""marshmallow schemas: declared once, used to validate writes and to dump rows.

Configuration keys stay camelCase, exactly as PolicySynth stores them. Row
fields are snake_case, as PolicySynth's API returns them.
"""
import copy
import decimal
import json
import math
import numbers
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast, get_args
from enum import Enum

from marshmallow import (
    EXCLUDE, INCLUDE, RAISE, Schema, fields, post_load, validates_schema,
)
from marshmallow import ValidationError as _MarshmallowValidationError
from marshmallow.validate import Length, OneOf, Range, Regexp

from ._constants import LONG_CONTEXT_RATE_KEYS, MAX_INTEGER, MAX_SAFE_INTEGER, MIN_INTEGER, time_range_problem
from .enums import (
    InferenceType, PsAiModelSize, PsAiModelType, ReasoningMode, RegionalProcessing,
)
from .errors import ValidationError

__all__ = [
    "ModelPricesSchema", "AiModelConfigurationSchema", "PsAiModelSchema", "PsAgentSchema", "dump_rows",
    "shape_problem", "readable", "time_problems", "Timestamp",
    "validate_configuration", "EXCLUDE", "INCLUDE", "RAISE", "BudgetSchema", "validate_budget_values",
    "BUDGET_FIELDS", "BUDGET_PERIODS", "BudgetPeriod", "BudgetUnpriced", "TAG_KEY_PATTERN",
    "MAX_TAG_KEY_LENGTH", "MAX_ATTRIBUTE_LENGTH",
]


class _Base(Schema):
    """Raises psai.ValidationError (a marshmallow ValidationError whose str()
    lists every bad field by its dotted path)."""

    def handle_error(self, error, data, *, many, **kwargs):
        raise ValidationError(error.messages, data=data, valid_data=error.valid_data) from None


# -- strict scalar fields: JSON has no "30" for 30, no 1 for true, no NaN ------------



class Number(fields.Field):
    """A finite JSON number (int or float); strings, booleans, NaN and
    infinities are refused. The value is kept as given (30 stays 30)."""

    default_error_messages = {
        "invalid": "Not a number.",
        "not_finite": "Not a finite number (NaN and infinity are not allowed).",
        "too_large": "Too large: PolicySynth (JavaScript) keeps integers exact only up to 2**53.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.make_error("invalid")
        # Integers first: math.isfinite(10**400) overflows.
        if isinstance(value, int):
            if abs(value) > MAX_SAFE_INTEGER:
                raise self.make_error("too_large")
            return value
        if not math.isfinite(value):
            raise self.make_error("not_finite")
        # A float past 2**53 comes back from PostgreSQL's jsonb as an integer
        # that would then be refused: refuse it now, on both backends.
        if abs(cast(float, value)) > MAX_SAFE_INTEGER:
            raise self.make_error("too_large")
        return value

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class Integer(Number):
    default_error_messages = {"invalid": "Not an integer."}

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, float):
            if not value.is_integer():
                raise self.make_error("invalid")
            value = int(value)
        return value


class Boolean(fields.Field):
    default_error_messages = {"invalid": "Not a boolean (true or false)."}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class String(fields.String):
    """A string without NUL characters or lone surrogates; str enums are
    stored as their plain value."""

    default_error_messages = {
        "nul": "Contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store.",
        "surrogate": "Contains a lone surrogate (e.g. \\ud800): not Unicode text, which PostgreSQL refuses "
                     "and SQLite would store unreadably.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, Enum):
            value = value.value
        value = super()._deserialize(value, attr, data, **kwargs)
        problem = text_problem(value)
        if problem:
            raise self.make_error(problem)
        return value


class Timestamp(fields.AwareDateTime):
    """An aware ISO 8601 time that can be read back (its UTC in years
    1-9999). On dump, a stored value psai could not read as a time (it reads
    as its text) is shown as stored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", default_timezone=None, **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        if isinstance(value, str):
            return str(value)
        return super()._serialize(value, attr, obj, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        problem = time_range_problem(value)
        if problem:
            raise _MarshmallowValidationError(problem)
        return value


def time_problems(row: Any, names: Iterable[str] = ("created_at", "updated_at")) -> list[str]:
    """What is wrong with a stored row's timestamps: each one psai could not
    read as a time (it reads as its text, with the reason)."""
    return ["%s %s" % (name, getattr(value, "problem", "cannot be read as a time"))
            for name in names if isinstance(value := getattr(row, name, None), str)]


def text_problem(value: str) -> str | None:
    """"nul" or "surrogate" when a string cannot be stored as JSON text on
    both backends, else None."""
    if "\x00" in value:
        return "nul"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "surrogate"
    return None


def Choice(enum: type[Enum], **kwargs: Any) -> String:
    values = [member.value for member in enum]
    return String(validate=OneOf(values, error="Must be one of: {choices}"), **kwargs)


def Rate(**kwargs: Any) -> Number:
    """A price per million tokens: finite and not negative."""
    return Number(validate=Range(min=0), **kwargs)


def Count(minimum: int = 0, **kwargs: Any) -> Integer:
    return Integer(validate=Range(min=minimum), **kwargs)


# -- configuration ----------------------------------------------------------------

class _ConfigurationPart(_Base):
    """Unknown keys are refused by default (a typo is the common case); a
    schema built with unknown=INCLUDE keeps them, for rows written by a newer
    PolicySynth."""

    class Meta:
        unknown = RAISE
        ordered = True


class _NestedPart(fields.Nested):
    """Nested schema that follows its parent's ``unknown`` setting."""

    def _deserialize(self, value, attr, data, partial=None, **kwargs):
        # The nested schema object belongs to this field alone, so setting
        # its ``unknown`` passes the choice on to the level below it too.
        self.unknown = self.schema.unknown = cast(Schema, self.parent).unknown
        return super()._deserialize(value, attr, data, partial=partial, **kwargs)

    def _serialize(self, nested_obj, attr, obj, **kwargs):  # type: ignore[override]  # Nested's names, not Field's
        # Dumps pass stored JSON through whole, so extra keys round-trip.
        return copy.deepcopy(nested_obj)


class ModelPricesSchema(_ConfigurationPart):
    costInTokensPerMillion = Rate(required=True)
    costOutTokensPerMillion = Rate(required=True)
    costInCachedContextTokensPerMillion = Rate(required=True)
    currency = String(
        required=True,
        validate=Regexp(r"^[A-Z]{3}\Z", error="Must be a three-letter ISO 4217 code such as USD."),
    )
    costPerThousandWebSearches = Rate()
    cacheWriteInputCostMultiplier = Number(validate=Range(min=0))
    cacheWrite1hInputCostMultiplier = Number(validate=Range(min=0))  # psai's own: 1-hour cache writes
    cacheWrite12hInputCostMultiplier = Number(validate=Range(min=0))  # psai's own: OpenAI's 12-hour writes
    costInAudioTokensPerMillion = Rate()  # psai's own: the rates of tokens that are not text
    costOutAudioTokensPerMillion = Rate()
    costOutImageTokensPerMillion = Rate()
    longContextCostInTokensPerMillion = Rate()
    longContextCostInCachedContextTokensPerMillion = Rate()
    longContextCostOutTokensPerMillion = Rate()
    longContextTokenThreshold = Count(minimum=1)
    regionalProcessingMargin = Number(validate=Range(min=0, max=1000))
    flexTokensIn = Rate()
    flexTokensCachedIn = Rate()
    flexTokensOut = Rate()
    priorityTokensIn = Rate()
    priorityTokensCachedIn = Rate()
    priorityTokensOut = Rate()
    fastTokensIn = Rate()
    fastTokensCachedIn = Rate()
    fastTokensOut = Rate()
    flexPriorityTokensEnabledOnLongContext = Boolean()

    @validates_schema
    def _long_context_needs_threshold(self, data, **kwargs):
        if "longContextTokenThreshold" in data:
            return
        errors = {
            key: ["Only meaningful with longContextTokenThreshold, which is missing."]
            for key in LONG_CONTEXT_RATE_KEYS if key in data
        }
        if errors:
            raise _MarshmallowValidationError(errors)


class _PricesPart(_NestedPart):
    """``prices``: ModelPricesSchema's, or ``{}``, which only an inactive
    model may have (a placeholder for calls whose model was not configured:
    they stay unpriced, saying so). An active one is told what is missing."""

    def _deserialize(self, value, attr, data, partial=None, **kwargs):
        if value == {} and isinstance(data, Mapping) and data.get("active") is False and not partial:
            return {}
        return super()._deserialize(value, attr, data, partial=partial, **kwargs)


class AiModelConfigurationSchema(_ConfigurationPart):
    type = Choice(PsAiModelType, required=True)
    modelSize = Choice(PsAiModelSize, required=True)
    model = String(required=True, validate=Length(min=1, max=255))
    provider = String(required=True, validate=Length(min=1, max=64))
    active = Boolean(required=True)
    prices = _PricesPart(ModelPricesSchema, required=True)
    maxTokensOut = Count(minimum=1, required=True)
    defaultTemperature = Number(required=True, validate=Range(min=0, max=2))
    apiModel = String(validate=Length(min=1, max=255))
    accountingVersion = Integer(validate=OneOf([1, 2], error="Must be 1 or 2."))
    inferenceType = Choice(InferenceType)
    regionalProcessing = Choice(RegionalProcessing)
    maxContextTokens = Count(minimum=1)
    deploymentName = String(validate=Length(min=1, max=255))
    endpoint = String(validate=Length(min=1, max=2048))
    limitTPM = Count()
    limitRPM = Count()
    timeoutMs = Count(minimum=1)
    reasoningMode = Choice(ReasoningMode)


def validate_configuration(configuration: Mapping[str, Any], *, allow_unknown: bool = False) -> dict[str, Any]:
    """Validate a model configuration and return it normalised (str enums to
    plain strings). Raises psai.ValidationError naming every bad field."""
    schema = AiModelConfigurationSchema(unknown=INCLUDE if allow_unknown else RAISE)
    return schema.load(configuration)


# -- rows -------------------------------------------------------------------------

def ColumnInteger(minimum: int = MIN_INTEGER, **kwargs: Any) -> Integer:
    """An integer that fits a 32-bit INTEGER column, as on PostgreSQL (SQLite
    would store more, and the same row could not be copied to PostgreSQL)."""
    return Integer(validate=Range(min=minimum, max=MAX_INTEGER), **kwargs)


class _Row(_Base):
    class Meta:
        unknown = RAISE
        ordered = True

    id = ColumnInteger(minimum=1)
    uuid = fields.UUID()
    created_at = Timestamp()
    updated_at = Timestamp()

    def __init__(self, *, with_links: bool = False, as_rows: bool = True, **kwargs: Any) -> None:
        if not with_links:
            kwargs["exclude"] = tuple(kwargs.get("exclude", ())) + (self._link_field,)
        # load() gives model instances (unsaved); as_rows=False gives dicts.
        self.as_rows = as_rows
        super().__init__(**kwargs)

    # The name of the field holding the linked rows, dumped only with_links (each schema's own).
    _link_field: str

    # The model class load() builds rows of: psai.models binds its tables
    # here (``bind_row_class``), as this module knows no database.
    row_class: Any = None

    @post_load
    def _make_row(self, data, **kwargs):
        if not self.as_rows:
            return data
        return self.row_class(**data)


class PsAiModelSchema(_Row):
    """A ``ps_ai_models`` row. ``with_links=True`` adds the linked agents."""

    _link_field = "agents"

    user_id = ColumnInteger(required=True)
    organization_id = ColumnInteger(required=True)
    name = String(required=True, validate=Length(min=1, max=255))
    configuration = _NestedPart(AiModelConfigurationSchema, required=True)
    agents = fields.Method("_dump_agents", dump_only=True)

    def _dump_agents(self, model):
        return PsAgentSchema(many=True).dump(model.agents)


class PsAgentSchema(_Row):
    """A ``ps_agents`` row. ``with_links=True`` adds the linked AI models."""

    _link_field = "ai_models"

    user_id = ColumnInteger(required=True)
    class_id = ColumnInteger(required=True)
    group_id = ColumnInteger(required=True)
    configuration = fields.Dict(keys=fields.String(), required=True)
    parent_agent_id = ColumnInteger(minimum=1, allow_none=True, load_default=None)
    ai_models = fields.Method("_dump_ai_models", dump_only=True)

    def _dump_ai_models(self, agent):
        return PsAiModelSchema(many=True).dump(agent.ai_models)

    @validates_schema
    def _name_is_text(self, data, **kwargs):
        # PolicySynth's agents name themselves in configuration.name: text, as a model's name is.
        configuration = data.get("configuration")
        if isinstance(configuration, dict) and "name" in configuration and not isinstance(configuration["name"], str):
            raise _MarshmallowValidationError({"configuration": {"name": ["Not a valid string."]}})


# -- validation of rows before they are written -------------------------------------

# A configuration is a few hundred bytes; megabytes are a mistake or an attack.
MAX_CONFIGURATION_BYTES = 256 * 1024

_ROW_SCHEMAS: dict[tuple[type[_Row], str], _Row] = {}


def _row_schema(schema_class: type[_Row], unknown: str) -> _Row:
    # marshmallow schemas are costly to build and safe to reuse: keep one each.
    key = (schema_class, unknown)
    if key not in _ROW_SCHEMAS:
        fields_ = [name for name, field in schema_class._declared_fields.items()
                   if not field.dump_only and name not in _Row._declared_fields]
        _ROW_SCHEMAS[key] = schema_class(only=fields_, unknown=unknown, as_rows=False)
    return _ROW_SCHEMAS[key]


# Configurations are a few levels deep; hundreds is a mistake or an attack
# (and Python's own recursion ends near a thousand).
MAX_JSON_DEPTH = 64


def json_problem(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` cannot be stored as JSON by psai (a sentence), or None:
    nested deeper than ``limit``, a string that is not storable text, a
    value that is not JSON. Walks without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return "Nested deeper than %d levels." % limit
            children = list(item.items()) if isinstance(item, dict) else [(None, v) for v in item]
            for key, child in children:
                if key is not None:
                    if not isinstance(key, str):
                        return "Not valid JSON: a key is not a string (%r)." % (key,)
                    stack.append((key, depth))
                stack.append((child, depth + 1))
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return cast(str, String.default_error_messages[problem])
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "Not valid JSON: NaN and infinity are not allowed."
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_SAFE_INTEGER:
            return cast(str, Number.default_error_messages["too_large"])
        elif item is not None and not isinstance(item, (bool, int)):
            return "Not valid JSON: %s is not a JSON value." % type(item).__name__
    return None


def _check_json(configuration: Any) -> None:
    """Refuse what is not plain JSON (NaN, sets, objects), is nested too deep
    or is too large."""
    if configuration is None:
        return
    problem = json_problem(configuration)
    if problem:
        raise ValidationError({"configuration": [problem]})
    size = len(json.dumps(configuration, separators=(",", ":")))
    if size > MAX_CONFIGURATION_BYTES:
        raise ValidationError({"configuration": [
            "Too large: %d bytes; at most %d." % (size, MAX_CONFIGURATION_BYTES)]})


def load_json(text: str | bytes, name: str = "JSON", limit: int = MAX_JSON_DEPTH, check: bool = True) -> Any:
    """Parse JSON a user gave (a file, a flag): psai.ValidationError naming
    ``name`` when it is not JSON or is nested deeper than ``limit``. Without
    ``check``, what psai could not store (a huge number, say) is left for the
    caller to find part by part (a catalog reports one bad entry and goes on)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValidationError({name: ["Nested deeper than %d levels." % limit]}) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError({name: ["Not JSON: %s." % exc]}) from None
    except ValueError as exc:  # a whole number past Python's digit limit (4,300 digits)
        raise ValidationError({name: ["A number too long to read: %s." % str(exc).split(";")[0]]}) from None
    problem = json_problem(value, limit) if check else None
    if problem:
        raise ValidationError({name: [problem]})
    return value


def _unknown_paths(configuration: Any) -> set[str]:
    if not isinstance(configuration, dict):
        return set()
    paths = {key for key in configuration if key not in AiModelConfigurationSchema._declared_fields}
    prices = configuration.get("prices")
    if isinstance(prices, dict):
        paths |= {"prices." + key for key in prices if key not in ModelPricesSchema._declared_fields}
    return paths


def _present(values: Mapping[str, Any], names: Sequence[str],
             partial: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The data to load and the names a partial write may leave out. Only
    whole columns may be absent: a configuration given is checked in full."""
    data = {name: values[name] for name in names if name in values}
    absent = tuple(name for name in names if name not in values)
    if not partial:
        data.update({name: None for name in absent})
        absent = ()
    return data, absent


def validate_model_values(values: dict[str, Any], *, partial: bool = False, unknown: str = RAISE) -> dict[str, Any]:
    """Validate PsAiModel column values ({name: value}) before a write and
    return them with the configuration normalised."""
    fields_ = ("user_id", "organization_id", "name", "configuration")
    data, absent = _present(values, fields_, partial)
    loaded = _row_schema(PsAiModelSchema, unknown).load(data, partial=absent)
    if "configuration" in loaded:
        if unknown is not RAISE:
            # Kept unknown keys were not checked by any field: check them as
            # JSON here. Known fields are finite, NUL-free and bounded already.
            _check_json(loaded["configuration"])
        values = dict(values, configuration=loaded["configuration"])
    return values


def bind_row_class(schema_class: type["_Row"], row_class: Any) -> None:
    """Make ``schema_class().load()`` build rows of ``row_class``."""
    schema_class.row_class = row_class


def unknown_paths(configuration: Any) -> set[str]:
    """The dotted paths of a configuration's keys psai does not know."""
    return _unknown_paths(configuration)


def validate_model_row(row: Any, stored_configuration: Any = None) -> dict[str, Any]:
    """Validate a PsAiModel before save() writes it; return its normalised
    configuration. Unknown configuration keys are refused, except those the
    row already stored (``stored_configuration``: written by a newer PolicySynth)."""
    unknown = RAISE
    extra = _unknown_paths(row.configuration)
    if extra and stored_configuration is not None and extra <= _unknown_paths(stored_configuration):
        unknown = INCLUDE
    values = {"user_id": row.user_id, "organization_id": row.organization_id,
              "name": row.name, "configuration": row.configuration}
    return validate_model_values(values, unknown=unknown)["configuration"]


def validate_agent_values(values: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
    fields_ = ("user_id", "class_id", "group_id", "configuration")
    data, absent = _present(values, fields_, partial)
    parent = values.get("parent_agent", values.get("parent_agent_id"))
    if parent is not None:
        data["parent_agent_id"] = getattr(parent, "id", parent)
    try:
        _row_schema(PsAgentSchema, RAISE).load(data, partial=absent)
    except ValidationError as exc:
        errors = cast(dict[str, Any], exc.messages)  # a schema's messages: a dict by field
    else:
        errors = {}
    if "configuration" in values and "configuration" not in errors:
        try:
            _check_json(values["configuration"])
        except ValidationError as exc:
            errors.update(cast(dict[str, Any], exc.messages))
    if errors:
        raise ValidationError(errors)
    return values


def validate_agent_row(row: Any) -> None:
    validate_agent_values({
        "user_id": row.user_id, "class_id": row.class_id, "group_id": row.group_id,
        "configuration": row.configuration, "parent_agent_id": row.parent_agent_id,
    })


def merge_configuration(configuration: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``configuration`` with ``changes`` merged in: nested dicts
    merge key by key, a None value removes the key."""
    merged = copy.deepcopy(configuration)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configuration(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def shape_problem(configuration: Any, *, model: bool = False) -> str | None:
    """Why a stored configuration cannot even be read as one (a sentence),
    or None: not an object, nested too deep, a model's prices not an object."""
    if not isinstance(configuration, dict):
        return "configuration is not a JSON object (%s)" % type(configuration).__name__
    problem = json_problem(configuration)
    if problem:
        return "configuration: %s" % problem
    if model and "prices" in configuration and not isinstance(configuration["prices"], dict):
        return "configuration.prices is not a JSON object"
    return None


def readable(configuration: Any) -> dict[str, Any]:
    """The configuration when it can be read as one, else {}: what listings
    show of a bad row besides its flag."""
    return configuration if shape_problem(configuration) is None else {}


def dump_rows(schema: Schema, rows: Iterable[Any],
              model: bool = False) -> list[tuple[dict[str, Any], str | None]]:
    """``[(dump, problem)]``: each row dumped by ``schema``; a row whose
    configuration cannot be read as one is dumped as stored (None where even
    JSON cannot hold it), with the problem, so it never hides the others; so
    is a row with a timestamp psai cannot read."""
    dumped: list[tuple[dict[str, Any], str | None]] = []
    for row in rows:
        problem = shape_problem(row.configuration, model=model)
        if problem is None:
            dump = schema.dump(row)
            odd_times = time_problems(row)
            dumped.append((dump, "; ".join(odd_times) if odd_times else None))
            continue
        problem = "; ".join([problem] + time_problems(row))
        stored = row.configuration
        try:
            json.dumps(stored)
        except (RecursionError, ValueError, TypeError):
            stored = None
        blank = type(row)(**dict(row.__data__, configuration={}))
        dumped.append((dict(schema.dump(blank), configuration=stored), problem))
    return dumped


# -- budgets -------------------------------------------------------------------------

BudgetPeriod = Literal["day", "week", "month", "year", "total"]
BudgetUnpriced = Literal["block", "allow"]
BUDGET_PERIODS: tuple[BudgetPeriod, ...] = get_args(BudgetPeriod)
BUDGET_UNPRICED: tuple[BudgetUnpriced, ...] = get_args(BudgetUnpriced)
BUDGET_SCOPES = ("agent_id", "model_name", "provider", "organization_id")
BUDGET_FIELDS = ("name", "amount", "currency", "period", "timezone", "agent_id", "include_sub_agents", "model_name",
                 "provider", "organization_id", "user", "session", "tag_key", "tag_value", "warn_at", "hard",
                 "unpriced")
# A tag's key: named in reports (``by="tag:KEY"``) and on the command line (``--tag KEY=VALUE``).
TAG_KEY_PATTERN = r"[A-Za-z0-9_.:/-]+\Z"
MAX_TAG_KEY_LENGTH = 64
# An attribution's text (user, session, a tag's value): at most this long.
MAX_ATTRIBUTE_LENGTH = 255


# A budget's amount: at most 10**15 with at most 9 decimal places, so that
# every limit, fraction of it and sum psai compares it with stays within
# Decimal's 28 digits (an amount like 1e1000000 overflowed every call in scope).
MAX_BUDGET_AMOUNT = decimal.Decimal(10) ** 15
BUDGET_AMOUNT_PLACES = 9


class Amount(fields.Field):
    """A positive amount of money as exact decimal text ("10", "2.50"); a
    number is taken by its decimal digits (2.5 is "2.5"), never as a binary
    float. At most ``MAX_BUDGET_AMOUNT``, with at most ``BUDGET_AMOUNT_PLACES``
    decimal places."""

    default_error_messages = {"invalid": "Not an amount of money (a number or decimal text such as \"2.50\").",
                              "positive": "Must be more than 0.",
                              "bounds": "Must be at most 10**15, with at most %d decimal places." % (
                                  BUDGET_AMOUNT_PLACES)}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
            raise self.make_error("invalid")
        try:
            amount = decimal.Decimal(value if isinstance(value, str) else repr(value))
        except decimal.InvalidOperation:
            raise self.make_error("invalid") from None
        if not amount.is_finite() or len(str(amount)) > 64:
            raise self.make_error("invalid")
        if amount <= 0:
            raise self.make_error("positive")
        exponent = amount.as_tuple().exponent  # an int: the amount is finite
        if amount > MAX_BUDGET_AMOUNT or isinstance(exponent, int) and exponent < -BUDGET_AMOUNT_PLACES and \
                amount != amount.quantize(decimal.Decimal(1).scaleb(-BUDGET_AMOUNT_PLACES), decimal.ROUND_DOWN):
            raise self.make_error("bounds")
        return str(amount)


# Files in the zone directory that are not zones of their own: "localtime"
# is whatever the host's clock is set to, so a budget in it would change
# its periods with the machine that reads it.
HOST_ZONE_NAMES = {"localtime", "posixrules"}


class TimeZoneName(String):
    """An IANA time zone name; never the host's own (``localtime``)."""

    default_error_messages = {"unknown_zone": "Not an IANA time zone name (e.g. UTC, Europe/Berlin).",
                              "host_zone": "Depends on the host's clock settings: give an IANA name "
                                           "(e.g. UTC, Europe/Berlin)."}

    def _deserialize(self, value, attr, data, **kwargs):
        name = super()._deserialize(value, attr, data, **kwargs)
        if name.lower() in HOST_ZONE_NAMES or name.lower().startswith(("posix/", "right/")):
            raise self.make_error("host_zone")
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise self.make_error("unknown_zone") from None
        return name


class BudgetSchema(_Base):
    """A budget's columns (``psai.set_budget``): one scope at most (none: all usage)."""

    name = String(required=True, validate=Length(1, 255))
    amount = Amount(required=True)
    currency = String(required=True, validate=Regexp(r"^[A-Z]{3,16}$", error="Must be a currency code such as USD."))
    period = String(required=True, validate=OneOf(BUDGET_PERIODS, error="Must be one of: {choices}"))
    timezone = TimeZoneName(required=True, validate=Length(1, 64))
    agent_id = ColumnInteger(minimum=1, allow_none=True)
    include_sub_agents = Boolean(required=True)
    model_name = String(allow_none=True, validate=Length(1, 255))
    provider = String(allow_none=True, validate=Length(1, 64))
    organization_id = ColumnInteger(allow_none=True)
    user = String(allow_none=True, validate=Length(1, MAX_ATTRIBUTE_LENGTH))
    session = String(allow_none=True, validate=Length(1, MAX_ATTRIBUTE_LENGTH))
    tag_key = String(allow_none=True, validate=[Length(1, MAX_TAG_KEY_LENGTH), Regexp(
        TAG_KEY_PATTERN, error="Use letters, digits and _ . : / - (as in --tag KEY=VALUE).")])
    tag_value = String(allow_none=True, validate=Length(1, MAX_ATTRIBUTE_LENGTH))
    warn_at = fields.List(Number(validate=Range(0, 1, min_inclusive=False, max_inclusive=False,
                                                error="Must be a fraction of the limit, between 0 and 1.")),
                          required=True, validate=Length(max=16))
    hard = Boolean(required=True)
    unpriced = String(required=True, validate=OneOf(BUDGET_UNPRICED, error="Must be one of: {choices}"))

    @validates_schema
    def _one_scope(self, data, **kwargs):
        given = [name for name in BUDGET_SCOPES if data.get(name) is not None]
        if len(given) > 1:
            raise _MarshmallowValidationError("A budget has one scope: give one of agent, model, provider, "
                                              "organization_id (got %s)." % ", ".join(given), "scope")

    @validates_schema
    def _one_attribution(self, data, **kwargs):
        tagged = data.get("tag_key") is not None, data.get("tag_value") is not None
        if tagged[0] != tagged[1]:
            raise _MarshmallowValidationError("A tag budget has a tag's key and its value, e.g. team=search.",
                                              "tag_key" if not tagged[0] else "tag_value")
        given = [name for name, value in (("user", data.get("user")), ("session", data.get("session")),
                                          ("tags", data.get("tag_key"))) if value is not None]
        if len(given) > 1:
            raise _MarshmallowValidationError("A budget covers one attribution: user, session or one tag, not "
                                              "both (got %s)." % " and ".join(given), "attribution")


def validate_budget_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a budget's columns before a write; return them normalised
    (the amount as decimal text, warn_at sorted without repeats)."""
    loaded = BudgetSchema().load(dict(values))
    loaded["warn_at"] = sorted(set(loaded["warn_at"]))
    return loaded
