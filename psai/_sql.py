"""The SQL psai writes by hand, in one place: where peewee cannot say it
(JSON read defensively the same way on both backends, fenced subqueries,
PostgreSQL's one-round-trip recording statement) or where a statement on
the hot path is built once and kept as text. Identifiers here are psai's
own literals, never a caller's; values are always bound parameters
(placeholders from ``db.param``).

- configuration filters (``config_filter``) as peewee expressions;
- ``JsonSQL`` and ``ItemReader``: reading usage items' JSON for reports;
- ``window``: a period and a set of models as WHERE clauses;
- statements compiled once by peewee with named slots (``compiled``), and
  PostgreSQL's one-round-trip recording statement (``one_round_trip_statements``).
"""
import json
import math
import operator
import re
from functools import reduce

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

from peewee import SQL, NodeList, PostgresqlDatabase, Value, fn

from ._constants import MAX_INTEGER, MAX_SAFE_INTEGER
from .errors import ValidationError
from .fields import SQLITE_TIME_GLOB
from .pricing import _is_number

__all__ = ["INDEXED_PATHS", "config_filter", "JsonSQL", "ItemReader", "ITEM_VALUES", "window", "quoted",
           "item_insert", "one_round_trip_statements", "stored_configuration_sql", "USAGE_ROW_COLUMNS", "compiled_once",
           "Slot", "slot", "Statement", "compiled", "item_groups_sql", "item_totals_sql", "counters_sound",
           "counters_negative", "counter_totals_sql", "counter_rows_sql", "price_period_sql", "counter_sums_sql",
           "negative_rows_sql", "item_check_sql", "object_items_sql", "item_data_update_sql", "lock_models_sql",
           "item_reprice_sql", "repriced_items_sql", "usage_state_sql", "response_id_sql", "item_by_response_id_sql",
           "attribute_sql", "attribute_path", "LEDGER_TABLE", "LEDGER_TRIGGERS", "ledger_trigger_sql",
           "drop_ledger_triggers_sql", "ledger_triggers_sql", "ledger_groups_sql", "ledger_insert_sql",
           "ledger_sums_sql", "attributed_items_sql", "POSTGRES_STATE_SQL", "state_and_rows_sql", "AUDITED_ITEMS",
           "audited_items_sql"]


# -- configuration filters ------------------------------------------------------------

# Paths served by expression indexes on SQLite (migration 0003). They are the
# only paths written into SQL as literals: they come from this list, never
# from a caller. PostgreSQL serves every path from one jsonb GIN index.
INDEXED_PATHS = ("provider", "type", "modelSize", "active", "model")

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_SCALARS = (str, int, float, bool, type(None))
# Keyword spellings accepted for where_config, besides the configuration keys.
_ALIASES = {"size": "modelSize"}


def _path(key):
    key = _ALIASES.get(key, key)
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or not all(_KEY.match(part) for part in parts):
        raise ValidationError({str(key): [
            "Not a configuration key: use letters, digits and _ (nested keys joined by '.')."]})
    return tuple(parts)


def _check_value(key, value):
    values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    bad = [v for v in values if not isinstance(v, _SCALARS)
           or (isinstance(v, float) and not math.isfinite(v))
           or (isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SAFE_INTEGER)
           or (isinstance(v, str) and "\x00" in v)]
    if bad or not values:
        raise ValidationError({str(key): [
            "Filter values must be strings, finite numbers (integers up to 2**53), booleans or null."]})
    return values


def _nest(path, value):
    for part in reversed(path):
        value = {part: value}
    return value


def _sqlite_extract(field, path):
    if len(path) == 1 and path[0] in INDEXED_PATHS:
        # The literal must match the index expression for SQLite to use it.
        return fn.json_extract(field, SQL("'$.%s'" % path[0]))
    return fn.json_extract(field, "$." + ".".join(path))


def _sqlite_equals(field, path, value):
    extract = _sqlite_extract(field, path).coerce(False)
    # json_type tells true/false from 1/0 and numbers from strings, so values
    # match by JSON type, as jsonb equality does on PostgreSQL.
    kind = fn.json_type(field, "$." + ".".join(path))
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return (extract == int(value)) & (kind == ("true" if value else "false"))
    if isinstance(value, str):
        return (extract == value) & (kind == "text")
    return (extract == value) & kind.in_(["integer", "real"])


# Up to this many values, "one of" is an IN list of bound values, which
# SQLite's planner matches against an expression index; beyond, one bound
# JSON array read by json_each keeps the statement's size (the planner then
# scans the table once its statistics say the table is large: a thousand
# models, a millisecond, where the index takes 10 us).
_SQLITE_IN_LIST = 100


def _sqlite_any(field, path, values):
    """``path`` equals one of ``values``, by JSON type, for any number of
    values: each type's values an IN list (an OR per value overflows SQLite's
    parser at a few dozen), or a bound JSON array past ``_SQLITE_IN_LIST``."""
    extract = _sqlite_extract(field, path).coerce(False)
    kind = fn.json_type(field, "$." + ".".join(path))
    clauses = []
    for kinds, chosen in ((("text",), [v for v in values if isinstance(v, str)]),
                          (("integer", "real"), [v for v in values if _is_number(v)])):
        if len(chosen) > _SQLITE_IN_LIST:
            within = NodeList((extract, SQL("IN (SELECT value FROM json_each(?))", [json.dumps(chosen)])))
            clauses.append(kind.in_(list(kinds)) & within)
        elif chosen:
            clauses.append(kind.in_(list(kinds)) & extract.in_(chosen))
    singles = dict.fromkeys(v for v in values if v is None or isinstance(v, bool))
    clauses += [_sqlite_equals(field, path, v) for v in singles]
    return reduce(operator.or_, clauses)


def _postgres_any(field, path, values):
    """``path`` equals one of ``values`` as jsonb (so 1, "1" and true
    differ), all values one bound jsonb array."""
    return NodeList((field, SQL("#> %s::text[] IN (SELECT jsonb_array_elements(%s::jsonb))",
                                                   ["{%s}" % ",".join(path), json.dumps(values)])))


def config_filter(field, filters, postgres):
    """A WHERE expression matching rows whose JSON ``field`` has every
    ``path: value`` of ``filters`` (a value that is a list matches any of
    it, however long the list), on PostgreSQL or SQLite."""
    clauses = []
    document: dict[str, Any] = {}
    for key, value in filters.items():
        path = _path(key)
        values = _check_value(key, value)
        if postgres and len(values) == 1:
            # All single values go into one jsonb containment document: one
            # bound parameter, one GIN index probe, a sharper row estimate.
            _merge(document, _nest(path, values[0]))
        elif postgres:
            clauses.append(_postgres_any(field, path, values))
        elif len(values) == 1:
            clauses.append(_sqlite_equals(field, path, values[0]))
        else:
            clauses.append(_sqlite_any(field, path, values))
    if document:
        clauses.insert(0, field.contains(document))
    return reduce(operator.and_, clauses) if clauses else SQL("1 = 1")


def _merge(target, addition):
    for key, value in addition.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


# -- reading usage items for reports -------------------------------------------------

class JsonSQL:
    """SQL reading a JSON column defensively: a value of the wrong type reads
    as absent, so one odd row cannot fail a report. Paths are psai's own
    literals, never a caller's."""

    _SQLITE_TYPES = {"number": "IN ('integer', 'real')", "object": "= 'object'"}
    _POSTGRES_VALUES = {"number": "(%s #>> %s)::numeric", "object": "%s #> %s"}

    def __init__(self, postgres):
        self.postgres = postgres

    def _typed(self, column, path, kind):
        """(SQL testing the value at ``path`` is of ``kind``, SQL reading it)."""
        if self.postgres:
            p = "'{%s}'" % ",".join(path)
            return ("jsonb_typeof(%s #> %s) = '%s'" % (column, p, kind), self._POSTGRES_VALUES[kind] % (column, p))
        p = "'$.%s'" % ".".join(path)
        return "json_type(%s, %s) %s" % (column, p, self._SQLITE_TYPES[kind]), "json_extract(%s, %s)" % (column, p)

    def _value(self, column, path, kind):
        return "(CASE WHEN %s THEN %s END)" % self._typed(column, path, kind)

    def number(self, column, *path):
        return self._value(column, path, "number")

    def object(self, column, *path):
        return self._value(column, path, "object")

    def greatest(self, a, b):
        return ("GREATEST(%s, %s)" if self.postgres else "max(%s, %s)") % (a, b)

    def day(self, column):
        """The UTC day of a timestamp column as YYYY-MM-DD text."""
        if self.postgres:
            return "to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD')" % column
        return "substr(%s, 1, 10)" % column  # SQLite keeps UTC ISO 8601 text


def ids_in(db, column, ids, where, params):
    """Append to ``where`` the clause ``column`` among ``ids`` (none matches
    an empty list), and the ids to ``params``; nothing for ``ids`` None."""
    if ids is not None:
        ids = list(ids)
        where.append("%s IN (%s)" % (column, ", ".join([db.param] * len(ids)) or "NULL"))
        params.extend(ids)


def window(db, column, field, since, until, model_ids, params):
    """WHERE clauses for a period (of the timestamp ``field``, read as
    ``column``) and a set of models; their parameters appended to ``params``."""
    p = db.param
    clauses = []
    if since is not None:
        clauses.append("%s >= %s" % (column, p))
        params.append(field.db_value(since))
    if until is not None:
        clauses.append("%s < %s" % (column, p))
        params.append(field.db_value(until))
    if model_ids is not None:
        clauses.append("%s IN (%s)" % (column.split(".")[0] + ".model_id", ", ".join([p] * len(model_ids)) or "NULL"))
        params.extend(model_ids)
    return clauses


# What a report reads of each item's data: (name, path, kind).
ITEM_VALUES = (
    ("provider", ("provider",), "string"),
    ("applied_service_tier", ("providerMetadata", "appliedServiceTier"), "string"),
    ("applied_speed", ("providerMetadata", "appliedSpeed"), "string"),
    ("tin", ("usageNormalized", "tokensIn"), "number"),
    ("cached", ("usageNormalized", "cachedInTokens"), "number"),
    ("cw", ("psai", "cacheWriteTokens"), "number"),
    ("cw1h", ("psai", "cacheWrite1hTokens"), "number"),
    ("cw12h", ("psai", "cacheWrite12hTokens"), "number"),
    ("audio_in", ("psai", "audioInTokens"), "number"),
    ("pcost", ("psai", "providerCost"), "number"),
    ("tout", ("usageNormalized", "tokensOut"), "number"),
    ("reasoning", ("usageNormalized", "reasoningTokens"), "number"),
    ("audio", ("usageNormalized", "audioTokens"), "number"),
    ("image", ("usageNormalized", "imageTokens"), "number"),
    ("web", ("psai", "webSearches"), "number"),
    ("pricing", ("pricing",), "object"),
    ("configured", ("pricing", "configuredPrices"), "object"),
    ("threshold", ("pricing", "configuredPrices", "longContextTokenThreshold"), "number"),
)
# The counts of a call an item holds (every one a report reads), each 0 to MAX_INTEGER for the item to be priced.
ITEM_COUNTS = ("tin", "cached", "cw", "cw1h", "cw12h", "audio_in", "tout", "reasoning", "audio", "image", "web")
_MODEL_THRESHOLD = ("prices", "longContextTokenThreshold")
_KINDS = dict({name: kind for name, _path, kind in ITEM_VALUES}, model_threshold="number")


class ItemReader:
    """Reading items' data for reports, in two steps, each a subquery:
    ``select(names)`` reads each JSON value once a row, and the typed
    values (``value``, ``count``, ``is_a``) are read from its columns. A
    value of the wrong type reads as absent and a count as 0 (as
    ``JsonSQL`` does), so one odd row cannot fail a report.

    The first step is fenced, so that the values are computed once a row
    however often the second uses them: SQLite keeps a subquery with
    OFFSET as it is; PostgreSQL keeps one whose columns hold a volatile
    function (it would change how often that runs), and clock_timestamp()
    is one that parallel workers may run, where OFFSET would stop them.

    SQLite reads each value as its JSON text (``->``; the text of a row is
    parsed once for all of them) and tells its type by its first character;
    text that is not JSON (SQLite's column can hold it) reads as an item
    without usage. PostgreSQL reads jsonb values with ``->``, key by key."""

    def __init__(self, postgres):
        self.postgres = postgres
        self.j = JsonSQL(postgres)
        # A column to add and a clause to end a subquery with, that fence it.
        self.fence_column = ", clock_timestamp() AS fence" if postgres else ""
        self.fence = "" if postgres else " LIMIT -1 OFFSET 0"

    def _raw(self, column, path):
        if self.postgres:
            return column + "".join(" -> '%s'" % key for key in path)
        sql = "%s -> '$.%s'" % (column, ".".join(path))
        # Text that is not JSON (or a blob) reads as absent: one odd row never fails a report or a trigger.
        return "(CASE WHEN typeof(%s) = 'text' AND json_valid(%s) THEN %s END)" % (column, column, sql)

    def select(self, names, where, model_threshold=False, with_id=False, source='"ps_model_usage_item"',
               models='"ps_ai_models"', attribute=None, with_kind=False):
        """The first step: the items' key columns and ``v_<name>`` for each
        value named (and the model's current long-context threshold; the
        items' ids). ``source``: the items' table, or a CTE of new items;
        ``models``: the models' table, or a CTE of their rows (id, configuration).
        ``attribute``: SQL of the attribution a report groups by (``attribute_sql``), as ``v_attribute``."""
        paths = {name: path for name, path, _kind in ITEM_VALUES}
        columns = ["i.model_id", "i.agent_id", "i.connector_id", "i.created_at"] + (["i.id"] if with_id else [])
        if attribute is not None:
            columns.append("%s AS v_attribute" % attribute)
        if with_kind:  # the attribution ledger's: the source's kind of attribution beside its value
            columns.append("i.kind AS v_kind")
        columns += ["%s AS v_%s" % (self._raw("i.data", paths[name]), name) for name in names]
        join = ""
        if model_threshold:
            columns.append("%s AS v_model_threshold" % self._raw("m.configuration", _MODEL_THRESHOLD))
            join = ' LEFT JOIN %s m ON m.id = i.model_id' % models
        return 'SELECT %s%s FROM %s i%s%s%s' % (
            ", ".join(columns), self.fence_column, source, join, " WHERE " + " AND ".join(where) if where else "",
            self.fence)

    def is_a(self, name):
        kind, column = _KINDS[name], "v_" + name
        if self.postgres:
            return "jsonb_typeof(%s) = '%s'" % (column, kind)
        return "%s GLOB '%s'" % (column, {"number": "[0-9-]*", "string": '"*', "object": "{*"}[kind])

    def value(self, name):
        kind, column = _KINDS[name], "v_" + name
        if self.postgres:
            read = {"number": "(%s)::numeric", "string": "%s #>> '{}'", "object": "(%s)::text"}[kind] % column
        else:
            read = {"number": "CAST(%s AS NUMERIC)", "string": "json_extract(%s, '$')", "object": "%s"}[kind] % column
        return "(CASE WHEN %s THEN %s END)" % (self.is_a(name), read)

    def counts_usable(self, names):
        """True when none of the counts ``names`` is a number below 0 or
        beyond what a counter column holds (a count of -5 or 1e300, written
        by hand, is not a call's: its item is not priced, at 0 or at 1e294)."""
        usable = "TRUE" if self.postgres else "1"
        return " AND ".join("coalesce(%s BETWEEN 0 AND %d, %s)" % (self.value(name), MAX_INTEGER, usable)
                            for name in names)

    def count(self, name):
        """A count: the number if it is one above 0, else 0. (SQLite: only a
        number's JSON text starts with a digit or "-", and CAST reads any
        other text as 0.)"""
        if self.postgres:
            return "coalesce(GREATEST(%s, 0), 0)" % self.value(name)
        return "coalesce(max(CAST(v_%s AS NUMERIC), 0), 0)" % name


