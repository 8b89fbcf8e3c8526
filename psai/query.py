"""Finding and adding models: configuration filters, model selection for
agents, PolicySynth's override lookup, superseding a model by name, and the
sub-agent tree. The tables' own queries live beside them in ``psai.models``
and are importable here too.

Filters on configuration fields give the same rows on SQLite and PostgreSQL
and never put a caller's key or value into the SQL text: values are always
bound parameters, and keys must be plain identifiers (PolicySynth's are
camelCase) or the filter is refused with ``psai.ValidationError``.
"""
import re
from collections.abc import Mapping
from typing import Any, Literal, overload

from peewee import ColumnBase

from .db import is_postgres, lock, model_db, table_columns, write_transaction
from .enums import PsAiModelProvider
from .errors import NotFoundError, ValidationError
from .models import (
    SIZE_FALLBACK, AgentModels, ModelProvenance, PsAiModel, model_choices, model_history, nearest_names, newest_first,
    select_model, sub_agent_tree, where_config,
)
from .schemas import validate_configuration
from ._sql import INDEXED_PATHS
from ._sql import config_filter as _config_filter

__all__ = ["config_filter", "where_config", "select_model", "model_choices", "find_by_provider_model",
           "add_model", "model_history", "sub_agent_tree", "SIZE_FALLBACK", "INDEXED_PATHS", "resolve_model",
           "model_configuration", "imported_ids", "PRICE_FLAGS", "MODEL_DEFAULTS", "KNOWN_PROVIDERS",
           "unmatched_model", "is_unmatched", "UNMATCHED_PREFIX"]


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


def add_model(*, name: str, configuration: dict[str, Any], user_id: int | None = None,
              organization_id: int | None = None) -> PsAiModel:
    """Add a model as PolicySynth's add-model tool does: older rows with the
    same name (in the organization) are deactivated and the new row created,
    in one transaction. Agents linked to an older row are linked to the new
    one instead, so they go on selecting a model of that name (PolicySynth
    would go on calling the old row, inactive or not); calls already
    recorded keep the prices they were charged at. Ids not given are the
    store's defaults (``psai.config``)."""
    new = PsAiModel(name=name, user_id=user_id, organization_id=organization_id,
                    configuration=configuration)
    new.validate()  # before anything changes; fills the default ids
    organization_id = new.organization_id
    with write_transaction(model_db(PsAiModel)):
        # One superseding of a name at a time: reading the older rows and
        # writing the new one must not interleave with another's.
        lock(model_db(PsAiModel), ("add_model", organization_id, name))
        older = list(PsAiModel.select()
                     .where((PsAiModel.name == name) & (PsAiModel.organization_id == organization_id)))
        for row in older:
            if isinstance(row.configuration, dict) and row.configuration.get("active") is not False:
                row.deactivate()  # the flag alone, under the row's lock: nothing else is written back
        new.save(force_insert=True)
        _move_links([row.id for row in older], new.id)
    return new


# The flags `psai models add` takes for each price key (without "--"); the
# same names say which flag a bad value came from.
PRICE_FLAGS = {
    "in": "costInTokensPerMillion", "out": "costOutTokensPerMillion", "cached": "costInCachedContextTokensPerMillion",
    "currency": "currency", "web-search-price": "costPerThousandWebSearches",
    "cache-write-multiplier": "cacheWriteInputCostMultiplier",
    "cache-write-1h-multiplier": "cacheWrite1hInputCostMultiplier",
    "long-context-in": "longContextCostInTokensPerMillion",
    "long-context-cached": "longContextCostInCachedContextTokensPerMillion",
    "long-context-out": "longContextCostOutTokensPerMillion", "long-context-threshold": "longContextTokenThreshold",
    "regional-margin": "regionalProcessingMargin",
    "flex-in": "flexTokensIn", "flex-cached": "flexTokensCachedIn", "flex-out": "flexTokensOut",
    "priority-in": "priorityTokensIn", "priority-cached": "priorityTokensCachedIn", "priority-out": "priorityTokensOut",
    "fast-in": "fastTokensIn", "fast-cached": "fastTokensCachedIn", "fast-out": "fastTokensOut",
    "flex-priority-on-long-context": "flexPriorityTokensEnabledOnLongContext",
}
# What a new model gets when it is not said (docs/configuration.md).
MODEL_DEFAULTS = {"type": "text", "modelSize": "medium", "maxTokensOut": 4096, "defaultTemperature": 0.7,
                  "currency": "USD"}
KNOWN_PROVIDERS = tuple(provider.value for provider in PsAiModelProvider)


