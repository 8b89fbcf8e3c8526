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
import datetime
from decimal import Decimal
from typing import Any, TypedDict, cast

import marshmallow

from ._arguments import as_datetime
from ._constants import strict_json_dumps
from .db import is_postgres, model_db, read_transaction, table_columns, write_transaction
from .errors import PsaiError, ValidationError
from .fields import utcnow
from .models import (
    ModelRef, PriceCorrection, PriceVersion, PsModelUsageItem, prices_of, record_price_change, usage_state,
)
from .reports import part_tokens, price_parts, usage_parts
from .rollups import applying_change, is_current, prepare_change
from .schemas import INCLUDE, ModelPricesSchema
from ._sql import item_reprice_sql, lock_models_sql, repriced_items_sql, window
from ._versions import (
    PriceCorrectionEntry as PriceCorrectionEntry, PriceVersionEntry as PriceVersionEntry, histories_of, merge_prices,
    price_history, prices_at, resolve_models,
)

__all__ = ["price_history", "histories_of", "prices_at", "reprice", "record_price_change", "resolve_models",
           "RepriceResult", "PriceVersionEntry", "PriceCorrectionEntry"]


class RepriceResult(TypedDict):
    """What ``reprice`` returns: the cost of the affected usage as recorded
    (``before``) and as corrected (``after``)."""

    before: Decimal
    after: Decimal
    currency: str | None
    calls: int
    unpriced_tokens_before: int
    unpriced_tokens_after: int
    applied: bool  # False for a dry run
    difference: Decimal  # after - before


def _price_changes(changes: Any) -> dict[str, Any]:
    """The changes of a correction: price keys (``prices.`` may lead) to
    new values, None removing a key. Refuses keys that are not prices."""
    if not isinstance(changes, dict) or not changes:
        raise ValidationError({"changes": ["Give the prices to change, e.g. {'costInTokensPerMillion': 2.5}."]})
    known = ModelPricesSchema().fields
    normalized: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for key, value in changes.items():
        name = key[len("prices."):] if isinstance(key, str) and key.startswith("prices.") else key
        if name not in known:
            errors[str(key)] = ["Not a price: use one of %s." % ", ".join(known)]
        else:
            normalized[name] = value
    if errors:
        raise ValidationError(errors)
    return normalized


def _check_prices(prices: dict[str, Any]) -> None:
    try:
        ModelPricesSchema(unknown=INCLUDE).load(prices)
    except marshmallow.ValidationError as exc:
        raise ValidationError({"prices": exc.messages}) from None


def reprice(model: ModelRef, changes: dict[str, Any], *,
            since: datetime.date | str | None = None, until: datetime.date | str | None = None,
            dry_run: bool = True) -> RepriceResult:
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
    rows = resolve_models(model)
    changes = _price_changes(changes)
    since, until = as_datetime(since), as_datetime(until, end=True)
    db = model_db(PsModelUsageItem)
    if not dry_run and not table_columns(db, PriceVersion._meta.table_name):
        raise PsaiError("this PolicySynth database has no psai tables for corrections: run `psai init --adopt` first")
    ids = [row.id for row in rows]

    if dry_run:
        with read_transaction(db):
            return cast(RepriceResult, _measure(db, rows, ids, changes, since, until))
    if is_postgres(db):
        with write_transaction(db):
            # Calls on these models wait (psai records under a share lock on
            # the model's row): what is reported is what is changed. Calls on
            # other models go on; the UPDATE locks only the rows it corrects.
            db.execute_sql(lock_models_sql(db, len(ids)), ids)
            result = _measure(db, rows, ids, changes, since, until)
            _apply(db, rows, ids, changes, since, until, result, None)
        return cast(RepriceResult, result)
    # SQLite: one write lock for the whole database, so the correction is
    # measured first in a read transaction, writers going on, and what the
    # rollups' triggers would fold out and in is computed then too; under
    # the write lock both are computed again only if the usage changed meanwhile.
    with read_transaction(db):
        result = _measure(db, rows, ids, changes, since, until)
        seen = usage_state(db, ids, since, until)
        prepared = _prepare(db, rows, ids, changes, since, until)
    with write_transaction(db):
        if usage_state(db, ids, since, until) != seen or not is_current(db, prepared):
            result = _measure(db, rows, ids, changes, since, until)
            prepared = _prepare(db, rows, ids, changes, since, until)
        _apply(db, rows, ids, changes, since, until, result, prepared)
    return cast(RepriceResult, result)


