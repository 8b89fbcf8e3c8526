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
"""
import hashlib
import importlib.util
import json
import os
from datetime import datetime
from decimal import Decimal

from .db import model_db, table_columns, write_transaction
from .errors import PsaiError, ValidationError
from .fields import UTC, utcnow
from .models import ModelProvenance, PsAiModel
from .schemas import validate_configuration

__all__ = ["SOURCES", "read_catalog", "import_catalog", "diff", "provenance", "default_size",
           "CATALOG_PRICE_KEYS", "CatalogUnavailableError"]

SOURCES = ("genai-prices", "litellm")
DEFAULT_MAX_TOKENS_OUT = 4096
# Input price per million below which a model is "small", then "medium"
# (``default_size``); documented in docs/catalog.md.
SIZE_BOUNDS = ((0.5, "small"), (2.0, "medium"))

# The price keys a catalog import writes and a diff compares; any other key
# under ``prices`` is the user's and left alone.
CATALOG_PRICE_KEYS = (
    "costInTokensPerMillion", "costOutTokensPerMillion", "costInCachedContextTokensPerMillion", "currency",
    "cacheWriteInputCostMultiplier", "costPerThousandWebSearches", "longContextTokenThreshold",
    "longContextCostInTokensPerMillion", "longContextCostInCachedContextTokensPerMillion",
    "longContextCostOutTokensPerMillion", "flexPriorityTokensEnabledOnLongContext",
    "flexTokensIn", "flexTokensCachedIn", "flexTokensOut", "priorityTokensIn", "priorityTokensCachedIn",
    "priorityTokensOut", "fastTokensIn", "fastTokensCachedIn", "fastTokensOut",
)


class CatalogUnavailableError(PsaiError):
    """The source's package or file is not there."""


def default_size(prices):
    """The modelSize for a model when none is given: by its input price per
    million tokens, below 0.5 small, below 2 medium, else large."""
    rate = prices.get("costInTokensPerMillion") or 0
    for bound, size in SIZE_BOUNDS:
        if rate < bound:
            return size
    return "large"


# -- genai-prices ----------------------------------------------------------------

