"""Recording token usage and reporting what it cost.

``record_usage`` adds one call's tokens to the counters of ``ps_model_usage``
(one row per model, agent, connector and UTC day). ``cost_report`` adds the
counters up in SQL and prices each group with the prices of the model row the
usage points to, in exact ``Decimal`` arithmetic.
"""
import datetime
import hashlib
import math
from collections import defaultdict
from decimal import Decimal

from peewee import SQL, NodeList, fn

from .db import database, is_postgres, write_transaction
from .errors import ValidationError
from .fields import UTC, utcnow
from .models import PsAgent, PsAiModel, PsModelUsage
from .pricing import COUNTERS, cost_of_counters, partition_usage, resolve_prices

__all__ = ["record_usage", "cost_report", "report_totals", "usage_counters", "REPORT_GROUPINGS", "model_cost"]

REPORT_GROUPINGS = ("model", "agent", "tree", "provider", "day")
INPUT_COUNTERS = tuple(c for c in COUNTERS if "_in_" in c)
OUTPUT_COUNTERS = tuple(c for c in COUNTERS if "_out_" in c)

# PolicySynth's counters are 32-bit INTEGER columns.
MAX_COUNTER = 2 ** 31 - 1


def _model(model):
    return model if isinstance(model, PsAiModel) else PsAiModel.get_by_key(model)


def _agent(agent):
    if agent is None or isinstance(agent, PsAgent):
        return agent
    return PsAgent.get_by_key(agent)


def _check_counts(counts):
    errors = {}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors[name] = ["Not a number."]
        elif not math.isfinite(value) or value < 0:
            errors[name] = ["Must be a finite number, 0 or more."]
        elif value > MAX_COUNTER:
            errors[name] = ["Too large for one call: at most %d." % MAX_COUNTER]
    if errors:
        raise ValidationError(errors)


def _round_half_up(value):
    # JavaScript's Math.round, which PolicySynth applies when storing counters.
    return int(math.floor(value + 0.5))


def _lock(key):
    """Serialise writers of one counter row. SQLite: the write transaction
    already holds the database's write lock. PostgreSQL: an advisory lock for
    this key, released at commit."""
    if is_postgres():
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (int.from_bytes(digest, "big", signed=True),))


def _day_bounds(moment):
    start = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    return start, start + datetime.timedelta(days=1)


CACHE_WRITE_COUNTERS = {"token_in_cache_write_count": "token_in_count",
                        "long_context_token_in_cache_write_count": "long_context_token_in_count"}


def usage_counters(db=None):
    """The counters this database's ps_model_usage has. psai creates all 14;
    a table made by PolicySynth's npm release has 12, without the cache-write
    counters, and psai works with it as it is (see ``record_usage``)."""
    db = db or database.obj
    columns = getattr(db, "_psai_usage_counters", None)
    if columns is None:
        present = {column.name for column in db.get_columns("ps_model_usage")}
        columns = tuple(name for name in COUNTERS if name in present)
        db._psai_usage_counters = columns
    return columns


def record_usage(model, agent=None, *, tokens_in=0, tokens_out=0, cached_tokens=0, cache_write_tokens=0,
                 reasoning_tokens=0, audio_tokens=0, image_tokens=0, user_id=None, connector_id=None):
    """Add one call's tokens to the usage counters of (model, agent).

    The counts are the provider's totals, as ``psai.pricing.estimate_cost``
    takes them; they are partitioned like PolicySynth does (long context when
    ``tokens_in`` reaches the model's threshold) and rounded when stored.
    Safe when several processes record at once. Returns the counter row.

    On a ps_model_usage table without the cache-write counters (PolicySynth's
    npm release), cache-write tokens are added to the ordinary input counters,
    as that release itself counts them.
    """
    counts = dict(tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached_tokens,
                  cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
                  audio_tokens=audio_tokens, image_tokens=image_tokens)
    _check_counts(counts)
    model, agent = _model(model), _agent(agent)
    prices = model.configuration.get("prices") or {}
    counters = partition_usage(long_context_threshold=prices.get("longContextTokenThreshold"), **counts)
    counters = {name: _round_half_up(value) for name, value in counters.items()}
    present = usage_counters()
    for name, fallback in CACHE_WRITE_COUNTERS.items():
        if name not in present:
            counters[fallback] += counters.pop(name)
    if user_id is None:
        user_id = agent.user_id if agent is not None else model.user_id
    agent_id = agent.id if agent is not None else None
    now = utcnow()
    start, end = _day_bounds(now)
    U = PsModelUsage
    find, update, insert = _usage_statements(present, agent_id is None, connector_id is None)
    stamp = U.created_at.db_value(now)
    with write_transaction():
        _lock((model.id, agent_id, connector_id))
        keys = [model.id] + [v for v in (agent_id, connector_id) if v is not None]
        counts = [counters[name] for name in present]
        # A row with no room left for these counts (32-bit counters) is not
        # found, and a new one is started: reports add all rows up.
        room = [MAX_COUNTER - count for count in counts]
        row = database.execute_sql(
            find, keys + [U.created_at.db_value(start), U.created_at.db_value(end)] + room).fetchone()
        if row is None:
            cursor = database.execute_sql(insert, [model.id, agent_id, connector_id, user_id, stamp, stamp] + counts)
        else:
            cursor = database.execute_sql(update, counts + [stamp, row[0]])
        values = cursor.fetchone()
    return _usage_row(present, values)


