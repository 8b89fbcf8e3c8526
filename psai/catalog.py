"""Price catalogs: models and prices from genai-prices or LiteLLM, read
offline, imported with their provenance, and checked for drift.

- ``genai-prices`` (``pip install 'psai[catalog]'``, pinned): its packaged
  data (``genai_prices.data``), never its network update.
- ``litellm``: the cost map inside the installed ``litellm`` package
  (``model_prices_and_context_window_backup.json``), found without importing
  LiteLLM (which fetches prices from the network at import), or a file of
  that format.

Each source model becomes a PolicySynth configuration. Whatever the source
prices and PolicySynth's configuration cannot say (1-hour cache writes,
batch or off-peak prices, per-request fees, ...) is reported by the import
(``unexpressed``), never silently dropped; a model whose token prices cannot
be said at all is skipped with the reason. For genai-prices every mapped
model is checked against genai-prices' own calculation before it is offered:
a rate that would come out differently is reported, not imported as if it
agreed.

Importing a model already imported from the same source (in the same
organization) updates its prices in place through
``PsAiModel.update_configuration``, so the price history keeps the old
prices and recorded calls keep theirs; only the price keys a catalog sets
are touched (a ``regionalProcessingMargin`` of your own stays).

The sources' adapters, which read and map them without a database, are
``psai._genai`` and ``psai._litellm``; this module is the database side:
reading a catalog, importing it, its provenance and drift.
"""
import difflib
import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from ._constants import CATALOG_PRICE_KEYS
from .db import lock, model_db, table_columns, write_transaction
from .errors import CatalogUnavailableError, NotAdoptedError, NotFoundError, ValidationError
from .fields import UTC, utcnow
from ._genai import genai_catalog
from ._genai import Unmappable as Unmappable, genai_entry as genai_entry, genai_usage as genai_usage
from ._genai import standard_prices as standard_prices
from ._litellm import LITELLM_FILE as LITELLM_FILE, litellm_cost_map_path as litellm_cost_map_path
from ._litellm import litellm_catalog, litellm_version
from .models import ModelProvenance, PsAiModel, default_ids, provenance as provenance
from .models import newest_first
from .query import MODEL_DEFAULTS, add_model, imported_ids, resolve_model
from .schemas import load_json, validate_configuration, validate_model_values

__all__ = ["SOURCES", "read_catalog", "import_catalog", "add_from_catalog", "catalog_defaults", "diff", "provenance",
           "default_size",
           "CATALOG_PRICE_KEYS", "CatalogUnavailableError"]

SOURCES = ("genai-prices", "litellm")
DEFAULT_MAX_TOKENS_OUT = 4096
# Input price per million below which a model is "small", then "medium"
# (``default_size``); documented in docs/catalog.md.
SIZE_BOUNDS = ((0.5, "small"), (2.0, "medium"))


def default_size(prices: dict[str, Any]) -> str:
    """The modelSize for a model when none is given: by its input price per
    million tokens, below 0.5 small, below 2 medium, else large."""
    rate = prices.get("costInTokensPerMillion") or 0
    for bound, size in SIZE_BOUNDS:
        if rate < bound:
            return size
    return "large"


# -- reading a catalog -----------------------------------------------------------

