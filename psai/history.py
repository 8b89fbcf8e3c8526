"""Price history and deliberate corrections of recorded usage.

Every recorded call keeps the prices it was charged at (its usage item), so
changing a model's prices changes nothing already recorded. What changes
prices over time is kept here:

- ``price_history(model)``: the versions of a model's prices, oldest first,
  each ``{"model_id", "valid_from", "valid_to", "prices", "source",
  "corrections"}``. psai writes a version whenever it changes prices
  (``PsAiModel.save``). A change made elsewhere (PolicySynth's UI edits the
  row in place) is found when the stored prices differ from the last version
  psai knows, and dated by the row's ``updated_at`` when that is later than
  the version before it; otherwise its ``valid_from`` is None: unknown,
  never guessed.
- ``reprice(model, changes, ...)``: a correction of the calls already
  recorded in a period, shown (dry run, the default) before it is applied.
"""
import copy
from contextlib import nullcontext
from decimal import Decimal

import marshmallow

from .db import is_postgres, model_db, table_columns, write_transaction
from .errors import NotFoundError, PsaiError, ValidationError
from .fields import utcnow
from .models import PriceCorrection, PriceVersion, PsAiModel, PsModelUsageItem, strict_json_dumps

__all__ = ["price_history", "histories_of", "prices_at", "reprice", "record_price_change", "resolve_models"]


def _prices_of(configuration):
    prices = configuration.get("prices") if isinstance(configuration, dict) else None
    return prices if isinstance(prices, dict) else {}


def _has_history(db):
    return bool(table_columns(db, PriceVersion._meta.table_name))


def _close(version, at):
    PriceVersion.update(valid_to=at).where(PriceVersion.id == version.id).execute()


def record_price_change(model, stored_configuration, stored_updated_at):
    """Called by ``PsAiModel.save`` inside its transaction, with the row as
    it was stored before the save: keep the history true."""
    if not _has_history(model_db(PriceVersion)):
        return  # a PolicySynth database psai has not adopted: nothing of psai's is written
    stored, new, now = _prices_of(stored_configuration), _prices_of(model.configuration), model.updated_at
    current = (PriceVersion.select()
               .where((PriceVersion.model == model.id) & PriceVersion.valid_to.is_null())
               .order_by(PriceVersion.valid_from.desc(), PriceVersion.id.desc()).first())
    if current is None or current.prices != stored:
        # The first save through psai, or prices changed elsewhere since the
        # last one: the stored prices were in force at least since the row
        # was last written.
        start = min(stored_updated_at, now) if stored_updated_at is not None else now  # clocks differ
        if current is not None:
            if start <= current.valid_from:
                start = now  # changed without touching updated_at: known only from now
            _close(current, start)
        current = PriceVersion.create(model=model.id, valid_from=start, prices=stored,
                                      source="observed" if current is not None else "stored")
    if new != stored:
        _close(current, now)
        PriceVersion.create(model=model.id, valid_from=now, prices=new, source="psai")


def resolve_models(model):
    """Model rows, as stored now, from a row, an id, a uuid, or a name (every
    row with it, oldest first)."""
    if isinstance(model, PsAiModel):
        model = model.id
    try:
        return [PsAiModel.get_by_key(model)]
    except NotFoundError:
        if not isinstance(model, str):
            raise
    rows = list(PsAiModel.select().where(PsAiModel.name == model).order_by(PsAiModel.created_at, PsAiModel.id))
    if not rows:
        raise NotFoundError("no model has the id, uuid or name %r" % (model,))
    return rows


def _corrections(db, model_ids):
    if not model_ids or not table_columns(db, PriceCorrection._meta.table_name):
        return {}
    found = {}
    for c in (PriceCorrection.select().where(PriceCorrection.model.in_(model_ids))
              .order_by(PriceCorrection.applied_at, PriceCorrection.id)):
        found.setdefault(c.model_id, []).append({
            "id": c.id, "applied_at": c.applied_at, "since": c.since, "until": c.until, "changes": c.changes,
            "calls": c.calls, "currency": c.currency, "before": Decimal(c.cost_before),
            "after": Decimal(c.cost_after)})
    return found


def _overlaps(correction, version):
    starts_before_end = version["valid_to"] is None or correction["since"] is None \
        or correction["since"] < version["valid_to"]
    ends_after_start = version["valid_from"] is None or correction["until"] is None \
        or correction["until"] > version["valid_from"]
    return starts_before_end and ends_after_start


def price_history(model):
    """The versions of a model's prices, oldest first (see the module's
    docstring). ``model``: a row, id, uuid or name (every row that has it)."""
    rows = resolve_models(model)
    histories = histories_of(rows)
    return [version for row in rows for version in histories[row.id][0]]