def attribute_path(kind):
    """The path in an item's data of an attribution ``kind`` (user, session,
    environment, or ``tag:KEY``)."""
    return ("psai", "tags", kind[4:]) if kind.startswith("tag:") else ("psai", kind)


def attribute_sql(postgres, column, kind, params):
    """SQL reading one attribution of an item (``column`` its data) as text:
    NULL when the item has none, or a value that is not text. Its path (a
    tag's key is a caller's) is a bound parameter, appended to ``params``."""
    path = attribute_path(kind)
    if postgres:
        params.extend([list(path), list(path)])
        return "(CASE WHEN jsonb_typeof(%s #> %%s::text[]) = 'string' THEN %s #>> %%s::text[] END)" % (column, column)
    text = "$." + ".".join('"%s"' % key for key in path)
    params.extend([text, text])
    return ("(CASE WHEN typeof(%s) = 'text' AND json_valid(%s) AND json_type(%s, ?) = 'text' "
            "THEN json_extract(%s, ?) END)" % (column, column, column, column))


# -- reports' statements over items and counters ---------------------------------------

# The typed values priced apart (items.APART's, in its order), and all those summed, not grouped by.
_APART_VALUES = ("cw1h", "cw12h", "audio_in", "audio", "image")
_SUMMED_VALUES = ("tin", "cached", "cw", "tout", "parts", "reasoning", "web", "threshold", "pcost") + _APART_VALUES


def item_groups_sql(r, read, grouped, rollup=False, single=False, extra=()):
    """``(sql, group)``: items (``read``, ItemReader.select's subquery) added
    up by model, the keys ``grouped`` (among agent, connector, day) and all
    that prices them; ``group``, the grouping columns in the order the rows
    return them, GroupSums' columns after them. ``rollup``: as the rollups
    keep them (``ROLLUP_COLUMNS``): grouped also by whether the model's
    current threshold decided the long-context side (an item without a
    snapshot) and by that threshold, and the count of calls that said
    their own cost last. ``single``: ``read`` holds one item (or none), its
    one group without a GROUP BY: the sums are its values; ``extra``, SQL
    returned after them, over the group's columns (in ``g``)."""
    columns = {
        "model_id": "model_id",
        "agent_id": "agent_id" if "agent" in grouped else None,
        "connector_id": "connector_id" if "connector" in grouped else None,
        "day": r.j.day("created_at") if "day" in grouped else None,
        "kind": "v_kind" if "kind" in grouped else None,
        "attribute": "v_attribute" if "attribute" in grouped else None,
        "provider": r.value("provider"),
        "pricing": r.value("pricing"),
        "applied_service_tier": r.value("applied_service_tier"),
        "applied_speed": r.value("applied_speed"),
        # Readable: token counts, the input total a number (an item whose
        # counts are text is not priced as 0 tokens, nor guessed).
        "has_usage": "(CASE WHEN %s AND %s THEN 1 ELSE 0 END)" % (r.is_a("tin"), r.counts_usable(ITEM_COUNTS)),
        "tin": r.count("tin"), "cached": r.count("cached"), "cw": r.count("cw"), "cw1h": r.count("cw1h"),
        "cw12h": r.count("cw12h"), "audio_in": r.count("audio_in"), "audio": r.count("audio"),
        "image": r.count("image"), "tout": r.count("tout"), "pcost": r.value("pcost"),
        "parts": " + ".join(r.count(name) for name in ("reasoning", "audio", "image")),
        "reasoning": r.count("reasoning"),
        "web": r.count("web"),
        # The call's own prices' threshold; for an item without a snapshot,
        # the model's current prices'.
        "threshold": "(CASE WHEN %s THEN %s ELSE %s END)" % (
            r.is_a("configured"), r.value("threshold"), r.value("model_threshold")),
    }
    if rollup:
        columns.update({
            "model_priced": "(CASE WHEN %s THEN 0 ELSE 1 END)" % r.is_a("configured"),
            "model_threshold": "(CASE WHEN %s THEN NULL ELSE %s END)" % (r.is_a("configured"),
                                                                     r.value("model_threshold"))})
    columns = {name: sql for name, sql in columns.items() if sql is not None}
    # The second step fenced as the first: its columns are used several times.
    typed = "SELECT %s%s FROM (%s) r%s" % (", ".join("%s AS %s" % (sql, name) for name, sql in columns.items()),
                                            r.fence_column, read, r.fence)
    group = [name for name in columns
             if name not in _SUMMED_VALUES]
    # Calls with tokens priced apart (longer-lived cache writes, audio, images) in groups of their
    # own: their extra needs price keys of its own, and without them only those calls are unpriced.
    group += ["long", "apart"]
    # In the order of GroupSums' fields.
    summed = [r.j.greatest("tin - cached - cw", "0"), "cached", "cw", "%s + parts" % r.j.greatest("tout - parts", "0"),
              "web", "tin", "tout"] + list(_APART_VALUES) + ["reasoning", "pcost"]
    # The rollups also count the calls that said their own cost: a sum of none of them is NULL.
    if single:
        sums = ["1"] + summed + (["(CASE WHEN pcost IS NULL THEN 0 ELSE 1 END)"] if rollup else []) + list(extra)
    else:
        sums = ["COUNT(*)"] + ["SUM(%s)" % value for value in summed] + (["COUNT(pcost)"] if rollup else [])
    if rollup:  # named, for the statements that write them
        sums = ["%s AS %s" % (sql, quoted(name)) for sql, name in zip(sums, ROLLUP_SUMS)] + sums[len(ROLLUP_SUMS):]
    sql = ("SELECT %s, %s FROM (SELECT c.*, CASE WHEN threshold > 0 AND tin >= threshold THEN 1 ELSE 0 END AS long, "
           "CASE WHEN %s THEN 1 ELSE 0 END AS apart FROM (%s) c) g" % (
               ", ".join(group), ", ".join(sums), " OR ".join("%s > 0" % name for name in _APART_VALUES), typed))
    return (sql if single else "%s GROUP BY %s" % (sql, ", ".join(group))), group


def item_totals_sql(r, read):
    """The items' input and output totals per (model, agent, connector)."""
    return ('SELECT model_id, agent_id, connector_id, SUM(%s), SUM(%s) FROM (%s) r '
            'GROUP BY model_id, agent_id, connector_id' % (r.count("tin"), r.count("tout"), read))


def counters_negative(present, alias=None):
    """Counter rows with a negative counter (a row written by hand)."""
    prefix = alias + "." if alias else ""
    return "(%s)" % " OR ".join("%s%s < 0" % (prefix, c) for c in present)


def counters_sound(present):
    """Counter rows without a negative counter."""
    return "NOT " + counters_negative(present)


def counter_totals_sql(present, output, where):
    """The counters' input and output totals per (model, agent, connector);
    ``output``, the output counters."""
    return ('SELECT model_id, agent_id, connector_id, SUM(%s), SUM(%s) FROM "ps_model_usage" WHERE %s '
            'GROUP BY model_id, agent_id, connector_id' % (
                # BIGINT: PostgreSQL adds 32-bit counters in 32 bits, and two full ones overflow.
                " + ".join("CAST(%s AS BIGINT)" % c for c in present if c not in output),
                " + ".join("CAST(%s AS BIGINT)" % c for c in present if c in output), " AND ".join(where)))


def counter_bucket_sums_sql(present, where):
    """Each counter's sum per (model, agent, connector) of the rows meeting ``where``."""
    return ('SELECT u.model_id, u.agent_id, u.connector_id, %s FROM "ps_model_usage" u WHERE %s '
            'GROUP BY u.model_id, u.agent_id, u.connector_id' % (
                ", ".join("SUM(CAST(u.%s AS BIGINT))" % c for c in present), " AND ".join(where)))


def odd_counter_times_sql(db, models):
    """SQLite: a row (1) when a counter row (of ``models``, that many ids
    bound; None: all) has a time stored otherwise than psai's text
    (``fields.sqlite_time_text``, which sorts as the times do)."""
    where = ["(typeof(created_at) <> 'text' OR created_at NOT GLOB '%s')" % SQLITE_TIME_GLOB]
    if models is not None:
        where.append("model_id IN (%s)" % (", ".join([db.param] * len(models)) or "NULL"))
    return 'SELECT 1 FROM "ps_model_usage" WHERE %s LIMIT 1' % " AND ".join(where)


def counter_rows_sql(db, present, models, sound):
    """The sound counter rows of ``models`` (that many ids bound), newest first."""
    return ('SELECT model_id, agent_id, connector_id, created_at, %s FROM "ps_model_usage" WHERE model_id IN (%s) '
            'AND %s ORDER BY created_at DESC, id DESC' % (", ".join(present), ", ".join([db.param] * models), sound))


def price_period_sql(db, alias, moments, params):
    """The number of the price period a counter row falls in, by its model:
    ``moments``, ``{model_id: [moments as stored]}`` where prices may change
    (their parameters appended to ``params``); "0" when there are none."""
    p = db.param
    period = ["CASE %s.model_id" % alias]
    for model_id, times in moments.items():
        if times:
            period.append("WHEN %s THEN CASE %s ELSE %d END" % (
                p, " ".join("WHEN %s.created_at < %s THEN %d" % (alias, p, i) for i in range(len(times))),
                len(times)))
            params += [model_id] + list(times)
    if len(period) == 1:
        return "0"
    # A row whose time psai cannot read (or, on SQLite, one stored as a Unix
    # time) is a piece of its own, so that it never dates the others.
    readable = ("%s.created_at >= '0001-01-01 00:00:00+00' AND %s.created_at < '10000-01-01 00:00:00+00'"
                if isinstance(db, PostgresqlDatabase)
                else "typeof(%s.created_at) = 'text' AND %s.created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-*'")
    return "CASE WHEN %s THEN %s ELSE 0 END ELSE -%s.id END" % (readable % (alias, alias), " ".join(period), alias)


def counter_sums_sql(present, columns, where):
    """Counter rows added up by ``columns`` (the first row's time, then the counters)."""
    groups = ", ".join(str(i + 1) for i in range(len(columns)))
    return 'SELECT %s, MIN(u.created_at), %s FROM "ps_model_usage" u WHERE %s GROUP BY %s' % (
        ", ".join(columns), ", ".join("SUM(u.%s)" % c for c in present), " AND ".join(where), groups)


def negative_rows_sql(present, where):
    return 'SELECT u.id, u.model_id, u.agent_id, u.created_at, %s FROM "ps_model_usage" u WHERE %s' % (
        ", ".join("u." + c for c in present), " AND ".join(where))


# -- statements of check and reprice ------------------------------------------------

def item_check_sql(postgres):
    """Every item's id, model, input count and price snapshot, read
    defensively (text that is not JSON reads as no data), and whether its
    counts are usable (``ItemReader.counts_usable``)."""
    j = JsonSQL(postgres)
    data = "data" if postgres else "(CASE WHEN json_valid(data) THEN data ELSE '[]' END)"
    r = ItemReader(postgres)
    return 'SELECT id, model_id, tokens_in, configured, (CASE WHEN %s THEN 1 ELSE 0 END) FROM (%s) r ORDER BY id' % (
        r.counts_usable(ITEM_COUNTS), 'SELECT id, model_id, %s AS tokens_in, %s AS configured, %s FROM '
        '"ps_model_usage_item"' % (j.number(data, "usageNormalized", "tokensIn"),
                                   j.object(data, "pricing", "configuredPrices"),
                                   ", ".join("%s AS v_%s" % (r._raw(data, path), name)
                                             for name, path, _kind in ITEM_VALUES if name in ITEM_COUNTS)))


def object_items_sql(postgres, where):
    """The items (``i``) meeting ``where`` whose data is a JSON object: id, model, data."""
    is_object = "jsonb_typeof(i.data) = 'object'" if postgres \
        else "(CASE WHEN json_valid(i.data) THEN json_type(i.data) END) = 'object'"
    return 'SELECT i.id, i.model_id, i.data FROM "ps_model_usage_item" i WHERE %s' % " AND ".join(where + [is_object])


def item_data_update_sql(db, count=1):
    """Items' new data (psai's JSON text) and updated_at, by id. PostgreSQL:
    ``count`` items in one statement, parameters updated_at then (id, data)
    ``count`` times. SQLite: one item, parameters (updated_at, data, id), for
    executemany (in process: no round trips to save)."""
    if not isinstance(db, PostgresqlDatabase):
        return 'UPDATE "ps_model_usage_item" SET "updated_at" = ?, "data" = json(?) WHERE "id" = ?'
    return ('UPDATE "ps_model_usage_item" AS i SET "updated_at" = %%s, "data" = v.data FROM (VALUES %s) '
            'AS v(id, data) WHERE i.id = v.id' % ", ".join(["(%s::integer, %s::jsonb)"] * count))


def lock_models_sql(db, count):
    """PostgreSQL: lock ``count`` models' rows (by id) until commit. psai
    records a call under a share lock on its model's row, so calls on these
    models wait, and calls on every other model go on."""
    return 'SELECT "id" FROM "ps_ai_models" WHERE "id" IN (%s) ORDER BY "id" FOR UPDATE' % (
        ", ".join([db.param] * count) or "NULL")


def usage_state_sql(where, model_count):
    """SQLite: the state of a correction's usage: of the items (``i``)
    meeting ``where``, of the models' counter rows and of the models' rows,
    how many, their ids and latest update. Parameters: ``where``'s, then the
    model ids twice."""
    ids = ", ".join(["?"] * model_count) or "NULL"
    return ('SELECT count(*), max(i.id), total(i.id), max(i.updated_at) FROM "ps_model_usage_item" i WHERE {where} '
            'UNION ALL SELECT count(*), max(id), total(id), max(updated_at) FROM "ps_model_usage" WHERE model_id IN '
            '({ids}) UNION ALL SELECT count(*), max(id), total(id), max(updated_at) || group_concat(configuration) '
            'FROM "ps_ai_models" WHERE id IN ({ids})').format(where=" AND ".join(where) or "1", ids=ids)