# genai-prices price keys PolicySynth's configuration expresses.
_GENAI_EXPRESSED = {"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "web_searches_kcount"}
_GENAI_WHAT = {
    "cache_write_1h_mtok": "1-hour cache writes (PolicySynth has one cache-write multiplier)",
    "requests_kcount": "a per-request fee",
    "storage_searches_kcount": "file-search calls",
    "output_reasoning_mtok": "a separate reasoning-token price",
}
# PolicySynth's inference tiers and the genai-prices request contexts they are.
_TIER_CONTEXTS = {"flex": ({"service_tier": "flex"},), "priority": ({"service_tier": "priority"},),
                  "fast": ({"speed": "fast"}, {"service_tier": "fast"})}
_TIER_KEYS = {"flex": ("flexTokensIn", "flexTokensCachedIn", "flexTokensOut"),
              "priority": ("priorityTokensIn", "priorityTokensCachedIn", "priorityTokensOut"),
              "fast": ("fastTokensIn", "fastTokensCachedIn", "fastTokensOut")}
_IGNORED_CONTEXTS = ({"service_tier": "default"},)  # the standard prices again


def _genai():
    try:
        import genai_prices
        from genai_prices import data
    except ImportError:
        raise CatalogUnavailableError(
            "genai-prices is not installed: pip install 'psai[catalog]'") from None
    return genai_prices.__version__, data.providers


def _price_text(value):
    from genai_prices.types import TieredPrices
    if isinstance(value, TieredPrices):
        return "%s (above %s input tokens: %s)" % (
            value.base, ", ".join(str(t.start) for t in value.tiers), ", ".join(str(t.price) for t in value.tiers))
    return str(value)


def standard_prices(model, now):
    """genai-prices' prices for ``model`` in force at ``now`` without a
    request context, and notes on the dated and time-of-day prices beside
    them. Time-of-day prices (off-peak discounts) are left out: PolicySynth
    has none, and the import must not depend on the hour it runs."""
    from genai_prices.types import ModelPrice, StartDateConstraint, TimeOfDateConstraint
    if isinstance(model.prices, ModelPrice):
        return model.prices, []
    chosen, notes = model.prices[0].prices, []
    for conditional in reversed(model.prices):  # genai-prices: the last one in force wins
        constraint = conditional.constraint
        if constraint is None or (isinstance(constraint, StartDateConstraint) and constraint.active(now)):
            chosen = conditional.prices
            break
    for conditional in model.prices:
        constraint = conditional.constraint
        if isinstance(constraint, TimeOfDateConstraint):
            notes.append("time-of-day prices %s-%s UTC: %s" % (
                constraint.start_time.strftime("%H:%M"), constraint.end_time.strftime("%H:%M"),
                conditional.prices))
        elif isinstance(constraint, StartDateConstraint) and not constraint.active(now):
            notes.append("a price change from %s: %s" % (constraint.start_date, conditional.prices))
    return chosen, notes


def _with_context(model, standard, context, now):
    """``standard`` with the overrides of the variants matching ``context``
    (genai-prices' own rule: the first matching variant sets each key)."""
    from copy import copy
    overrides, matched = {}, False
    for variant in model.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        if variant.when != context:
            continue
        matched = True
        for key, price in variant.prices.__dict__.items():
            if price is not None:
                overrides.setdefault(key, price)
    if not matched:
        return None
    resolved = copy(standard)
    resolved.__dict__.update(overrides)
    return resolved


class Unmappable(ValueError):
    """A source model whose token prices PolicySynth's configuration cannot say."""


def _split(prices, key):
    """(base, long, threshold) of one genai-prices price: a flat price has no
    long rate; a price with one tier above ``start`` input tokens is
    PolicySynth's long context from ``start + 1`` (PolicySynth: total ≥
    threshold; genai-prices: total > start)."""
    from genai_prices.types import TieredPrices
    value = prices.__dict__.get(key)
    if value is None:
        return None, None, None
    if isinstance(value, TieredPrices):
        if len(value.tiers) != 1:
            raise Unmappable("%s has %d price tiers; PolicySynth has one long-context threshold"
                             % (key, len(value.tiers)))
        return value.base, value.tiers[0].price, value.tiers[0].start + 1
    return value, None, None


def _token_rates(prices):
    """The four token rates of a genai-prices ModelPrice as PolicySynth sees
    them: base and long input, cached input, cache write, output; cached input
    and cache writes without a price of their own cost what input costs."""
    rates = {name: _split(prices, key) for name, key in (
        ("in", "input_mtok"), ("cached", "cache_read_mtok"), ("write", "cache_write_mtok"), ("out", "output_mtok"))}
    thresholds = {threshold for _, _, threshold in rates.values() if threshold is not None}
    if len(thresholds) > 1:
        raise Unmappable("long-context thresholds differ between prices (%s)"
                         % ", ".join(str(t - 1) for t in sorted(thresholds)))
    if rates["in"][0] is None:
        raise Unmappable("no input token price")
    for name in ("cached", "write"):
        if rates[name][0] is None:
            rates[name] = rates["in"]
    return rates, (thresholds.pop() if thresholds else None)


def _number(value):
    return float(value) if value is not None else None


def _standard_configuration(provider, model, prices):
    rates, threshold = _token_rates(prices)
    output_keys = [key for key, value in prices.__dict__.items()
                   if value is not None and key.startswith("output_") and key != "output_mtok"]
    if rates["out"][0] is None:
        if output_keys:
            raise Unmappable("no output token price (priced by %s)" % ", ".join(sorted(output_keys)))
        model_type, rates["out"] = "embedding", (Decimal(0), None, None)
    else:
        model_type = "text"
    (rate_in, long_in, _), (cached, long_cached, _) = rates["in"], rates["cached"]
    # A long-context cache-write price is PolicySynth's long input rate times the multiplier: the probes check it.
    (write, _, _), (rate_out, long_out, _) = rates["write"], rates["out"]
    result = {"costInTokensPerMillion": _number(rate_in), "costOutTokensPerMillion": _number(rate_out),
              "costInCachedContextTokensPerMillion": _number(cached), "currency": "USD"}
    if prices.__dict__.get("cache_write_mtok") is not None and write != rate_in:
        if not rate_in:
            raise Unmappable("a cache-write price on a free input price (PolicySynth has a multiplier of it)")
        result["cacheWriteInputCostMultiplier"] = float(write / rate_in)
    if threshold is not None:
        result["longContextTokenThreshold"] = threshold
        for key, value in (("longContextCostInTokensPerMillion", long_in),
                           ("longContextCostInCachedContextTokensPerMillion", long_cached),
                           ("longContextCostOutTokensPerMillion", long_out)):
            if value is not None:
                result[key] = float(value)
    web = prices.__dict__.get("web_searches_kcount")
    if web is not None:
        if not isinstance(web, Decimal):
            raise Unmappable("tiered web-search prices")
        result["costPerThousandWebSearches"] = float(web)
    configuration = {"type": model_type, "model": model.id, "provider": provider.id, "active": True,
                     "prices": result}
    if model.context_window:
        configuration["maxContextTokens"] = model.context_window
    return configuration, threshold


def _tier_rates(prices):
    rates, _ = _token_rates(prices)
    return (rates["in"][0], rates["cached"][0], rates["out"][0] if rates["out"][0] is not None else Decimal(0))


def _probes(threshold):
    """Usages that between them exercise every rate PolicySynth's
    configuration holds: each token kind below and above the long-context
    threshold, and web searches, each as the difference it makes to a call
    (so a per-request fee, reported on its own, does not hide the rest).
    Cost is linear in each within a regime, so agreeing on these is agreeing
    on every call."""
    regimes = []
    if threshold is None or threshold > 1:
        regimes.append(("", 1000 if threshold is None else min(1000, threshold - 1)))
    if threshold is not None:
        regimes.append((" from %d input tokens" % threshold, threshold))
    for regime, total in regimes:
        yield "input" + regime, {"tokens_in": total}, {}
        yield "cached input" + regime, {"tokens_in": total, "cached_tokens": total}, {}
        yield "cache writes" + regime, {"tokens_in": total, "cache_write_tokens": total}, {}
        yield "output" + regime, {"tokens_in": total, "tokens_out": 1000}, {"tokens_in": total}
        yield ("reasoning tokens" + regime, {"tokens_in": total, "tokens_out": 1000, "reasoning_tokens": 1000},
               {"tokens_in": total, "tokens_out": 1000})
    yield "web searches", {"web_searches": 10}, {}


def genai_usage(tokens_in=0, tokens_out=0, cached_tokens=0, cache_write_tokens=0, reasoning_tokens=0,
                web_searches=0):
    """psai's usage keywords as a genai-prices Usage (both count totals:
    cached and cache-write tokens are part of the input, reasoning part of
    the output)."""
    from genai_prices import Usage
    values = {"input_tokens": tokens_in, "output_tokens": tokens_out, "cache_read_tokens": cached_tokens,
              "cache_write_tokens": cache_write_tokens, "output_reasoning_tokens": reasoning_tokens,
              "web_searches": web_searches}
    return Usage(**{key: value for key, value in values.items() if value})


def _disagreements(configuration, tiers, threshold):
    """Where psai's estimate_cost on ``configuration`` and genai-prices'
    calculation differ: ``{(tier or "standard", what)}``."""
    from .pricing import estimate_cost
    prices, provider = configuration["prices"], configuration["provider"]
    found = set()
    for tier, genai_prices in tiers.items():
        def ours(usage):
            usage = dict({"tokens_in": 0, "tokens_out": 0}, **usage)
            return Decimal(estimate_cost(prices, **usage, provider=provider, inference_type=tier))

        for what, usage, minus in _probes(threshold):
            try:
                theirs = (genai_prices.calc_price(genai_usage(**usage))["total_price"]
                          - genai_prices.calc_price(genai_usage(**minus))["total_price"])
            except ValueError:
                found.add((tier or "standard", what))
                continue
            difference = ours(usage) - ours(minus)
            if abs(difference - theirs) > Decimal("1e-12") * max(abs(theirs), 1):
                found.add((tier or "standard", what))
    return found


def _tiered_configuration(configuration, model, standard, now, threshold):
    """Add the source's flex, priority and fast prices to ``configuration``
    where PolicySynth can say them; returns ``{tier: genai prices}`` for the
    tiers the source has and the notes on its other request variants."""
    from .pricing import normalize_inference_type
    provider = configuration["provider"]
    tiers, notes = {None: standard}, []
    used = list(_IGNORED_CONTEXTS)
    for tier, contexts in _TIER_CONTEXTS.items():
        for context in contexts:
            resolved = _with_context(model, standard, context, now)
            if resolved is None:
                continue
            used.append(context)
            tiers[tier] = resolved
            if normalize_inference_type(provider, tier) == tier:
                # A tier PolicySynth maps onto another (OpenAI's fast is its
                # priority) keeps no rates of its own: the probes compare.
                for key, value in zip(_TIER_KEYS[tier], _tier_rates(resolved)):
                    configuration["prices"][key] = float(value)
            break
    for variant in model.price_variants or ():
        if variant.when not in used:
            used.append(variant.when)
            notes.append("prices when %s: %s" % (
                ", ".join("%s=%s" % item for item in variant.when.items()), variant.prices))
    return tiers, notes


def _fewest_disagreements(configuration, tiers, threshold):
    """PolicySynth re-derives flex and priority long-context rates only with
    ``flexPriorityTokensEnabledOnLongContext``: keep whichever setting agrees
    with the source in more places (off when they tie)."""
    found = _disagreements(configuration, tiers, threshold)
    if threshold is None or not (set(tiers) & {"flex", "priority"}) or not found:
        return found
    prices = configuration["prices"]
    prices["flexPriorityTokensEnabledOnLongContext"] = True
    flagged = _disagreements(configuration, tiers, threshold)
    if len(flagged) < len(found):
        return flagged
    del prices["flexPriorityTokensEnabledOnLongContext"]
    return found


def genai_entry(provider, model, now):
    """One genai-prices model as ``{"configuration", "unexpressed",
    "disagreements"}`` (the configuration without size, temperature and
    output limit); raises Unmappable with the reason."""
    standard, notes = standard_prices(model, now)
    configuration, threshold = _standard_configuration(provider, model, standard)
    for key, value in standard.__dict__.items():
        if value is not None and key not in _GENAI_EXPRESSED:
            notes.append("%s %s: %s" % (key, _price_text(value), _GENAI_WHAT.get(key, "no PolicySynth price for it")))
    tiers, variant_notes = _tiered_configuration(configuration, model, standard, now, threshold)
    disagreements = _fewest_disagreements(configuration, tiers, threshold)
    notes += variant_notes
    notes += ["%s %s: PolicySynth's rules price it differently" % (tier, what)
              for tier, what in sorted(disagreements)]
    return {"configuration": configuration, "unexpressed": notes, "disagreements": disagreements}


def _genai_catalog(providers, models, now):
    version, catalog = _genai()
    entries, skipped = {}, {}
    for provider in catalog:
        if providers and provider.id not in providers:
            continue
        for model in provider.models:
            source_model = "%s/%s" % (provider.id, model.id)
            if models and model.id not in models and source_model not in models:
                continue
            try:
                entries[source_model] = dict(genai_entry(provider, model, now), name=source_model)
            except Unmappable as exc:
                skipped[source_model] = str(exc)
    return version, entries, skipped


# -- LiteLLM ---------------------------------------------------------------------

LITELLM_FILE = "model_prices_and_context_window_backup.json"


def litellm_cost_map_path():
    """The cost map inside the installed litellm package, found without
    importing it."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise CatalogUnavailableError(
            "LiteLLM is not installed: pip install litellm, or pass its cost map with --file PATH "
            "(model_prices_and_context_window.json)")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, LITELLM_FILE)
        if os.path.exists(path):
            return path
    raise CatalogUnavailableError("the installed litellm package has no %s" % LITELLM_FILE)


def _litellm_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("litellm")
    except PackageNotFoundError:
        return "unknown"


def _litellm_notes(entry, consumed):
    notes = []
    for key, value in entry.items():
        if key in consumed or "cost" not in key or not value:
            continue
        if isinstance(value, (int, float, dict)) and not isinstance(value, bool):
            notes.append("%s %s: no PolicySynth price for it" % (key, json.dumps(value, sort_keys=True)))
    return notes


def _litellm_catalog(cost_map, providers, models):
    from .litellm import consumed_keys, map_entry
    from .schemas import json_problem
    entries, skipped = {}, {}
    for name, entry in cost_map.items():
        if name == "sample_spec":
            continue  # LiteLLM's own documentation of the format
        problem = json_problem(entry)
        if problem:
            skipped[name] = problem
            continue
        provider = entry.get("litellm_provider") if isinstance(entry, dict) else None
        if providers and provider not in providers:
            continue
        if models and not (name in models or (provider and name[len(provider) + 1:] in models)):
            continue
        try:
            configuration = map_entry(name, entry, model_size="medium")
        except ArithmeticError:
            skipped[name] = "a number too large to use"  # e.g. 10**400, which no float holds
            continue
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        for key in ("modelSize", "defaultTemperature", "maxTokensOut"):
            configuration.pop(key)
        entries[name] = {"name": name, "configuration": configuration,
                         "unexpressed": _litellm_notes(entry, consumed_keys(entry)), "disagreements": set(),
                         "maxTokensOut": entry["max_output_tokens"]}
    return entries, skipped


# -- reading a catalog -----------------------------------------------------------

def read_catalog(source, *, providers=(), models=(), file=None, now=None):
    """The models of ``source`` ("genai-prices" or "litellm"), optionally only
    these providers and models: ``{"source", "source_version", "entries":
    {source_model: entry}, "skipped": {source_model: reason}}``. ``file``: a
    LiteLLM cost map to read instead of the installed package's."""
    if source not in SOURCES:
        raise ValidationError({"source": ["Must be one of: %s." % ", ".join(SOURCES)]})
    providers, models = set(providers or ()), set(models or ())
    if source == "genai-prices":
        if file is not None:
            raise ValidationError({"file": ["genai-prices is read from its installed package only."]})
        version, entries, skipped = _genai_catalog(providers, models, now or datetime.now(UTC))
    else:
        path = file or litellm_cost_map_path()
        with open(path, "rb") as handle:
            raw = handle.read()
        from .schemas import load_json
        try:
            cost_map = load_json(raw.decode("utf-8"), os.path.basename(path), check=False)
        except UnicodeDecodeError as exc:
            raise ValidationError({os.path.basename(path): ["Not JSON: %s." % exc]}) from None
        if not isinstance(cost_map, dict):
            raise ValidationError({"cost_map": ["Must be a JSON object of model name to prices."]})
        version = (_litellm_version() if file is None
                   else "file sha256:%s" % hashlib.sha256(raw).hexdigest()[:16])
        entries, skipped = _litellm_catalog(cost_map, providers, models)
    return {"source": source, "source_version": version, "entries": entries, "skipped": skipped}


# -- importing -------------------------------------------------------------------

def _provenance_table(db):
    if not table_columns(db, ModelProvenance._meta.table_name):
        from .migrations import NotAdoptedError
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


def price_differences(stored, source):
    """[(key, stored value, source value)] over the catalog's price keys."""
    stored, source = _catalog_prices(stored), _catalog_prices(source)
    return [(key, stored.get(key), source.get(key)) for key in CATALOG_PRICE_KEYS
            if (key in stored or key in source) and not _same(stored.get(key), source.get(key))]


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b  # 2 == 2.0: PostgreSQL's jsonb may give an int back


def _update_prices(model, differences):
    """Set the differing price keys (``price_differences``) of ``model`` to
    the source's, through the price-change path (history kept); a key the
    source does not have is removed."""
    model.update_configuration({"prices": {key: source for key, _stored, source in differences}})


def import_catalog(source, *, user_id, organization_id, size=None, temperature=0.7, providers=(), models=(),
                   dry_run=False, file=None, progress=None):
    """Import (or update) the models of a price catalog, in one transaction.

    Returns ``{"source", "source_version", "models": [{"source_model",
    "name", "model_id", "action", "unexpressed"}], "skipped": {source_model:
    reason}}``; ``action`` is imported, updated or unchanged (``would
    import`` / ``would update`` with ``dry_run``, which writes nothing)."""
    from .query import add_model
    from .schemas import validate_model_values
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
        existing = _imported(source, organization_id, set(entries))
        now = utcnow()
        for done, (source_model, entry) in enumerate(sorted(entries.items()), 1):
            found = existing.get(source_model)
            row = {"source_model": source_model, "name": entry["name"], "model_id": None,
                   "unexpressed": entry["unexpressed"]}
            if found is None:
                configuration = dict(entry["configuration"], modelSize=size or default_size(
                    entry["configuration"]["prices"]), defaultTemperature=temperature)
                configuration["maxTokensOut"] = entry.get("maxTokensOut") or min(
                    DEFAULT_MAX_TOKENS_OUT, configuration.get("maxContextTokens", DEFAULT_MAX_TOKENS_OUT))
                configuration = validate_configuration(configuration)
                row["action"] = "would import" if dry_run else "imported"
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


def diff(source, *, file=None, organization_id=None, apply=False):
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
    catalog = read_catalog(source, providers=providers, models=set(imported), file=file)
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


def provenance(model):
    """Where an imported model's prices came from: ``{"source",
    "source_version", "source_model", "imported_at"}``, or None for a model
    not imported from a catalog (or a database without psai's tables)."""
    if not isinstance(model, PsAiModel):
        model = PsAiModel.get_by_key(model)
    if not table_columns(model_db(PsAiModel), ModelProvenance._meta.table_name):
        return None
    row = ModelProvenance.select().where(ModelProvenance.model == model.id).first()
    if row is None:
        return None
    return {"source": row.source, "source_version": row.source_version, "source_model": row.source_model,
            "imported_at": row.imported_at}
