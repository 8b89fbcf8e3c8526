"""Recording token usage and reporting what it cost.

``record_usage`` records one call as PolicySynth 1.3.172 does: a
``ps_model_usage_item`` with the prices in force (``psai.items``), and its
tokens added to the counters of ``ps_model_usage`` (one row per model,
agent, connector and UTC day). ``cost_report`` prices every call from its
own item, adding calls priced alike up in SQL first; counter usage no item
covers is priced by the price history. Exact ``Decimal`` arithmetic.
"""
import bisect
import datetime
import json
import math
from collections import defaultdict, deque
from decimal import Decimal

from peewee import Cast

from .db import execute_prepared, is_postgres, lock, lock_id, model_db, table_columns, write_transaction
from .errors import NotFoundError, UnpricedUsageError, ValidationError
from .fields import UTC, utcnow
from .items import BUCKETS, bucket_cost, effective_prices, item_data, price_problem
from .models import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, strict_json_dumps
from .pricing import COUNTERS, cost_breakdown, partition_usage

__all__ = ["record_usage", "cost_report", "report_totals", "usage_counters", "REPORT_GROUPINGS", "model_cost",
           "UnpricedUsageError", "NO_AGENT", "daily_costs"]

REPORT_GROUPINGS = ("model", "agent", "tree", "provider", "day")

# PolicySynth's counters are 32-bit INTEGER columns.
MAX_COUNTER = 2 ** 31 - 1
# ps_model_usage_item.agent_id for usage without an agent (NOT NULL there).
NO_AGENT = 0


def _model(model):
    return model if isinstance(model, PsAiModel) else PsAiModel.get_by_key(model)


def _agent(agent):
    if agent is None or isinstance(agent, PsAgent):
        return agent
    return PsAgent.get_by_key(agent)


def _check_counts(counts):
    """One rule for every count a caller gives (record_usage, model_cost): a
    number, finite, 0 or more, at most what one counter column holds."""
    errors = {}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors[name] = ["Not a number."]
        elif isinstance(value, float) and not math.isfinite(value) or value < 0:
            errors[name] = ["Must be a finite number, 0 or more."]
        elif value > MAX_COUNTER:  # compared as given: math.isfinite(10**400) would overflow
            errors[name] = ["Too large for one call: at most %d." % MAX_COUNTER]
    if errors:
        raise ValidationError(errors)


def _check_ids(ids):
    """Ids a caller gives for columns: integers that fit PostgreSQL's INTEGER
    (SQLite would store text or huge numbers where PolicySynth cannot read them)."""
    errors = {}
    for name, value in ids.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            errors[name] = ["Not an integer."]
        elif not -MAX_COUNTER - 1 <= value <= MAX_COUNTER:
            errors[name] = ["Out of range for an INTEGER column (at most %d)." % MAX_COUNTER]
    if errors:
        raise ValidationError(errors)


def _round_half_up(value):
    # Half up, as JavaScript's Math.round: whole tokens for the integer counters.
    return int(math.floor(value + 0.5))


def _day_bounds(moment):
    start = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    return start, start + datetime.timedelta(days=1)


CACHE_WRITE_COUNTERS = {"token_in_cache_write_count": "token_in_count",
                        "long_context_token_in_cache_write_count": "long_context_token_in_count"}


def usage_counters(db=None):
    """The counters this database's ps_model_usage has. psai creates all 14;
    a table made by PolicySynth's npm release has 12, without the cache-write
    counters, and psai works with it as it is (see ``record_usage``)."""
    columns = table_columns(db or model_db(PsModelUsage), PsModelUsage._meta.table_name)
    return tuple(name for name in COUNTERS if name in columns)


def record_usage(model, agent=None, *, tokens_in=0, tokens_out=0, cached_tokens=0, cache_write_tokens=0,
                 reasoning_tokens=0, audio_tokens=0, image_tokens=0, web_searches=0, user_id=None,
                 connector_id=None, provider_metadata=None):
    """Record one call: add its tokens to the usage counters of (model,
    agent) and write its ``ps_model_usage_item`` with the model's prices as
    stored at that moment, in one transaction.

    The counts are the provider's totals, as ``psai.pricing.estimate_cost``
    takes them (rounded half up to whole tokens); they are partitioned like
    PolicySynth does (long context when ``tokens_in`` reaches the model's
    threshold). ``provider_metadata`` is what the provider reported, e.g.
    ``{"appliedServiceTier": "flex"}``: reports price the tier applied.
    Safe when several processes record at once, and against a concurrent
    price change: the call is priced either before it or after it. Returns
    the counter row.

    On a ps_model_usage table without the cache-write counters (PolicySynth's
    npm release), cache-write tokens are added to the ordinary input counters,
    as that release itself counts them. On a database without
    ps_model_usage_item (a PolicySynth older than items), only the counters
    are written.
    """
    counts = dict(tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached_tokens,
                  cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
                  audio_tokens=audio_tokens, image_tokens=image_tokens, web_searches=web_searches)
    _check_counts(counts)
    _check_ids({"user_id": user_id, "connector_id": connector_id})
    if provider_metadata is not None:
        from .schemas import json_problem
        problem = "Must be a dict, e.g. {'appliedServiceTier': 'flex'}." if not isinstance(provider_metadata, dict) \
            else json_problem(provider_metadata)
        if problem:
            raise ValidationError({"provider_metadata": [problem]})
    counts = {name: _round_half_up(value) for name, value in counts.items()}
    web_searches = counts.pop("web_searches")
    model, agent = _model(model), _agent(agent)
    db = model_db(PsModelUsage)
    present = usage_counters(db)
    with_items = bool(table_columns(db, PsModelUsageItem._meta.table_name))
    if user_id is None:
        user_id = agent.user_id if agent is not None else model.user_id
    agent_id = agent.id if agent is not None else None
    keys = (model.id, agent_id, connector_id)
    call = dict(counts, model_id=model.id, user_id=user_id, agent_id=agent_id, connector_id=connector_id,
                web_searches=web_searches, provider_metadata=provider_metadata)
    if is_postgres(db) and with_items and not db.in_transaction() and isinstance(model.configuration, dict):
        returned = _record_in_one_round_trip(db, present, model.configuration, call)
        if returned is not None:
            return _usage_row(present, returned)
    find, update, insert = _usage_statements(db, present, agent_id is None, connector_id is None)
    with write_transaction(db):
        lock(db, keys)
        # The prices as stored now, not as this object last saw them; the
        # shared lock makes a concurrent price change wait for this call.
        configuration = _stored_configuration(db, model)
        now = utcnow()  # after the lock: a price change is wholly before or after the call
        params = _statement_params(call, *_call_rows(configuration, present, with_items, now, call), now)
        row = db.execute_sql(find, params["find"]).fetchone()
        if row is None:
            cursor = db.execute_sql(insert, params["insert"])
        else:
            cursor = db.execute_sql(update, params["update"] + [row[0]])
        returned = cursor.fetchone()
        if with_items:
            db.execute_sql(_item_insert(db), params["item"])
    return _usage_row(present, returned)