def item_reprice_sql(postgres, where, model_count):
    """One UPDATE correcting the snapshot of every item (``i``) meeting
    ``where`` whose data is an object, computed in SQL: the prices
    (``configuredPrices``, else the model's current ones, else {}) with the
    changes merged in, the original ``pricing`` kept once in
    ``psai.originalPricing``, the correction's id appended to
    ``psai.corrections``.
    Parameters, in order: updated_at; (model id, its current prices as a
    JSON object) ``model_count`` times; the changes (a JSON object, null
    removing a key); on PostgreSQL the removed keys (a text[]); the
    correction's id; ``where``'s."""
    if postgres:
        data = "i.data"
        pricing = "(CASE WHEN jsonb_typeof(%s -> 'pricing') = 'object' THEN %s -> 'pricing' ELSE '{}' END)" % (
            data, data)
        extras = "(CASE WHEN jsonb_typeof(%s -> 'psai') = 'object' THEN %s -> 'psai' ELSE '{}' END)" % (data, data)
        configured = "%s #> '{pricing,configuredPrices}'" % data
        current = "(CASE i.model_id %s END)" % " ".join(["WHEN %s THEN %s::jsonb"] * model_count) \
            if model_count else "NULL"
        base = ("(CASE WHEN jsonb_typeof({c}) = 'object' THEN {c} WHEN {c} IS NULL OR jsonb_typeof({c}) = 'null' "
                "THEN coalesce({current}, '{{}}') ELSE '{{}}' END)").format(c=configured, current=current)
        corrections = "%s -> 'corrections'" % extras
        return (
            'UPDATE "ps_model_usage_item" i SET "updated_at" = %s, "data" = {data} || jsonb_build_object('
            "'pricing', {pricing} || jsonb_build_object('configuredPrices', ({base} || %s::jsonb) - %s::text[]), "
            "'psai', jsonb_build_object('originalPricing', coalesce({data} -> 'pricing', 'null')) || {extras} || "
            "jsonb_build_object('corrections', (CASE WHEN jsonb_typeof({corrections}) = 'array' THEN {corrections} "
            "ELSE '[]' END) || to_jsonb(%s::integer))) WHERE {where}").format(
                data=data, pricing=pricing, base=base, extras=extras, corrections=corrections,
                where=" AND ".join(where + ["jsonb_typeof(i.data) = 'object'"]))
    return 'UPDATE "ps_model_usage_item" AS i SET "updated_at" = ?, "data" = %s WHERE %s' % (
        _sqlite_corrected_data(model_count), " AND ".join(where + [_SQLITE_OBJECT]))


# An item's data SQLite corrects: valid JSON, an object.
_SQLITE_OBJECT = "json_valid(i.data) AND ltrim(i.data, ' ' || char(9, 10, 13)) LIKE '{%'"


def _sqlite_corrected_data(model_count):
    """SQLite: the corrected data of an item ``i`` whose data is an object."""
    # SQLite: JSON text, parsed again by every JSON function; so the item's
    # pricing (p) and extras (x) are named once ("->" gives any value as
    # JSON text) and the rest works on them. json() marks text as JSON. The
    # model's current prices (cur), the changes (c) and the correction's id
    # (k) are columns of the same subquery, so each is bound once. (SQLite
    # flattens the subquery: each use of p or x is a lookup in the item,
    # whose parse SQLite keeps for the row, and a parse of what it gives.)
    kind = "json_type(p, '$.configuredPrices')"
    current = "(CASE i.model_id %s END)" % " ".join(["WHEN ? THEN ?"] * model_count) if model_count else "NULL"
    base = ("(CASE WHEN {k} = 'object' THEN p -> '$.configuredPrices' WHEN {k} IS NULL OR {k} = 'null' "
            "THEN coalesce(cur, '{{}}') ELSE '{{}}' END)").format(k=kind)
    general = (
        "json_set(i.data, '$.pricing', json_set(CASE WHEN json_type(p) = 'object' THEN json(p) ELSE json('{}') END, "
        "'$.configuredPrices', json_patch(%s, c)), "
        "'$.psai', json_set(json_insert(CASE WHEN json_type(x) = 'object' THEN json(x) ELSE json('{}') END, "
        "'$.originalPricing', json(coalesce(p, 'null'))), '$.corrections', json_insert("
        "CASE WHEN json_type(x, '$.corrections') = 'array' THEN json(x -> '$.corrections') ELSE json('[]') END, "
        "'$[#]', k)))" % base)
    # The usual item (a snapshot object, psai's extras absent or an object
    # with corrections absent or a list) is corrected by one json_set of
    # paths inside it, looked up in the item's own cached parse: the same
    # JSON, key for key and in the same order, in about two thirds of the time.
    usual = ("json_type(i.data, '$.pricing.configuredPrices') = 'object' AND coalesce(json_type(i.data, '$.psai'), "
             "'object') = 'object' AND coalesce(json_type(i.data, '$.psai.corrections'), 'array') = 'array'")
    fast = ("json_set(i.data, '$.pricing.configuredPrices', json_patch(i.data -> '$.pricing.configuredPrices', c), "
            "'$.psai.originalPricing', json(coalesce(i.data -> '$.psai.originalPricing', i.data -> '$.pricing')), "
            "'$.psai.corrections', json_insert(coalesce(i.data -> '$.psai.corrections', '[]'), '$[#]', k))")
    return ("(SELECT CASE WHEN {usual} THEN {fast} ELSE {general} END FROM (SELECT i.data -> '$.pricing' AS p, "
            "i.data -> '$.psai' AS x, {current} AS cur, ? AS c, ? AS k))").format(
                usual=usual, fast=fast, general=general, current=current)


def repriced_items_sql(where, model_count):
    """SQLite: the items (``i``) meeting ``where`` as ``item_reprice_sql``
    leaves them (the columns a fold reads), without changing them: what a
    correction folds in, computed before it takes the write lock.
    Parameters: ``item_reprice_sql``'s but updated_at."""
    return ('SELECT i.id, i.model_id, i.agent_id, i.connector_id, i.created_at, CASE WHEN %s THEN %s ELSE i.data END '
            'AS data FROM "ps_model_usage_item" i WHERE %s' % (_SQLITE_OBJECT, _sqlite_corrected_data(model_count),
                                                                " AND ".join(where) or "1 = 1"))


# The temporary table of the items an audit corrects, with their new data (SQLite, before the write lock).
AUDITED_ITEMS = "psai_audit_items"


def audited_items_sql():
    """SQLite: (the statements making AUDITED_ITEMS, the INSERT of one
    item's id and new data text for executemany, the items an audit
    corrects as it leaves them: the columns a fold reads, as
    ``repriced_items_sql``)."""
    make = ['DROP TABLE IF EXISTS temp."%s"' % AUDITED_ITEMS,
            'CREATE TEMP TABLE "%s" ("id" INTEGER PRIMARY KEY, "data" TEXT)' % AUDITED_ITEMS]
    insert = 'INSERT INTO temp."%s" ("id", "data") VALUES (?, json(?))' % AUDITED_ITEMS
    items = ('SELECT i.id, i.model_id, i.agent_id, i.connector_id, i.created_at, a.data AS data '
             'FROM "ps_model_usage_item" i JOIN temp."%s" a ON a.id = i.id' % AUDITED_ITEMS)
    return make, insert, items


# -- statements built once ----------------------------------------------------------

# The counter row's columns record_usage reads back, before the counters.
USAGE_ROW_COLUMNS = ("id", "user_id", "created_at", "updated_at", "model_id", "agent_id", "connector_id")

_USAGE_SQL: dict[tuple, tuple[str, str]] = {}


class Slot(str):
    """The name of a parameter in a statement compiled once (``compiled``)."""


def slot(name: str) -> Value:
    """A named placeholder for peewee to compile: its value is given each
    time the statement runs (``Statement.params``)."""
    return Value(Slot(name), converter=False)


class Statement(NamedTuple):
    """A statement peewee compiled once: its text, and in the order of its
    placeholders the names of its slots (or the constants peewee bound)."""

    sql: str
    order: tuple

    def params(self, values: Mapping[str, Any]) -> list:
        return [values[name] if type(name) is Slot else name for name in self.order]


def compiled(query: Any, db: Any) -> Statement:
    """``query`` (peewee's, with ``slot`` placeholders) compiled for ``db``."""
    sql, params = query.bind(db).sql()
    return Statement(sql, tuple(params))


_COMPILED_ONCE: dict[tuple, Statement] = {}


def compiled_once(db: Any, key: Hashable, build: Callable[[], Any]) -> Statement:
    """The query ``build()`` makes (with ``slot`` placeholders) compiled for
    ``db`` once per backend and ``key``, which names everything it depends
    on: for a query of many columns, peewee compiling it afresh costs more
    than running it."""
    found = _COMPILED_ONCE.get((type(db), key))
    if found is None:
        found = _COMPILED_ONCE[(type(db), key)] = compiled(build(), db)
    return found


# What names the data a PostgreSQL statement sees (psai._budget_ledger's state): its snapshot, with the
# role and search path that choose the tables and rows.
POSTGRES_STATE_SQL = "SELECT pg_current_snapshot()::text, current_user, current_setting('search_path')"


def state_and_rows_sql(sql):
    """PostgreSQL: one statement giving POSTGRES_STATE_SQL's columns and
    then those of ``sql``'s rows (its parameters), all from one snapshot:
    one row of the state with NULLs when ``sql`` has no row."""
    return "SELECT s.*, q.* FROM (%s) s LEFT JOIN (%s) q ON TRUE" % (POSTGRES_STATE_SQL, sql)


def quoted(name):
    """An identifier as SQL (psai's own names: tables, columns)."""
    return '"%s"' % name


def item_insert(db):
    """The INSERT of one usage item. The data is psai's own strict, minified
    JSON: SQLite need not parse it again with json(). PostgreSQL returns the
    item's id (SQLite's cursor has it as ``lastrowid``)."""
    return ('INSERT INTO "ps_model_usage_item" ("user_id", "created_at", "updated_at", "model_id", "agent_id", '
            '"connector_id", "data") VALUES (%s)%s' % (", ".join([db.param] * 7),
                                                       ' RETURNING "id"' if isinstance(db, PostgresqlDatabase) else ""))


def response_id_sql(postgres):
    """The provider's response id an item keeps in psai's part
    (``data.psai.responseId``), as the unique index of migration 0010 reads
    it (the same text, so that a lookup uses the index): SQLite only from
    valid JSON, which its column need not hold."""
    if postgres:
        return "(data -> 'psai' ->> 'responseId')"
    return "(CASE WHEN json_valid(data) THEN json_extract(data, '$.psai.responseId') END)"


def item_by_response_id_sql(db):
    """The item (id, model id, data) recorded for a response id: one lookup
    in migration 0010's index."""
    return 'SELECT "id", "model_id", "data" FROM "ps_model_usage_item" WHERE %s = %s' % (
        response_id_sql(isinstance(db, PostgresqlDatabase)), db.param)


def one_round_trip_statements(find, present, agent_is_null, connector_is_null):
    """PostgreSQL: (the advisory lock, the statement that records a call:
    on condition that the model's stored configuration is the one given,
    find or start the day's counter row, add to it, insert the item), built
    once. ``find``: the text of the counter row's find, guarded by ``m``
    (peewee's; its parameters come between the configuration's and the
    update's). Data-modifying CTEs are what peewee cannot say."""
    key = ("one round trip", find, present, agent_is_null, connector_is_null)
    if key not in _USAGE_SQL:
        columns = ", ".join(quoted(c) for c in USAGE_ROW_COLUMNS + present)
        counters = ("model_id", "agent_id", "connector_id", "user_id", "created_at", "updated_at") + present
        casts = ["%s::integer"] * 4 + ["%s::timestamptz"] * 2 + ["%s::integer"] * len(present)
        _USAGE_SQL[key] = "SELECT pg_advisory_xact_lock(%s)", (
            'WITH m AS (SELECT "id", "configuration" FROM "ps_ai_models" WHERE "id" = %s '
            'AND "configuration" = %s::jsonb FOR SHARE), '
            'found AS ({find}), '
            'updated AS (UPDATE "ps_model_usage" SET {add}, "updated_at" = %s '
            'WHERE "id" = (SELECT "id" FROM found) RETURNING {columns}), '
            'inserted AS (INSERT INTO "ps_model_usage" ({counters}) SELECT {casts} FROM m '
            'WHERE NOT EXISTS (SELECT 1 FROM found) RETURNING {columns}), '
            'item AS (INSERT INTO "ps_model_usage_item" ("user_id", "created_at", "updated_at", "model_id", '
            '"agent_id", "connector_id", "data") SELECT %s::integer, %s::timestamptz, %s::timestamptz, '
            '%s::integer, %s::integer, %s::integer, %s::jsonb FROM m) '
            'SELECT * FROM updated UNION ALL SELECT * FROM inserted').format(
                find=find,
                add=", ".join('{0} = {0} + %s'.format(quoted(c)) for c in present), columns=columns,
                counters=", ".join(quoted(c) for c in counters), casts=", ".join(casts))
    return _USAGE_SQL[key]


def stored_configuration_sql(db):
    """The SELECT of one model's stored configuration (FOR SHARE on PostgreSQL:
    a concurrent price change waits for the call being recorded)."""
    sql = 'SELECT "configuration" FROM "ps_ai_models" WHERE "id" = %s' % db.param
    return sql + " FOR SHARE" if isinstance(db, PostgresqlDatabase) else sql


# -- rollups (psai.rollups) --------------------------------------------------------------

ROLLUP_TABLE = "psai_usage_rollup"
# Items the triggers could not fold (their time is not one psai stores, or on
# PostgreSQL the fold failed), and days whose fold-out failed: read from the items.
UNFOLDED_TABLE = "psai_rollup_unfolded"
ROLLUP_FUNCTION = "psai_rollup_fold"
ROLLUP_TRIGGERS = ("psai_rollup_insert", "psai_rollup_update", "psai_rollup_delete")
# A rollup row's key (item_groups_sql's groups with rollup=True, in its order) and sums
# (GroupSums' order, then how many of its calls said their own cost).
ROLLUP_KEYS = ("model_id", "agent_id", "connector_id", "day", "provider", "pricing", "applied_service_tier",
               "applied_speed", "has_usage", "model_priced", "model_threshold", "long", "apart")