class _ModelFilter:
    """Which source models ``--model`` patterns take: a pattern is a source
    model id (``anthropic/claude-sonnet-4-5``; the id without its provider
    when that is one model only) or a glob (``openai/gpt-4o*``). Records
    what each pattern matched, to refuse a pattern that matches nothing, or
    several providers' copies of one id."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = sorted(set(patterns))
        self.matched: dict[str, set[str]] = {pattern: set() for pattern in self.patterns}
        self.exact: dict[str, bool] = {pattern: False for pattern in self.patterns}
        self.seen: list[str] = []

    def __call__(self, source_model: str, bare: str) -> bool:
        self.seen.append(source_model)
        taken = False
        for pattern in self.patterns:
            if _GLOB.search(pattern):
                # A glob with a provider reads whole ids; without one, ids within a provider.
                hit = fnmatch.fnmatchcase(source_model if "/" in pattern else bare, pattern)
            else:
                hit = source_model == pattern or bare == pattern
                self.exact[pattern] |= source_model == pattern
            if hit:
                self.matched[pattern].add(source_model)
                taken = True
        return taken

    def chosen(self, source: str, version: str) -> set[str]:
        """The source models taken; a ValidationError for a pattern that
        takes none, or a bare id that several providers have."""
        errors: dict[str, list[str]] = {}
        chosen: set[str] = set()
        for pattern in self.patterns:
            found = self.matched[pattern]
            if self.exact[pattern]:
                found = {pattern}
            if not found:
                near = difflib.get_close_matches(pattern, self.seen, n=5, cutoff=0.6)
                errors[pattern] = ["No model of %s %s is %r%s." % (
                    source, version, pattern, "; nearest: %s" % ", ".join(near) if near else "")]
            elif len(found) > 1 and not _GLOB.search(pattern):
                errors[pattern] = ["Several models have this id: %s; give one as provider/model (or --provider)."
                                   % ", ".join(sorted(found))]
            chosen |= found
        if errors:
            raise ValidationError({"model": errors})
        return chosen


_GLOB = re.compile(r"[*?\[]")


def read_catalog(source: str, *, providers: Iterable[str] | None = (), models: Iterable[str] | None = (),
                 file: str | os.PathLike[str] | None = None, now: datetime | None = None,
                 models_must_match: bool = True) -> dict[str, Any]:
    """The models of ``source`` ("genai-prices" or "litellm"), optionally only
    these providers and models: ``{"source", "source_version", "entries":
    {source_model: entry}, "skipped": {source_model: reason}}``. A model is
    named by its source id exactly (or without its provider, when only one
    provider has it), or by a glob; with ``models_must_match`` a name that
    matches no model, or several providers' copies, is a ValidationError.
    ``file``: a LiteLLM cost map to read instead of the installed package's."""
    if source not in SOURCES:
        raise ValidationError({"source": ["Must be one of: %s." % ", ".join(SOURCES)]})
    provider_set = set(providers or ())
    model_set = _ModelFilter(models) if models else None
    if source == "genai-prices":
        if file is not None:
            raise ValidationError({"file": ["genai-prices is read from its installed package only."]})
        version, entries, skipped = genai_catalog(provider_set, model_set, now or datetime.now(UTC))
    else:
        path = file or litellm_cost_map_path()
        with open(path, "rb") as handle:
            raw = handle.read()
        try:
            cost_map = load_json(raw.decode("utf-8"), os.path.basename(path), check=False)
        except UnicodeDecodeError as exc:
            raise ValidationError({os.path.basename(path): ["Not JSON: %s." % exc]}) from None
        if not isinstance(cost_map, dict):
            raise ValidationError({"cost_map": ["Must be a JSON object of model name to prices."]})
        version = (litellm_version() if file is None
                   else "file sha256:%s" % hashlib.sha256(raw).hexdigest()[:16])
        entries, skipped = litellm_catalog(cost_map, provider_set, model_set)
    if model_set is not None and models_must_match:
        chosen = model_set.chosen(source, version)
        entries = {key: value for key, value in entries.items() if key in chosen}
        skipped = {key: value for key, value in skipped.items() if key in chosen}
    return {"source": source, "source_version": version, "entries": entries, "skipped": skipped}


# -- importing -------------------------------------------------------------------

def _provenance_table(db):
    if not table_columns(db, ModelProvenance._meta.table_name):
        raise NotAdoptedError("this database has no psai_model_provenance table: run `psai init --adopt` "
                              "(a PolicySynth database) or `psai init` first")


def _imported(source, organization_id=None, source_models=None):
    """{source_model: (provenance, model)} for the models imported from
    ``source``, the newest row of each source model."""
    query = (ModelProvenance.select(ModelProvenance, PsAiModel)
             .join(PsAiModel)
             .where(ModelProvenance.source == source)
             .order_by(PsAiModel.created_at, PsAiModel.id))
    if organization_id is not None:
        query = query.where(PsAiModel.organization_id == organization_id)
    found = {}
    for row in query:
        if source_models is None or row.source_model in source_models:
            found[row.source_model] = (row, row.model)
    return found