def _stamp(moment):
    return PsModelUsage.created_at.db_value(moment)


def _statement_params(call, values, data, now):
    """The parameters of record_usage's statements for one call, by
    statement: find the day's counter row, insert one, update one (its id
    last, not here), insert the item."""
    start, end = _day_bounds(now)
    stamp = _stamp(now)
    keys = (call["model_id"], call["agent_id"], call["connector_id"])
    return {
        # A row with no room left for these counts (32-bit counters) is not
        # found, and a new one is started: reports add all rows up.
        "find": [v for v in keys if v is not None] + [_stamp(start), _stamp(end)]
                + [MAX_COUNTER - count for count in values],
        "insert": list(keys) + [call["user_id"], stamp, stamp] + values,
        "update": values + [stamp],
        "item": [call["user_id"], stamp, stamp, call["model_id"], call["agent_id"] or NO_AGENT,
                 call["connector_id"], data],
    }


def _call_rows(configuration, present, with_items, now, call):
    """(counter values in the order of ``present``, the item's JSON text or
    None) of one call priced with ``configuration``."""
    prices = configuration.get("prices") if isinstance(configuration.get("prices"), dict) else {}
    counts = {name: call[name] for name in _RECORDED_COUNTS}
    counters = partition_usage(long_context_threshold=prices.get("longContextTokenThreshold"), **counts)
    for name, fallback in CACHE_WRITE_COUNTERS.items():
        if name not in present:
            counters[fallback] += counters.pop(name)
    data = None
    if with_items:
        data = strict_json_dumps(item_data(configuration=configuration, moment=now, **call))
    return [counters[name] for name in present], data


_RECORDED_COUNTS = ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
                    "audio_tokens", "image_tokens")


def _record_in_one_round_trip(db, present, configuration, call):
    """PostgreSQL, outside a transaction: record the call in one round trip,
    priced with the configuration the caller's model object holds, on
    condition that it is still the stored one (compared as jsonb, under the
    share lock the general path takes). One message of two statements: the
    advisory lock, then a prepared statement that finds or starts the day's
    counter row, adds to it and writes the item. PostgreSQL runs a message
    of several statements as one transaction, and psycopg2 (autocommit, as
    peewee runs it) adds no BEGIN or COMMIT round trip. The lock is its own
    statement so that the next one's snapshot sees the rows written by the
    writer it waited for.

    Returns the counter row, or None when the stored configuration differs
    (or the model is gone): nothing was written, and the general path takes
    over."""
    agent_id, connector_id = call["agent_id"], call["connector_id"]
    now = utcnow()
    statements = _statement_params(call, *_call_rows(configuration, present, True, now, call), now)
    params = ([lock_id((call["model_id"], agent_id, connector_id)), call["model_id"],
               strict_json_dumps(configuration)]
              + statements["find"] + statements["update"] + statements["insert"] + statements["item"])
    lock_sql, record_sql = _one_round_trip_statements(present, agent_id is None, connector_id is None)
    return execute_prepared(db, record_sql, params, before=lock_sql + "; ").fetchone()


def _one_round_trip_statements(present, agent_is_null, connector_is_null):
    """(the lock, the statement that records the call), built once."""
    key = ("one round trip", present, agent_is_null, connector_is_null)
    if key not in _USAGE_SQL:
        find, _update, _insert = _usage_statements(db=None, present=present, agent_is_null=agent_is_null,
                                                   connector_is_null=connector_is_null, postgres=True)
        columns = ", ".join('"%s"' % c for c in _ROW_COLUMNS + present)
        counters = ("model_id", "agent_id", "connector_id", "user_id", "created_at", "updated_at") + present
        casts = ["%s::integer"] * 4 + ["%s::timestamptz"] * 2 + ["%s::integer"] * len(present)
        _USAGE_SQL[key] = "SELECT pg_advisory_xact_lock(%s)", (
            'WITH m AS (SELECT "id" FROM "ps_ai_models" WHERE "id" = %s AND "configuration" = %s::jsonb FOR SHARE), '
            'found AS ({find}), '
            'updated AS (UPDATE "ps_model_usage" SET {add}, "updated_at" = %s '
            'WHERE "id" = (SELECT "id" FROM found) RETURNING {columns}), '
            'inserted AS (INSERT INTO "ps_model_usage" ({counters}) SELECT {casts} FROM m '
            'WHERE NOT EXISTS (SELECT 1 FROM found) RETURNING {columns}), '
            'item AS (INSERT INTO "ps_model_usage_item" ("user_id", "created_at", "updated_at", "model_id", '
            '"agent_id", "connector_id", "data") SELECT %s::integer, %s::timestamptz, %s::timestamptz, '
            '%s::integer, %s::integer, %s::integer, %s::jsonb FROM m) '
            'SELECT * FROM updated UNION ALL SELECT * FROM inserted').format(
                find=find.replace('WHERE ', 'WHERE EXISTS (SELECT 1 FROM m) AND ', 1),
                add=", ".join('"{0}" = "{0}" + %s'.format(c) for c in present), columns=columns,
                counters=", ".join('"%s"' % c for c in counters), casts=", ".join(casts))
    return _USAGE_SQL[key]


def _stored_configuration(db, model):
    sql = 'SELECT "configuration" FROM "ps_ai_models" WHERE "id" = %s' % ("%s" if is_postgres(db) else "?")
    if is_postgres(db):
        sql += " FOR SHARE"
    row = db.execute_sql(sql, (model.id,)).fetchone()
    if row is None:
        raise NotFoundError("PsAiModel %s does not exist" % model.id)
    configuration = PsAiModel.configuration.python_value(row[0])
    return configuration if isinstance(configuration, dict) else {}


def _item_insert(db):
    # The data is psai's own strict, minified JSON: SQLite need not parse it again with json().
    p = "%s" if is_postgres(db) else "?"
    return ('INSERT INTO "ps_model_usage_item" ("user_id", "created_at", "updated_at", "model_id", "agent_id", '
            '"connector_id", "data") VALUES (%s)' % ", ".join([p] * 7))


_ROW_COLUMNS = ("id", "user_id", "created_at", "updated_at", "model_id", "agent_id", "connector_id")


_USAGE_SQL = {}