def histories_of(rows):
    """``{model_id: (versions, corrections)}`` of model rows as stored, in
    two queries whatever their number (reports price many models)."""
    db = model_db(PriceVersion)
    ids = [row.id for row in rows]
    stored = {}
    if _has_history(db) and ids:
        for v in (PriceVersion.select().where(PriceVersion.model.in_(ids))
                  .order_by(PriceVersion.valid_from, PriceVersion.id)):
            stored.setdefault(v.model_id, []).append(
                {"model_id": v.model_id, "valid_from": v.valid_from, "valid_to": v.valid_to, "prices": v.prices,
                 "source": v.source})
    corrections = _corrections(db, ids)
    histories = {}
    for row in rows:
        versions = stored.get(row.id, [])
        current = _prices_of(row.configuration)
        if not versions:
            # Never changed through psai: these prices since the row was last written.
            versions = [{"model_id": row.id, "valid_from": row.updated_at, "valid_to": None, "prices": current,
                         "source": "stored"}]
        elif versions[-1]["prices"] != current:
            # Changed elsewhere since psai last saved the row.
            last = versions[-1]
            at = row.updated_at if row.updated_at and row.updated_at > last["valid_from"] else None
            last["valid_to"] = at
            versions.append({"model_id": row.id, "valid_from": at, "valid_to": None, "prices": current,
                             "source": "observed"})
        for version in versions:
            version["corrections"] = [c for c in corrections.get(row.id, []) if _overlaps(c, version)]
        histories[row.id] = (versions, corrections.get(row.id, []))
    return histories


def prices_at(model, moment, history=None, corrections=None):
    """``(prices, known)``: the prices of ``model`` (a row) in force at
    ``moment`` by its history, with the corrections covering ``moment``
    applied; when the history does not reach back that far, its current
    prices and ``known=False``. ``history`` and ``corrections`` (as
    ``histories_of`` gives them) may be passed when pricing many moments."""
    if history is None or corrections is None:
        history, corrections = histories_of([PsAiModel.get_by_key(model.id)])[model.id]
    prices, known = _prices_of(model.configuration), False
    for version in history:
        if version["valid_from"] is not None and version["valid_from"] <= moment \
                and (version["valid_to"] is None or moment < version["valid_to"]):
            prices, known = version["prices"], True
            break
    for correction in corrections:
        if _covers(correction, moment):
            prices = _merge_prices(prices, correction["changes"])
    return prices, known


def _covers(correction, moment):
    return (correction["since"] is None or correction["since"] <= moment) and \
        (correction["until"] is None or moment < correction["until"])


def _merge_prices(prices, changes):
    # Prices are flat: merge_configuration's rules (None removes a key) apply as they are.
    from .schemas import merge_configuration
    return merge_configuration(prices if isinstance(prices, dict) else {}, changes)


def _price_changes(changes):
    """The changes of a correction: price keys (``prices.`` may lead) to
    new values, None removing a key. Refuses keys that are not prices."""
    from .schemas import ModelPricesSchema
    if not isinstance(changes, dict) or not changes:
        raise ValidationError({"changes": ["Give the prices to change, e.g. {'costInTokensPerMillion': 2.5}."]})
    known = ModelPricesSchema().fields
    normalized, errors = {}, {}
    for key, value in changes.items():
        name = key[len("prices."):] if isinstance(key, str) and key.startswith("prices.") else key
        if name not in known:
            errors[str(key)] = ["Not a price: use one of %s." % ", ".join(known)]
        else:
            normalized[name] = value
    if errors:
        raise ValidationError(errors)
    return normalized


def _check_prices(prices):
    from .schemas import INCLUDE, ModelPricesSchema
    try:
        ModelPricesSchema(unknown=INCLUDE).load(prices)
    except marshmallow.ValidationError as exc:
        raise ValidationError({"prices": exc.messages}) from None