ROLLUP_SUMS = ("calls", "fresh_in", "cached", "cache_write", "out", "web", "all_in", "all_out", "cache_write_1h",
               "cache_write_12h", "audio_in", "audio_out", "image_out", "reasoning_out", "provider_cost", "cost_calls")
_ROLLUP_COLUMNS = ", ".join(quoted(c) for c in ("range_day",) + ROLLUP_KEYS + ROLLUP_SUMS + ("group_key",))
# The columns an item's fold reads: an UPDATE of others (updated_at) folds nothing.
_FOLDED_COLUMNS = ("id", "model_id", "agent_id", "connector_id", "created_at", "data")


def rollup_groups_sql(r, where, source='"ps_model_usage_item"', single=False, models='"ps_ai_models"'):
    """The items meeting ``where`` added up as rollup rows are (ROLLUP_KEYS,
    ROLLUP_SUMS). ``single``: they are one item (item_groups_sql's);
    ``source``, ``models``: ItemReader.select's."""
    read = r.select([name for name, _path, _kind in ITEM_VALUES], where, model_threshold=True,
                    source=source, models=models)
    sql, group = item_groups_sql(r, read, ("agent", "connector", "day"), rollup=True, single=single)
    assert tuple(group) == ROLLUP_KEYS, group
    return sql


def _group_key(postgres, alias="g", keys=ROLLUP_KEYS):
    """One text naming a rollup row's key (``keys``, NULLs apart from any
    text): the unique index the triggers' upsert finds the row by.
    PostgreSQL: its md5, a price snapshot can be longer than a btree entry."""
    if postgres:
        return "md5(concat_ws('|', %s))" % ", ".join("quote_nullable(%s.%s)" % (alias, quoted(c)) for c in keys)
    return " || '|' || ".join("quote(%s.%s)" % (alias, quoted(c)) for c in keys)


def rollup_insert_sql(r, groups):
    """Insert the rows ``groups`` (rollup_groups_sql, not single) as rollup rows, each under its day."""
    return 'INSERT INTO "%s" (%s) SELECT g."day", %s, %s FROM (%s) g' % (
        ROLLUP_TABLE, _ROLLUP_COLUMNS, ", ".join("g.%s" % quoted(c) for c in ROLLUP_KEYS + ROLLUP_SUMS),
        _group_key(r.postgres), groups)


def foldable_sql(postgres, column):
    """True when the item time ``column`` is one the triggers fold: a time
    psai stores (SQLite: its text, whose first ten characters are the UTC
    day its range holds it in), from year 1 to 9999."""
    if postgres:
        return ("coalesce(%s >= '0001-01-01 00:00:00+00' AND %s < '10000-01-01 00:00:00+00', false)"
                % (column, column))
    return "coalesce(typeof(%s) = 'text' AND %s GLOB '%s' AND %s >= '0001', 0)" % (
        column, column, SQLITE_TIME_GLOB, column)


def _row_source(row):
    """An item of a row trigger (NEW or OLD) as the one-row table ItemReader reads."""
    return "(SELECT %s)" % ", ".join("%s.%s AS %s" % (row, quoted(c), c) for c in _FOLDED_COLUMNS)


def _upsert_sql(table, columns, leading, keys, sums, key, groups, sign, condition=None):
    """Add (``sign`` 1) or take off (-1) the rows ``groups`` (as ``g``) to
    the rows of a rollup ``table`` (``columns``: those written) they key:
    one upsert. ``leading``: the SQL of the columns before ``keys`` (the
    range first; the ledger's attribution); ``key``: of the group key.
    ``condition``: a row trigger's, its item folds when it holds; without
    one (a statement's groups, many rows), the rows are written in the
    order of their range and key, the order concurrent writers lock them in."""
    times = "" if sign == 1 else "-1 * "
    values = list(leading) + ["g.%s" % quoted(c) for c in keys] + ["%sg.%s" % (times, quoted(c)) for c in sums]
    target = quoted(table)
    added = _added_sql(target, sums)
    tail = " WHERE %s" % condition if condition is not None else " ORDER BY 1, %d" % (len(values) + 1)
    return 'INSERT INTO %s (%s) SELECT %s, %s FROM (%s) g%s ON CONFLICT (%s, "group_key") DO UPDATE SET %s' % (
        target, columns, ", ".join(values), key, groups, tail, columns.split(", ")[0], ", ".join(added))


def _added_sql(target, sums):
    """An upsert's SET of ``sums`` on its ``target`` table: each its own plus the row's."""
    added = ["%s = %s.%s + excluded.%s" % (quoted(c), target, quoted(c), quoted(c)) for c in sums
             if c != "provider_cost"]
    if "provider_cost" in sums:
        added.append('"provider_cost" = coalesce(%s."provider_cost", 0) + coalesce(excluded."provider_cost", 0)'
                     % target)
    return added


def _fold_sql(r, row, sign, condition):
    """Add (``sign`` 1) or take off (-1) the row trigger's item ``row`` to
    the rollup row of its key, when ``condition`` holds: one upsert."""
    return _upsert_sql(ROLLUP_TABLE, _ROLLUP_COLUMNS, ['g."day"'], ROLLUP_KEYS, ROLLUP_SUMS, _group_key(r.postgres),
                       rollup_groups_sql(r, [], source=_row_source(row), single=True), sign, condition)


def _fold_rows_sql(r, source, where, sign):
    """Add (``sign`` 1) or take off (-1) the items of ``source`` meeting
    ``where`` (``i``; a statement's) to the rollup rows of their keys."""
    return _rollup_upsert_sql(r, rollup_groups_sql(r, where, source=source), sign)


def _rollup_upsert_sql(r, groups, sign):
    """Add (``sign`` 1) or take off (-1) the rows ``groups`` (rollup_groups_sql's) to the rollup rows of their keys."""
    return _upsert_sql(ROLLUP_TABLE, _ROLLUP_COLUMNS, ['g."day"'], ROLLUP_KEYS, ROLLUP_SUMS, _group_key(r.postgres),
                       groups, sign)