def _usage_statements(db, present, agent_is_null, connector_is_null, postgres=None):
    """record_usage's three statements for this kind of database, built
    once: the hot path of every agent call should not pay for building SQL."""
    cache = _USAGE_SQL
    postgres = is_postgres(db) if postgres is None else postgres
    key = (postgres, present, agent_is_null, connector_is_null)
    if key not in cache:
        p = "%s" if postgres else "?"
        returning = " RETURNING " + ", ".join('"%s"' % c for c in _ROW_COLUMNS + present)
        find = ('SELECT "id" FROM "ps_model_usage" WHERE "model_id" = {p} AND "agent_id" {agent} '
                'AND "connector_id" {connector} AND "created_at" >= {p} AND "created_at" < {p} {room}'
                'ORDER BY "id" LIMIT 1').format(
                    p=p, agent="IS NULL" if agent_is_null else "= " + p,
                    connector="IS NULL" if connector_is_null else "= " + p,
                    room="".join('AND "%s" <= %s ' % (c, p) for c in present))
        update = ('UPDATE "ps_model_usage" SET %s, "updated_at" = {p} WHERE "id" = {p}'
                  % ", ".join('"{0}" = "{0}" + {{p}}'.format(c) for c in present)).format(p=p) + returning
        columns = ("model_id", "agent_id", "connector_id", "user_id", "created_at", "updated_at") + present
        insert = 'INSERT INTO "ps_model_usage" (%s) VALUES (%s)' % (
            ", ".join('"%s"' % c for c in columns), ", ".join([p] * len(columns))) + returning
        cache[key] = (find, update, insert)
    return cache[key]


def _usage_row(present, values):
    """A PsModelUsage from a RETURNING row."""
    fields = PsModelUsage._meta.columns
    data = {}
    for column, value in zip(_ROW_COLUMNS + present, values):
        field = fields[column]
        data[field.name] = field.python_value(value)
    row = PsModelUsage(__no_default__=True, **data)
    row._dirty.clear()
    return row


def _call_context(configuration):
    """How a model's calls are priced, from its configuration: the keyword
    arguments resolve_prices and cost_breakdown take besides the prices."""
    return {"provider": configuration.get("provider"),
            "inference_type": configuration.get("inferenceType"),
            "regional_processing": configuration.get("regionalProcessing")}


_CALL_COUNTS = ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
                "audio_tokens", "image_tokens", "web_searches")


_BY_KEY_SQL = {}
# Configurations as read, by the JSON text stored: a row read again whose
# text has not changed is not parsed and checked again (the row itself is
# always read afresh, so a price another process changed is seen at once).
_PARSED = {}
_PARSED_MAX = 512


def _parsed(text):
    """(configuration, prices, price problem) of a configuration's JSON text."""
    found = _PARSED.get(text)
    if found is None:
        try:
            configuration = json.loads(text)
        except ValueError:  # SQLite's text may not be JSON: read as the JSON field reads it, unchanged
            configuration = text
        found = _checked_configuration(configuration)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[text] = found
    return found


def _checked_configuration(configuration):
    configuration = configuration if isinstance(configuration, dict) else {}
    prices = configuration.get("prices")
    return configuration, prices, price_problem(prices)


def _stored(key):
    """``(id, (configuration, prices, price problem))`` of the model with this
    id or uuid, as stored now: one statement (built by peewee once per
    backend and key kind), no row object. The configuration may be shared
    with other calls: read it, never change it."""
    field, value = PsAiModel.key_field(key)
    db = model_db(PsAiModel)
    postgres = is_postgres(db)
    cache_key = (postgres, field.name)
    sql = _BY_KEY_SQL.get(cache_key)
    if sql is None:
        # The configuration as text on PostgreSQL too (psycopg2 would parse
        # jsonb on every call): parsed once per distinct text by _parsed.
        configuration = Cast(PsAiModel.configuration, "text") if postgres else PsAiModel.configuration
        sql = _BY_KEY_SQL[cache_key] = PsAiModel.select(PsAiModel.id, configuration).where(field == value).sql()[0]
    params = (field.db_value(value),)
    if postgres:
        cursor = execute_prepared(db, sql, params)  # parsed and planned once per connection
    else:
        cursor = db.cursor()  # peewee's cursor on the thread's connection: the statement is built already
        cursor.execute(sql, params)
    row = cursor.fetchone()
    if row is None:
        raise NotFoundError("PsAiModel %s does not exist" % key)
    return row[0], _parsed(row[1])


def model_cost(model, **usage):
    """``psai.pricing.cost_breakdown`` for a stored model (a row, an id or a
    uuid): its prices, with its provider, inference type and region unless
    given. Counts follow ``record_usage``'s rule (a bad count is a
    ValidationError, not 0), and prices that cannot price a call are a
    ValidationError, not a cost of 0."""
    _check_counts({name: value for name, value in usage.items() if name in _CALL_COUNTS})
    if isinstance(model, PsAiModel):
        model_id = model.id
        configuration, prices, problem = _checked_configuration(model.configuration)
    else:
        model_id, (configuration, prices, problem) = _stored(model)
    if problem:
        raise ValidationError({"prices": ["Model %s cannot be priced: %s." % (model_id, problem)]})
    usage = dict(_call_context(configuration), **usage)
    return cost_breakdown(prices, **usage)


# -- reports -------------------------------------------------------------------
#
# Every call is priced from its own item: the prices stored with it, the tier
# the provider applied, its own long-context split. The SQL adds up calls
# that are priced alike (same model, snapshot, tier and split), so Python
# prices groups, not rows, and the sums stay exact (cost is linear in the
# counts of a group). Counter usage that no item covers (recorded before
# items existed, or by other tools) is priced by the price version in force
# when its counter row was started, else by the model's current prices.

class _JsonSQL:
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


def _window(db, column, since, until, model_ids, params):
    """WHERE clauses for a period and a set of models (params appended)."""
    p = "%s" if is_postgres(db) else "?"
    field = PsModelUsageItem.created_at
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
_ITEM_VALUES = (
    ("provider", ("provider",), "string"),
    ("applied_service_tier", ("providerMetadata", "appliedServiceTier"), "string"),
    ("applied_speed", ("providerMetadata", "appliedSpeed"), "string"),
    ("tin", ("usageNormalized", "tokensIn"), "number"),
    ("cached", ("usageNormalized", "cachedInTokens"), "number"),
    ("cw", ("psai", "cacheWriteTokens"), "number"),
    ("tout", ("usageNormalized", "tokensOut"), "number"),
    ("reasoning", ("usageNormalized", "reasoningTokens"), "number"),
    ("audio", ("usageNormalized", "audioTokens"), "number"),
    ("image", ("usageNormalized", "imageTokens"), "number"),
    ("web", ("psai", "webSearches"), "number"),
    ("pricing", ("pricing",), "object"),
    ("configured", ("pricing", "configuredPrices"), "object"),
    ("threshold", ("pricing", "configuredPrices", "longContextTokenThreshold"), "number"),
)
_MODEL_THRESHOLD = ("prices", "longContextTokenThreshold")
_KINDS = dict({name: kind for name, _path, kind in _ITEM_VALUES}, model_threshold="number")