def _catalog_prices(prices):
    return {key: prices[key] for key in CATALOG_PRICE_KEYS if isinstance(prices, dict) and key in prices}


def price_differences(stored: Any, source: Any) -> list[tuple[str, Any, Any]]:
    """[(key, stored value, source value)] over the price keys the source
    sets: a key it does not set (your 1-hour multiplier, a margin) is yours
    and never a difference, so applying differences never removes it."""
    stored, source = _catalog_prices(stored), _catalog_prices(source)
    return [(key, stored.get(key), source[key]) for key in CATALOG_PRICE_KEYS
            if key in source and not _same(stored.get(key), source[key])]


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b  # 2 == 2.0: PostgreSQL's jsonb may give an int back


def _update_prices(model, differences):
    """Set the differing price keys (``price_differences``) of ``model`` to
    the source's, through the price-change path (history kept)."""
    model.update_configuration({"prices": {key: source for key, _stored, source in differences}})


def import_catalog(source: str, *, user_id: int | None = None, organization_id: int | None = None,
                   size: str | None = None,
                   temperature: float = 0.7, providers: Iterable[str] | None = (), models: Iterable[str] | None = (),
                   dry_run: bool = False, file: str | os.PathLike[str] | None = None,
                   progress: Callable[[int, int], object] | None = None) -> dict[str, Any]:
    """Import (or update) the models of a price catalog, in one transaction.

    Returns ``{"source", "source_version", "models": [{"source_model",
    "name", "model_id", "action", "prices", "unexpressed", "calls"}],
    "skipped": {source_model: reason}}``; ``action`` is imported, updated
    or unchanged (``would import`` / ``would update`` with ``dry_run``,
    which writes nothing); ``calls``, for a new row, says whether responses
    answered as its model would land on it or stay on the model they land
    on now (your rows win over imported ones: ``psai.query.resolve_model``).
    Ids not given are the store's defaults (``psai.config``)."""
    ids = default_ids(user_id=user_id, organization_id=organization_id)
    user_id, organization_id = ids["user_id"], ids["organization_id"]
    validate_model_values({"user_id": user_id, "organization_id": organization_id}, partial=True)
    if size is not None and size not in ("large", "medium", "small"):
        raise ValidationError({"size": ["Must be one of: large, medium, small."]})
    catalog = read_catalog(source, providers=providers, models=models, file=file)
    entries = catalog["entries"]
    db = model_db(PsAiModel)
    _provenance_table(db)
    result = {"source": source, "source_version": catalog["source_version"], "models": [],
              "skipped": catalog["skipped"]}
    total = len(entries)
    with write_transaction(db):
        # One import of a source model at a time (per organization), as
        # superseding a name is: what is "already imported" is read after the
        # locks, so a concurrent import's rows are seen, never duplicated. In
        # one order for every import, so two cannot deadlock.
        for source_model in sorted(entries):
            lock(db, ("catalog import", source, organization_id, source_model))
        existing = _imported(source, organization_id, set(entries))
        now = utcnow()
        for done, (source_model, entry) in enumerate(sorted(entries.items()), 1):
            found = existing.get(source_model)
            row = {"source_model": source_model, "name": entry["name"], "model_id": None,
                   "prices": entry["configuration"]["prices"], "unexpressed": entry["unexpressed"], "calls": None}
            if found is None:
                configuration = _new_configuration(entry, size, temperature)
                row["action"] = "would import" if dry_run else "imported"
                before = _landing(configuration)
                if before is not None and before.id not in imported_ids([before.id]):
                    row["calls"] = "calls answered as %r stay on your model %s (id %s)" % (
                        configuration["model"], before.name, before.id)
                elif before is not None:
                    row["calls"] = "calls answered as %r %s here instead of on %s (id %s)" % (
                        configuration["model"], "would land" if dry_run else "land", before.name, before.id)
                if not dry_run:
                    model = add_model(name=entry["name"], user_id=user_id, organization_id=organization_id,
                                      configuration=configuration)
                    ModelProvenance.create(model=model.id, source=source, source_version=catalog["source_version"],
                                           source_model=source_model, imported_at=now)
                    row["model_id"] = model.id
            else:
                provenance_row, model = found
                row["model_id"], row["name"] = model.id, model.name
                changed = price_differences(model.configuration.get("prices"), entry["configuration"]["prices"])
                row["action"] = ("would update" if dry_run else "updated") if changed else "unchanged"
                if not dry_run:
                    if changed:
                        _update_prices(model, changed)
                    ModelProvenance.update(source_version=catalog["source_version"], imported_at=now) \
                        .where(ModelProvenance.id == provenance_row.id).execute()
            result["models"].append(row)
            if progress:
                progress(done, total)
    return result