_ROW_COLUMNS = ("id", "user_id", "created_at", "updated_at", "model_id", "agent_id", "connector_id")


def _usage_statements(present, agent_is_null, connector_is_null):
    """record_usage's three statements for this database, built once: the
    hot path of every agent call should not pay for building SQL."""
    db = database.obj
    cache = db.__dict__.setdefault("_psai_usage_sql", {})
    key = (present, agent_is_null, connector_is_null)
    if key not in cache:
        p = "%s" if is_postgres(db) else "?"
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


def model_cost(model, **usage):
    """``psai.pricing.cost_breakdown`` for a stored model: its prices, with
    its provider, inference type and region unless given."""
    from .pricing import cost_breakdown
    configuration = _model(model).configuration
    usage = dict(_call_context(configuration), **usage)
    return cost_breakdown(configuration.get("prices") or {}, **usage)


# -- reports -------------------------------------------------------------------

def _day_expression():
    """The UTC day of ``created_at`` as YYYY-MM-DD text."""
    if is_postgres():
        utc = NodeList((PsModelUsage.created_at, SQL("AT TIME ZONE 'UTC'")))
        return fn.to_char(utc, "YYYY-MM-DD").coerce(False)
    # SQLite keeps UTC ISO 8601 text: the day is its first ten characters.
    return fn.substr(PsModelUsage.created_at, 1, 10).coerce(False)


def _as_datetime(value, end=False):
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value) if "T" in value or " " in value \
            else datetime.date.fromisoformat(value)
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime(value.year, value.month, value.day, tzinfo=UTC)
        if end:
            value += datetime.timedelta(days=1)  # a date until is inclusive
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _grouped_counters(by, since, until):
    """Counter sums computed in SQL, per model and what the report needs
    besides: the agent (agent and tree reports) or the day. Prices belong to
    models, so the model is always a key; nothing finer is grouped."""
    U = PsModelUsage
    columns, group = [U.model.alias("model_id")], [U.model]
    if by in ("agent", "tree"):
        columns.append(U.agent.alias("agent_id"))
        group.append(U.agent)
    elif by == "day":
        columns.append(_day_expression().alias("day"))
        group.append(SQL("day"))
    columns += [fn.SUM(getattr(U, name)).alias(name) for name in usage_counters()]
    query = U.select(*columns).group_by(*group)
    if since is not None:
        query = query.where(U.created_at >= since)
    if until is not None:
        query = query.where(U.created_at < until)
    return list(query.dicts())


def _resolved_prices(model_ids):
    models = {m.id: m for m in PsAiModel.select().where(PsAiModel.id.in_(list(model_ids)))}
    resolved = {}
    for model_id, model in models.items():
        configuration = model.configuration
        prices = configuration.get("prices") or {}
        resolved[model_id] = (model, resolve_prices(prices, **_call_context(configuration)), prices.get("currency"))
    return resolved


def _ancestors():
    """For every agent, the agents whose tree holds it (itself included), by
    one recursive query. UNION (not UNION ALL) ends at a cycle."""
    cursor = database.execute_sql(
        'WITH RECURSIVE tree(root, id) AS ('
        ' SELECT id, id FROM "ps_agents"'
        ' UNION SELECT tree.root, a.id FROM "ps_agents" a JOIN tree ON a.parent_agent_id = tree.id)'
        ' SELECT root, id FROM tree')
    pairs = defaultdict(set)
    for root, agent_id in cursor.fetchall():
        pairs[agent_id].add(root)
    return pairs