def _range_day(postgres, column):
    return ("to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if postgres else "substr(%s, 1, 10)") % column


class _Family(NamedTuple):
    """A family of derived rows kept by triggers on the items: ``table``,
    whose first column is the range (a UTC day or slot) of ``range_sql``
    (postgres, time); its ``triggers`` (insert, update, delete) and, on
    PostgreSQL, the plpgsql ``function`` they call (before migration 0020
    one row trigger, named as the function); ``what`` it is, for a warning;
    ``fold(r, row, sign, condition)``, a row trigger's fold (SQLite);
    ``fold_rows(r, source, where, sign)``, a statement's (PostgreSQL);
    ``counts``: a table of counts of changes, not of sums (no row is ever
    emptied; a statement's items taken away and brought are counted in one
    statement, its rows locked in one order)."""
    table: str
    range_column: str
    range_sql: Any
    triggers: tuple[str, str, str]
    function: str
    what: str
    fold: Any
    fold_rows: Any
    counts: bool = False


ROLLUPS = _Family(ROLLUP_TABLE, "range_day", _range_day, ROLLUP_TRIGGERS, ROLLUP_FUNCTION, "the rollups", _fold_sql,
                  _fold_rows_sql)


def _emptied_sql(family, postgres, row):
    """Drop the rows of the row trigger's item's range that hold no call any more."""
    return 'DELETE FROM "%s" WHERE "%s" = %s AND "calls" = 0' % (
        family.table, family.range_column, family.range_sql(postgres, "%s.created_at" % row))


def _emptied_rows_sql(family, source):
    """Drop the rows that hold no call any more in the ranges of the items
    of ``source`` (a statement's) whose time the triggers fold. The ranges
    are one array, looked up in the table's range index: the statistics say
    rows without calls are rare (the triggers drop them), so as a join the
    planner took the emptied rows for one and read every range for each of
    them (8,000 items moved to another model took 20 s; 100k did not end)."""
    return 'DELETE FROM "%s" WHERE "%s" = ANY (ARRAY(SELECT DISTINCT %s FROM %s i WHERE %s)) AND "calls" = 0' % (
        family.table, family.range_column, family.range_sql(True, "i.created_at"), source,
        foldable_sql(True, "i.created_at"))


_ODD_TIME = "its created_at is not a time psai folds"


def _sqlite_triggers_sql(names, fold_in, fold_out):
    """SQLite's three triggers (``names``: insert, update, delete), row
    triggers running ``fold_in`` and ``fold_out``, SQL that cannot fail."""
    insert, update, delete = names
    body = 'CREATE TRIGGER IF NOT EXISTS "%s" AFTER %s ON "ps_model_usage_item" BEGIN %s; END'
    return [body % (insert, "INSERT", "; ".join(fold_in)),
            body % (update, "UPDATE OF %s" % ", ".join(quoted(c) for c in _FOLDED_COLUMNS),
                    "; ".join(fold_out + fold_in)),
            body % (delete, "DELETE", "; ".join(fold_out))]


def _changed_sql(table, other):
    """The rows of an UPDATE's transition ``table`` that have no row of the
    same id and folded columns in ``other``: what the UPDATE changed that a
    fold reads (an UPDATE of updated_at alone changes none; a changed id is
    an item taken away and one brought)."""
    same = " AND ".join("o.%s IS NOT DISTINCT FROM t.%s" % (quoted(c), quoted(c)) for c in _FOLDED_COLUMNS[1:])
    return "(SELECT t.* FROM %s t WHERE NOT EXISTS (SELECT 1 FROM %s o WHERE o.id = t.id AND %s))" % (
        table, other, same)


def _guarded_sql(family, steps, marks):
    """plpgsql: ``steps`` in one block (one subtransaction a statement);
    when one fails, all are undone and ``marks`` written instead, and when
    even those fail, a warning: the writer's statement never fails. (The
    function goes through psycopg2: "%%%%" here is one "%".)"""
    return """    BEGIN
      %s;
    EXCEPTION WHEN OTHERS THEN
      BEGIN
        %s;
      EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'psai: %s could not keep a change of ps_model_usage_item: %%%%', SQLERRM;
      END;
    END;""" % (";\n      ".join(steps), ";\n        ".join(marks), family.what.replace("'", "''"))


def _statement_triggers_sql(family, work):
    """PostgreSQL's statement triggers of a family (one an event; transition
    tables allow no more) calling its plpgsql function, made anew, and its
    row trigger of before migration 0020 dropped. ``work(gone, came)``: the
    plpgsql keeping one statement's change, ``gone`` the items it took away
    and ``came`` those it brought (SQL of a table of items, or None). The
    function's search_path is the one it was made with, so a writer
    connected with another still finds psai's tables."""
    changed = _changed_sql("psai_old", "psai_new"), _changed_sql("psai_new", "psai_old")
    function = """CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $psai$
BEGIN
  IF TG_OP = 'INSERT' THEN
%s
  ELSIF TG_OP = 'UPDATE' THEN
%s
  ELSE
%s
  END IF;
  RETURN NULL;
END
$psai$""" % (family.function, work(None, "psai_new"), work(*changed), work("psai_old", None))
    statements = [function] + _drop_triggers_sql(True, family)
    for name, (event, transitions) in zip(family.triggers, _TRANSITIONS):
        statements.append('CREATE TRIGGER "%s" AFTER %s ON "ps_model_usage_item" REFERENCING %s FOR EACH STATEMENT '
                          'EXECUTE PROCEDURE %s()' % (name, event, transitions, family.function))
    return statements


# The transition tables a statement trigger of each event sees: the items an INSERT brought, a DELETE took
# away, and both of an UPDATE.
_TRANSITIONS = (("INSERT", "NEW TABLE AS psai_new"), ("UPDATE", "OLD TABLE AS psai_old NEW TABLE AS psai_new"),
                ("DELETE", "OLD TABLE AS psai_old"))


def _drop_triggers_sql(postgres, family):
    """The statements removing a family's triggers (PostgreSQL's: also its
    row trigger of before migration 0020; its function stays, harmless)."""
    if postgres:
        return ['DROP TRIGGER IF EXISTS "%s" ON "ps_model_usage_item"' % name
                for name in (family.function,) + family.triggers]
    return ['DROP TRIGGER IF EXISTS "%s"' % name for name in family.triggers]


def _triggers_on_sql(postgres, family):
    """One value, true when a family's triggers are all on the item table
    (enabled): on PostgreSQL, its three statement triggers, or its one row
    trigger of before migration 0020 (which keeps the rows as well; the
    migrations before 0020 that remake triggers see it on)."""
    if postgres:
        return ("SELECT count(*) FILTER (WHERE tgname IN (%s)) = %d OR count(*) FILTER (WHERE tgname = '%s') = 1 "
                "FROM pg_trigger WHERE tgrelid = to_regclass('\"ps_model_usage_item\"') AND tgenabled <> 'D'"
                % (", ".join("'%s'" % name for name in family.triggers), len(family.triggers), family.function))
    return ("SELECT count(*) = %d FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ps_model_usage_item' "
            "AND name IN (%s)" % (len(family.triggers), ", ".join("'%s'" % name for name in family.triggers)))


def _beside_rollups_trigger_sql(postgres, family):
    """The statements installing a family of triggers kept beside the
    rollups' (the attribution ledger's, the budgets' slots'), like them in
    the writer's transaction and never failing it: they fold what the
    rollups fold (``foldable_sql``; the rollups mark the rest). SQLite: row
    triggers, SQL that cannot fail; PostgreSQL: statement triggers, whose
    block, when a fold fails, marks the days of the statement's items in
    ``psai_rollup_unfolded``, so reports and budgets read those days from
    the items until they are rebuilt."""
    r = ItemReader(postgres)
    if not postgres:
        new_ok, old_ok = foldable_sql(False, "NEW.created_at"), foldable_sql(False, "OLD.created_at")
        return _sqlite_triggers_sql(family.triggers, [family.fold(r, "NEW", 1, new_ok)],
                                    [family.fold(r, "OLD", -1, old_ok)]
                                    + ([] if family.counts else [_emptied_sql(family, False, "OLD")]))
    ok = foldable_sql(True, "i.created_at")

    def work(gone, came):
        steps = []
        if gone and came and family.counts:
            steps.append(family.fold_rows(r, "(SELECT * FROM %s g UNION ALL SELECT * FROM %s c)" % (gone, came),
                                          [ok], 1))
        else:
            if gone:
                steps.append(family.fold_rows(r, gone, [ok], -1))
            if came:
                steps.append(family.fold_rows(r, came, [ok], 1))
        if gone and not family.counts:
            steps.append(_emptied_rows_sql(family, gone))
        days = " UNION ".join("SELECT %s AS d FROM %s i WHERE %s" % (_range_day(True, "i.created_at"), source, ok)
                              for source in (gone, came) if source)
        mark = "INSERT INTO %s (range_day, reason) SELECT DISTINCT d, SQLERRM FROM (%s) days" % (
            quoted(UNFOLDED_TABLE), days)
        return _guarded_sql(family, steps, [mark])
    return _statement_triggers_sql(family, work)


def rollup_trigger_sql(postgres):
    """The statements installing the triggers that keep the rollups in the
    writer's own transaction (docs/rollups.md). SQLite: a row trigger an
    event, SQL that cannot fail (a value of the wrong type reads as absent;
    an item whose time psai does not store is marked unfolded).
    PostgreSQL: a statement trigger an event, each statement's items added
    up by group (one upsert a group, not one an item: a bulk write's rows
    would each update the same few rows), the work in a block that marks
    what it could not fold instead of failing the writer's statement."""
    r = ItemReader(postgres)
    unfolded = quoted(UNFOLDED_TABLE)
    if not postgres:
        new_ok, old_ok = foldable_sql(False, "NEW.created_at"), foldable_sql(False, "OLD.created_at")
        old_rolled = "%s AND NOT EXISTS (SELECT 1 FROM %s WHERE item_id = OLD.id)" % (old_ok, unfolded)
        fold_in = [_fold_sql(r, "NEW", 1, new_ok),
                   "INSERT INTO %s (item_id, reason) SELECT NEW.id, '%s' WHERE NOT %s" % (unfolded, _ODD_TIME, new_ok)]
        fold_out = [_fold_sql(r, "OLD", -1, old_rolled), _emptied_sql(ROLLUPS, False, "OLD"),
                    "DELETE FROM %s WHERE item_id = OLD.id" % unfolded]
        return _sqlite_triggers_sql(ROLLUPS.triggers, fold_in, fold_out)
    ok = foldable_sql(True, "i.created_at")

    def work(gone, came):
        # Items taken away that are marked unfolded are unmarked, not folded out.
        steps, marks = [], []
        if gone:
            steps += [_fold_rows_sql(r, gone, [ok, "NOT EXISTS (SELECT 1 FROM %s u WHERE u.item_id = i.id)" % unfolded],
                                     -1),
                      "DELETE FROM %s WHERE item_id IN (SELECT i.id FROM %s i)" % (unfolded, gone)]
            marks.append("INSERT INTO %s (range_day, reason) SELECT DISTINCT %s, SQLERRM FROM %s i WHERE %s"
                         % (unfolded, _range_day(True, "i.created_at"), gone, ok))
        if came:
            steps += [_fold_rows_sql(r, came, [ok], 1),
                      "INSERT INTO %s (item_id, reason) SELECT i.id, '%s' FROM %s i WHERE NOT %s"
                      % (unfolded, _ODD_TIME, came, ok)]
            marks.append("INSERT INTO %s (item_id, reason) SELECT i.id, SQLERRM FROM %s i" % (unfolded, came))
        if gone:
            steps.append(_emptied_rows_sql(ROLLUPS, gone))
        return _guarded_sql(ROLLUPS, steps, marks)
    return _statement_triggers_sql(ROLLUPS, work)


def drop_rollup_triggers_sql(postgres):
    """The statements removing the triggers (the function stays, harmless)."""
    return _drop_triggers_sql(postgres, ROLLUPS)


def rollup_triggers_sql(postgres):
    """One value: true when psai's rollup triggers are on (``_triggers_on_sql``)."""
    return _triggers_on_sql(postgres, ROLLUPS)


# -- the rollups' summaries: kept by triggers on the rollups themselves ----------------------

# The rollups without the agent and connector (what reports and budgets that
# do not keep agents apart read: a row a day and price group of a model, not
# one for each of its agents), and all days' input and output tokens per
# (model, agent, connector), of the items beside the counter rows' (what
# tells which counters the items cover).
MODEL_ROLLUP_TABLE = "psai_model_rollup"
MODEL_ROLLUP_KEYS = tuple(c for c in ROLLUP_KEYS if c not in ("agent_id", "connector_id"))
KEY_TOTALS_TABLE = "psai_key_totals"
KEY_TOTALS_KEYS = ("model_id", "agent_id", "connector_id")
KEY_TOTALS_SUMS = ("calls", "all_in", "all_out")
SUMMARY_FUNCTION = "psai_rollup_summaries"
SUMMARY_TRIGGERS = ("psai_rollup_summaries_insert", "psai_rollup_summaries_update", "psai_rollup_summaries_rekey",
                    "psai_rollup_summaries_delete")


class _Summary(NamedTuple):
    """A table of rollup rows added up by fewer ``keys`` (``ranged``: by
    their range day too), their ``sums``; ``empty``: when a row of it holds
    nothing any more."""
    table: str
    ranged: bool
    keys: tuple[str, ...]
    sums: tuple[str, ...]
    empty: str

    @property
    def leading(self) -> tuple[str, ...]:
        return ("range_day",) if self.ranged else ()

    @property
    def columns(self) -> str:
        return ", ".join(quoted(c) for c in self.leading + self.keys + self.sums + ("group_key",))


# A row of the key totals is empty when neither its items nor its counter rows hold anything.
KEY_TOTALS_EMPTY = '"calls" = 0 AND "counter_rows" = 0 AND "negative_rows" = 0'
SUMMARIES = (_Summary(MODEL_ROLLUP_TABLE, True, MODEL_ROLLUP_KEYS, ROLLUP_SUMS, '"calls" = 0'),
             _Summary(KEY_TOTALS_TABLE, False, KEY_TOTALS_KEYS, KEY_TOTALS_SUMS, KEY_TOTALS_EMPTY))


def _summary_upsert_sql(postgres, summary, row, sign, base=None):
    """Add (``sign`` 1) or take off (-1) the rollup row ``row`` (NEW, OLD)
    to its row of ``summary``; with ``base`` (OLD), add what ``row`` (NEW)
    holds beyond it (the same rollup row, changed)."""
    times = "" if sign == 1 else "-1 * "
    if base is None:
        sums = ["%s%s.%s" % (times, row, quoted(c)) for c in summary.sums]
    else:
        sums = [("coalesce(%s.%s, 0) - coalesce(%s.%s, 0)" if c == "provider_cost" else "%s.%s - %s.%s")
                % (row, quoted(c), base, quoted(c)) for c in summary.sums]
    values = (["%s.%s" % (row, quoted(c)) for c in summary.leading + summary.keys] + sums
              + [_group_key(postgres, row, summary.keys)])
    target = quoted(summary.table)
    return "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO UPDATE SET %s" % (
        target, summary.columns, ", ".join(values),
        ", ".join(quoted(c) for c in summary.leading + ("group_key",)), ", ".join(_added_sql(target, summary.sums)))


def _summary_emptied_sql(postgres, summary, row, condition="1 = 1"):
    """Drop the row of ``summary`` the rollup row ``row`` (OLD) was in when it holds no call any more."""
    ranged = '"range_day" = %s."range_day" AND ' % row if summary.ranged else ""
    return 'DELETE FROM %s WHERE %s AND %s"group_key" = %s AND %s' % (
        quoted(summary.table), condition, ranged, _group_key(postgres, row, summary.keys), summary.empty)


def _row_fold_function_sql(function, same, changed, fold_out, fold_in, emptied, skip=None, failed=None):
    """plpgsql: the function of a row trigger that keeps rows from the row
    changed. An UPDATE where ``same`` holds runs ``changed`` (its
    difference added); anything else takes the old row off (``fold_out``),
    adds the new one (``fold_in``) and drops rows left empty (``emptied``).
    ``skip``: a condition under which it does nothing; ``failed``: (SQL run
    instead when the fold fails, what is kept, the table written) so that
    the writer's statement goes on. (The function goes through psycopg2:
    "%%%%" here is one "%".)"""
    body = """IF TG_OP = 'UPDATE' AND %s THEN
  %s;
  RETURN NULL;
END IF;
IF TG_OP <> 'INSERT' THEN
  %s;
END IF;
IF TG_OP <> 'DELETE' THEN
  %s;
END IF;
IF TG_OP <> 'INSERT' THEN
  %s;
END IF;""" % (same, ";\n  ".join(changed), ";\n  ".join(fold_out), ";\n  ".join(fold_in), ";\n  ".join(emptied))
    if failed is not None:
        mark, what, table = failed
        body = """BEGIN
%s
EXCEPTION WHEN OTHERS THEN
  BEGIN
    %s;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'psai: %s could not keep a change of %s: %%%%', SQLERRM;
  END;
END;""" % (body, mark, what, table)
    if skip is not None:
        body = "IF %s THEN\n  RETURN NULL;\nEND IF;\n%s" % (skip, body)
    return """CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $psai$
BEGIN
%s
RETURN NULL;
END
$psai$""" % (function, body)


# A rollup row updated keeps its key (a fold changes its sums): its summaries get the difference.
_SAME_ROLLUP_KEY = 'NEW."range_day" = OLD."range_day" AND NEW."group_key" = OLD."group_key"'
_FEWER_CALLS = 'NEW."calls" < OLD."calls"'


def summary_trigger_sql(postgres):
    """The statements installing the triggers that keep the summaries
    (SUMMARIES) from each change of a rollup row, in the same transaction:
    whatever changes a rollup row (the items' triggers, a rebuild's
    statements, SQL by hand) changes its summaries. SQLite: row triggers
    (an update that keeps the row's key apart from one that changes it);
    PostgreSQL: one row trigger calling a plpgsql function. The SQL cannot
    fail but as the rollups' own upsert can (on PostgreSQL, in the items'
    triggers' guarded block)."""
    fold_in = [_summary_upsert_sql(postgres, s, "NEW", 1) for s in SUMMARIES]
    fold_out = [_summary_upsert_sql(postgres, s, "OLD", -1) for s in SUMMARIES]
    changed = [_summary_upsert_sql(postgres, s, "NEW", 1, "OLD") for s in SUMMARIES]
    emptied = [_summary_emptied_sql(postgres, s, "OLD") for s in SUMMARIES]
    if not postgres:
        insert, update, rekey, delete = SUMMARY_TRIGGERS
        body = 'CREATE TRIGGER IF NOT EXISTS "%s" AFTER %s ON "%s"%s BEGIN %s; END'
        emptied_if_fewer = [_summary_emptied_sql(False, s, "OLD", _FEWER_CALLS) for s in SUMMARIES]
        return [body % (insert, "INSERT", ROLLUP_TABLE, "", "; ".join(fold_in)),
                body % (update, "UPDATE", ROLLUP_TABLE, " WHEN %s" % _SAME_ROLLUP_KEY,
                        "; ".join(changed + emptied_if_fewer)),
                body % (rekey, "UPDATE", ROLLUP_TABLE, " WHEN NOT (%s)" % _SAME_ROLLUP_KEY,
                        "; ".join(fold_out + fold_in + emptied)),
                body % (delete, "DELETE", ROLLUP_TABLE, "", "; ".join(fold_out + emptied))]
    # A rebuild writes the summaries itself (``psai.rebuilding`` set in its transaction).
    fewer = "IF %s THEN\n    %s;\n  END IF" % (_FEWER_CALLS, ";\n    ".join(emptied))
    function = _row_fold_function_sql(SUMMARY_FUNCTION, _SAME_ROLLUP_KEY, changed + [fewer], fold_out, fold_in,
                                      emptied, skip="coalesce(current_setting('psai.rebuilding', true), '') = 'on'")
    return [function, 'DROP TRIGGER IF EXISTS "%s" ON "%s"' % (SUMMARY_FUNCTION, ROLLUP_TABLE),
            'CREATE TRIGGER "%s" AFTER INSERT OR UPDATE OR DELETE ON "%s" FOR EACH ROW EXECUTE PROCEDURE %s()'
            % (SUMMARY_FUNCTION, ROLLUP_TABLE, SUMMARY_FUNCTION)]


def drop_summary_triggers_sql(postgres):
    """The statements removing the summaries' triggers (the function stays, harmless)."""
    if postgres:
        return ['DROP TRIGGER IF EXISTS "%s" ON "%s"' % (SUMMARY_FUNCTION, ROLLUP_TABLE)]
    return ['DROP TRIGGER IF EXISTS "%s"' % name for name in SUMMARY_TRIGGERS]


def summary_triggers_sql(postgres):
    """One value: true when the summaries' triggers are on the rollup table."""
    if postgres:
        return ("SELECT count(*) = 1 FROM pg_trigger WHERE tgrelid = to_regclass('\"%s\"') AND tgname = '%s' "
                "AND tgenabled <> 'D'" % (ROLLUP_TABLE, SUMMARY_FUNCTION))
    return ("SELECT count(*) = %d FROM sqlite_master WHERE type = 'trigger' AND tbl_name = '%s' AND name IN (%s)"
            % (len(SUMMARY_TRIGGERS), ROLLUP_TABLE, ", ".join("'%s'" % name for name in SUMMARY_TRIGGERS)))


def summary_rebuild_sql(postgres, summary, where):
    """Add the rows of ``summary`` from the rollup rows meeting ``where`` (to
    rows emptied of them: the key totals' rows keep their counter rows')."""
    grouped = ", ".join(quoted(c) for c in summary.leading + summary.keys)
    sums = ", ".join("SUM(%s) AS %s" % (quoted(c), quoted(c)) for c in summary.sums)
    target = quoted(summary.table)
    return ('INSERT INTO %s (%s) SELECT %s, %s FROM (SELECT %s, %s FROM "%s" WHERE %s GROUP BY %s) g WHERE 1 = 1 '
            'ON CONFLICT (%s) DO UPDATE SET %s' % (
                target, summary.columns, ", ".join("g.%s" % quoted(c) for c in summary.leading + summary.keys
                                                   + summary.sums),
                _group_key(postgres, "g", summary.keys), grouped, sums, ROLLUP_TABLE, " AND ".join(where) or "1 = 1",
                grouped, ", ".join(quoted(c) for c in summary.leading + ("group_key",)),
                ", ".join(_added_sql(target, summary.sums))))


def key_totals_sql(where):
    """The input and output tokens per (model, agent, connector) of every day the rollups hold."""
    return 'SELECT "model_id", "agent_id", "connector_id", "all_in", "all_out" FROM "%s" WHERE "calls" > 0 AND %s' % (
        KEY_TOTALS_TABLE, " AND ".join(where) or "1 = 1")


# Every counter row's input and output tokens per (model, agent, connector), in the key totals beside the
# items': what those are compared with. Kept by triggers on ps_model_usage, made for the counters the table
# has (``present``).
COUNTER_TOTALS_FUNCTION = "psai_counter_totals_fold"
COUNTER_TOTALS_TRIGGERS = ("psai_counter_totals_insert", "psai_counter_totals_update",
                           "psai_counter_totals_rekey", "psai_counter_totals_delete")
# A row whose presence says the totals are not to be trusted (on PostgreSQL, a fold failed) until rebuilt.
COUNTER_TOTALS_STALE = "stale"
# The counter rows without a negative counter, their tokens, and the rows with one (reported apart, unpriced).
COUNTER_TOTAL_SUMS = ("counter_rows", "counted_in", "counted_out", "negative_rows")
_COUNTER_TOTALS_COLUMNS = ", ".join(quoted(c) for c in KEY_TOTALS_KEYS + COUNTER_TOTAL_SUMS + ("group_key",))


def _counted_sql(present, output, row, inputs):
    """The input (``inputs``) or output tokens of the counter row ``row``: the sum of its counters."""
    # BIGINT: PostgreSQL adds 32-bit counters in 32 bits, and two full ones overflow.
    return " + ".join("CAST(%s.%s AS BIGINT)" % (row, quoted(c)) for c in present
                      if (c not in output) == inputs) or "0"


def _counted_row_sql(present, output, row):
    """COUNTER_TOTAL_SUMS of the counter row ``row`` alone: a row with a
    negative counter counts only as such (and one with a NULL counter as
    neither, as reports read it)."""
    negative = counters_negative([quoted(c) for c in present], row)
    return ["CASE WHEN NOT %s THEN 1 ELSE 0 END" % negative] + [
        "CASE WHEN NOT %s THEN %s ELSE 0 END" % (negative, _counted_sql(present, output, row, inputs))
        for inputs in (True, False)] + ["CASE WHEN %s THEN 1 ELSE 0 END" % negative]


def _counter_totals_upsert_sql(postgres, present, output, row, sign, base=None):
    """Add (``sign`` 1) or take off (-1) the counter row ``row`` (NEW, OLD)
    to its totals (``_counted_row_sql``); with ``base`` (OLD), add what
    ``row`` (NEW) counts beyond it (the same row, neither with a negative counter)."""
    times = "" if sign == 1 else "-1 * "
    if base is None:
        counted = ["%s(%s)" % (times, value) for value in _counted_row_sql(present, output, row)]
    else:
        counted = ["0"] + ["(%s) - (%s)" % (_counted_sql(present, output, row, inputs),
                                            _counted_sql(present, output, base, inputs))
                           for inputs in (True, False)] + ["0"]
    values = (["%s.%s" % (row, quoted(c)) for c in KEY_TOTALS_KEYS] + counted
              + [_group_key(postgres, row, KEY_TOTALS_KEYS)])
    target = quoted(KEY_TOTALS_TABLE)
    return 'INSERT INTO %s (%s) VALUES (%s) ON CONFLICT ("group_key") DO UPDATE SET %s' % (
        target, _COUNTER_TOTALS_COLUMNS, ", ".join(values), ", ".join(_added_sql(target, COUNTER_TOTAL_SUMS)))


def counter_totals_trigger_sql(postgres, present, output):
    """The statements installing the triggers that keep the counter totals
    (in KEY_TOTALS_TABLE) from each change of a counter row, in the
    writer's transaction: ``present``, the counters the table has (their
    names are in the triggers: ``counter_totals_on_sql`` tells which);
    ``output``, the output ones. An update that keeps the row's key and
    has no negative counter before or after adds the difference. On
    PostgreSQL a fold that fails writes COUNTER_TOTALS_STALE instead, and
    the writer's statement goes on."""
    fold_in = _counter_totals_upsert_sql(postgres, present, output, "NEW", 1)
    fold_out = _counter_totals_upsert_sql(postgres, present, output, "OLD", -1)
    changed = _counter_totals_upsert_sql(postgres, present, output, "NEW", 1, "OLD")
    emptied = 'DELETE FROM %s WHERE "group_key" = %s AND %s' % (
        quoted(KEY_TOTALS_TABLE), _group_key(postgres, "OLD", KEY_TOTALS_KEYS), KEY_TOTALS_EMPTY)
    same = " AND ".join(["NEW.%s %s OLD.%s" % (quoted(c), "IS NOT DISTINCT FROM" if postgres else "IS", quoted(c))
                         for c in KEY_TOTALS_KEYS] + ["NOT %s" % counters_negative([quoted(c) for c in present], row)
                                                       for row in ("OLD", "NEW")])
    if not postgres:
        insert, update, rekey, delete = COUNTER_TOTALS_TRIGGERS
        body = 'CREATE TRIGGER IF NOT EXISTS "%s" AFTER %s ON "ps_model_usage"%s BEGIN %s; END'
        folded = "UPDATE OF %s" % ", ".join(quoted(c) for c in KEY_TOTALS_KEYS + tuple(present))
        return [body % (insert, "INSERT", "", fold_in),
                body % (update, folded, " WHEN %s" % same, changed),
                body % (rekey, folded, " WHEN NOT (%s)" % same, "; ".join([fold_out, fold_in, emptied])),
                body % (delete, "DELETE", "", "; ".join([fold_out, emptied]))]
    function = _row_fold_function_sql(
        COUNTER_TOTALS_FUNCTION, same, [changed], [fold_out], [fold_in], [emptied],
        failed=("INSERT INTO %s (\"group_key\") VALUES ('%s') ON CONFLICT (\"group_key\") DO NOTHING"
                % (quoted(KEY_TOTALS_TABLE), COUNTER_TOTALS_STALE),
                "the counter totals", "ps_model_usage"))
    # ALWAYS: also for a writer in replica mode (session_replication_role), which is how a counter row
    # pointing at a missing model or agent is written by hand; reports always read such rows.
    return [function, 'DROP TRIGGER IF EXISTS "%s" ON "ps_model_usage"' % COUNTER_TOTALS_FUNCTION,
            'CREATE TRIGGER "%s" AFTER INSERT OR UPDATE OR DELETE ON "ps_model_usage" FOR EACH ROW '
            'EXECUTE PROCEDURE %s()' % (COUNTER_TOTALS_FUNCTION, COUNTER_TOTALS_FUNCTION),
            'ALTER TABLE "ps_model_usage" ENABLE ALWAYS TRIGGER "%s"' % COUNTER_TOTALS_FUNCTION]


def drop_counter_totals_triggers_sql(postgres):
    """The statements removing the counter totals' triggers (the function stays, harmless)."""
    if postgres:
        return ['DROP TRIGGER IF EXISTS "%s" ON "ps_model_usage"' % COUNTER_TOTALS_FUNCTION]
    return ['DROP TRIGGER IF EXISTS "%s"' % name for name in COUNTER_TOTALS_TRIGGERS]


def counter_totals_on_sql(postgres):
    """The SQL of the counter totals' triggers that are on (a row each; SQLite: its three triggers',
    PostgreSQL: its function's), in which the counters they add up are named."""
    if postgres:
        return ("SELECT p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = "
                "to_regclass('\"ps_model_usage\"') AND t.tgname = '%s' AND t.tgenabled <> 'D'"
                % COUNTER_TOTALS_FUNCTION)
    return ("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ps_model_usage' AND name IN (%s)"
            % ", ".join("'%s'" % name for name in COUNTER_TOTALS_TRIGGERS))


def counter_groups_sql(present, output):
    """The counter rows per (model, agent, connector), COUNTER_TOTAL_SUMS."""
    return 'SELECT "model_id", "agent_id", "connector_id", %s FROM "ps_model_usage" u GROUP BY 1, 2, 3' % ", ".join(
        "SUM(%s) AS %s" % (value, quoted(name))
        for value, name in zip(_counted_row_sql(present, output, "u"), COUNTER_TOTAL_SUMS))


def counter_totals_rebuild_sql(postgres, present, output):
    """Insert the counter totals of every counter row without a negative
    counter, adding to a row a writer's trigger made since they were
    emptied (PostgreSQL: its write is not in what this statement reads)."""
    target = quoted(KEY_TOTALS_TABLE)
    return 'INSERT INTO %s (%s) SELECT g.*, %s FROM (%s) g WHERE 1 = 1 ON CONFLICT ("group_key") DO UPDATE SET %s' % (
        target, _COUNTER_TOTALS_COLUMNS, _group_key(postgres, "g", KEY_TOTALS_KEYS),
        counter_groups_sql(present, output), ", ".join(_added_sql(target, COUNTER_TOTAL_SUMS)))


def negative_counter_rows_sql():
    """One row when the kept counter totals count a counter row with a negative counter."""
    return 'SELECT 1 FROM %s WHERE "negative_rows" > 0 LIMIT 1' % quoted(KEY_TOTALS_TABLE)


def kept_counter_totals_sql(where):
    """The kept counter totals per (model, agent, connector): counter_totals_sql's layout."""
    return ('SELECT "model_id", "agent_id", "connector_id", "counted_in", "counted_out" FROM %s '
            'WHERE "counter_rows" > 0 AND %s' % (quoted(KEY_TOTALS_TABLE), " AND ".join(where) or "1 = 1"))


def uncovered_keys_sql():
    """The key totals a report must look at (the counters' tokens beyond
    the items'): those whose counter rows hold more input or output tokens
    than their items, and all of those whose agent is none or gone, which a
    report adds up as one agent, none. Each with whether its agent exists,
    its calls and both sides' tokens."""
    agents = '"agent_id" IN (SELECT "id" FROM "ps_agents")'
    return ('SELECT "model_id", "agent_id", "connector_id", %s, "calls", "all_in", "all_out", "counted_in", '
            '"counted_out" FROM %s WHERE "group_key" <> \'%s\' AND ("counted_in" > "all_in" OR "counted_out" > '
            '"all_out" OR "agent_id" IS NULL OR NOT %s)' % (agents, quoted(KEY_TOTALS_TABLE), COUNTER_TOTALS_STALE,
                                                             agents))


def unfolded_items_sql(postgres, where):
    """Items the triggers could not fold (``where`` on their time, ``created_at``)."""
    return ('SELECT i.id FROM "ps_model_usage_item" i WHERE NOT %s%s'
            % (foldable_sql(postgres, "i.created_at"), "".join(" AND " + w for w in where)))


def rollup_sums_sql(group, where, only=None, table=ROLLUP_TABLE):
    """Rollup rows meeting ``where`` added up by ``group`` (names among
    ROLLUP_KEYS): rows in item_groups_sql's layout (GroupSums after the keys);
    ``only`` (names among ROLLUP_SUMS): just those sums, in that order.
    ``table``: the rollups, or their summary without agents (MODEL_ROLLUP_TABLE)."""
    if only is not None:
        sums = ['SUM(%s)' % quoted(c) for c in only]
    else:
        sums = ["CAST(SUM(\"calls\") AS BIGINT)"] + ['SUM(%s)' % quoted(c) for c in ROLLUP_SUMS[1:-2]] + [
            'CASE WHEN SUM("cost_calls") > 0 THEN SUM("provider_cost") END']
    keys = ", ".join(quoted(c) for c in group)
    return 'SELECT %s, %s FROM "%s" WHERE %s GROUP BY %s' % (keys, ", ".join(sums), table,
                                                             " AND ".join(where) or "1 = 1", keys)


def rollup_days_sql(where):
    """Per range day of the rollups: their calls."""
    return ('SELECT "range_day", CAST(SUM("calls") AS BIGINT) FROM "%s" WHERE %s GROUP BY "range_day"'
            % (ROLLUP_TABLE, " AND ".join(where) or "1 = 1"))


def rollup_day_list_sql(postgres, where, table=ROLLUP_TABLE):
    """The range days of the rollups (index psai_usage_rollup_day alone, migration 0018;
    ``table``: or of their summary without agents, the same days in fewer rows).
    PostgreSQL: one probe of the index a day (its DISTINCT reads every row's
    entry, and the table's rows too until a vacuum marks them visible);
    ``where``'s parameters twice. SQLite skips along the index by itself."""
    condition = " AND ".join(where) or "1 = 1"
    if not postgres:
        return 'SELECT DISTINCT "range_day" FROM "%s" WHERE %s' % (table, condition)
    return ('WITH RECURSIVE d (day) AS (SELECT min("range_day") FROM "{t}" WHERE {w} UNION ALL '
            'SELECT (SELECT min("range_day") FROM "{t}" WHERE "range_day" > d.day AND {w}) FROM d '
            'WHERE d.day IS NOT NULL) SELECT day FROM d WHERE day IS NOT NULL').format(t=table, w=condition)


def rollup_thresholds_sql(where):
    """The thresholds of models' current prices the rollups of items without a snapshot were split by
    (a partial index of those rows alone, migration 0018)."""
    return ('SELECT DISTINCT "range_day", "model_id", "model_threshold" FROM "%s" WHERE "model_priced" = 1 AND %s'
            % (ROLLUP_TABLE, " AND ".join(where) or "1 = 1"))


def rollup_rows_sql(where):
    """Rollup rows (range day, keys, sums, key), for verify."""
    return 'SELECT %s FROM "%s" WHERE %s' % (_ROLLUP_COLUMNS, ROLLUP_TABLE, " AND ".join(where) or "1 = 1")


def item_days_sql(postgres, where):
    """The items per UTC day and their count, from the created_at index alone."""
    return 'SELECT %s, COUNT(*) FROM "ps_model_usage_item" WHERE %s GROUP BY 1' % (
        _range_day(postgres, "created_at"), " AND ".join(where) or "1 = 1")


def model_thresholds_sql(r, model_count):
    """The current long-context threshold of ``model_count`` models (their
    ids the parameters), read as the reports read it."""
    return 'SELECT id, %s FROM (SELECT m.id, %s AS v_model_threshold FROM "ps_ai_models" m WHERE m.id IN (%s)) t' % (
        r.value("model_threshold"), r._raw("m.configuration", _MODEL_THRESHOLD),
        ", ".join(["%s" if r.postgres else "?"] * model_count) or "NULL")


def ranges_clause(db, column, field, ranges, params):
    """One WHERE clause: ``column`` in any of ``ranges`` ([start, end), None
    for open), their parameters appended to ``params``; FALSE for none."""
    clauses = []
    for start, end in ranges:
        parts = window(db, column, field, start, end, None, params)
        clauses.append("(%s)" % " AND ".join(parts) if parts else "1 = 1")
    return "(%s)" % " OR ".join(clauses) if clauses else "1 = 0"


# -- the attribution ledger (psai.rollups; reports by user, session and tag) -------------------

LEDGER_TABLE = "psai_attribution_ledger"
LEDGER_FUNCTION = "psai_ledger_fold"
LEDGER_TRIGGERS = ("psai_ledger_insert", "psai_ledger_update", "psai_ledger_delete")
# A ledger row: one UTC day, one attribution (kind: user, session or tag:KEY; its text value) and one
# rollup key, with the rollup sums of the items so attributed.
_LEDGER_COLUMNS = ", ".join(quoted(c) for c in ("range_day", "kind", "value") + ROLLUP_KEYS + ROLLUP_SUMS
                            + ("group_key",))


def attributed_items_sql(postgres, source):
    """The items of ``source`` (a table or a subquery of items, as ``i``),
    one row for each attribution each holds as text: their folded columns,
    ``kind`` (user, session, ``tag:KEY``) and ``value``. Data that is not
    JSON, or a value that is not text, holds none."""
    columns = ", ".join("i.%s" % quoted(c) for c in _FOLDED_COLUMNS)
    if postgres:
        def text(path):
            return "jsonb_typeof(i.data #> '{%s}') = 'string'" % path, "i.data #>> '{%s}'" % path
        user, session = text("psai,user"), text("psai,session")
        return ("SELECT %s, a.kind, a.value FROM %s i CROSS JOIN LATERAL ("
                "SELECT 'user' AS kind, %s AS value WHERE %s "
                "UNION ALL SELECT 'session', %s WHERE %s "
                "UNION ALL SELECT 'tag:' || t.key, t.value #>> '{}' FROM jsonb_each(CASE WHEN "
                "jsonb_typeof(i.data #> '{psai,tags}') = 'object' THEN i.data #> '{psai,tags}' ELSE '{}'::jsonb END) t "
                "WHERE jsonb_typeof(t.value) = 'string') a" % (columns, source, user[1], user[0], session[1],
                                                               session[0]))
    data = "(CASE WHEN typeof(i.data) = 'text' AND json_valid(i.data) THEN i.data ELSE '{}' END)"
    selects = ["SELECT %s, '%s' AS kind, json_extract(%s, '$.psai.%s') AS value FROM %s i "
               "WHERE json_type(%s, '$.psai.%s') = 'text'" % (columns, kind, data, kind, source, data, kind)
               for kind in ("user", "session")]
    selects.append("SELECT %s, 'tag:' || t.key, t.value FROM %s i, json_each(CASE WHEN json_type(%s, '$.psai.tags') "
                   "= 'object' THEN json_extract(%s, '$.psai.tags') ELSE '{}' END) t WHERE t.type = 'text'"
                   % (columns, source, data, data))
    return " UNION ALL ".join(selects)


def ledger_groups_sql(r, where, source='"ps_model_usage_item"'):
    """The attributions of the items meeting ``where`` added up as ledger
    rows are: (day, kind, value, ROLLUP_KEYS' other columns, ROLLUP_SUMS)."""
    attributed = "(%s)" % attributed_items_sql(r.postgres, source)
    read = r.select([name for name, _path, _kind in ITEM_VALUES], where, model_threshold=True, source=attributed,
                    attribute="i.value", with_kind=True)
    sql, group = item_groups_sql(r, read, ("agent", "connector", "day", "kind", "attribute"), rollup=True)
    assert tuple(g for g in group if g not in ("kind", "attribute")) == ROLLUP_KEYS, group
    return sql


def ledger_sums_of_items_sql(r, where):
    """The ledger rows the items meeting ``where`` add up to, as
    ``ledger_rows_sql`` reads the kept ones: (kind, value, ROLLUP_KEYS, ROLLUP_SUMS)."""
    return 'SELECT g.kind, g.attribute, %s FROM (%s) g' % (
        ", ".join("g.%s" % quoted(c) for c in ROLLUP_KEYS + ROLLUP_SUMS), ledger_groups_sql(r, where))


def ledger_rows_sql(where):
    """Ledger rows (kind, value, ROLLUP_KEYS, ROLLUP_SUMS) meeting ``where``, for verify."""
    return 'SELECT %s FROM "%s" WHERE %s' % (", ".join(quoted(c) for c in ("kind", "value") + ROLLUP_KEYS
                                                       + ROLLUP_SUMS), LEDGER_TABLE, " AND ".join(where) or "1 = 1")


def _ledger_key(postgres):
    keys = _group_key(postgres)
    if postgres:
        return "md5(quote_nullable(g.kind) || '|' || quote_nullable(g.attribute) || '|' || %s)" % keys
    return "quote(g.kind) || '|' || quote(g.attribute) || '|' || %s" % keys


def ledger_insert_sql(r, groups):
    """Insert the rows ``groups`` (ledger_groups_sql) into the ledger, each under its day."""
    return 'INSERT INTO "%s" (%s) SELECT g."day", g.kind, g.attribute, %s, %s FROM (%s) g' % (
        LEDGER_TABLE, _LEDGER_COLUMNS, ", ".join("g.%s" % quoted(c) for c in ROLLUP_KEYS + ROLLUP_SUMS),
        _ledger_key(r.postgres), groups)


def _ledger_fold_sql(r, row, sign, condition):
    """Add (``sign`` 1) or take off (-1) the row trigger's item ``row`` to
    the ledger rows of its attributions, when ``condition`` holds."""
    return _upsert_sql(LEDGER_TABLE, _LEDGER_COLUMNS, ['g."day"', "g.kind", "g.attribute"], ROLLUP_KEYS, ROLLUP_SUMS,
                       _ledger_key(r.postgres), ledger_groups_sql(r, [], source=_row_source(row)), sign, condition)


def _ledger_fold_rows_sql(r, source, where, sign):
    """Add (``sign`` 1) or take off (-1) the items of ``source`` meeting
    ``where`` (``i``; a statement's) to the ledger rows of their attributions."""
    return _ledger_upsert_sql(r, ledger_groups_sql(r, where, source=source), sign)


def _ledger_upsert_sql(r, groups, sign):
    """Add (``sign`` 1) or take off (-1) the rows ``groups`` (ledger_groups_sql's) to the ledger rows of their keys."""
    return _upsert_sql(LEDGER_TABLE, _LEDGER_COLUMNS, ['g."day"', "g.kind", "g.attribute"], ROLLUP_KEYS, ROLLUP_SUMS,
                       _ledger_key(r.postgres), groups, sign)


LEDGER = _Family(LEDGER_TABLE, "range_day", _range_day, LEDGER_TRIGGERS, LEDGER_FUNCTION, "the attribution ledger",
                 _ledger_fold_sql, _ledger_fold_rows_sql)


def ledger_trigger_sql(postgres):
    """The statements installing the ledger's own triggers, beside the
    rollups' (``_beside_rollups_trigger_sql``)."""
    return _beside_rollups_trigger_sql(postgres, LEDGER)


def drop_ledger_triggers_sql(postgres):
    """The statements removing the ledger's triggers (the function stays, harmless)."""
    return _drop_triggers_sql(postgres, LEDGER)


def ledger_triggers_sql(postgres):
    """One value: true when the ledger's triggers are on (``_triggers_on_sql``)."""
    return _triggers_on_sql(postgres, LEDGER)


def ledger_kinds_sql(where):
    """The kinds of attribution (user, session, ``tag:KEY``) in the ledger rows meeting ``where``."""
    return 'SELECT DISTINCT "kind" FROM "%s" WHERE "calls" <> 0%s' % (LEDGER_TABLE, "".join(" AND " + w for w in where))


def item_kinds_sql(postgres, where):
    """The kinds of attribution (``user``, ``session``, ``tag:KEY``) the
    items meeting ``where`` (as ``i``) hold as text: a user or session
    found ends its search at the first item. Parameters: ``where``'s three times."""
    also = "".join(" AND " + w for w in where)
    if postgres:
        def held(path):
            return ("SELECT '%s' AS kind WHERE EXISTS (SELECT 1 FROM \"ps_model_usage_item\" i WHERE "
                    "jsonb_typeof(i.data #> '{psai,%s}') = 'string'%s)" % (path, path, also))
        tags = ("SELECT DISTINCT 'tag:' || t.key FROM \"ps_model_usage_item\" i CROSS JOIN LATERAL jsonb_each(CASE "
                "WHEN jsonb_typeof(i.data #> '{psai,tags}') = 'object' THEN i.data #> '{psai,tags}' ELSE '{}'::jsonb "
                "END) t WHERE jsonb_typeof(t.value) = 'string'%s" % also)
    else:
        data = "(CASE WHEN typeof(i.data) = 'text' AND json_valid(i.data) THEN i.data ELSE '{}' END)"

        def held(path):
            return ("SELECT '%s' AS kind WHERE EXISTS (SELECT 1 FROM \"ps_model_usage_item\" i WHERE "
                    "json_type(%s, '$.psai.%s') = 'text'%s)" % (path, data, path, also))
        tags = ("SELECT DISTINCT 'tag:' || t.key FROM \"ps_model_usage_item\" i, json_each(CASE WHEN json_type(%s, "
                "'$.psai.tags') = 'object' THEN json_extract(%s, '$.psai.tags') ELSE '{}' END) t "
                "WHERE t.type = 'text'%s" % (data, data, also))
    return " UNION ALL ".join([held("user"), held("session"), tags])


def ledger_sums_sql(group, common, attributed, none_group):
    """Ledger rows meeting ``common`` (days, models, agents) and
    ``attributed`` (their kind, maybe their value) added up by ``group``
    (names among ROLLUP_KEYS, and ``attribute``, the value): rows in
    item_groups_sql's layout. ``none_group``: also the calls without that
    kind, attribute NULL: the rollups meeting ``common`` less those ledger
    rows (the ledger read once: its groups taken off). Parameters:
    ``common``'s and ``attributed``'s; with ``none_group`` then ``common``'s."""
    keys = ", ".join(quoted(c) for c in group)
    named = ", ".join('"value" AS "attribute"' if c == "attribute" else quoted(c) for c in group)
    grouped = ", ".join('"value"' if c == "attribute" else quoted(c) for c in group)
    nulled = ", ".join('NULL AS "attribute"' if c == "attribute" else quoted(c) for c in group)
    sums = ", ".join(quoted(c) for c in ROLLUP_SUMS)

    def summed(times):
        return ", ".join(['CAST(SUM(%s"calls") AS BIGINT)' % times] + [
            'SUM(%s%s)' % (times, quoted(c)) for c in ROLLUP_SUMS[1:-2]] + [
            'CASE WHEN SUM(%s"cost_calls") > 0 THEN SUM(%s"provider_cost") END' % (times, times)])
    ledger = 'SELECT %s, %s FROM "%s" WHERE %s GROUP BY %s' % (
        named, summed(""), LEDGER_TABLE, " AND ".join(list(common) + list(attributed)), grouped)
    if not none_group:
        return ledger
    # The ledger's groups as they are, and the rollups less their sums, by what is not the attribute.
    kept = ", ".join(quoted(c) for c in ROLLUP_SUMS[:-2])
    return ('WITH a AS (SELECT %s, %s FROM "%s" WHERE %s GROUP BY %s) '
            'SELECT %s, %s, CASE WHEN "cost_calls" > 0 THEN "provider_cost" END FROM a UNION ALL '
            'SELECT %s, %s FROM (SELECT %s, 1 AS s, %s FROM "%s" WHERE %s UNION ALL SELECT %s, -1, %s FROM a) t '
            'GROUP BY %s HAVING SUM(s * "calls") <> 0' % (
                named, ", ".join(("CAST(SUM(%s) AS BIGINT) AS %s" if c == "calls" else "SUM(%s) AS %s")
                                 % (quoted(c), quoted(c)) for c in ROLLUP_SUMS), LEDGER_TABLE,
                " AND ".join(list(common) + list(attributed)), grouped,
                keys, kept,
                keys, summed("s * "), nulled, sums, ROLLUP_TABLE, " AND ".join(common) or "1 = 1", nulled, sums,
                keys))


# -- the budgets' 15-minute slots (psai._budget_ledger) ------------------------------------

# The items added up per 15-minute slot of UTC time, beside the daily rollups,
# kept by triggers of their own: a budget in a zone other than UTC reads the
# partial days at its period's ends from them (every IANA zone's midnight is
# on a quarter hour), not from the items.
SLOT_TABLE = "psai_usage_slots"
SLOT_FUNCTION = "psai_slot_fold"
SLOT_TRIGGERS = ("psai_slot_insert", "psai_slot_update", "psai_slot_delete")
SLOT_MINUTES = 15
# A slot row's key (a daily rollup's, without the connector and the day) and the sums a budget reads.
SLOT_KEYS = ("model_id", "agent_id", "provider", "pricing", "applied_service_tier", "applied_speed", "has_usage",
             "model_priced", "model_threshold", "long", "apart")
BUDGET_SUMS = ("calls", "fresh_in", "cached", "cache_write", "out", "web", "cache_write_1h", "cache_write_12h",
               "audio_in", "audio_out", "image_out")
# What a budget groups calls by: what prices them (item_groups_sql's group without agent, connector or day).
BUDGET_GROUP = ("model_id", "provider", "pricing", "applied_service_tier", "applied_speed", "has_usage", "long",
                "apart")
_SLOT_COLUMNS = ", ".join(quoted(c) for c in ("range_slot",) + SLOT_KEYS + BUDGET_SUMS + ("group_key",))


def range_slot_sql(postgres, column):
    """The 15-minute slot of UTC time holding the time ``column``, as text
    'YYYY-MM-DD HH:MM' (its start): ordered as the times are."""
    if postgres:
        return ("to_char(date_trunc('hour', %s AT TIME ZONE 'UTC') + floor(date_part('minute', %s AT TIME ZONE "
                "'UTC') / 15) * interval '15 minutes', 'YYYY-MM-DD HH24:MI')" % (column, column))
    # SQLite keeps UTC text: 'YYYY-MM-DD HH:MM:...'.
    return ("(substr(%s, 1, 14) || CASE WHEN substr(%s, 15, 2) < '15' THEN '00' WHEN substr(%s, 15, 2) < '30' "
            "THEN '15' WHEN substr(%s, 15, 2) < '45' THEN '30' ELSE '45' END)" % ((column,) * 4))


def _slot_key(postgres, alias="g"):
    """One text naming a slot row's key: the unique index the upsert finds it by."""
    if postgres:
        return "md5(concat_ws('|', %s))" % ", ".join("quote_nullable(%s.%s)" % (alias, quoted(c)) for c in SLOT_KEYS)
    return " || '|' || ".join("quote(%s.%s)" % (alias, quoted(c)) for c in SLOT_KEYS)


def _slot_fold_sql(r, row, sign, condition):
    """Add (``sign`` 1) or take off (-1) the row trigger's item ``row`` to its slot row, when ``condition`` holds."""
    groups = rollup_groups_sql(r, [], source=_row_source(row), single=True)
    return _upsert_sql(SLOT_TABLE, _SLOT_COLUMNS, [range_slot_sql(r.postgres, "%s.created_at" % row)], SLOT_KEYS,
                       BUDGET_SUMS, _slot_key(r.postgres), groups, sign, condition)


def slot_groups_sql(r, where, source='"ps_model_usage_item"'):
    """The items of ``source`` meeting ``where`` (``i``) added up by slot
    and key: item_groups_sql's groups, the slot standing in the connector's
    column (slots keep no connector)."""
    read = r.select([name for name, _path, _kind in ITEM_VALUES], where, model_threshold=True, source=source)
    slotted = "SELECT s.model_id, s.agent_id, %s AS connector_id, s.created_at, %s FROM (%s) s" % (
        range_slot_sql(r.postgres, "s.created_at"), ", ".join("s.v_" + name for name, _p, _k in ITEM_VALUES)
        + ", s.v_model_threshold", read)
    groups, group = item_groups_sql(r, slotted, ("agent", "connector"), rollup=True)
    assert set(SLOT_KEYS) <= set(group) and "connector_id" in group, group
    return groups


def _slot_fold_rows_sql(r, source, where, sign):
    """Add (``sign`` 1) or take off (-1) the items of ``source`` meeting
    ``where`` (``i``; a statement's) to their slot rows."""
    return _slot_upsert_sql(r, slot_groups_sql(r, where, source=source), sign)


def _slot_upsert_sql(r, groups, sign):
    """Add (``sign`` 1) or take off (-1) the rows ``groups`` (slot_groups_sql's) to the slot rows of their keys."""
    return _upsert_sql(SLOT_TABLE, _SLOT_COLUMNS, ['g."connector_id"'], SLOT_KEYS, BUDGET_SUMS, _slot_key(r.postgres),
                       groups, sign)


SLOTS = _Family(SLOT_TABLE, "range_slot", range_slot_sql, SLOT_TRIGGERS, SLOT_FUNCTION, "the budgets' slots",
                _slot_fold_sql, _slot_fold_rows_sql)


def slot_trigger_sql(postgres):
    """The statements installing the triggers that keep the 15-minute slots,
    beside the rollups' (``_beside_rollups_trigger_sql``)."""
    return _beside_rollups_trigger_sql(postgres, SLOTS)


def drop_slot_triggers_sql(postgres):
    """The statements removing the slots' triggers (the function stays, harmless)."""
    return _drop_triggers_sql(postgres, SLOTS)


def slot_triggers_sql(postgres):
    """One value: true when the slots' triggers are on (``_triggers_on_sql``)."""
    return _triggers_on_sql(postgres, SLOTS)


# -- what changed on which day: counters the triggers bump ---------------------------------

# Per UTC day and model, a count of the changes of that day's items, bumped
# in the writer's transaction whoever writes (a count only grows; a write
# rolled back takes its bump with it): a budget check reads again only the
# days whose count moved since it read them. The row of day
# DAY_CHANGES_REBUILT (model 0) counts rebuilds, which rewrite every day.
DAY_CHANGES_TABLE = "psai_day_changes"
DAY_CHANGES_FUNCTION = "psai_day_changes_bump"
DAY_CHANGES_TRIGGERS = ("psai_day_changes_insert", "psai_day_changes_update", "psai_day_changes_delete")
DAY_CHANGES_REBUILT = ""


def _bump_sql(days):
    """Bump the counters of ``days`` (SQL of distinct rows (range_day, model_id)), in their order."""
    table = quoted(DAY_CHANGES_TABLE)
    return ('INSERT INTO %s ("range_day", "model_id", "changes") SELECT d.range_day, d.model_id, 1 FROM (%s) d '
            'ORDER BY 1, 2 ON CONFLICT ("range_day", "model_id") DO UPDATE SET "changes" = %s."changes" + 1'
            % (table, days, table))


def _day_changes_fold_sql(r, row, sign, condition):
    """Bump the counter of the day and model of the row trigger's item
    ``row`` when ``condition`` holds (either ``sign``: taken away or brought, a change)."""
    return _bump_sql("SELECT %s AS range_day, coalesce(%s.model_id, 0) AS model_id WHERE %s"
                     % (_range_day(r.postgres, "%s.created_at" % row), row, condition))


def _day_changes_fold_rows_sql(r, source, where, sign):
    """Bump the counters of the days and models of the items of ``source`` meeting ``where`` (``i``; a statement's)."""
    return _bump_sql("SELECT DISTINCT %s AS range_day, coalesce(i.model_id, 0) AS model_id FROM %s i WHERE %s"
                     % (_range_day(r.postgres, "i.created_at"), source, " AND ".join(where) or "1 = 1"))


DAY_CHANGES = _Family(DAY_CHANGES_TABLE, "range_day", _range_day, DAY_CHANGES_TRIGGERS, DAY_CHANGES_FUNCTION,
                      "the days' change counters", _day_changes_fold_sql, _day_changes_fold_rows_sql, counts=True)


def day_changes_trigger_sql(postgres):
    """The statements installing the triggers that bump the days' change
    counters, beside the rollups' (``_beside_rollups_trigger_sql``)."""
    return _beside_rollups_trigger_sql(postgres, DAY_CHANGES)


def drop_day_changes_triggers_sql(postgres):
    """The statements removing the day counters' triggers (the function stays, harmless)."""
    return _drop_triggers_sql(postgres, DAY_CHANGES)


def day_changes_triggers_sql(postgres):
    """One value: true when the day counters' triggers are on (``_triggers_on_sql``)."""
    return _triggers_on_sql(postgres, DAY_CHANGES)


def triggers_named_sql(postgres):
    """The names of the triggers (enabled ones, on PostgreSQL) on the item
    table and on the rollups: (name, whether on the rollups)."""
    if postgres:
        return ("SELECT tgname, tgrelid = to_regclass('\"%s\"') FROM pg_trigger WHERE tgrelid IN "
                "(to_regclass('\"ps_model_usage_item\"'), to_regclass('\"%s\"')) AND tgenabled <> 'D'"
                % (ROLLUP_TABLE, ROLLUP_TABLE))
    return ("SELECT name, tbl_name = '%s' FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN "
            "('ps_model_usage_item', '%s')" % (ROLLUP_TABLE, ROLLUP_TABLE))


def families_on(postgres, named):
    """From ``triggers_named_sql``'s rows: whether the rollups', the slots',
    the summaries' and the day counters' triggers are all there (as
    ``_triggers_on_sql`` and ``summary_triggers_sql`` tell each)."""
    on_items = {name for name, on_rollups in named if not on_rollups}
    on_rollups = {name for name, on_rollups in named if on_rollups}

    def family(f):
        return set(f.triggers) <= on_items or postgres and f.function in on_items
    summaries = SUMMARY_FUNCTION in on_rollups if postgres else set(SUMMARY_TRIGGERS) <= on_rollups
    return family(ROLLUPS), family(SLOTS), summaries, family(DAY_CHANGES)


def day_changes_rebuilt_sql():
    """Bump the count of rebuilds."""
    return _bump_sql("SELECT CAST('%s' AS TEXT) AS range_day, 0 AS model_id" % DAY_CHANGES_REBUILT)


def day_model_changes_sql(db, days, model_ids, params):
    """The counters (range_day, model_id, changes) of ``days`` and ``model_ids`` (None: every model)."""
    where = ['"range_day" IN (%s)' % ", ".join([db.param] * len(days))]
    params += list(days)
    ids_in(db, '"model_id"', model_ids, where, params)
    return 'SELECT "range_day", "model_id", "changes" FROM %s WHERE %s' % (
        quoted(DAY_CHANGES_TABLE), " AND ".join(where))


def day_changes_sql(db, first, last, model_ids, params):
    """The count of rebuilds (as day DAY_CHANGES_REBUILT) and, per day of
    [first, last] (UTC days as text), the sum of the counters of ``model_ids``
    (None: every model), which grows with every change of those models' items that day."""
    where = ['"range_day" >= %s' % db.param, '"range_day" <= %s' % db.param]
    params += [first, last]
    ids_in(db, '"model_id"', model_ids, where, params)
    params.append(DAY_CHANGES_REBUILT)
    return 'SELECT "range_day", SUM("changes") FROM %s WHERE (%s) OR "range_day" = %s GROUP BY "range_day"' % (
        quoted(DAY_CHANGES_TABLE), " AND ".join(where), db.param)


# What a change of many items folds by statement on SQLite (change_fold_sql), a family by name: its
# rows, its groups of items (r, where, source), the upsert of such groups (r, groups, sign), and the
# groups' column holding the range (the day; the slot where the connector would be).
_CHANGE_FOLDS = {"rollups": (ROLLUPS, rollup_groups_sql, _rollup_upsert_sql, "day"),
                 "ledger": (LEDGER, ledger_groups_sql, _ledger_upsert_sql, "day"),
                 "slots": (SLOTS, slot_groups_sql, _slot_upsert_sql, "connector_id")}


class ChangeFold(NamedTuple):
    """SQLite: what the update trigger of one family does for every item
    of a change of many items, as whole statements. ``prepare``: (SQL,
    whether it takes ``where``'s parameters) making temporary tables of the
    groups to fold out and in; they may run before the write lock is
    taken. ``before`` and ``after`` the change, with no parameters: the
    folds from those tables; ``trigger``, the update trigger dropped for
    the change; ``temporary``, the tables to drop after."""

    prepare: list[tuple[str, bool]]
    before: list[str]
    trigger: str
    after: list[str]
    temporary: list[str]


# The temporary table of the items a change changes as it leaves them (change_fold_sql).
CHANGED_ITEMS = "psai_fold_changed"


def change_fold_sql(name, where):
    """The ``ChangeFold`` of the family ``name`` (rollups, ledger, slots, day_changes)
    for a change of the items meeting ``where`` (``i``) that keeps their
    ids and times, those items as the change leaves them (id, model_id,
    agent_id, connector_id, created_at, data: ``repriced_items_sql``) in
    the temporary table CHANGED_ITEMS. A row trigger folds an item with a few
    statements: 100,000 items changed by one UPDATE took 200 µs each,
    seconds past a writer's busy timeout."""
    r, items, ok = ItemReader(False), '"ps_model_usage_item"', foldable_sql(False, "i.created_at")
    if name == "day_changes":  # the changed items' days and models, bumped once after the change
        changed = "psai_fold_day_changes"
        pairs = "SELECT %s AS range_day, coalesce(i.model_id, 0) AS model_id FROM %s i WHERE %s"
        days = "%s UNION %s" % (pairs % (_range_day(False, "i.created_at"), items, " AND ".join(where + [ok])),
                                pairs % (_range_day(False, "i.created_at"), 'temp."%s"' % CHANGED_ITEMS, ok))
        return ChangeFold([('CREATE TEMP TABLE "%s" AS %s' % (changed, days), True)], [], DAY_CHANGES.triggers[1],
                          [_bump_sql('SELECT * FROM temp."%s"' % changed)], [changed])
    family, groups, upsert, range_column = _CHANGE_FOLDS[name]
    gone, came = "psai_fold_%s_gone" % name, "psai_fold_%s_came" % name
    held = where + [ok]
    if family is ROLLUPS:  # as its row trigger: an item marked unfolded is unmarked, not folded out
        held.append("NOT EXISTS (SELECT 1 FROM %s u WHERE u.item_id = i.id)" % quoted(UNFOLDED_TABLE))
    prepare = [('CREATE TEMP TABLE "%s" AS %s' % (gone, groups(r, held, source=items)), True),
               ('CREATE TEMP TABLE "%s" AS %s' % (came, groups(r, [ok], source='temp."%s"' % CHANGED_ITEMS)), False)]
    before = [upsert(r, 'SELECT * FROM temp."%s"' % gone, -1),
              'DELETE FROM "%s" WHERE "%s" IN (SELECT "%s" FROM temp."%s") AND "calls" = 0' % (
                  family.table, family.range_column, range_column, gone)]
    after = [upsert(r, 'SELECT * FROM temp."%s"' % came, 1)]
    temporary = [gone, came]
    if family is ROLLUPS:  # and those whose time cannot be folded are marked again
        unfolded, all_of = quoted(UNFOLDED_TABLE), " AND ".join(where) or "1 = 1"
        prepare += [('CREATE TEMP TABLE "psai_fold_marked" AS SELECT u.item_id FROM %s u JOIN %s i ON i.id = '
                     'u.item_id WHERE %s' % (unfolded, items, all_of), True),
                    ('CREATE TEMP TABLE "psai_fold_odd" AS SELECT i.id FROM %s i WHERE %s AND NOT %s'
                     % (items, all_of, ok), True)]
        before.append('DELETE FROM %s WHERE item_id IN (SELECT item_id FROM temp."psai_fold_marked")' % unfolded)
        after.append("INSERT INTO %s (item_id, reason) SELECT id, '%s' FROM temp.\"psai_fold_odd\""
                     % (unfolded, _ODD_TIME))
        temporary += ["psai_fold_marked", "psai_fold_odd"]
    return ChangeFold(prepare, before, family.triggers[1], after, temporary)


def slot_rebuild_sql(r, where):
    """Insert the slot rows of the items meeting ``where`` (``i``): ``slot_groups_sql``'s."""
    return 'INSERT INTO %s (%s) SELECT g."connector_id", %s, %s FROM (%s) g' % (
        quoted(SLOT_TABLE), _SLOT_COLUMNS, ", ".join("g.%s" % quoted(c) for c in SLOT_KEYS + BUDGET_SUMS),
        _slot_key(r.postgres), slot_groups_sql(r, where))


def slot_sums_sql(r, where):
    """The slot rows the items meeting ``where`` (``i``) add up to, as
    ``slot_rows_sql`` reads the kept ones: (range_slot, SLOT_KEYS, BUDGET_SUMS)."""
    return 'SELECT g."connector_id", %s FROM (%s) g' % (
        ", ".join("g.%s" % quoted(c) for c in SLOT_KEYS + BUDGET_SUMS), slot_groups_sql(r, where))


def slot_rows_sql(where):
    """Slot rows (range_slot, SLOT_KEYS, BUDGET_SUMS) meeting ``where``, for verify."""
    return 'SELECT %s FROM %s WHERE %s' % (", ".join(quoted(c) for c in ("range_slot",) + SLOT_KEYS + BUDGET_SUMS),
                                           quoted(SLOT_TABLE), " AND ".join(where) or "1 = 1")


def slot_thresholds_sql(where):
    """The models' thresholds the slot rows of items without a snapshot were split by."""
    return ('SELECT DISTINCT "model_id", "model_threshold" FROM %s WHERE "model_priced" = 1 AND %s'
            % (quoted(SLOT_TABLE), " AND ".join(where) or "1 = 1"))


def budget_sums_sql(table, where, by_day=False):
    """The rows of a rollup table (the daily rollups or the slots) meeting
    ``where`` added up by BUDGET_GROUP and the model's threshold that split
    rows of items without a snapshot (``model_priced``, that threshold): the
    keys, those two, then BUDGET_SUMS; ``by_day``: per day too (a daily
    table's), the day first."""
    keys = ", ".join([quoted(c) for c in ("range_day",) * by_day + BUDGET_GROUP + ("model_priced",)]
                     + ['CASE WHEN "model_priced" = 1 THEN "model_threshold" END'])
    return 'SELECT %s, %s FROM %s WHERE %s GROUP BY %s' % (
        keys, ", ".join("SUM(%s)" % quoted(c) for c in BUDGET_SUMS), quoted(table), " AND ".join(where) or "1 = 1",
        keys)