def reprice(model, changes, *, since=None, until=None, dry_run=True):
    """Correct the prices of calls already recorded for ``model`` (a row,
    id, uuid or name) in [since, until), all of them by default.

    Returns ``{"before", "after", "difference", "currency", "calls",
    "unpriced_tokens_before", "unpriced_tokens_after", "applied"}``: the cost
    of the affected usage as recorded and as corrected. Nothing changes
    unless ``dry_run=False``; then each affected item's snapshot is changed
    (the original kept in ``data.psai.originalPricing``), the correction is
    recorded (``price_history`` shows it) and counter usage without items is
    priced with it too. The report's total changes by exactly
    ``difference``. The model's own prices, for calls to come, are not
    changed: that is ``PsAiModel.update_configuration``.
    """
    from .usage import _as_datetime, _price_parts, _tokens, _usage_parts
    rows = resolve_models(model)
    changes = _price_changes(changes)
    since, until = _as_datetime(since), _as_datetime(until, end=True)
    db = model_db(PsModelUsageItem)
    if not dry_run and not _has_history(db):
        raise PsaiError("this PolicySynth database has no psai tables for corrections: run `psai init --adopt` first")
    ids = [row.id for row in rows]

    def transform(prices):
        return _merge_prices(prices, changes)

    with (write_transaction(db) if not dry_run else nullcontext()):
        if not dry_run and is_postgres(db):
            # No call may be recorded in between: what is reported is what is changed.
            db.execute_sql('LOCK TABLE "ps_model_usage_item", "ps_model_usage" IN EXCLUSIVE MODE')
        before = _price_parts(_usage_parts(db, "model", since, until, ids))
        after = _price_parts(copy.deepcopy(_usage_parts(db, "model", since, until, ids)), transform)
        # Every price set the correction makes must be one psai would store.
        corrected = [transform(_prices_of(row.configuration)) for row in rows]
        corrected += [p["pricing"]["configuredPrices"] for p in after if p["has_usage"]]
        for prices in {strict_json_dumps(prices, sort_keys=True): prices for prices in corrected}.values():
            _check_prices(prices)
        currencies = {p["currency"] for p in before + after if p["cost"] is not None}
        if len(currencies) > 1:
            raise ValidationError({"since/until": [
                "The usage in this period is priced in several currencies (%s): correct one period at a time."
                % ", ".join(sorted(currencies))]})
        result = {
            "before": sum((p["cost"] for p in before if p["cost"] is not None), Decimal(0)),
            "after": sum((p["cost"] for p in after if p["cost"] is not None), Decimal(0)),
            "currency": currencies.pop() if currencies else None,
            "calls": sum(p["calls"] for p in before),
            "unpriced_tokens_before": sum(sum(_tokens(p)) for p in before if p["cost"] is None),
            "unpriced_tokens_after": sum(sum(_tokens(p)) for p in after if p["cost"] is None),
            "applied": False,
        }
        result["difference"] = result["after"] - result["before"]
        if not dry_run:
            _apply(db, rows, ids, changes, transform, since, until, result)
            result["applied"] = True
    return result


def _apply(db, rows, ids, changes, transform, since, until, result):
    from .usage import _window
    now = utcnow()
    correction = PriceCorrection.create(
        model=ids[0], applied_at=now, since=since, until=until, changes=changes, calls=result["calls"],
        currency=result["currency"], cost_before=str(result["before"]), cost_after=str(result["after"]))
    for other in ids[1:]:  # a name with several rows: one record each, so each row's history shows it
        PriceCorrection.create(
            model=other, applied_at=now, since=since, until=until, changes=changes, calls=0,
            currency=result["currency"], cost_before="0", cost_after="0")
    current = {row.id: _prices_of(row.configuration) for row in rows}
    params = []
    # Items whose data is not an object are left as they are (reports show them unpriced).
    postgres = is_postgres(db)
    where = _window(db, "i.created_at", since, until, ids, params) + (
        ["jsonb_typeof(i.data) = 'object'"] if postgres
        else ["(CASE WHEN json_valid(i.data) THEN json_type(i.data) END) = 'object'"])
    items = db.execute_sql('SELECT i.id, i.model_id, i.data FROM "ps_model_usage_item" i WHERE %s'
                           % " AND ".join(where), params).fetchall()
    p = "%s" if is_postgres(db) else "?"
    update = 'UPDATE "ps_model_usage_item" SET "data" = %s, "updated_at" = %s WHERE "id" = %s' % (
        p if is_postgres(db) else "json(?)", p, p)
    stamp = PsModelUsageItem.updated_at.db_value(now)
    changed = []
    for item_id, model_id, data in items:
        data = PsModelUsageItem.data.python_value(data)
        pricing = data.get("pricing") if isinstance(data.get("pricing"), dict) else {}
        configured = pricing.get("configuredPrices")
        extras = data.get("psai") if isinstance(data.get("psai"), dict) else {}
        extras.setdefault("originalPricing", copy.deepcopy(data.get("pricing")))
        extras["corrections"] = list(extras.get("corrections") or []) + [correction.id]
        data["psai"] = extras
        data["pricing"] = dict(pricing, configuredPrices=transform(
            configured if configured is not None else current.get(model_id)))
        changed.append((strict_json_dumps(data), stamp, item_id))
    if changed:
        db.cursor().executemany(update, changed)