class _ItemReader:
    """Reading items' data for reports, in two steps, each a subquery:
    ``select(names)`` reads each JSON value once a row, and the typed
    values (``value``, ``count``, ``is_a``) are read from its columns. A
    value of the wrong type reads as absent and a count as 0 (as
    ``_JsonSQL`` does), so one odd row cannot fail a report.

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
        self.j = _JsonSQL(postgres)
        # A column to add and a clause to end a subquery with, that fence it.
        self.fence_column = ", clock_timestamp() AS fence" if postgres else ""
        self.fence = "" if postgres else " LIMIT -1 OFFSET 0"

    def _raw(self, column, path):
        if self.postgres:
            return column + "".join(" -> '%s'" % key for key in path)
        sql = "%s -> '$.%s'" % (column, ".".join(path))
        return sql if column != "i.data" else "(CASE WHEN json_valid(i.data) THEN %s END)" % sql

    def select(self, names, where, model_threshold=False):
        """The first step: the items' key columns and ``v_<name>`` for each
        value named (and the model's current long-context threshold)."""
        paths = {name: path for name, path, _kind in _ITEM_VALUES}
        columns = ["i.model_id", "i.agent_id", "i.connector_id", "i.created_at"]
        columns += ["%s AS v_%s" % (self._raw("i.data", paths[name]), name) for name in names]
        join = ""
        if model_threshold:
            columns.append("%s AS v_model_threshold" % self._raw("m.configuration", _MODEL_THRESHOLD))
            join = ' LEFT JOIN "ps_ai_models" m ON m.id = i.model_id'
        return 'SELECT %s%s FROM "ps_model_usage_item" i%s%s%s' % (
            ", ".join(columns), self.fence_column, join, " WHERE " + " AND ".join(where) if where else "",
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

    def count(self, name):
        """A count: the number if it is one above 0, else 0. (SQLite: only a
        number's JSON text starts with a digit or "-", and CAST reads any
        other text as 0.)"""
        if self.postgres:
            return "coalesce(GREATEST(%s, 0), 0)" % self.value(name)
        return "coalesce(max(CAST(v_%s AS NUMERIC), 0), 0)" % name


def _item_groups(db, keys=(), since=None, until=None, model_ids=None, agents=None, totals=None):
    """Items added up in SQL by model, ``keys`` (among agent, connector and
    day, the UTC day) and everything that decides their price. One dict a
    group; ``agent_id`` is None for usage without an agent or whose agent
    was deleted (``agents``: the ids that exist, when the caller has them).

    ``totals``, a ``defaultdict(lambda: [0, 0])``, gets the items' input and
    output tokens per (model, agent, connector) from the same pass: what
    ``_uncovered_counters`` compares with the counters."""
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return []
    r = _ItemReader(is_postgres(db))
    params = []
    read = r.select([name for name, _path, _kind in _ITEM_VALUES],
                    _window(db, "i.created_at", since, until, model_ids, params), model_threshold=True)
    # Rows that differ only by the agent and connector asked for by
    # ``totals`` and not by ``keys`` are added up in Python.
    extra = () if totals is None else tuple(k for k in ("agent", "connector") if k not in keys)
    grouped = tuple(keys) + extra
    columns = {
        "model_id": "model_id",
        "agent_id": "agent_id" if "agent" in grouped else None,
        "connector_id": "connector_id" if "connector" in grouped else None,
        "day": r.j.day("created_at") if "day" in grouped else None,
        "provider": r.value("provider"),
        "pricing": r.value("pricing"),
        "applied_service_tier": r.value("applied_service_tier"),
        "applied_speed": r.value("applied_speed"),
        # Readable: token counts, the input total a number (an item whose
        # counts are text is not priced as 0 tokens, nor guessed).
        "has_usage": "(CASE WHEN %s THEN 1 ELSE 0 END)" % r.is_a("tin"),
        "tin": r.count("tin"), "cached": r.count("cached"), "cw": r.count("cw"), "tout": r.count("tout"),
        "parts": " + ".join(r.count(name) for name in ("reasoning", "audio", "image")),
        "web": r.count("web"),
        # The call's own prices' threshold; for an item without a snapshot,
        # the model's current prices'.
        "threshold": "(CASE WHEN %s THEN %s ELSE %s END)" % (
            r.is_a("configured"), r.value("threshold"), r.value("model_threshold")),
    }
    columns = {name: sql for name, sql in columns.items() if sql is not None}
    # The second step fenced as the first: its columns are used several times.
    typed = "SELECT %s%s FROM (%s) r%s" % (", ".join("%s AS %s" % (sql, name) for name, sql in columns.items()),
                                            r.fence_column, read, r.fence)
    group = [name for name in columns if name not in ("tin", "cached", "cw", "tout", "parts", "web", "threshold")]
    group.append("long")
    sums = ["COUNT(*)", "SUM(%s)" % r.j.greatest("tin - cached - cw", "0"), "SUM(cached)", "SUM(cw)",
            "SUM(%s + parts)" % r.j.greatest("tout - parts", "0"), "SUM(web)", "SUM(tin)", "SUM(tout)"]
    sql = ("SELECT %s, %s FROM (SELECT c.*, CASE WHEN threshold > 0 AND tin >= threshold THEN 1 ELSE 0 END AS long "
           "FROM (%s) c) g GROUP BY %s" % (", ".join(group), ", ".join(sums), typed, ", ".join(group)))
    if agents is None and "agent" in grouped:
        agents = _agent_ids(db)
    # The columns of a group, without the extra ones.
    keep = [i for i, name in enumerate(group) if name not in {k + "_id" for k in extra}]
    names = [group[i] for i in keep]
    agent_at = group.index("agent_id") if "agent" in grouped else None
    connector_at = group.index("connector_id") if "connector" in grouped else None
    width = len(group)
    merged = {}
    for values in db.execute_sql(sql, params):
        if agent_at is not None and values[agent_at] not in agents:
            values = values[:agent_at] + (None,) + values[agent_at + 1:]
        # Sums as exact numbers (SQLite sums REAL values as floats).
        sums = [value if type(value) is not float else _number(value) for value in values[width:]]
        if totals is not None:
            entry = totals[(values[0], values[agent_at], values[connector_at])]
            entry[0] += sums[6] or 0
            entry[1] += sums[7] or 0
        key = tuple(values[i] for i in keep) if extra else values[:width]
        into = merged.get(key)
        if into is None:
            merged[key] = sums
        else:
            for i in range(6):
                into[i] += sums[i] or 0
    pricing_at = names.index("pricing")
    parsed = {}
    rows = []
    for key, sums in merged.items():
        row = dict(zip(names, key))
        prefix = "long_" if row.pop("long") else ""
        row["calls"] = sums[0]
        row["buckets"] = dict.fromkeys(BUCKETS, 0)
        for bucket, value in zip(("in", "cached", "cache_write", "out"), sums[1:5]):
            row["buckets"][prefix + bucket] = _number(value)
        row["web"] = int(sums[5] or 0)
        # Pricing is JSON text: parsed once for each distinct text, and with
        # the tier applied, what tells groups priced alike without comparing dicts.
        pricing = key[pricing_at]
        row["price_key"] = (pricing, row["applied_service_tier"], row["applied_speed"])
        if pricing is not None:
            if pricing not in parsed:
                parsed[pricing] = json.loads(pricing)
            row["pricing"] = parsed[pricing]
        rows.append(row)
    return rows


def _agent_ids(db):
    """The ids of the agents that exist: usage of a deleted agent (or of
    none, agent_id 0 in an item) is reported without one, as
    ps_model_usage's ON DELETE SET NULL has it."""
    return {row[0] for row in db.execute_sql('SELECT "id" FROM "ps_agents"').fetchall()}


def _number(value):
    """A sum from SQL as an exact number (SQLite sums floats as REAL)."""
    if value is None:
        return 0
    if isinstance(value, float):
        return int(value) if value.is_integer() else Decimal(repr(value))
    return int(value) if isinstance(value, Decimal) and value == value.to_integral_value() else value


_BUCKET_COUNTER_NAMES = {
    "in": ("token_in_count",), "cached": ("token_in_cached_context_count",),
    "cache_write": ("token_in_cache_write_count",), "long_in": ("long_context_token_in_count",),
    "long_cached": ("long_context_token_in_cached_context_count",),
    "long_cache_write": ("long_context_token_in_cache_write_count",),
    "out": ("token_out_count", "token_out_reasoning_count", "token_out_audio_count", "token_out_image_count"),
    "long_out": ("long_context_token_out_count", "long_context_token_out_reasoning_count",
                 "long_context_token_out_audio_count", "long_context_token_out_image_count"),
}


def _bucket_reader(present):
    """A function from counter values (a sequence in the order of
    ``present``: a row or its sums) to BUCKETS. Output counters are one
    bucket: they share the output rate."""
    position = {name: i for i, name in enumerate(present)}
    spec = [(bucket, [position[n] for n in names if n in position]) for bucket, names in _BUCKET_COUNTER_NAMES.items()]

    def read(values):
        return {bucket: sum(int(values[i] or 0) for i in indexes) for bucket, indexes in spec}
    return read


def _item_totals(db, agents, model_ids=None):
    """Input and output tokens of all items per (model, agent, connector):
    the light pass that tells which counters the items cover."""
    totals = defaultdict(lambda: [0, 0])
    if not table_columns(db, PsModelUsageItem._meta.table_name):
        return totals
    r = _ItemReader(is_postgres(db))
    params = []
    read = r.select(["tin", "tout"], _window(db, "i.created_at", None, None, model_ids, params))
    for model_id, agent_id, connector_id, tokens_in, tokens_out in db.execute_sql(
            'SELECT model_id, agent_id, connector_id, SUM(%s), SUM(%s) FROM (%s) r '
            'GROUP BY model_id, agent_id, connector_id' % (r.count("tin"), r.count("tout"), read), params):
        entry = totals[(model_id, agent_id if agent_id in agents else None, connector_id)]
        entry[0] += _number(tokens_in)
        entry[1] += _number(tokens_out)
    return totals


def _uncovered_counters(db, by, agents, since=None, until=None, model_ids=None, itemized=None):
    """Counter usage in [since, until) that no item accounts for, as pieces
    of counter rows.

    Items and counters are compared per (model, agent, connector). Where
    there are no items at all (usage recorded before items, or by other
    tools), every counter row is uncovered, and SQL adds the rows up by
    price period (``_untouched_pieces``). Where there are items, but fewer
    tokens than the counters hold, what the items add up to is taken off
    the newest counter rows first (items came later than counters), bucket
    by bucket, and what is left of each row is its uncovered part. Items
    beyond the counters (a counter write that failed) count as they are:
    the items are the record of the calls. ``itemized``: the items' totals
    per (model, agent, connector), when the caller has them already."""
    present = usage_counters(db)
    p = "%s" if is_postgres(db) else "?"
    # A row with a negative counter (written by hand) is not counted: it is
    # reported unpriced (_negative_counters).
    sound = "NOT (%s)" % " OR ".join("%s < 0" % c for c in present)
    where, params = " WHERE " + sound, []
    if model_ids is not None:
        where += " AND model_id IN (%s)" % (", ".join([p] * len(model_ids)) or "NULL")
        params = list(model_ids)
    if itemized is None:
        itemized = _item_totals(db, agents, model_ids)
    if not itemized:  # no items at all (a database from before them): every row is uncovered
        return _untouched_pieces(db, by, since, until, None, agents, sound, model_ids)
    read = _bucket_reader(present)
    # Input and output tokens of the counters per (model, agent, connector).
    output = {c for bucket in ("out", "long_out") for c in _BUCKET_COUNTER_NAMES[bucket]}
    counted = defaultdict(lambda: [0, 0])
    for model_id, agent_id, connector_id, tokens_in, tokens_out in db.execute_sql(
            'SELECT model_id, agent_id, connector_id, SUM(%s), SUM(%s) FROM "ps_model_usage"%s '
            'GROUP BY model_id, agent_id, connector_id' % (
                # BIGINT: PostgreSQL adds 32-bit counters in 32 bits, and two full ones overflow.
                " + ".join("CAST(%s AS BIGINT)" % c for c in present if c not in output),
                " + ".join("CAST(%s AS BIGINT)" % c for c in present if c in output), where), params):
        entry = counted[(model_id, agent_id if agent_id in agents else None, connector_id)]
        entry[0] += int(tokens_in)
        entry[1] += int(tokens_out)
    if not counted:
        return []
    short = {key for key, (tokens_in, tokens_out) in counted.items()
             if tokens_in > itemized.get(key, (0, 0))[0] or tokens_out > itemized.get(key, (0, 0))[1]}
    untouched = {key for key in short if key not in itemized}
    pieces = _untouched_pieces(db, by, since, until, untouched, agents, sound) if untouched else []
    partly = short - untouched
    if not partly:
        return pieces
    models = sorted({key[0] for key in partly})
    folded = "token_in_cache_write_count" not in present
    covered = defaultdict(lambda: dict.fromkeys(BUCKETS, 0))
    for group in _item_groups(db, ("agent", "connector"), model_ids=models, agents=agents):
        into = covered[(group["model_id"], group["agent_id"], group["connector_id"])]
        for bucket, value in group["buckets"].items():
            if folded and bucket.endswith("cache_write"):
                bucket = bucket.replace("cache_write", "in")  # how such a table counted them
            into[bucket] += value
    rows = db.execute_sql(
        'SELECT model_id, agent_id, connector_id, created_at, %s FROM "ps_model_usage" WHERE model_id IN (%s) '
        'AND %s ORDER BY created_at DESC, id DESC' % (", ".join(present), ", ".join([p] * len(models)), sound),
        models).fetchall()
    for values in rows:
        key = (values[0], values[1] if values[1] in agents else None, values[2])
        if key not in partly:
            continue
        remaining = covered[key]
        buckets = read(values[4:])
        piece = {}
        for bucket in BUCKETS:
            taken = min(buckets[bucket], remaining[bucket])
            remaining[bucket] -= taken
            piece[bucket] = buckets[bucket] - taken
        created_at = PsModelUsage.created_at.python_value(values[3])
        if any(piece.values()) and (since is None or created_at >= since) and (until is None or created_at < until):
            pieces.append({"model_id": key[0], "agent_id": key[1], "connector_id": key[2],
                           "created_at": created_at, "buckets": piece})
    return pieces


def _price_moments(histories):
    """For each model, the moments where the prices in force may change (a
    version or a correction begins or ends): usage between the same two of
    them is priced alike."""
    return {model_id: sorted({t for v in history for t in (v["valid_from"], v["valid_to"]) if t is not None}
                             | {t for c in corrections for t in (c["since"], c["until"]) if t is not None})
            for model_id, (history, corrections) in histories.items()}


MAX_PERIOD_BRANCHES = 400


def _untouched_pieces(db, by, since, until, keys, agents, sound, model_ids=None):
    """The counter rows of ``keys`` (keys with no item at all; None: every
    row), added up in SQL by key, price period (and day), each sum a piece
    dated by its first row. Without keys, rows are added up only by what
    the report needs (the agent for agent and tree reports)."""
    from .history import histories_of
    j = _JsonSQL(is_postgres(db))
    p = "%s" if j.postgres else "?"
    field = PsModelUsage.created_at
    present = usage_counters(db)
    if keys is not None:
        model_ids = sorted({key[0] for key in keys})
    else:  # the models that have counter rows
        used = {row[0] for row in db.execute_sql('SELECT DISTINCT model_id FROM "ps_model_usage"').fetchall()}
        model_ids = sorted(used if model_ids is None else used & set(model_ids))
    if not model_ids:
        return []
    models = list(PsAiModel.select().where(PsAiModel.id.in_(model_ids)))
    moments = _price_moments(histories_of(models))
    if sum(len(times) for times in moments.values()) > MAX_PERIOD_BRANCHES:
        # The period expression grows with the moments of every model and is
        # evaluated per row: past a few hundred, each row on its own is faster.
        moments = {}
    period, params = ["CASE u.model_id"], []
    for model_id, times in moments.items():
        if times:
            period.append("WHEN %s THEN CASE %s ELSE %d END" % (
                p, " ".join("WHEN u.created_at < %s THEN %d" % (p, i) for i in range(len(times))), len(times)))
            params += [model_id] + [field.db_value(t) for t in times]
    period = " ".join(period) + " ELSE 0 END" if len(period) > 1 else "0"
    whole = keys is not None or by in ("agent", "tree")
    columns = ["u.model_id", "u.agent_id" if whole else "NULL", "u.connector_id" if keys is not None else "NULL",
               "(%s)" % period if moments else "u.id"]
    if by == "day":
        columns.append(j.day("u.created_at"))
    where = _window(db, "u.created_at", since, until, model_ids, params) + [sound]
    groups = ", ".join(str(i + 1) for i in range(len(columns)))
    sql = 'SELECT %s, MIN(u.created_at), %s FROM "ps_model_usage" u WHERE %s GROUP BY %s' % (
        ", ".join(columns), ", ".join("SUM(u.%s)" % c for c in present), " AND ".join(where), groups)
    read = _bucket_reader(present)
    offset = len(columns)
    pieces = []
    for values in db.execute_sql(sql, params).fetchall():
        key = (values[0], values[1] if values[1] in agents else None, values[2])
        if keys is None or key in keys:
            pieces.append({"model_id": key[0], "agent_id": key[1], "connector_id": key[2],
                           "created_at": field.python_value(values[offset]), "buckets": read(values[offset + 1:])})
    return pieces


def _negative_counters(db, by, agents, since, until, model_ids=None):
    """Counter rows with a negative counter, as unpriced parts: a negative
    count is never added (it would lower the total) nor priced as 0."""
    present = usage_counters(db)
    params = []
    where = _window(db, "u.created_at", since, until, model_ids, params) + [
        "(%s)" % " OR ".join("u.%s < 0" % c for c in present)]
    read = _bucket_reader(present)
    parts = []
    for values in db.execute_sql('SELECT u.id, u.model_id, u.agent_id, u.created_at, %s FROM "ps_model_usage" u '
                                 'WHERE %s' % (", ".join("u." + c for c in present), " AND ".join(where)),
                                 params).fetchall():
        model_id, agent_id, created_at = values[1:4]
        buckets = read([max(v or 0, 0) for v in values[4:]])
        created_at = PsModelUsage.created_at.python_value(created_at)
        parts.append({"model_id": model_id, "agent_id": agent_id if agent_id in agents else None, "provider": None,
                      "pricing": None, "metadata": {}, "has_usage": 0, "calls": 0, "web": 0, "buckets": buckets,
                      "priced_from": "current", "problem": "negative token counters (`psai check` lists the rows)",
                      "day": created_at.astimezone(UTC).strftime("%Y-%m-%d") if by == "day" else None})
    return parts


def _usage_parts(db, by, since, until, model_ids=None):
    """All recorded usage in [since, until), as parts each priced alike:
    item groups and uncovered counter pieces. Each part has ``model_id``,
    ``agent_id`` (by agent or tree), ``day`` (by day), the pricing context
    and its ``buckets``."""
    from .history import histories_of, prices_at
    keys = {"agent": ("agent",), "tree": ("agent",), "day": ("day",)}.get(by, ())
    agents = _agent_ids(db)  # once a report: items and counters both map deleted agents to None
    # What the items cover of the counters comes from a pass over all items.
    # Over all usage, the pass that adds the items up can give it, grouping
    # by agent and connector too. That is cheaper than a second pass on
    # SQLite, which reads each row's JSON once either way, and on
    # PostgreSQL when the groups have the agent already; otherwise more
    # groups cost PostgreSQL's parallel workers more than a light pass.
    one_pass = since is None and until is None and model_ids is None and (
        "agent" in keys or not is_postgres(db))
    itemized = defaultdict(lambda: [0, 0]) if one_pass else None
    parts = []
    for group in _item_groups(db, keys, since, until, model_ids, agents, totals=itemized):
        pricing = group["pricing"] or {}
        parts.append(dict(
            group,
            metadata={k: v for k, v in (("appliedServiceTier", group.pop("applied_service_tier")),
                                        ("appliedSpeed", group.pop("applied_speed"))) if v is not None},
            priced_from="snapshot" if pricing.get("configuredPrices") is not None else "current"))
    parts += _negative_counters(db, by, agents, since, until, model_ids)
    pieces = _uncovered_counters(db, by, agents, since, until, model_ids, itemized)
    if not pieces:
        return parts
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p["model_id"] for p in pieces})))}
    histories = histories_of(list(models.values()))
    moments = _price_moments(histories)
    merged = {}
    for piece in pieces:
        model_id = piece["model_id"]
        day = piece["created_at"].astimezone(UTC).strftime("%Y-%m-%d") if by == "day" else None
        period = bisect.bisect_right(moments.get(model_id, ()), piece["created_at"])
        key = (model_id, piece["agent_id"], day, period)
        if key in merged:
            for bucket, value in piece["buckets"].items():
                merged[key]["buckets"][bucket] += value
            continue
        model = models.get(model_id)
        configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
        prices, known = prices_at(model, piece["created_at"], *histories[model_id]) if model is not None \
            else (None, False)
        pricing = {"configuredPrices": prices}
        for name in ("inferenceType", "regionalProcessing"):
            if configuration.get(name) is not None:
                pricing[name] = configuration[name]
        merged[key] = dict(piece, provider=configuration.get("provider"), pricing=pricing, metadata={},
                           has_usage=1, calls=0, web=0, priced_from="history" if known else "current", day=day,
                           buckets=dict(piece["buckets"]))
    return parts + list(merged.values())


