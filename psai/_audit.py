"""Auditing recorded calls against the provider's own usage.

Every item PolicySynth's model classes (or ``psai.record_response``) wrote
keeps the provider's raw usage (``usageRaw``). ``audit()`` reads each such
item's counts again from it (``psai.usage_from_response``) and lists the
items whose stored counts disagree: PolicySynth 1.3.172's Claude class
weights cache writes and reads into ``tokensIn`` and files the writes as
cached, loses fast mode (``usage.speed``) and 1-hour writes. For each, the
cost as recorded and as billed, per model and in total.
"""
import datetime
from decimal import Decimal
from typing import Any, TypedDict

from ._arguments import as_datetime
from ._constants import strict_json_dumps
from .db import is_postgres, lock, lock_id, model_db, read_transaction, table_columns, write_transaction
from .errors import ValidationError
from .fields import utcnow
from ._items import BUCKET_COUNTERS, BUCKETS, call_buckets, item_cost, js_timestamp
from .models import ModelRef, PriceCorrection, PsModelUsage, PsModelUsageItem, usage_counters, usage_state
from ._recording import CACHE_WRITE_COUNTERS
from ._responses import ResponseUsage, usage_from_response
from .rollups import PreparedChange, applying_change, is_current, prepare_change
from ._sql import AUDITED_ITEMS, audited_items_sql, item_data_update_sql
from ._versions import resolve_models

__all__ = ["audit", "AuditFinding", "AuditResult"]

# apiFamily (PolicySynth's names) -> a response of that API around its raw usage.
_WRAPPERS = {
    "openai.chat.completions": lambda usage: {"object": "chat.completion", "choices": [], "usage": usage},
    "chat.completions": lambda usage: {"object": "chat.completion", "choices": [], "usage": usage},
    "responses": lambda usage: {"object": "response", "status": "completed", "output": [], "usage": usage},
    "messages": lambda usage: {"type": "message", "content": [], "usage": usage},
    "generateContent": lambda usage: {"usageMetadata": usage},
}
_PROVIDERS = {"chat.completions": "azure", "generateContent": "google", "messages": "anthropic"}


class AuditFinding(TypedDict):
    """One item whose stored counts are not what its raw usage says."""

    item_id: int
    model_id: int
    created_at: datetime.datetime
    api_family: str
    stored: dict[str, Any]
    billed: dict[str, Any]
    currency: str | None
    cost_recorded: Decimal | None
    cost_billed: Decimal | None


class AuditResult(TypedDict):
    findings: list[AuditFinding]
    by_model: dict[int, dict[str, Any]]
    recorded: dict[str, Decimal]
    billed: dict[str, Decimal]
    items_read: int
    applied: bool


