"""Stored rows psai would refuse, found and shown without failing.

Rows written by PolicySynth, another tool or by hand can hold anything. psai
never lets one of them break a listing, an export or a report: each is shown
as far as it can be read, flagged with what is wrong. ``check()`` (``psai
check``) lists every such row and why, so it can be fixed or deactivated.
"""
import datetime
import json
import operator
from collections.abc import Callable, Iterable
from functools import reduce
from typing import Any, cast


from peewee import Model

from ._constants import MAX_INTEGER, MIN_INTEGER
from .db import is_postgres, model_db, table_columns
from .errors import ValidationError
from .fields import UTC, TimestampTzField, UnreadableTime, read_time
from ._items import price_problem
from .models import (
    AgentModels, ModelProvenance, PriceCorrection, PriceVersion, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem,
    usage_counters,
)
from .query import is_unmatched
from .rollups import ROLLUP_TABLE, unfolded, verify as verify_rollups
from .schemas import (
    INCLUDE, dump_rows, readable, shape_problem, time_problems, validate_agent_values, validate_model_values,
)
from ._sql import item_check_sql

__all__ = ["shape_problem", "model_problem", "agent_problem", "check", "readable", "dump_rows"]


def _problem(validate: Callable[[dict[str, Any]], object], values: dict[str, Any]) -> str | None:
    try:
        validate(values)
    except ValidationError as exc:
        return str(exc)
    except RecursionError:
        return "configuration: nested too deep"
    return None


def model_problem(row: PsAiModel) -> str | None:
    """Why psai would refuse to write this model row as it is, or None.
    Configuration keys psai does not know are accepted (a newer PolicySynth
    writes them)."""
    return _problem(lambda values: validate_model_values(values, unknown=INCLUDE), {
        "user_id": row.user_id, "organization_id": row.organization_id, "name": row.name,
        "configuration": row.configuration})


def agent_problem(row: PsAgent) -> str | None:
    return _problem(validate_agent_values, {
        "user_id": row.user_id, "class_id": row.class_id, "group_id": row.group_id,
        "configuration": row.configuration, "parent_agent_id": row.parent_agent_id})


def _with_times(problem: str | None, row: Model) -> str | None:
    return "; ".join(([problem] if problem else []) + time_problems(row)) or None


def _time_columns(model_class: type[Model]) -> list[TimestampTzField]:
    """``model_class``'s timestamp fields whose columns its table has."""
    present = table_columns(model_db(model_class), model_class._meta.table_name)
    return [f for f in model_class._meta.sorted_fields if isinstance(f, TimestampTzField) and f.column_name in present]


EARLIEST = datetime.datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime.datetime(9999, 12, 31, tzinfo=UTC)


def _unreadable_times(model_class: type[Model]) -> list[dict[str, Any]]:
    """``model_class``'s rows with a timestamp psai cannot read as a time."""
    columns = _time_columns(model_class)
    if not columns:
        return []
    found = []
    query = model_class.select(model_class._meta.primary_key, *columns).order_by(model_class._meta.primary_key)
    if is_postgres(model_db(model_class)):
        # timestamptz holds only times: the ones Python cannot are at the ends (any session time zone).
        query = query.where(reduce(operator.or_, [(c < EARLIEST) | (c >= LATEST) for c in columns]))
    # .tuples() gives tuples, which peewee's type stubs do not say (they give the query's model).
    for row in cast(Iterable[tuple[Any, ...]], query.tuples()):
        problems = ["%s %s" % (f.name, v.problem) for f, v in zip(columns, row[1:]) if isinstance(v, UnreadableTime)]
        if problems:
            found.append({"table": model_class._meta.table_name, "id": row[0], "problem": "; ".join(problems)})
    return found


def _named(row: dict[str, Any]) -> tuple[Any, Any]:
    """(table, id) of a problem, hashable (a link's id is a list of two)."""
    return row["table"], tuple(row["id"]) if isinstance(row["id"], list) else row["id"]