def _price_key(part):
    """What prices a part besides its provider, hashable: item groups have it
    from SQL (the pricing's text and the tier applied); other parts get their
    pricing and metadata as canonical JSON."""
    key = part.get("price_key")
    if key is None:
        key = part["price_key"] = strict_json_dumps([part["pricing"], part["metadata"]], sort_keys=True)
    return key


def _merge_parts(parts, fields):
    """Parts that agree on ``fields`` and on everything that prices them,
    added up: each is priced once."""
    merged = {}
    for part in parts:
        key = tuple(part[f] for f in fields) + (
            part["provider"], part["priced_from"], part["has_usage"], _price_key(part))
        into = merged.get(key)
        if into is None:
            merged[key] = dict(part, buckets=dict(part["buckets"]))
            continue
        for bucket, value in part["buckets"].items():
            into["buckets"][bucket] += value
        into["calls"] += part["calls"]
        into["web"] += part["web"]
    return list(merged.values())


def _price_parts(parts, transform=None):
    """Give each part ``cost`` (Decimal, or None), ``currency`` and, when it
    cannot be priced, ``reason``. ``transform(prices)`` changes the prices a
    part is priced at (psai.reprice's "after")."""
    models = {m.id: m for m in PsAiModel.select().where(
        PsAiModel.id.in_(sorted({p["model_id"] for p in parts if p["priced_from"] == "current"})))} \
        if any(p["priced_from"] == "current" for p in parts) else {}
    resolved = {}
    for part in parts:
        part["cost"], part["currency"], part["reason"] = None, None, None
        if not part["has_usage"]:
            part["reason"] = part.get("problem") or "the item has no usable token counts (usageNormalized.tokensIn)"
            continue
        pricing = part["pricing"] if isinstance(part["pricing"], dict) else {}
        fallback = None
        if pricing.get("configuredPrices") is None:
            model = models.get(part["model_id"])
            configuration = model.configuration if model is not None else None
            fallback = configuration.get("prices") if isinstance(configuration, dict) else None
        if transform is not None:
            pricing = dict(pricing, configuredPrices=transform(
                pricing["configuredPrices"] if pricing.get("configuredPrices") is not None else fallback))
        if transform is None:
            key = (part["provider"], _price_key(part), part["model_id"] if fallback is not None else None)
        else:
            key = strict_json_dumps([part["provider"], pricing, part["metadata"], fallback], sort_keys=True)
        if key not in resolved:
            resolved[key] = effective_prices(part["provider"], pricing, part["metadata"], fallback)
        prices, problem = resolved[key]
        if problem:
            part["reason"] = problem
            continue
        part["cost"] = bucket_cost(part["buckets"], prices, web_searches=part["web"])
        part["currency"] = prices.get("currency")
    return parts