def model_configuration(*, provider: str, model: str, prices: Mapping[str, Any], model_type: str | None = None,
                        size: str | None = None, max_tokens_out: int | None = None,
                        temperature: float | None = None, active: bool = True,
                        any_provider: bool = False, **extra: Any) -> dict[str, Any]:
    """A whole, validated configuration from what a script cares about:
    the provider, its model name and ``prices`` (PolicySynth's keys; the
    cached input rate is the input rate unless given, the currency USD,
    upper-cased). The rest has documented defaults (``MODEL_DEFAULTS``):
    type text, size medium, 4096 tokens out, temperature 0.7
    (``catalog.catalog_defaults`` gives a size and output limit from an
    installed catalog that knows the model). A provider
    psai does not know (``KNOWN_PROVIDERS``) is refused unless
    ``any_provider``. ``extra``: other configuration keys (apiModel, ...)."""
    errors: dict[str, list[str]] = {}
    if not any_provider and provider not in KNOWN_PROVIDERS:
        errors["provider"] = ["Unknown provider %r: one of %s (or allow any provider)." % (
            provider, ", ".join(KNOWN_PROVIDERS))]
    if not isinstance(prices, Mapping):
        errors["prices"] = ["Must be a mapping of PolicySynth's price keys."]
    if errors:
        raise ValidationError(errors)
    priced = {key: value for key, value in prices.items() if value is not None}
    currency = priced.get("currency", MODEL_DEFAULTS["currency"])
    priced["currency"] = currency.upper() if isinstance(currency, str) else currency
    if "costInCachedContextTokensPerMillion" not in priced and "costInTokensPerMillion" in priced:
        priced["costInCachedContextTokensPerMillion"] = priced["costInTokensPerMillion"]
    configuration = dict(extra, type=model_type or MODEL_DEFAULTS["type"],
                         modelSize=size or MODEL_DEFAULTS["modelSize"], model=model, provider=provider,
                         active=active, prices=priced,
                         maxTokensOut=MODEL_DEFAULTS["maxTokensOut"] if max_tokens_out is None else max_tokens_out,
                         defaultTemperature=MODEL_DEFAULTS["defaultTemperature"] if temperature is None
                         else temperature)
    return validate_configuration(configuration)


def _move_links(old_ids, new_id):
    if not old_ids:
        return
    links = AgentModels.ai_model.in_(old_ids)
    agent_ids = sorted(set(AgentModels.select(AgentModels.agent).where(links).scalars()))
    if agent_ids:
        AgentModels.delete().where(links).execute()
        AgentModels.insert_many([{"agent": agent_id, "ai_model": new_id} for agent_id in agent_ids]) \
            .on_conflict_ignore().execute()


# -- a response's model name to a stored model ---------------------------------------------

# Snapshot suffixes providers answer with, beside the name a model is configured by.
_SNAPSHOT_SUFFIXES = (
    ("a dated snapshot (-YYYY-MM-DD)", re.compile(r"-\d{4}-\d{2}-\d{2}\Z")),
    ("a dated snapshot (-YYYYMMDD)", re.compile(r"-\d{8}\Z")),
    ("a dated snapshot (@YYYYMMDD)", re.compile(r"@\d{8}\Z")),
    ("a version suffix (-NNN)", re.compile(r"-\d{3}\Z")),
)


def _undated(name: str) -> tuple[str, str] | None:
    """(the name without its snapshot suffix, which suffix), or None."""
    for why, suffix in _SNAPSHOT_SUFFIXES:
        if suffix.search(name):
            return suffix.sub("", name), why
    return None


def imported_ids(model_ids: list[int]) -> set[int]:
    """Of these models, those a catalog import made: named by their source
    model (``openai/gpt-4o``), with its provenance. A model you named and
    filled from a catalog (``psai models add NAME --from ...``) is yours."""
    db = model_db(PsAiModel)
    if not model_ids or not table_columns(db, ModelProvenance._meta.table_name):
        return set()
    query = (ModelProvenance.select(ModelProvenance.model).join(PsAiModel)
             .where(ModelProvenance.model.in_(model_ids) & (PsAiModel.name == ModelProvenance.source_model)))
    return {row.model_id for row in query}


def _yours_first(by_name: dict[tuple[str, str], list[Any]]) -> tuple[dict[tuple[str, str], list[Any]], list[Any]]:
    """Among the candidates of a response's model name, rows you made win
    over rows a catalog import made (an import never takes your calls):
    the candidates left, and those passed over."""
    candidates = [row.id for found in by_name.values() for row in found]
    if len(candidates) < 2:  # one row (or none) is left whether it was imported or not: no query
        return by_name, []
    imported = imported_ids(candidates)
    if not imported or all(row.id in imported for found in by_name.values() for row in found):
        return by_name, []
    yours = {key: [row for row in found if row.id not in imported] for key, found in by_name.items()}
    passed = [row for found in by_name.values() for row in found if row.id in imported]
    return {key: found for key, found in yours.items() if found}, passed


@overload
def resolve_model(name: str, *, provider: str | list[str] | None = None,
                  explain: Literal[False] = False) -> PsAiModel: ...


@overload
def resolve_model(name: str, *, provider: str | list[str] | None = None,
                  explain: Literal[True]) -> tuple[PsAiModel, str]: ...


