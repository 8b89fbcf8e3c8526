"""Stored rows psai would refuse, found and shown without failing.

Rows written by PolicySynth, another tool or by hand can hold anything. psai
never lets one of them break a listing, an export or a report: each is shown
as far as it can be read, flagged with what is wrong. ``check()`` (``psai
check``) lists every such row and why, so it can be fixed or deactivated.
"""
import json
from collections.abc import Callable, Iterable
from typing import Any, cast


from .db import is_postgres, model_db, table_columns
from .errors import ValidationError
from .items import price_problem
from .models import AgentModels, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, usage_counters
from .rollups import ROLLUP_TABLE, verify as verify_rollups
from .schemas import (
    INCLUDE, dump_rows, readable, shape_problem, validate_agent_values, validate_model_values,
)
from .sql import item_check_sql

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


def check() -> list[dict[str, Any]]:
    """Every stored row psai would refuse or cannot use, as dicts
    ``{"table", "id", "problem"}`` (``id`` is a pair for a link)."""
    found: list[dict[str, Any]] = []
    model_ids: set[int] = set()
    agent_ids: set[int] = set()
    for model in PsAiModel.select().order_by(PsAiModel.id):
        model_ids.add(model.id)
        problem = model_problem(model)
        if problem:
            found.append({"table": "ps_ai_models", "id": model.id, "problem": problem})
    for agent in PsAgent.select().order_by(PsAgent.id):
        agent_ids.add(agent.id)
        problem = agent_problem(agent)
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
    if table_columns(db, PsModelUsageItem._meta.table_name):
        found += _check_items(db, model_ids, price_problem)
        found += [{"table": ROLLUP_TABLE, "id": p["day"], "problem": p["problem"]} for p in verify_rollups(db)]
    return found


def _check_items(db, model_ids, price_problem):
    """Items whose data cannot be read, or whose snapshot cannot price them."""
    found, verdicts = [], {}
    cursor = db.execute_sql(item_check_sql(is_postgres(db)))
    for item_id, model_id, tokens_in, configured in cursor.fetchall():
        if tokens_in is None:
            found.append({"table": "ps_model_usage_item", "id": item_id,
                          "problem": "no usable token counts (data.usageNormalized.tokensIn)"})
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
