"""Finding and adding models: configuration filters, model selection for
agents, PolicySynth's override lookup, superseding a model by name, and the
sub-agent tree. The tables' own queries live beside them in ``psai.models``
and are importable here too.

Filters on configuration fields give the same rows on SQLite and PostgreSQL
and never put a caller's key or value into the SQL text: values are always
bound parameters, and keys must be plain identifiers (PolicySynth's are
camelCase) or the filter is refused with ``psai.ValidationError``.
"""
from collections.abc import Mapping
from typing import Any

from peewee import ColumnBase

from .db import is_postgres, lock, model_db, write_transaction
from .errors import NotFoundError
from .models import (
    SIZE_FALLBACK, AgentModels, PsAiModel, newest_first, model_choices, model_history, select_model,
    sub_agent_tree, where_config,
)
from .sql import INDEXED_PATHS
from .sql import config_filter as _config_filter

__all__ = ["config_filter", "where_config", "select_model", "model_choices", "find_by_provider_model",
           "add_model", "model_history", "sub_agent_tree", "SIZE_FALLBACK", "INDEXED_PATHS"]


def config_filter(filters: Mapping[str, Any]) -> ColumnBase:
    """A WHERE expression matching models whose configuration has every
    ``path: value`` of ``filters`` (a value that is a list matches any of
    it, however long the list)."""
    return _config_filter(PsAiModel.configuration, filters, is_postgres(model_db(PsAiModel)))


def find_by_provider_model(provider: str, model_name: str, *, include_inactive: bool = False) -> PsAiModel:
    """PolicySynth's override lookup by provider and model name, made
    deterministic: the newest active row wins."""
    filters: dict[str, Any] = {"provider": provider, "model": model_name}
    if not include_inactive:
        filters["active"] = True
    found = newest_first(where_config(filters)).first()
    if found is None:
        raise NotFoundError("no %smodel %r from provider %r" % (
            "" if include_inactive else "active ", model_name, provider))
    return found


def add_model(*, name: str, user_id: int, organization_id: int, configuration: dict[str, Any]) -> PsAiModel:
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
