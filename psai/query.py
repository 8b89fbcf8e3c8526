"""Finding models: configuration filters, model selection for agents,
superseding a model, and the sub-agent tree.

Filters on configuration fields give the same rows on SQLite and PostgreSQL
and never put a caller's key or value into the SQL text: values are always
bound parameters, and keys must be plain identifiers (PolicySynth's are
camelCase) or the filter is refused with ``psai.ValidationError``.
"""
import json
import math
import operator
import re
from functools import reduce

from peewee import SQL, NodeList, Value, fn

from .db import is_postgres, lock, model_db, write_transaction
from .enums import PsAiModelSize
from .errors import NotFoundError, ValidationError
from .models import AgentModels, PsAgent, PsAiModel
from .pricing import _is_number
from .schemas import MAX_SAFE_INTEGER

__all__ = ["config_filter", "where_config", "select_model", "model_choices", "find_by_provider_model",
           "add_model", "model_history", "sub_agent_tree", "SIZE_FALLBACK", "INDEXED_PATHS"]

# Paths served by expression indexes on SQLite (migration 0003). They are the
# only paths written into SQL as literals: they come from this list, never
# from a caller. PostgreSQL serves every path from one jsonb GIN index.
INDEXED_PATHS = ("provider", "type", "modelSize", "active", "model")

# PolicySynth's size fallback: which sizes to try, in order, for a size asked for.
SIZE_FALLBACK = {
    "large": ("large", "medium", "small"),
    "medium": ("medium", "large", "small"),
    "small": ("small", "medium", "large"),
}

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


def _sqlite_extract(path):
    field = PsAiModel.configuration
    if len(path) == 1 and path[0] in INDEXED_PATHS:
        # The literal must match the index expression for SQLite to use it.
        return fn.json_extract(field, SQL("'$.%s'" % path[0]))
    return fn.json_extract(field, "$." + ".".join(path))


def _sqlite_equals(path, value):
    extract = _sqlite_extract(path).coerce(False)
    # json_type tells true/false from 1/0 and numbers from strings, so values
    # match by JSON type, as jsonb equality does on PostgreSQL.
    kind = fn.json_type(PsAiModel.configuration, "$." + ".".join(path))
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return (extract == int(value)) & (kind == ("true" if value else "false"))
    if isinstance(value, str):
        return (extract == value) & (kind == "text")
    return (extract == value) & kind.in_(["integer", "real"])


def _sqlite_any(path, values):
    """``path`` equals one of ``values``, by JSON type, for any number of
    values: each type's values are one bound JSON array read by json_each,
    so the SQL stays the same size (an OR per value overflows SQLite's
    parser at a few dozen)."""
    extract = _sqlite_extract(path).coerce(False)
    kind = fn.json_type(PsAiModel.configuration, "$." + ".".join(path))
    clauses = []
    for kinds, chosen in ((("text",), [v for v in values if isinstance(v, str)]),
                          (("integer", "real"), [v for v in values if _is_number(v)])):
        if chosen:
            within = NodeList((extract, SQL("IN (SELECT value FROM json_each(?))", [json.dumps(chosen)])))
            clauses.append(kind.in_(list(kinds)) & within)
    clauses += [_sqlite_equals(path, v) for v in dict.fromkeys(v for v in values if v is None or isinstance(v, bool))]
    return reduce(operator.or_, clauses)


def _postgres_any(path, values):
    """``path`` equals one of ``values`` as jsonb (so 1, "1" and true
    differ), all values one bound jsonb array."""
    return NodeList((PsAiModel.configuration, SQL("#> %s::text[] IN (SELECT jsonb_array_elements(%s::jsonb))",
                                                   ["{%s}" % ",".join(path), json.dumps(values)])))


def config_filter(filters):
    """A WHERE expression matching models whose configuration has every
    ``path: value`` of ``filters`` (a value that is a list matches any of
    it, however long the list)."""
    postgres = is_postgres(model_db(PsAiModel))
    clauses, document = [], {}
    for key, value in filters.items():
        path = _path(key)
        values = _check_value(key, value)
        if postgres and len(values) == 1:
            # All single values go into one jsonb containment document: one
            # bound parameter, one GIN index probe, a sharper row estimate.
            _merge(document, _nest(path, values[0]))
        elif postgres:
            clauses.append(_postgres_any(path, values))
        elif len(values) == 1:
            clauses.append(_sqlite_equals(path, values[0]))
        else:
            clauses.append(_sqlite_any(path, values))
    if document:
        clauses.insert(0, PsAiModel.configuration.contains(document))
    return reduce(operator.and_, clauses) if clauses else SQL("1 = 1")


def _merge(target, addition):
    for key, value in addition.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def where_config(filters=None, query=None, **fields):
    """Models whose configuration matches, e.g. ``where_config(provider="openai",
    type="text", active=True)`` or ``where_config({"prices.currency": "EUR"})``."""
    combined = dict(filters or {})
    combined.update(fields)
    query = PsAiModel.select() if query is None else query
    return query.where(config_filter(combined))


def _newest_first(query):
    return query.order_by(PsAiModel.created_at.desc(), PsAiModel.id.desc())