# Item times this far out are not a call's: a test, a typo, a default written by hand.
EDGE_EARLY = datetime.datetime(1000, 1, 1, tzinfo=datetime.timezone.utc)
EDGE_LATE = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)


def _edge_times() -> list[dict[str, Any]]:
    """Items dated before year 1000 or on the calendar's last day: reports
    and rollups read them, but no call was made then."""
    item = PsModelUsageItem
    query = item.select(item.id, item.created_at).where(
        (item.created_at < EDGE_EARLY) | (item.created_at >= EDGE_LATE)).order_by(item.id)
    return [{"table": item._meta.table_name, "id": row_id,
             "problem": "created_at %s is at the edge of the calendar (before year 1000, or 9999-12-31): not a "
                        "call's time" % (stamp.isoformat() if isinstance(stamp, datetime.datetime) else stamp)}
            for row_id, stamp in cast(Iterable[tuple[Any, ...]], query.tuples())]


def _unix_times(model_class: type[Model]) -> list[dict[str, Any]]:
    """On SQLite, ``model_class``'s rows with a timestamp stored as a Unix
    time: read as one, but periods (``--since``/``--until``) and days are
    taken from the stored text in SQL, and miss it."""
    db = model_db(model_class)
    if is_postgres(db):
        return []
    table, found = model_class._meta.table_name, []
    for column in _time_columns(model_class):
        cursor = db.execute_sql('SELECT "id", "%s" FROM "%s" WHERE typeof("%s") IN (\'integer\', \'real\') '
                                'ORDER BY "id"' % (column.column_name, table, column.column_name))
        for row_id, stored in cursor.fetchall():
            read = read_time(stored)
            if not isinstance(read, UnreadableTime):
                found.append({"table": table, "id": row_id, "problem": (
                    "%s is stored as a Unix time (%s), read as %s, but periods and days in reports miss it: "
                    "store it as ISO 8601 text" % (column.name, stored, read.isoformat()))})
    return found