def _tokens(part):
    buckets = part["buckets"]
    tokens_in = sum(buckets[b] for b in BUCKETS if b not in ("out", "long_out"))
    return tokens_in, buckets["out"] + buckets["long_out"]


def _as_datetime(value, end=False, name=None):
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
    return value


def _agent_tree(db):
    """``(levels, ancestors)`` of every agent, from one query of (id,
    parent): its depth in its tree, and the agents whose tree holds it
    (itself first, its root last). A loop in parent_agent_id, which
    PolicySynth does not prevent, is cut at its smallest id, which stands
    as the root of the loop: every agent has one root, so each call is
    counted once in the roots' totals."""
    parent = dict(db.execute_sql('SELECT "id", "parent_agent_id" FROM "ps_agents"').fetchall())
    children = defaultdict(list)
    for child, of in parent.items():
        if of in parent:
            children[of].append(child)
    levels = {}

    def walk(root):
        queue = deque([(root, 0)])
        while queue:
            agent, level = queue.popleft()
            if agent not in levels:
                levels[agent] = level
                queue.extend((child, level + 1) for child in sorted(children[agent]))

    for agent in sorted(parent):
        if parent[agent] not in parent:
            walk(agent)
    for agent in sorted(parent):
        if agent not in levels:  # in a loop, or under one
            path, node = [], agent
            while node not in path:
                path.append(node)
                node = parent[node]
            walk(min(path[path.index(node):]))
    ancestors = {}
    for agent in parent:
        chain = [agent]
        while levels[chain[-1]] > 0:
            chain.append(parent[chain[-1]])
        ancestors[agent] = chain
    return levels, ancestors