@overload
def resolve_model(name: str, *, provider: str | list[str] | None = None,
                  explain: bool) -> PsAiModel | tuple[PsAiModel, str]: ...


def resolve_model(name: str, *, provider: str | list[str] | None = None,
                  explain: bool = False) -> PsAiModel | tuple[PsAiModel, str]:
    """The stored model a response's model name (``gpt-4o-2024-08-06``,
    ``claude-sonnet-4-5-20250929``, ``models/gemini-2.5-pro``) means: an
    active model whose ``model`` or ``apiModel`` is the name, else the name
    without its dated snapshot suffix (Gemini's ``models/`` prefix never
    counts). Never a different model: ``gpt-4o-mini`` is not ``gpt-4o``.
    Rows you made win over rows a catalog import made (``imported_ids``);
    among rows of one configured name the newest wins (as PolicySynth's
    override lookup); two different configured names equally good, or
    none, is a NotFoundError naming the candidates. ``provider``: only
    models of that provider (or of any in a list). ``explain=True``
    returns ``(model, reason)``."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({"name": ["Give the model name the provider answered with."]})
    asked = name.strip()
    wanted = asked[len("models/"):] if asked.startswith("models/") else asked
    tries = [(wanted, "the name itself")]
    undated = _undated(wanted)
    if undated is not None:
        tries.append((undated[0], "the name without %s" % undated[1]))
    filters: dict[str, Any] = {"active": True}
    if provider is not None:
        filters["provider"] = provider
    rows = list(newest_first(where_config(filters)))
    for candidate, how in tries:
        by_name: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            configuration = row.configuration if isinstance(row.configuration, dict) else {}
            for key in ("model", "apiModel"):
                if configuration.get(key) == candidate:
                    by_name.setdefault((str(configuration.get("provider")), key), []).append(row)
                    break
        by_name, passed_over = _yours_first(by_name)
        if len(by_name) > 1:
            raise NotFoundError("%r matches models of several names (%s): give the model, or the provider" % (
                asked, "; ".join("%s %s=%r: %s" % (p, key, candidate, ", ".join("%s (id %s)" % (r.name, r.id)
                                                                                  for r in found))
                                 for (p, key), found in sorted(by_name.items()))))
        if by_name:
            [((_provider, key), found)] = by_name.items()
            chosen = found[0]
            reason = "%s equals configuration.%s of %d active model(s)%s; the newest row, id %s, wins" % (
                how, key, len(found), " of provider %r" % provider if provider else "", chosen.id)
            if passed_over:
                reason += "; rows you made win over rows a catalog import made: %s passed over" % ", ".join(
                    "%s (id %s)" % (row.name, row.id) for row in passed_over)
            return (chosen, reason) if explain else chosen
    configured = {str(r.configuration.get(key)) for r in rows if isinstance(r.configuration, dict)
                  for key in ("model", "apiModel") if isinstance(r.configuration.get(key), str)}
    near = nearest_names(undated[0] if undated else wanted, configured)
    raise NotFoundError("no active model%s is configured as %r%s%s" % (
        " of provider %r" % provider if provider else "", wanted,
        " or %r" % undated[0] if undated else "", ("; the nearest configured: %s" % ", ".join(near)) if near else ""))


# A placeholder model's name: calls whose model name matched no configured model.
UNMATCHED_PREFIX = "Unmatched model: "


def is_unmatched(model: PsAiModel) -> bool:
    """True for a placeholder model (``unmatched_model``): inactive, its
    prices empty, named with UNMATCHED_PREFIX."""
    configuration = model.configuration if isinstance(model.configuration, dict) else {}
    return (isinstance(model.name, str) and model.name.startswith(UNMATCHED_PREFIX)
            and configuration.get("active") is False and configuration.get("prices") == {})


def unmatched_model(name: str, provider: str | None, *, user_id: int) -> PsAiModel:
    """The placeholder model that holds the calls whose response named
    ``name`` (of ``provider``) when no active model matched it: found, or
    created once (several processes at once make one). It is inactive, so
    nothing selects or resolves it, and its prices are empty (``{}``), so
    its calls are unpriced, saying why, until ``psai.assign_unmatched``
    moves them to the model configured for the name."""
    provider = provider or "unknown"
    label = ("%s%s (%s)" % (UNMATCHED_PREFIX, name, provider))[:255]
    db = model_db(PsAiModel)
    with write_transaction(db):
        lock(db, ("unmatched model", label))
        found = newest_first(PsAiModel.select().where(PsAiModel.name == label)).first()
        if found is not None and is_unmatched(found):
            return found
        return PsAiModel.create(user_id=user_id, organization_id=0, name=label, configuration={
            "type": "text", "modelSize": "medium", "model": name[:255], "provider": provider[:64],
            "active": False, "prices": {}, "maxTokensOut": 1, "defaultTemperature": 0})