def _levels():
    cursor = database.execute_sql(
        'WITH RECURSIVE depth(id, level) AS ('
        ' SELECT id, 0 FROM "ps_agents" WHERE parent_agent_id IS NULL'
        ' UNION ALL SELECT a.id, depth.level + 1 FROM "ps_agents" a JOIN depth ON a.parent_agent_id = depth.id)'
        ' SELECT id, level FROM depth')
    return dict(cursor.fetchall())


def cost_report(by="model", *, since=None, until=None, progress=None):
    """Cost of recorded usage grouped ``by`` model, agent, tree, provider or day.

    Each row has the group's keys, ``tokens_in``, ``tokens_out``, ``cost``
    (a ``Decimal``, exact) and ``currency``; a group that spans currencies
    gives one row per currency. ``tree`` rows hold an agent with all its
    sub-agents, and their ``level`` in the tree. ``since``/``until`` limit the
    usage by day recorded (dates or datetimes; a date ``until`` is inclusive).
    ``progress``, if given, is called as ``progress(done, total)`` while the
    groups the SQL summed are priced.
    """
    if by not in REPORT_GROUPINGS:
        raise ValidationError({"by": ["Must be one of: %s." % ", ".join(REPORT_GROUPINGS)]})
    since, until = _as_datetime(since), _as_datetime(until, end=True)
    groups = _grouped_counters(by, since, until)
    prices = _resolved_prices({g["model_id"] for g in groups})
    ancestors = _ancestors() if by == "tree" else None

    totals = {}
    for done, group in enumerate(groups, 1):
        if progress:
            progress(done, len(groups))
        model, rates, currency = prices[group["model_id"]]
        counters = {name: int(group.get(name) or 0) for name in COUNTERS}
        cost = cost_of_counters(counters, rates, exact=True)["total"]
        if by == "model":
            keys = [(model.id,)]
        elif by == "agent":
            keys = [(group["agent_id"],)]
        elif by == "provider":
            keys = [(model.configuration.get("provider"),)]
        elif by == "day":
            keys = [(group["day"],)]
        else:
            agent_id = group["agent_id"]
            keys = [(root,) for root in ancestors.get(agent_id, ())] if agent_id is not None else [(None,)]
        for key in keys:
            entry = totals.setdefault(key + (currency,), {"tokens_in": 0, "tokens_out": 0, "cost": Decimal(0)})
            entry["tokens_in"] += sum(counters[c] for c in INPUT_COUNTERS)
            entry["tokens_out"] += sum(counters[c] for c in OUTPUT_COUNTERS)
            entry["cost"] += cost
    return _report_rows(by, totals, prices)


def _report_rows(by, totals, prices):
    rows = []
    agent_ids = {key[0] for key in totals if by in ("agent", "tree") and key[0] is not None}
    agents = {a.id: a for a in PsAgent.select().where(PsAgent.id.in_(list(agent_ids)))} if agent_ids else {}
    levels = _levels() if by == "tree" else {}
    models = {model.id: model for model, _rates, _currency in prices.values()}
    for (key, currency), entry in totals.items():
        row = {}
        if by == "model":
            model = models[key]
            row.update(model_id=key, model_name=model.name, provider=model.configuration.get("provider"))
        elif by in ("agent", "tree"):
            agent = agents.get(key)
            row.update(agent_id=key, agent_name=(agent.configuration.get("name") if agent else None))
            if by == "tree":
                row.update(parent_agent_id=agent.parent_agent_id if agent else None, level=levels.get(key))
        elif by == "provider":
            row["provider"] = key
        else:
            row["day"] = key
        row.update(entry, currency=currency)
        rows.append(row)

    def order(row):
        if by == "tree":
            return (row["level"] is None, row["level"] or 0, row["agent_id"] is None, row["agent_id"] or 0)
        first = next(iter(row.values()))
        return (first is None, first if first is not None else 0, row["currency"] or "")
    rows.sort(key=order)
    return rows


def report_totals(rows, by=None):
    """Total cost and tokens per currency. Tree rows overlap (a parent holds
    its sub-agents), so for them only the roots (level 0) are added."""
    totals = {}
    for row in rows:
        if by == "tree" and row.get("level") not in (0, None):
            continue
        entry = totals.setdefault(row["currency"], {"tokens_in": 0, "tokens_out": 0, "cost": Decimal(0)})
        for name in ("tokens_in", "tokens_out", "cost"):
            entry[name] += row[name]
    return totals
