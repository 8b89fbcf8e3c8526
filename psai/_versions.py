"""Price versions: the prices a model had over time, and the corrections
applied to them (see ``psai._history`` for the whole story). The save hook
that writes versions lives beside the tables (``psai.models``); this
module reads them."""
import datetime
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, TypedDict

from peewee import Database

from ._base import check_database
from .db import model_db, table_columns
from .models import ModelRef, PriceCorrection, PriceVersion, PsAiModel, find_models, prices_of
from .schemas import merge_configuration

__all__ = ["price_history", "histories_of", "prices_at", "resolve_models", "merge_prices", "PriceVersionEntry",
           "PriceCorrectionEntry"]


class PriceCorrectionEntry(TypedDict):
    """A correction of recorded usage (``psai.reprice``), as ``price_history`` shows it."""

    id: int
    applied_at: datetime.datetime
    since: datetime.datetime | None
    until: datetime.datetime | None
    changes: dict[str, Any]
    calls: int
    currency: str | None
    before: Decimal
    after: Decimal


class PriceVersionEntry(TypedDict):
    """One version of a model's prices: in force from ``valid_from`` (None:
    unknown) until ``valid_to`` (None: still in force)."""

    model_id: int
    valid_from: datetime.datetime | None
    valid_to: datetime.datetime | None
    prices: dict[str, Any]
    source: str  # "stored", "psai" or "observed"
    corrections: list[PriceCorrectionEntry]


def resolve_models(model: ModelRef) -> list[PsAiModel]:
    """Model rows, as stored now, from a row, an id, a uuid, or a name (every
    row with it, oldest first): ``psai.models.find_models``."""
    if isinstance(model, PsAiModel):
        check_database(model)
        model = model.id  # the row as stored now
    return find_models(model)


def _time(value: datetime.datetime | str | None) -> datetime.datetime | None:
    """A stored time as history uses it: one psai cannot read (it reads as
    its text; `psai check` names the row) is unknown."""
    return None if isinstance(value, str) else value


def _corrections(db: Database, model_ids: Sequence[int]) -> dict[int, list[PriceCorrectionEntry]]:
    if not model_ids or not table_columns(db, PriceCorrection._meta.table_name):
        return {}
    found: dict[int, list[PriceCorrectionEntry]] = {}
    for c in (PriceCorrection.select().where(PriceCorrection.model.in_(model_ids))
              .order_by(PriceCorrection.applied_at, PriceCorrection.id)):
        if isinstance(c.since, str) or isinstance(c.until, str):
            continue  # a period psai cannot read: applied nowhere rather than everywhere
        found.setdefault(c.model_id, []).append({
            "id": c.id, "applied_at": c.applied_at, "since": c.since, "until": c.until, "changes": c.changes,
            "calls": c.calls, "currency": c.currency, "before": Decimal(c.cost_before),
            "after": Decimal(c.cost_after)})
    return found


def _overlaps(correction: PriceCorrectionEntry, version: PriceVersionEntry) -> bool:
    starts_before_end = version["valid_to"] is None or correction["since"] is None \
        or correction["since"] < version["valid_to"]
    ends_after_start = version["valid_from"] is None or correction["until"] is None \
        or correction["until"] > version["valid_from"]
    return starts_before_end and ends_after_start


def price_history(model: ModelRef) -> list[PriceVersionEntry]:
    """The versions of a model's prices, oldest first (see the module's
    docstring). ``model``: a row, id, uuid or name (every row that has it)."""
    rows = resolve_models(model)
    histories = histories_of(rows)
    return [version for row in rows for version in histories[row.id][0]]


def histories_of(rows: Sequence[PsAiModel]) -> dict[int, tuple[list[PriceVersionEntry], list[PriceCorrectionEntry]]]:
    """``{model_id: (versions, corrections)}`` of model rows as stored, in
    two queries whatever their number (reports price many models)."""
    db = model_db(PriceVersion)
    ids = [row.id for row in rows]
    stored: dict[int, list[PriceVersionEntry]] = {}
    if table_columns(db, PriceVersion._meta.table_name) and ids:
        for v in (PriceVersion.select().where(PriceVersion.model.in_(ids))
                  .order_by(PriceVersion.valid_from, PriceVersion.id)):
            stored.setdefault(v.model_id, []).append(
                # An unknown start is never matched (prices_at), so a version with an unreadable bound prices nothing.
                {"model_id": v.model_id, "valid_from": _time(v.valid_from) if not isinstance(v.valid_to, str) else None,
                 "valid_to": _time(v.valid_to), "prices": v.prices,
                 "source": v.source, "corrections": []})
    corrections = _corrections(db, ids)
    histories: dict[int, tuple[list[PriceVersionEntry], list[PriceCorrectionEntry]]] = {}
    for row in rows:
        versions = stored.get(row.id, [])
        current = prices_of(row.configuration)
        if not versions:
            # Never changed through psai: these prices since the row was last written.
            versions = [{"model_id": row.id, "valid_from": _time(row.updated_at), "valid_to": None, "prices": current,
                         "source": "stored", "corrections": []}]
        elif versions[-1]["prices"] != current:
            # Changed elsewhere since psai last saved the row.
            last = versions[-1]
            updated_at = _time(row.updated_at)
            at = updated_at if updated_at and (last["valid_from"] is None or updated_at > last["valid_from"]) else None
            last["valid_to"] = at
            versions.append({"model_id": row.id, "valid_from": at, "valid_to": None, "prices": current,
                             "source": "observed", "corrections": []})
        for version in versions:
            version["corrections"] = [c for c in corrections.get(row.id, []) if _overlaps(c, version)]
        histories[row.id] = (versions, corrections.get(row.id, []))
    return histories


def prices_at(model: PsAiModel, moment: datetime.datetime, history: Sequence[PriceVersionEntry] | None = None,
              corrections: Sequence[PriceCorrectionEntry] | None = None) -> tuple[dict[str, Any], bool]:
    """``(prices, known)``: the prices of ``model`` (a row) in force at
    ``moment`` by its history, with the corrections covering ``moment``
    applied; when the history does not reach back that far, its current
    prices and ``known=False``. ``history`` and ``corrections`` (as
    ``histories_of`` gives them) may be passed when pricing many moments."""
    if history is None or corrections is None:
        history, corrections = histories_of([PsAiModel.get_by_key(model.id)])[model.id]
    prices, known = prices_of(model.configuration), False
    for version in history:
        if version["valid_from"] is not None and version["valid_from"] <= moment \
                and (version["valid_to"] is None or moment < version["valid_to"]):
            prices, known = version["prices"], True
            break
    for correction in corrections:
        if _covers(correction, moment):
            prices = merge_prices(prices, correction["changes"])
    return prices, known


def _covers(correction: PriceCorrectionEntry, moment: datetime.datetime) -> bool:
    return (correction["since"] is None or correction["since"] <= moment) and \
        (correction["until"] is None or moment < correction["until"])


def merge_prices(prices: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
    # Prices are flat: merge_configuration's rules (None removes a key) apply as they are.
    return merge_configuration(prices if isinstance(prices, dict) else {}, changes)