def cost_report(by="model", *, since=None, until=None, strict=False, progress=None):
    """Cost of recorded usage grouped ``by`` model, agent, tree, provider or day.

    Each call is priced from its own usage item (the prices stored with it,
    the tier the provider applied), so editing a price never changes the
    cost of calls already recorded. Rows have the group's keys, ``calls``
    (items), ``tokens_in``, ``tokens_out``, ``cost`` (an exact ``Decimal``),
    ``currency``, ``unpriced_tokens`` and ``priced_from`` (``snapshot``, and
    for usage without a snapshot ``history`` or ``current``). Usage whose
    prices are missing or unusable is never priced at 0: it is in a row of
    its own with ``currency`` and ``cost`` None, its tokens in
    ``unpriced_tokens`` and why in ``unpriced_reason``; with ``strict=True``
    it raises ``UnpricedUsageError`` instead.

    ``tree`` rows hold an agent with all its sub-agents, and their ``level``.
    ``since``/``until`` limit the usage by time recorded (dates or datetimes;
    a date ``until`` is inclusive). ``progress``, if given, is called as
    ``progress(done, total)`` while the groups the SQL summed are priced.
    """
    if by not in REPORT_GROUPINGS:
        raise ValidationError({"by": ["Must be one of: %s." % ", ".join(REPORT_GROUPINGS)]})
    since, until = _as_datetime(since), _as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    keep = {"agent": ("agent_id",), "tree": ("agent_id",), "day": ("day",)}.get(by, ())
    parts = _price_parts(_merge_parts(_usage_parts(db, by, since, until), ("model_id",) + keep))
    if strict:
        _refuse_unpriced(parts)
    levels, ancestors = _agent_tree(db) if by == "tree" else ({}, {})
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p["model_id"] for p in parts})))} \
        if by in ("model", "provider") else {}
    totals = {}
    for done, part in enumerate(parts, 1):
        if progress:
            progress(done, len(parts))
        if by == "model":
            keys = [(part["model_id"],)]
        elif by == "agent":
            keys = [(part["agent_id"],)]
        elif by == "provider":
            provider = part["provider"]
            if provider is None and part["model_id"] in models:
                configuration = models[part["model_id"]].configuration
                provider = configuration.get("provider") if isinstance(configuration, dict) else None
            keys = [(provider,)]
        elif by == "day":
            keys = [(part["day"],)]
        else:
            keys = [(agent,) for agent in ancestors.get(part["agent_id"], [None])]
        for key in keys:
            entry = totals.setdefault(key + (part["currency"],), _new_total(priced_from=set(), unpriced_reason=set()))
            if _add_part(entry, part):
                entry["priced_from"].add(part["priced_from"])
            else:
                entry["unpriced_reason"].add(part["reason"])
    return _report_rows(by, totals, models, levels)