def select_model(agent, model_type, size, *, include_inactive=False):
    """The model ``agent`` uses for ``model_type`` and ``size`` under
    PolicySynth's rules: the first size of SIZE_FALLBACK[size] the agent has a
    model for, else any model of the type. Inactive models are skipped unless
    ``include_inactive``. Among equals the newest row wins."""
    model_type = getattr(model_type, "value", model_type)
    size = getattr(size, "value", size)
    if not isinstance(size, str) or size not in SIZE_FALLBACK:
        raise ValidationError({"size": ["Must be one of: %s." % ", ".join(s.value for s in PsAiModelSize)]})
    if not isinstance(model_type, str):
        raise ValidationError({"model_type": ["Must be a model type such as 'text'."]})
    filters = {"type": model_type}
    if not include_inactive:
        filters["active"] = True
    candidates = list(_newest_first(where_config(filters, query=agent.ai_models)))
    chosen = _choose(candidates, size)
    if chosen is None:
        raise NotFoundError("agent %s has no %s%r model" % (
            agent.id, "" if include_inactive else "active ", model_type))
    return chosen


def _choose(candidates, size):
    """From models of one type, newest first: PolicySynth's pick for ``size``."""
    by_size = {}
    for model in candidates:
        by_size.setdefault(model.configuration.get("modelSize"), model)
    for wanted in SIZE_FALLBACK[size]:
        if wanted in by_size:
            return by_size[wanted]
    return candidates[0] if candidates else None


def model_choices(agent, *, include_inactive=False):
    """For each type among the agent's models and each size: the model
    select_model would pick. One query."""
    query = agent.ai_models if include_inactive else where_config({"active": True}, query=agent.ai_models)
    by_type = {}
    for model in _newest_first(query):
        by_type.setdefault(model.configuration.get("type"), []).append(model)
    rows = []
    for model_type in sorted(by_type, key=str):
        for size in SIZE_FALLBACK:
            model = _choose(by_type[model_type], size)
            rows.append({"type": model_type, "size": size, "model_id": model.id, "name": model.name,
                         "model_size": model.configuration.get("modelSize"),
                         "model": model.configuration.get("model")})
    return rows


def find_by_provider_model(provider, model_name, *, include_inactive=False):
    """PolicySynth's override lookup by provider and model name, made
    deterministic: the newest active row wins."""
    filters = {"provider": provider, "model": model_name}
    if not include_inactive:
        filters["active"] = True
    found = _newest_first(where_config(filters)).first()
    if found is None:
        raise NotFoundError("no %smodel %r from provider %r" % (
            "" if include_inactive else "active ", model_name, provider))
    return found


def model_history(name, organization_id=None):
    """Every row that had this name, newest first."""
    query = PsAiModel.select().where(PsAiModel.name == name)
    if organization_id is not None:
        query = query.where(PsAiModel.organization_id == organization_id)
    return list(_newest_first(query))


def add_model(*, name, user_id, organization_id, configuration):
    """Add a model as PolicySynth's add-model tool does: older rows with the
    same name (in the organization) are deactivated and the new row created,
    in one transaction. Agents linked to an older row are linked to the new
    one instead, so they go on selecting a model of that name (PolicySynth
    would go on calling the old row, inactive or not); calls already
    recorded keep the prices they were charged at."""
    new = PsAiModel(name=name, user_id=user_id, organization_id=organization_id,
                    configuration=configuration)
    new.validate()  # before anything changes
    with write_transaction(model_db(PsAiModel)):
        # One superseding of a name at a time: reading the older rows and
        # writing the new one must not interleave with another's.
        lock(model_db(PsAiModel), ("add_model", organization_id, name))
        older = list(PsAiModel.select()
                     .where((PsAiModel.name == name) & (PsAiModel.organization_id == organization_id)))
        for row in older:
            if row.configuration.get("active") is not False:
                row.configuration = dict(row.configuration, active=False)
                row.save()
        new.save(force_insert=True)
        _move_links([row.id for row in older], new.id)
    return new


def _move_links(old_ids, new_id):
    if not old_ids:
        return
    links = AgentModels.ai_model.in_(old_ids)
    agent_ids = sorted({agent_id for (agent_id,) in AgentModels.select(AgentModels.agent).where(links).tuples()})
    if agent_ids:
        AgentModels.delete().where(links).execute()
        AgentModels.insert_many([{"agent": agent_id, "ai_model": new_id} for agent_id in agent_ids]) \
            .on_conflict_ignore().execute()


MAX_TREE_DEPTH = 64


def sub_agent_tree(agent, *, include_self=True):
    """The agents under ``agent`` (and itself), each with ``.level`` (0 for
    ``agent``), in one recursive query, by level then id. A loop in
    parent_agent_id (which PolicySynth does not prevent) ends the walk."""
    tree = (PsAgent.select(PsAgent.id, Value(0).alias("level"))
            .where(PsAgent.id == agent.id)
            .cte("agent_tree", recursive=True, columns=("id", "level")))
    child = PsAgent.alias("child")
    step = (child.select(child.id, tree.c.level + 1)
            .join(tree, on=(child.parent_agent == tree.c.id))
            .where(tree.c.level < MAX_TREE_DEPTH))
    tree = tree.union_all(step)
    query = (PsAgent.select(PsAgent, tree.c.level.alias("level"))
             .join(tree, on=(PsAgent.id == tree.c.id))
             .with_cte(tree)
             .order_by(tree.c.level, PsAgent.id)
             .objects())  # level lands on each agent, not on a joined object
    seen, result = set(), []
    for row in query:
        if row.id in seen:
            continue
        seen.add(row.id)
        if include_self or row.level > 0:
            result.append(row)
    return result