def check() -> list[dict[str, Any]]:
    """Every stored row psai would refuse or cannot use, as dicts
    ``{"table", "id", "problem"}`` (``id`` is a pair for a link)."""
    found: list[dict[str, Any]] = []
    model_ids: set[int] = set()
    agent_ids: set[int] = set()
    for model in PsAiModel.select().order_by(PsAiModel.id):
        model_ids.add(model.id)
        problem = _with_times(model_problem(model), model)
        if problem is None and is_unmatched(model):
            problem = ("a placeholder holding calls whose response named %r, which no configured model matched: "
                       "they are unpriced until the model is configured and `psai usage assign --apply` moves them"
                       % model.configuration["model"])
        if problem:
            found.append({"table": "ps_ai_models", "id": model.id, "problem": problem})
    for agent in PsAgent.select().order_by(PsAgent.id):
        agent_ids.add(agent.id)
        problem = _with_times(agent_problem(agent), agent)
        if problem:
            found.append({"table": "ps_agents", "id": agent.id, "problem": problem})
    # .tuples() gives tuples, which peewee's type stubs do not say (they give the query's model).
    links = cast(Iterable[tuple[int, int]], AgentModels.select(AgentModels.agent, AgentModels.ai_model).tuples())
    for agent_id, model_id in links:
        missing = [name for name, key, ids in (("agent", agent_id, agent_ids), ("model", model_id, model_ids))
                   if key not in ids]
        if missing:
            found.append({"table": "AgentModels", "id": [agent_id, model_id],
                          "problem": "links to a %s that does not exist" % " and a ".join(missing)})
    db = model_db(PsModelUsage)
    counters = usage_counters(db)
    usage = PsModelUsage.select(PsModelUsage.id, PsModelUsage.model, *[getattr(PsModelUsage, c) for c in counters])
    for row in cast(Iterable[tuple[Any, ...]], usage.tuples()):
        row_id, model_id, values = row[0], row[1], row[2:]
        if model_id not in model_ids:
            found.append({"table": "ps_model_usage", "id": row_id,
                          "problem": "model %s does not exist: its usage cannot be priced" % model_id})
        negative = [name for name, value in zip(counters, values) if value is not None and value < 0]
        if negative:
            found.append({"table": "ps_model_usage", "id": row_id,
                          "problem": "negative counters (%s): not counted" % ", ".join(negative)})
        # SQLite stores any integer; PostgreSQL's (and so PolicySynth's) INTEGER does not.
        beyond = [name for name, value in zip(counters, values) if isinstance(value, (int, float))
                  and not isinstance(value, bool) and not MIN_INTEGER <= value <= MAX_INTEGER]
        if beyond:
            found.append({"table": "ps_model_usage", "id": row_id,
                          "problem": "counters beyond PostgreSQL's INTEGER, at most %d (%s): PolicySynth cannot "
                                     "hold them, and a copy to PostgreSQL refuses the row"
                                     % (MAX_INTEGER, ", ".join(beyond))})
    if table_columns(db, PsModelUsageItem._meta.table_name):
        found += _check_items(db, model_ids, price_problem)
    timed: list[type[Model]] = [PsModelUsage, PsModelUsageItem, PriceVersion, PriceCorrection, ModelProvenance]
    for model_class in timed:  # models' and agents' are read with their rows above
        found += _unreadable_times(model_class)
    for model_class in [PsAiModel, PsAgent] + timed:
        found += _unix_times(model_class)
    if table_columns(db, PsModelUsageItem._meta.table_name):
        found += [row for row in _edge_times() if _named(row) not in {_named(seen) for seen in found}]
    found += [{"table": ROLLUP_TABLE, "id": p["day"], "problem": p["problem"]} for p in verify_rollups(db)]
    named = {_named(row) for row in found}
    for mark in unfolded(db):  # what the rollups' triggers could not fold: read from the items
        if mark["item"] is not None and ("ps_model_usage_item", mark["item"]) in named:
            continue  # its time is named already: one problem a row
        if mark["item"] is not None:
            found.append({"table": "ps_model_usage_item", "id": mark["item"],
                          "problem": "the rollups' trigger could not fold it (%s): reports read it from the items"
                                     % mark["reason"]})
        else:
            found.append({"table": ROLLUP_TABLE, "id": mark["day"],
                          "problem": "a trigger could not keep this day's rollups (%s): reports read it from the "
                                     "items; `psai rollup rebuild --since %s --until %s` repairs it"
                                     % (mark["reason"], mark["day"], mark["day"])})
    return found


def _check_items(db, model_ids, price_problem):
    """Items whose data cannot be read, or whose snapshot cannot price them."""
    found, verdicts = [], {}
    cursor = db.execute_sql(item_check_sql(is_postgres(db)))
    for item_id, model_id, tokens_in, configured, counts_usable in cursor.fetchall():
        if tokens_in is None:
            found.append({"table": "ps_model_usage_item", "id": item_id,
                          "problem": "no usable token counts (data.usageNormalized.tokensIn)"})
            continue
        if not counts_usable:
            found.append({"table": "ps_model_usage_item", "id": item_id,
                          "problem": "token counts below 0 or beyond %d (data.usageNormalized, data.psai): not "
                                     "priced" % MAX_INTEGER})
            continue
        if configured is None:
            if model_id not in model_ids:
                found.append({"table": "ps_model_usage_item", "id": item_id,
                              "problem": "no price snapshot, and model %s does not exist" % model_id})
            continue
        prices = json.loads(configured) if isinstance(configured, str) else configured
        key = json.dumps(prices, sort_keys=True)
        if key not in verdicts:
            verdicts[key] = price_problem(prices)
        if verdicts[key]:
            found.append({"table": "ps_model_usage_item", "id": item_id,
                          "problem": "its price snapshot cannot price it: %s" % verdicts[key]})
    return found