def _new_total(**more):
    return dict({"calls": 0, "tokens_in": 0, "tokens_out": 0, "cost": None, "unpriced_tokens": 0}, **more)


def _add_part(entry, part):
    """Add a priced part's calls, tokens and cost to a report entry (its
    tokens to ``unpriced_tokens`` when it has no cost, never a cost of 0).
    True when the part was priced."""
    tokens_in, tokens_out = _tokens(part)
    entry["calls"] += part["calls"]
    entry["tokens_in"] += tokens_in
    entry["tokens_out"] += tokens_out
    if part["cost"] is None:
        entry["unpriced_tokens"] += tokens_in + tokens_out
        return False
    entry["cost"] = (entry["cost"] or Decimal(0)) + part["cost"]
    return True


def _refuse_unpriced(parts):
    unpriced = [p for p in parts if p["cost"] is None]
    if unpriced:
        tokens = sum(sum(_tokens(p)) for p in unpriced)
        reasons = sorted({"model %s: %s" % (p["model_id"], p["reason"]) for p in unpriced})
        raise UnpricedUsageError("%d tokens (%d calls) cannot be priced: %s" % (
            tokens, sum(p["calls"] for p in unpriced), "; ".join(reasons)))


def _report_rows(by, totals, models, levels):
    rows = []
    agent_ids = {key[0] for key in totals if by in ("agent", "tree") and key[0] is not None}
    agents = {a.id: a for a in PsAgent.select().where(PsAgent.id.in_(sorted(agent_ids)))} if agent_ids else {}
    for (key, currency), entry in totals.items():
        row = {}
        if by == "model":
            model = models.get(key)
            configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
            row.update(model_id=key, model_name=model.name if model else None, provider=configuration.get("provider"))
        elif by in ("agent", "tree"):
            agent = agents.get(key)
            configuration = agent.configuration if agent is not None and isinstance(agent.configuration, dict) else {}
            row.update(agent_id=key, agent_name=configuration.get("name"))
            if by == "tree":
                row.update(parent_agent_id=agent.parent_agent_id if agent else None, level=levels.get(key))
        elif by == "provider":
            row["provider"] = key
        else:
            row["day"] = key
        row.update(calls=entry["calls"], tokens_in=entry["tokens_in"], tokens_out=entry["tokens_out"],
                   cost=entry["cost"], currency=currency, unpriced_tokens=entry["unpriced_tokens"],
                   priced_from=",".join(sorted(entry["priced_from"])) or None,
                   unpriced_reason="; ".join(sorted(entry["unpriced_reason"])) or None)
        rows.append(row)

    def order(row):
        if by == "tree":
            return (row["level"] is None, row["level"] or 0, row["agent_id"] is None, row["agent_id"] or 0,
                    row["currency"] is None, row["currency"] or "")
        first = next(iter(row.values()))
        return (first is None, first if first is not None else 0, row["currency"] is None, row["currency"] or "")
    rows.sort(key=order)
    return rows


def report_totals(rows, by=None):
    """Totals per currency (None: the unpriced usage, whose ``cost`` is
    None). Tree rows overlap (a parent holds its sub-agents), so for them
    only the roots (level 0) are added."""
    totals = {}
    for row in rows:
        if by == "tree" and row.get("level") not in (0, None):
            continue
        entry = totals.setdefault(row["currency"], {"calls": 0, "tokens_in": 0, "tokens_out": 0, "cost": None,
                                                    "unpriced_tokens": 0})
        for name in ("calls", "tokens_in", "tokens_out", "unpriced_tokens"):
            entry[name] += row[name]
        if row["cost"] is not None:
            entry["cost"] = (entry["cost"] or Decimal(0)) + row["cost"]
    return totals


def daily_costs(*, since=None, until=None):
    """Cost per UTC day and model, for charts: rows ``{"day", "model_id",
    "model_name", "provider", "currency", "calls", "cost", "tokens_in",
    "tokens_out", "unpriced_tokens"}`` (``cost`` None where nothing of it
    could be priced), each call priced as ``cost_report`` prices it."""
    since, until = _as_datetime(since), _as_datetime(until, end=True)
    db = model_db(PsModelUsage)
    parts = _price_parts(_merge_parts(_usage_parts(db, "day", since, until), ("model_id", "day")))
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(sorted({p["model_id"] for p in parts})))}
    rows = {}
    for part in parts:
        model = models.get(part["model_id"])
        configuration = model.configuration if model is not None and isinstance(model.configuration, dict) else {}
        row = rows.setdefault((part["day"], part["model_id"], part["currency"]), _new_total(
            day=part["day"], model_id=part["model_id"], model_name=model.name if model else None,
            provider=part["provider"] or configuration.get("provider"), currency=part["currency"]))
        _add_part(row, part)
    return sorted(rows.values(), key=lambda r: (r["day"] or "", r["model_id"], r["currency"] or ""))