def _prepare(db, rows, ids, changes, since, until):
    """SQLite: the correction's folds prepared (``rollups.prepare_change``),
    the items as the UPDATE leaves them read with a correction id of 0
    (what the folds read of an item does not hold it)."""
    params: list = []
    where = window(db, "i.created_at", PsModelUsageItem.created_at, since, until, ids, params)
    return prepare_change(db, where, params, repriced_items_sql(where, len(rows)),
                          _corrected_params(db, rows, changes, 0) + params)


def _corrected_params(db, rows, changes, correction_id):
    """``item_reprice_sql``'s parameters after updated_at and before ``where``'s."""
    params: list = []
    for row in rows:
        params += [row.id, strict_json_dumps(prices_of(row.configuration))]
    if not is_postgres(db):
        return params + [strict_json_dumps(changes), correction_id]
    return params + [strict_json_dumps({key: value for key, value in changes.items() if value is not None}),
                     [key for key, value in changes.items() if value is None], correction_id]


def _measure(db, rows, ids, changes, since, until):
    """The correction's result, not applied: the usage's cost as recorded and corrected."""
    def transform(prices):
        return merge_prices(prices, changes)

    before = price_parts(usage_parts(db, "model", since, until, ids))
    # The same parts priced again (price_parts gives priced copies).
    after = price_parts(before, transform)
    # Every price set the correction makes must be one psai would store.
    current = {row.id: prices_of(row.configuration) for row in rows}
    corrected = [transform(prices) for prices in current.values()]
    for part in before:
        pricing = part.pricing if isinstance(part.pricing, dict) else {}
        if part.has_usage and pricing.get("configuredPrices") is not None:
            corrected.append(transform(pricing["configuredPrices"]))
    for prices in {strict_json_dumps(prices, sort_keys=True): prices for prices in corrected}.values():
        _check_prices(prices)
    currencies = {cast(str, p.currency) for p in before + after if p.cost is not None}
    if len(currencies) > 1:
        raise ValidationError({"since/until": [
            "The usage in this period is priced in several currencies (%s): correct one period at a time."
            % ", ".join(sorted(currencies))]})
    result: dict[str, Any] = {
        "before": sum((p.cost for p in before if p.cost is not None), Decimal(0)),
        "after": sum((p.cost for p in after if p.cost is not None), Decimal(0)),
        "currency": currencies.pop() if currencies else None,
        "calls": sum(p.calls for p in before),
        "unpriced_tokens_before": sum(sum(part_tokens(p)) for p in before if p.cost is None),
        "unpriced_tokens_after": sum(sum(part_tokens(p)) for p in after if p.cost is None),
        "applied": False,
    }
    result["difference"] = result["after"] - result["before"]
    return cast(RepriceResult, result)


def _apply(db, rows, ids, changes, since, until, result, prepared):
    now = utcnow()
    correction = PriceCorrection.create(
        model=ids[0], applied_at=now, since=since, until=until, changes=changes, calls=result["calls"],
        currency=result["currency"], cost_before=str(result["before"]), cost_after=str(result["after"]))
    for other in ids[1:]:  # a name with several rows: one record each, so each row's history shows it
        PriceCorrection.create(
            model=other, applied_at=now, since=since, until=until, changes=changes, calls=0,
            currency=result["currency"], cost_before="0", cost_after="0")
    # One statement computing each corrected snapshot in SQL; items whose
    # data is not an object are left as they are (reports show them unpriced).
    params = [PsModelUsageItem.updated_at.db_value(now)] + _corrected_params(db, rows, changes, correction.id)
    where = window(db, "i.created_at", PsModelUsageItem.created_at, since, until, ids, params)
    with applying_change(db, prepared):
        db.execute_sql(item_reprice_sql(is_postgres(db), where, len(rows)), params)
    result["applied"] = True