def _new_configuration(entry, size, temperature):
    """A catalog entry's configuration as a new model's: with a size (given,
    else by input price), a temperature and an output limit."""
    configuration = dict(entry["configuration"], modelSize=size or default_size(
        entry["configuration"]["prices"]), defaultTemperature=temperature)
    configuration["maxTokensOut"] = entry.get("maxTokensOut") or min(
        DEFAULT_MAX_TOKENS_OUT, configuration.get("maxContextTokens", DEFAULT_MAX_TOKENS_OUT))
    return validate_configuration(configuration)


# psai's providers and the providers the catalogs file their models under (default: the same name).
_CATALOG_PROVIDERS = {"openaiResponses": ("openai",), "google": ("google", "gemini", "vertex_ai-language-models")}


def catalog_defaults(provider: str, model: str, *,
                     file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What a catalog installed here says of a new model that a script gives
    by provider and model name (``psai models add NAME --provider P --model
    M --in X --out Y``): ``{"size", "max_tokens_out"}``, keywords of
    ``query.model_configuration``, as ``add_from_catalog`` derives them (the
    size by the catalog's input price, ``default_size``; the output limit
    the catalog's, else 4096 within the context window), from the first of
    LiteLLM's cost map (it knows output limits; ``file``: this one instead
    of the installed package's) and genai-prices that has the model under
    exactly that name. ``{}`` when neither is installed or knows it: the
    documented defaults (``query.MODEL_DEFAULTS``) apply."""
    if _GLOB.search(model):
        return {}  # a model name is never read as a glob of the catalog's
    providers = set(_CATALOG_PROVIDERS.get(provider, (provider,)))
    for source in ("litellm", "genai-prices"):
        try:
            catalog = read_catalog(source, providers=providers, models=[model], models_must_match=False,
                                   file=file if source == "litellm" else None)
        except CatalogUnavailableError:
            continue
        for found in sorted(catalog["entries"]):
            entry = catalog["entries"][found]
            if entry["configuration"]["model"] == model:
                configuration = _new_configuration(entry, None, MODEL_DEFAULTS["defaultTemperature"])
                return {"size": configuration["modelSize"], "max_tokens_out": configuration["maxTokensOut"]}
    return {}


def _landing(configuration: dict[str, Any]) -> PsAiModel | None:
    """The model a response answered as this configuration's model lands on now (None: none)."""
    try:
        return resolve_model(str(configuration.get("model")), provider=configuration.get("provider"))
    except NotFoundError:
        return None


def add_from_catalog(name: str, source: str, source_model: str, *, user_id: int | None = None,
                     organization_id: int | None = None, size: str | None = None, temperature: float = 0.7,
                     file: str | os.PathLike[str] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Your model ``name`` with a catalog's prices (``psai models add NAME
    --from genai-prices openai/gpt-4o``): a model of that name (in the
    organization) gets the catalog's price keys, its other keys and yours
    kept; none, and it is added with the catalog's configuration. Either
    way its provenance is recorded, so ``catalog diff`` and later imports
    of that source model update this row, never add one beside it. Returns
    ``{"model_id", "name", "source", "source_version", "source_model",
    "action" (created, filled, unchanged; "would ..." with ``dry_run``),
    "changes": [(key, before, after)], "unexpressed"}``."""
    catalog = read_catalog(source, models=[source_model], file=file)
    if not catalog["entries"]:
        [(found, reason)] = catalog["skipped"].items()
        raise ValidationError({"source_model": ["%s %s cannot be imported: %s." % (source, found, reason)]})
    [(found, entry)] = catalog["entries"].items()
    ids = default_ids(user_id=user_id, organization_id=organization_id)
    validate_model_values(dict(ids, name=name), partial=True)
    db = model_db(PsAiModel)
    _provenance_table(db)
    with write_transaction(db):
        lock(db, ("add_model", ids["organization_id"], name))
        existing = newest_first(PsAiModel.select().where(
            (PsAiModel.name == name) & (PsAiModel.organization_id == ids["organization_id"]))).first()
        result: dict[str, Any] = {"model_id": None, "name": name, "source": source,
                                  "source_version": catalog["source_version"], "source_model": found,
                                  "changes": [], "unexpressed": entry["unexpressed"]}
        if existing is None:
            configuration = _new_configuration(entry, size, temperature)
            result["action"] = "would create" if dry_run else "created"
            result["changes"] = [(key, None, value) for key, value in configuration["prices"].items()]
            if dry_run:
                return result
            model = add_model(name=name, user_id=ids["user_id"], organization_id=ids["organization_id"],
                              configuration=configuration)
        else:
            model = existing
            stored = model.configuration.get("prices") if isinstance(model.configuration, dict) else None
            changes = price_differences(stored, entry["configuration"]["prices"])
            result["changes"] = changes
            result["action"] = ("would fill" if dry_run else "filled") if changes else "unchanged"
            if dry_run:
                result["model_id"] = model.id
                return result
            if changes:
                _update_prices(model, changes)
        ModelProvenance.insert(model=model.id, source=source, source_version=catalog["source_version"],
                               source_model=found, imported_at=utcnow()).on_conflict(
            conflict_target=[ModelProvenance.model],
            update={ModelProvenance.source: source, ModelProvenance.source_version: catalog["source_version"],
                    ModelProvenance.source_model: found, ModelProvenance.imported_at: utcnow()}).execute()
        result["model_id"] = model.id
    return result


def diff(source: str, *, file: str | os.PathLike[str] | None = None, organization_id: int | None = None,
         apply: bool = False) -> list[dict[str, Any]]:
    """The imported, active models whose stored prices differ from ``source``
    as installed now: ``[{"model_id", "name", "source_model", "field",
    "stored", "source"}]``, one row a differing price key (``field`` "model"
    when the source no longer has or can no longer map the model). With
    ``apply``, the differences are written through the price-change path in
    one transaction, and the same list is returned."""
    db = model_db(PsAiModel)
    _provenance_table(db)
    imported = {key: value for key, value in _imported(source, organization_id).items()
                if isinstance(value[1].configuration, dict) and value[1].configuration.get("active") is not False}
    if not imported:
        return []
    providers = {name.split("/", 1)[0] for name in imported} if source == "genai-prices" else ()
    catalog = read_catalog(source, providers=providers, models=set(imported), file=file, models_must_match=False)
    rows, updates = [], []
    for source_model, (_, model) in sorted(imported.items()):
        base = {"model_id": model.id, "name": model.name, "source_model": source_model}
        entry = catalog["entries"].get(source_model)
        if entry is None:
            reason = catalog["skipped"].get(source_model, "not in %s %s" % (source, catalog["source_version"]))
            rows.append(dict(base, field="model", stored=source_model, source=None, reason=reason))
            continue
        source_prices = entry["configuration"]["prices"]
        differences = price_differences(model.configuration.get("prices"), source_prices)
        rows += [dict(base, field="prices." + key, stored=stored, source=new) for key, stored, new in differences]
        if differences:
            updates.append((model, differences))
    if apply and updates:
        with write_transaction(db):
            for model, differences in updates:
                _update_prices(model, differences)
            ModelProvenance.update(source_version=catalog["source_version"], imported_at=utcnow()) \
                .where(ModelProvenance.model.in_([model.id for model, _ in updates])).execute()
    return rows