def _part(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _corrected(data: dict[str, Any], usage: ResponseUsage) -> dict[str, Any]:
    """The item's data with the counts its raw usage says, as psai records them."""
    counts = usage.counts()
    corrected = dict(data, usageNormalized={
        "tokensIn": counts["tokens_in"], "tokensOut": counts["tokens_out"],
        "cachedInTokens": counts["cached_tokens"], "reasoningTokens": counts["reasoning_tokens"],
        "audioTokens": counts["audio_tokens"], "imageTokens": counts["image_tokens"]})
    extras = dict(_part(data, "psai"))
    for key, value in (("cacheWriteTokens", counts["cache_write_tokens"]),
                       ("cacheWrite1hTokens", usage.cache_write_1h_tokens)):
        if value:
            extras[key] = value
        else:
            extras.pop(key, None)
    if usage.web_searches:
        extras["webSearches"] = usage.web_searches
    corrected["psai"] = extras
    speed = usage.provider_metadata.get("appliedSpeed")
    if speed is not None:
        corrected["providerMetadata"] = dict(_part(data, "providerMetadata"), appliedSpeed=speed)
    return corrected


def _stored_view(data: dict[str, Any]) -> dict[str, Any]:
    usage, extras, metadata = _part(data, "usageNormalized"), _part(data, "psai"), _part(data, "providerMetadata")
    return {"tokensIn": usage.get("tokensIn"), "tokensOut": usage.get("tokensOut"),
            "cachedInTokens": usage.get("cachedInTokens") or 0, "cacheWriteTokens": extras.get("cacheWriteTokens", 0),
            "cacheWrite1hTokens": extras.get("cacheWrite1hTokens", 0), "appliedSpeed": metadata.get("appliedSpeed")}


def audit(*, since: datetime.date | str | None = None, until: datetime.date | str | None = None,
          model: ModelRef | None = None, dry_run: bool = True) -> AuditResult:
    """Every item in [since, until) (of ``model``: a row, id, uuid or name)
    whose raw usage can be read and whose stored counts disagree with it:
    ``findings`` (each with its counts as stored and as billed, and its cost
    both ways), per model and in total per currency. Writes nothing unless
    ``dry_run=False``: then, in one transaction, each finding's item gets the
    billed counts (the stored ones kept in ``data.psai.originalUsage``), and
    the usage counters of its model, agent and connector change by the same
    tokens, so that a report changes by exactly the difference shown."""
    start, end = as_datetime(since), as_datetime(until, end=True)
    query = PsModelUsageItem.select().order_by(PsModelUsageItem.id)
    if start is not None:
        query = query.where(PsModelUsageItem.created_at >= start)
    if end is not None:
        query = query.where(PsModelUsageItem.created_at < end)
    model_ids = None
    if model is not None:
        model_ids = [row.id for row in resolve_models(model)]
        query = query.where(PsModelUsageItem.model_id.in_(model_ids))
    db = model_db(PsModelUsageItem)
    prepared = None
    if dry_run or not is_postgres(db):
        # Read in one snapshot, writers going on. SQLite has one write lock
        # for the whole database: the items are read and compared with their
        # raw usage before it is taken, and what the rollups' triggers would
        # fold out and in is computed then too; under the lock both are
        # computed again only if the items changed meanwhile (as reprice does).
        with read_transaction(db):
            findings, items_read, corrections = _find(query.clone())
            if dry_run:
                return _summary(findings, items_read, applied=False)
            seen = usage_state(db, model_ids, start, end)
            prepared = _prepare(db, corrections)
    with write_transaction(db):
        if is_postgres(db) or usage_state(db, model_ids, start, end) != seen or not is_current(db, prepared):
            findings, items_read, corrections = _find(query.clone())  # a query run once keeps its rows
            prepared = _prepare(db, corrections)
        if corrections:
            _lock_calls(db, corrections)
            _apply(db, corrections, _record_corrections(db, findings, start, end), prepared)
    return _summary(findings, items_read, applied=bool(corrections))


def _find(query: Any) -> tuple[list[AuditFinding], int, list[tuple[Any, dict[str, Any]]]]:
    findings: list[AuditFinding] = []
    corrections: list[tuple[Any, dict[str, Any]]] = []
    items_read = 0
    for item in query:
        data = item.data
        if not isinstance(data, dict) or not isinstance(data.get("usageRaw"), dict):
            continue
        family = data.get("apiFamily")
        if not isinstance(family, str) or family not in _WRAPPERS:
            continue
        wrap = _WRAPPERS[family]
        items_read += 1
        try:
            usage = usage_from_response(wrap(data["usageRaw"]), provider=_PROVIDERS.get(family))
        except ValidationError:
            continue  # raw usage psai cannot read as counts: nothing to compare
        corrected = _corrected(data, usage)
        stored, billed = _stored_view(data), _stored_view(corrected)
        if stored == billed:
            continue
        prices = _part(data, "pricing").get("configuredPrices")
        currency = prices.get("currency") if isinstance(prices, dict) else None
        findings.append({"item_id": item.id, "model_id": item.model_id, "created_at": item.created_at,
                         "api_family": family, "stored": stored, "billed": billed,
                         "currency": currency if isinstance(currency, str) else None,
                         "cost_recorded": item_cost(data), "cost_billed": item_cost(corrected)})
        corrections.append((item, corrected))
    return findings, items_read, corrections


def _summary(findings: list[AuditFinding], items_read: int, applied: bool) -> AuditResult:
    by_model: dict[int, dict[str, Any]] = {}
    recorded: dict[str, Decimal] = {}
    billed_total: dict[str, Decimal] = {}
    for finding in findings:
        entry = by_model.setdefault(finding["model_id"], {"items": 0, "recorded": Decimal(0), "billed": Decimal(0)})
        entry["items"] += 1
        currency = finding["currency"]
        if finding["cost_recorded"] is not None and finding["cost_billed"] is not None and currency:
            entry["recorded"] += finding["cost_recorded"]
            entry["billed"] += finding["cost_billed"]
            recorded[currency] = recorded.get(currency, Decimal(0)) + finding["cost_recorded"]
            billed_total[currency] = billed_total.get(currency, Decimal(0)) + finding["cost_billed"]
    return {"findings": findings, "by_model": by_model, "recorded": recorded, "billed": billed_total,
            "items_read": items_read, "applied": applied}


def _counter_buckets(data: dict[str, Any]) -> dict[str, float]:
    """An item's usage in BUCKETS, as the reports count it against the counters."""
    prices = _part(data, "pricing").get("configuredPrices")
    threshold = prices.get("longContextTokenThreshold") if isinstance(prices, dict) else None
    return call_buckets(_part(data, "usageNormalized"), cache_write_tokens=_part(data, "psai").get(
        "cacheWriteTokens", 0), threshold=threshold)


def _record_corrections(db: Any, findings: list[AuditFinding], since: datetime.datetime | None,
                        until: datetime.datetime | None) -> dict[int, int]:
    """One correction a model, beside reprice's (``psai models history``
    shows it): no price changed (``changes`` empty), the calls recounted
    and their cost before and after. ``{model_id: correction id}``; none
    on a PolicySynth database psai has not adopted."""
    if not table_columns(db, PriceCorrection._meta.table_name):
        return {}
    ids = {}
    for model_id in sorted({f["model_id"] for f in findings}):
        mine = [f for f in findings if f["model_id"] == model_id]
        currencies = {f["currency"] for f in mine}
        before = sum((f["cost_recorded"] or Decimal(0) for f in mine), Decimal(0))
        after = sum((f["cost_billed"] or Decimal(0) for f in mine), Decimal(0))
        ids[model_id] = PriceCorrection.create(
            model=model_id, applied_at=utcnow(), since=since, until=until, changes={}, calls=len(mine),
            currency=currencies.pop() if len(currencies) == 1 else None, cost_before=str(before),
            cost_after=str(after)).id
    return ids


def _update_items(db: Any, changed: list[tuple[int, str]], stamp: Any) -> None:
    """Set-based: PostgreSQL a statement per 1,000 items, SQLite one executemany."""
    if not is_postgres(db):
        db.cursor().executemany(item_data_update_sql(db), [(stamp, data, item_id) for item_id, data in changed])
        return
    for start in range(0, len(changed), 1000):
        batch = changed[start:start + 1000]
        db.execute_sql(item_data_update_sql(db, len(batch)), [stamp] + [v for pair in batch for v in pair])


def _lock_calls(db: Any, corrections: list[tuple[Any, dict[str, Any]]]) -> None:
    """Before changing anything: the lock ``record_usage`` takes for each
    (model, agent, connector) whose counters the audit changes, in one order
    (two audits cannot deadlock). A call on those counters then waits for
    the audit, or the audit for it, instead of the two locking the counter
    row and the day's rollup row in opposite orders (PostgreSQL's deadlock,
    which failed the call). SQLite: the write transaction holds the file."""
    keys = {(item.model_id, item.agent_id or None, item.connector_id) for item, _corrected in corrections}
    for key in sorted(keys, key=lock_id):
        lock(db, key)


def _audited_data(corrections: list[tuple[Any, dict[str, Any]]], correction_ids: dict[int, int],
                  now: datetime.datetime) -> list[tuple[int, str]]:
    """(item id, its new data as text) of each correction: the billed
    counts, the stored ones kept in ``psai.originalUsage``, the audit's time
    and its correction of the item's model (``correction_ids``, if any)."""
    changed: list[tuple[int, str]] = []
    for item, corrected in corrections:
        original = {name: item.data.get(name) for name in ("usageNormalized", "providerMetadata")}
        original["psai"] = {k: v for k, v in _part(item.data, "psai").items() if k != "originalUsage"}
        part = dict(corrected["psai"], originalUsage=original, auditedAt=js_timestamp(now))
        if item.model_id in correction_ids:
            part["corrections"] = list(_part(item.data, "psai").get("corrections") or []) + [
                correction_ids[item.model_id]]
        changed.append((item.id, strict_json_dumps(dict(corrected, psai=part))))
    return changed


def _prepare(db: Any, corrections: list[tuple[Any, dict[str, Any]]]) -> PreparedChange | None:
    """SQLite: the corrections' folds prepared (``rollups.prepare_change``)
    from the items as the audit leaves them, its time and correction ids
    standing in (what a fold reads of an item holds neither). None on
    PostgreSQL, whose triggers fold a statement at once, and for no corrections."""
    if is_postgres(db) or not corrections:
        return None
    make, insert, items = audited_items_sql()
    for statement in make:
        db.execute_sql(statement)
    db.cursor().executemany(insert, _audited_data(corrections, {}, utcnow()))
    prepared = prepare_change(db, ['i.id IN (SELECT "id" FROM temp."%s")' % AUDITED_ITEMS], [], items, [])
    db.execute_sql(make[0])
    return prepared


def _apply(db: Any, corrections: list[tuple[Any, dict[str, Any]]], correction_ids: dict[int, int],
           prepared: PreparedChange | None) -> None:
    """Write the billed counts into the items (their folds ``prepared``, on
    SQLite), and the same change of tokens into the counters of each
    (model, agent, connector): what the counters hold beyond the items
    (usage recorded before items) stays as it was."""
    now = utcnow()
    present = usage_counters(db)
    deltas: dict[tuple[int, int | None, int | None], dict[str, float]] = {}
    for item, corrected in corrections:
        before, after = _counter_buckets(item.data), _counter_buckets(corrected)
        key = (item.model_id, item.agent_id or None, item.connector_id)
        delta = deltas.setdefault(key, dict.fromkeys(BUCKETS, 0))
        for bucket in BUCKETS:
            delta[bucket] += after[bucket] - before[bucket]
    with applying_change(db, prepared):
        _update_items(db, _audited_data(corrections, correction_ids, now), PsModelUsageItem.updated_at.db_value(now))
    for (model_id, agent_id, connector_id), delta in deltas.items():
        usage = PsModelUsage
        row = (usage.select().where((usage.model == model_id)
                                    & (usage.agent.is_null() if agent_id is None else usage.agent == agent_id)
                                    & (usage.connector_id.is_null() if connector_id is None
                                       else usage.connector_id == connector_id))
               .order_by(usage.created_at.desc(), usage.id.desc()).first())
        if row is None:
            continue  # no counters for these calls: the items alone are their record
        changes: dict[str, float] = {}
        for bucket, value in delta.items():
            counter = BUCKET_COUNTERS[bucket]
            if counter not in present:  # a table without cache-write counters counts them as input
                counter = CACHE_WRITE_COUNTERS.get(counter, counter)
            changes[counter] = changes.get(counter, 0) + value
        # Changed by the difference, in SQL: calls another writer (PolicySynth)
        # adds to the row meanwhile stay in it (a value read, then written back, lost them).
        fields = usage._meta.fields
        values = {fields[name]: fields[name] + round(value) for name, value in changes.items() if round(value)}
        if values:
            usage.update({**values, usage.updated_at: now}).where(usage.id == row.id).execute()

