"""Export and import of models, agents and their links, as JSON in
PolicySynth's row format (the shape PsAiModelSchema and PsAgentSchema dump),
and ``copy`` of a whole store from one database to another.

An import is all or nothing: every row is checked before anything is
written, the writes share one transaction, and an error names the table,
the row and the field. Rows are matched by uuid, so importing the same file
twice changes nothing the second time.
"""
import contextlib
import datetime
import itertools
import operator
from collections.abc import Callable, Iterable
from typing import Any, cast

import peewee
from peewee import Case, Database, ExceptionWrapper, ForeignKeyField, IntegerField, ModelUpdate, fn

from ._constants import MAX_INTEGER, MIN_INTEGER
from .db import connect, is_postgres, model_db, read_transaction, table_columns, using, write_transaction
from .errors import ValidationError
from .fields import TimestampTzField, UnreadableTime, read_sqlite_time_text
from .migrations import ensure_schema
from .models import (
    AgentModels, CopiedItem, CopiedUsage, ModelProvenance, PriceCorrection, PriceVersion, PsAgent, PsAiModel,
    PsModelUsage, PsModelUsageItem,
)
from .pricing import COUNTERS
from ._recording import NO_AGENT
from .schemas import dump_rows, INCLUDE, RAISE, PsAgentSchema, PsAiModelSchema

__all__ = ["export_data", "import_data", "copy", "TABLES"]

TABLES = ("ps_ai_models", "ps_agents", "AgentModels")


def export_data() -> dict[str, list[dict[str, Any]]]:
    """Every model, agent and link, JSON-ready. A row psai would refuse is
    exported as stored (`psai check` says what is wrong with it)."""
    return {
        "ps_ai_models": [dump for dump, _problem in dump_rows(
            PsAiModelSchema(), PsAiModel.select().order_by(PsAiModel.id), model=True)],
        "ps_agents": [dump for dump, _problem in dump_rows(PsAgentSchema(), PsAgent.select().order_by(PsAgent.id))],
        "AgentModels": [
            {"agent_id": link.agent_id, "ai_model_id": link.ai_model_id}
            for link in AgentModels.select().order_by(AgentModels.agent, AgentModels.ai_model)
        ],
    }


def _load_rows(schema, rows, table, errors, progress):
    loaded: list[Any] = []
    if not isinstance(rows, list):
        errors[table] = ["Must be a list of rows."]
        return loaded
    for index, row in enumerate(rows):
        try:
            loaded.append(schema.load(row))
        except ValidationError as exc:
            errors.setdefault(table, {})[index] = exc.messages
            loaded.append(None)
        progress()
    return loaded


def import_data(data: dict[str, Any], *, allow_unknown_keys: bool = False,
                progress: Callable[[int, int], object] | None = None) -> dict[str, int]:
    """Import an ``export_data()`` document. Returns counts of what changed.
    ``progress``, if given, is called as ``progress(done, total)`` as rows are checked."""
    if not isinstance(data, dict):
        raise ValidationError({"_schema": ["An import is a JSON object with %s." % ", ".join(TABLES)]})
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ValidationError({key: ["Unknown table."] for key in unknown})
    total = sum(len(rows) for rows in data.values() if isinstance(rows, list))
    checked = [0]

    def step():
        checked[0] += 1
        if progress:
            progress(checked[0], total)
    errors: dict[str, Any] = {}
    model_schema = PsAiModelSchema(unknown=INCLUDE if allow_unknown_keys else RAISE, as_rows=False)
    models = _load_rows(model_schema, data.get("ps_ai_models", []), "ps_ai_models", errors, step)
    agents = _load_rows(PsAgentSchema(as_rows=False), data.get("ps_agents", []), "ps_agents", errors, step)
    links = data.get("AgentModels", [])
    model_ids = {row.get("id") for row in models if row}
    agent_ids = {row.get("id") for row in agents if row}
    for index, row in enumerate(agents):
        parent = row and row.get("parent_agent_id")
        if parent is not None and parent not in agent_ids:
            errors.setdefault("ps_agents", {}).setdefault(index, {})["parent_agent_id"] = [
                "No agent with id %s in this file." % parent]
    if not isinstance(links, list):
        errors["AgentModels"] = ["Must be a list of rows."]
        links = []
    for index, link in enumerate(links):
        problems: dict[str, list[str]] = {}
        if not isinstance(link, dict) or set(link) != {"agent_id", "ai_model_id"}:
            problems["_schema"] = ["A link is {\"agent_id\": ..., \"ai_model_id\": ...}."]
        elif not all(isinstance(link[k], int) and not isinstance(link[k], bool) for k in link):
            problems.update({k: ["Not an integer id."] for k in link
                             if not isinstance(link[k], int) or isinstance(link[k], bool)})
        else:
            if link["agent_id"] not in agent_ids:
                problems["agent_id"] = ["No agent with id %s in this file." % link["agent_id"]]
            if link["ai_model_id"] not in model_ids:
                problems["ai_model_id"] = ["No model with id %s in this file." % link["ai_model_id"]]
        if problems:
            errors.setdefault("AgentModels", {})[index] = problems
        step()
    for table, rows in (("ps_ai_models", models), ("ps_agents", agents)):
        missing = [i for i, row in enumerate(rows) if row and "id" not in row]
        for index in missing:
            errors.setdefault(table, {}).setdefault(index, {})["id"] = ["Missing: links refer to rows by id."]
    if errors:
        raise ValidationError(errors)

    counts = {"created": 0, "updated": 0, "links": 0}
    with write_transaction(model_db(PsAiModel)):
        model_map = {row["id"]: _upsert(PsAiModel, row, counts) for row in models}
        # Parents may come after their children in the file: rows first, then parents.
        agent_map = {row["id"]: _upsert(PsAgent, {k: v for k, v in row.items() if k != "parent_agent_id"}, counts)
                     for row in agents}
        for row in agents:
            parent = row.get("parent_agent_id")
            parent = agent_map[parent] if parent is not None else None
            agent = PsAgent.get_by_id(agent_map[row["id"]])
            if agent.parent_agent_id != parent:
                agent.parent_agent = parent
                agent.save()
        rows = [{"agent": agent_map[link["agent_id"]], "ai_model": model_map[link["ai_model_id"]]}
                for link in links]
        if rows:
            before = AgentModels.select().count()
            AgentModels.insert_many(rows).on_conflict_ignore().execute()
            counts["links"] = AgentModels.select().count() - before
    return counts


def _upsert(model_class, row, counts):
    """Insert the row, or update the row with its uuid; return its id here."""
    # updated_at is psai's to set (every save refreshes it), so it is not compared.
    fields = {key: value for key, value in row.items() if key not in ("id", "updated_at")}
    existing = model_class.get_or_none(model_class.uuid == fields["uuid"]) if "uuid" in fields else None
    if existing is None:
        instance = model_class(**fields)
        instance.save(force_insert=True, validate=False)  # checked by the import's schema, with its rules
        counts["created"] += 1
        return instance.id
    changed = {key: value for key, value in fields.items() if getattr(existing, key) != value}
    if changed:
        for key, value in changed.items():
            setattr(existing, key, value)
        existing.save(validate=False)
        counts["updated"] += 1
    return existing.id


# -- copying between databases ----------------------------------------------------

def _columns(model_class, db):
    """The fields of ``model_class`` whose columns ``db``'s table has (a
    PolicySynth table may lack some of psai's)."""
    present = table_columns(db, model_class._meta.table_name)
    return [field for field in model_class._meta.sorted_fields if field.column_name in present]


def _read(model_class, db, order_by=None):
    """Every row of ``model_class`` in ``db`` as {field name: value}, as stored."""
    fields = _columns(model_class, db)
    if not fields:
        return []
    with using(db):
        query = model_class.select(*fields).order_by(*(order_by or [model_class._meta.primary_key])).tuples()
        return [dict(zip((f.name for f in fields), row)) for row in query]


COPY_BATCH = 2000  # rows read, compared and written at a time: what a copy holds of its large tables
_cursor_names = itertools.count(1)
# A raw cursor's driver errors raised as peewee's, as from any query (peewee's stubs lack the table).
_AS_PEEWEES = ExceptionWrapper(vars(peewee)["EXCEPTIONS"])


def _as_read(fields):
    """``_stream``'s columns for ``fields``, each value as its field reads it."""
    return [(field.name, field, field.python_value) for field in fields]


def _as_stored(fields):
    """``_stream``'s columns for ``fields`` on SQLite, each value as stored
    but times, which read as psai's stored text (``read_sqlite_time_text``):
    equal and ordered as the times are, and written back as they are; and
    whole numbers, whose fraction SQLite drops as the general path's field
    does (SQLite keeps a 7.5 given to an INTEGER column; the general path
    reads and matches it as 7), in the SELECT, not a call a value."""
    def column(field):
        if isinstance(field, IntegerField):
            return Case(None, [(fn.typeof(field) == "real", field.cast("INTEGER"))], field)
        return field
    return [(field.name, column(field), read_sqlite_time_text if isinstance(field, TimestampTzField) else None)
            for field in fields]


def _stream(model_class, db, columns, order_by, batch):
    """The rows of ``model_class`` in ``db`` as {name: value}, in
    ``order_by``, read ``batch`` rows at a time: on PostgreSQL through a
    server-side cursor (inside the caller's transaction), on SQLite by
    stepping the statement; so only a batch is ever in memory. ``columns``
    are (name, expression, read): ``read`` turns a stored value other than
    None into the row's; without one the value stays as stored."""
    with using(db):
        sql, params = model_class.select(*(expression for _name, expression, _read in columns)) \
            .order_by(*order_by).sql()
    if is_postgres(db):
        # peewee runs psycopg2 in autocommit and sends BEGIN itself, so the
        # driver takes a named cursor only WITH HOLD; inside the transaction
        # that is an ordinary one, read as it goes (closed before the commit).
        cursor = db.connection().cursor(name="psai_copy_%d" % next(_cursor_names), withhold=True)
        cursor.itersize = batch
    else:
        cursor = db.cursor()
    names = [name for name, _expression, _read in columns]
    readers = [(name, read) for name, _expression, read in columns if read is not None]
    try:
        with _AS_PEEWEES:
            cursor.execute(sql, params)
        while True:
            with _AS_PEEWEES:
                fetched = cursor.fetchmany(batch)
            if not fetched:
                return
            rows = [dict(zip(names, row)) for row in fetched]
            if readers:
                with using(db):  # a JSON field reads the way its database stores it
                    for row in rows:
                        for name, read in readers:
                            value = row[name]
                            if value is not None:
                                row[name] = read(value)
            yield from rows
    finally:
        if not getattr(cursor.connection, "closed", False):  # a cut connection took its cursor with it
            cursor.close()


class _OutOfOrder(Exception):
    """A table read in ``created_at`` order gave an earlier time after a later one."""


def _later(when, than):
    try:
        return bool(when > than)
    except TypeError:  # a time that is not one (unreadable, missing) has no place in the order
        raise _OutOfOrder() from None


def _by_time(rows):
    """(created_at, [rows]) for each run of rows sharing their created_at,
    which must grow from run to run (else ``_OutOfOrder``)."""
    group: list[dict[str, Any]] = []
    last = None
    for row in rows:
        when = row["created_at"]
        if group and when != last:
            if not _later(when, last):
                raise _OutOfOrder()
            yield last, group
            group = []
        group.append(row)
        last = when
    if group:
        yield last, group


def _fit(model_class, names, values):
    """``values`` without the columns the target's table lacks; refused when
    that would lose something (a PolicySynth table without psai's two
    cache-write counters takes a row whose counts there are 0)."""
    dropped = [key for key, value in values.items() if key not in names and value not in (None, 0)]
    if dropped:
        raise ValidationError({model_class._meta.table_name: [
            "The target's table has no column for %s." % ", ".join(sorted(dropped))]})
    return {key: value for key, value in values.items() if key in names}


def _insert(model_class, rows):
    """Insert rows as they are (copied, not typed in: a row psai would
    refuse is copied as stored, and `psai check` finds it on both sides)."""
    with _AS_PEEWEES:  # bulk_insert's cursor raises the driver's errors (a cut connection) as they are
        model_class.bulk_insert(rows, validate=False)  # defaults filled; peewee's own SQL per batch costs more


def _update(model_class, row_id, values):
    ModelUpdate(model_class, {model_class._meta.fields[k]: v for k, v in values.items()}) \
        .where(model_class._meta.primary_key == row_id).execute()


def _by_key(rows, key):
    """{key: [rows...]} keeping order: rows that share a key pair up in order."""
    grouped: dict[Any, list[Any]] = {}
    for row in rows:
        grouped.setdefault(key(row), []).append(row)
    return grouped


def _mirror_rows(model_class, target, source_rows, key, translate, counts, name, merge=None):
    """Update the target rows that match a source row by ``key``, insert the
    others; rows of the target's own are left alone. ``merge(existing,
    values)``, if given, gives the values a matched row is to have."""
    target_rows = _by_key(_read(model_class, target), key) if source_rows else {}
    names = _target_names(model_class, target)
    inserts = _match(model_class, names, target_rows, source_rows, key, translate, counts, name, merge)
    _insert(model_class, inserts)
    counts[name]["created"] += len(inserts)


def _target_names(model_class, target):
    """The names of the fields a copied row may give ``target``'s table (its id is the target's own)."""
    return {field.name for field in _columns(model_class, target)} - {model_class._meta.primary_key.name}


def _changes(existing, values):
    # An expression (a counter plus a difference, ``_mirror_usage``) is a change by itself.
    return {k: v for k, v in values.items() if isinstance(v, peewee.Node) or existing.get(k) != v}


def _match(model_class, names, target_rows, source_rows, key, translate, counts, name, merge=None):
    """Update the rows of ``target_rows`` ({key: [rows]}) that match a source
    row by ``key``, in order; return the values of the others, to insert.
    ``names``: ``_target_names``. (Items follow their own rule: ``_Items.match``.)"""
    pk = model_class._meta.primary_key.name
    inserts = []
    for group_key, rows in _by_key(source_rows, key).items():
        matches = target_rows.get(group_key, ())
        for index, row in enumerate(rows):
            values = translate(row)
            values.pop(pk, None)
            values = _fit(model_class, names, values)
            if index < len(matches):
                existing = matches[index]
                if merge is not None:
                    values = merge(existing, values)
                changed = _changes(existing, values)
                if changed:
                    _update(model_class, existing[pk], changed)
                    counts[name]["updated"] += 1
            else:
                inserts.append(values)
    return inserts


def _item_key(row):
    return row["model_id"], row["agent_id"], row.get("connector_id"), row["user_id"], row["created_at"]


_ITEM_ORDER = [PsModelUsageItem.created_at, PsModelUsageItem.id]
_DATA = PsModelUsageItem.data
# Whether the copy wrote the item (psai_copied_items), read with it: one index lookup a row, in SQL.
_COPIED = fn.EXISTS(CopiedItem.select(CopiedItem.item).where(CopiedItem.item == PsModelUsageItem.id))
_REMEMBER_BATCH = 1000  # memory rows written a statement at a time (SQLite's and PostgreSQL's parameter limits)


class _Items:
    """How a copy reads, retargets, compares and writes the items. As
    Python values (fields' ``python_value``, ``bulk_insert``), between any
    two databases; or, SQLite to SQLite with the same columns (``stored``),
    as stored: times as psai's stored text, which compares as the times do
    (``read_sqlite_time_text``), and the item's JSON as its text, retargeted
    by SQLite where the copy keeps the item's ids (``_data_on_own_ids``),
    else read, retargeted and written as the general path writes it; rows
    go in by ``insert_stored``. What lands in the target is the same either
    way, as psai reads it.

    Each item the copy writes, or finds already there, is remembered on the
    target (``psai_copied_items``, when the target has psai's tables): a
    later copy updates only those (``match``)."""

    def __init__(self, source, target, model_ids, agent_ids, stored):
        self.target_fields = _columns(PsModelUsageItem, target)
        self.source_fields = _columns(PsModelUsageItem, source)
        self.model_ids, self.agent_ids, self.stored = model_ids, agent_ids, stored
        self.names = _target_names(PsModelUsageItem, target)
        # Every source column has one in the target: _fit would change nothing.
        self.fits = {f.name for f in self.source_fields} - {"id"} <= self.names
        self.to_postgres = is_postgres(target)
        # An un-adopted PolicySynth target has no memory: its items are matched only when equal.
        self.remembers = bool(table_columns(target, CopiedItem._meta.table_name))
        self.found: list[int] = []  # target items found equal to a source item, not yet remembered

    @classmethod
    def can_be_stored(cls, source, target):
        """Both SQLite, with the same item columns (none to fill with a default)."""
        return not is_postgres(source) and not is_postgres(target) and \
            [f.name for f in _columns(PsModelUsageItem, source)] == [f.name for f in _columns(PsModelUsageItem, target)]

    def target_columns(self):
        columns = (_as_stored if self.stored else _as_read)(self.target_fields)
        return columns + [("copied", _COPIED, None)] if self.remembers else columns

    def source_columns(self):
        if not self.stored:
            return _as_read(self.source_fields)
        return _as_stored(self.source_fields) + [("on_own_ids", _data_on_own_ids(), None)]

    def translate(self, row):
        """A source row (``_item_key`` and all) as the target is to hold it,
        or None when its model is not copied (it points nowhere)."""
        model_id = self.model_ids.get(row["model_id"])
        if model_id is None:
            return None
        agent_id = self.agent_ids.get(row["agent_id"], NO_AGENT)
        if not self.stored:
            return dict(row, model_id=model_id, agent_id=agent_id, data=_retarget_item(row["data"], model_id, agent_id))
        on_own_ids = row.pop("on_own_ids")
        if on_own_ids is not None and model_id == row["model_id"] and agent_id == row["agent_id"]:
            row["data"] = on_own_ids  # the target's ids are the item's own (a target filled in id order)
        else:
            data = _retarget_item(_DATA.read_text(row["data"]), model_id, agent_id)
            row["data"] = None if data is None else _DATA.text(data)  # as bulk_insert would write it
        row["model_id"], row["agent_id"] = model_id, agent_id
        return row

    def new(self, row):
        """A translated row that matches none of the target's, as it is to be inserted."""
        row.pop("id", None)
        return row if self.fits else _fit(PsModelUsageItem, self.names, row)

    def changes(self, existing, values):
        changed = _changes(existing, values)
        if self.stored and "data" in changed:
            data = _DATA.read_text(changed["data"])
            if _DATA.read_text(existing.get("data")) == data:
                del changed["data"]  # the same JSON, written another way: as the general path compares
            else:
                changed["data"] = data  # for _update, which writes it through the field
        return changed

    def match(self, here, rows, counts):
        """Pair each translated source row of ``rows`` with a target row of
        ``here`` ({``_item_key``: [rows, in order]}) of its key: first one
        that already holds its values (nothing to write: a copy's, also one
        copied before the memory was kept); else, in order, one the copy
        wrote whose source row changed since, updated. A target row neither
        equal nor remembered is the target's own, left alone. Return the
        values of the source rows left over, to insert."""
        name = "ps_model_usage_item"
        inserts = []
        for group_key, group in _by_key(rows, _item_key).items():
            targets = here.get(group_key, ())
            free = [True] * len(targets)
            first = 0  # the rows before it are taken
            left = []
            for values in map(self.new, group):
                while first < len(targets) and not free[first]:
                    first += 1
                # A run's copies come in the source's order: the first free row is usually the one.
                match = next((index for index in range(first, len(targets))
                              if free[index] and not self.changes(targets[index], values)), None)
                if match is None:
                    left.append(values)
                    continue
                free[match] = False
                if not targets[match].get("copied"):
                    self.found.append(targets[match]["id"])
            copies = (existing for index, existing in enumerate(targets) if free[index] and existing.get("copied"))
            for values in left:
                existing = next(copies, None)
                if existing is None:
                    inserts.append(values)
                    continue
                _update(PsModelUsageItem, existing["id"], self.changes(existing, values))
                counts[name]["updated"] += 1
        return inserts

    def insert(self, rows):
        """Insert ``rows`` and remember them, with the rows found equal so far."""
        if self.remembers and self.found:
            self._remember(self.found)
            self.found = []
        if not rows:
            return
        if not self.remembers:
            self._insert(rows)
        elif self.to_postgres:
            # Other processes may record meanwhile: the ids are the ones the INSERT gives back.
            for start in range(0, len(rows), _REMEMBER_BATCH):
                query = PsModelUsageItem.insert_many(rows[start:start + _REMEMBER_BATCH], validate=False)
                self._remember([row[0] for row in query.returning(PsModelUsageItem.id).tuples().execute()])
        else:
            # The copy holds SQLite's write lock: every item numbered past the last one is the copy's.
            last = PsModelUsageItem.select(fn.MAX(PsModelUsageItem.id)).scalar() or 0
            self._insert(rows)
            CopiedItem.insert_from(PsModelUsageItem.select(PsModelUsageItem.id).where(PsModelUsageItem.id > last),
                                   [CopiedItem.item]).execute()

    @staticmethod
    def _remember(item_ids):
        """Remember these target items as the copy's (those remembered already stay as they are)."""
        for start in range(0, len(item_ids), _REMEMBER_BATCH):
            CopiedItem.insert_many([(item_id,) for item_id in item_ids[start:start + _REMEMBER_BATCH]],
                                   [CopiedItem.item], validate=False).on_conflict_ignore().execute()

    def _insert(self, rows):
        if not self.stored:
            _insert(PsModelUsageItem, rows)
        elif rows:
            names = list(rows[0])  # every row has the same keys: the source's columns
            values = operator.itemgetter(*names)
            with _AS_PEEWEES:
                PsModelUsageItem.insert_stored(names, [values(row) for row in rows])


def _data_on_own_ids():
    """SQLite: the item's JSON with its model id and agent id, where it has
    them (``_retarget_item``'s rule: ``json_replace`` sets only paths that
    exist), set to the item's own ``model_id`` and ``agent_id`` columns, so
    retargeted by SQLite when the copy maps both to themselves (an item
    without an agent names 0, as ``NO_AGENT``). NULL unless the JSON is an
    object exactly as SQLite's json() gives it back, so that Python reads it
    as SQLite does (but for a duplicate ``model`` or ``actor`` key: SQLite
    rewrites the first, Python reads the last; docs/performance.md); any
    other item is read, retargeted and written in Python."""
    item = PsModelUsageItem
    data = item.data
    # CASE tries its conditions in order: the JSON functions only see valid JSON.
    plain = Case(None, [(~((fn.typeof(data) == "text") & (fn.json_valid(data) == 1)), 0),
                        (fn.json(data) != data, 0), (fn.json_type(data) != "object", 0)], 1)
    return Case(None, [(plain == 1, fn.json_replace(data, "$.model.id", item.model_id,
                                                    "$.actor.agentId", item.agent_id))], None)


def _merge_items(target, source_rows, counts, batch, items):
    """Mirror the items of ``source_rows`` (read in created_at order, as
    ``items`` translates them) onto the target's, read in the same order:
    the two are walked side by side a run of equal times at a time, and
    rows are matched within a run (``_Items.match``), so only a batch of each
    side is in memory. ``_OutOfOrder`` when either side's order is not its
    times' (text SQLite could not sort)."""
    name = "ps_model_usage_item"
    inserts: list[dict[str, Any]] = []
    model = PsModelUsageItem
    with contextlib.closing(_by_time(_stream(model, target, items.target_columns(), _ITEM_ORDER, batch))) as here:
        pending = next(here, None)
        for when, rows in _by_time(source_rows):
            while pending is not None and _later(when, pending[0]):
                pending = next(here, None)  # the target's own items, left alone
            if pending is not None and pending[0] == when:
                inserts += items.match(_by_key(pending[1], _item_key), rows, counts)
            else:  # nothing of the target's at this time: every row is new
                inserts += map(items.new, rows)
            if len(inserts) >= batch:
                items.insert(inserts)
                counts[name]["created"] += len(inserts)
                inserts = []
    items.insert(inserts)
    counts[name]["created"] += len(inserts)


def _beyond_integer(model_class, rows, errors):
    """Add to ``errors`` the values of ``rows`` that PostgreSQL's INTEGER
    columns cannot hold (SQLite stores any integer), by table, the source's
    row id and column. References are left out: copy gives them the
    target's ids."""
    columns = [field for field in model_class._meta.sorted_fields
               if field.field_type == "INT" and not isinstance(field, ForeignKeyField)
               and field.name not in ("model_id", "agent_id")]
    pk = model_class._meta.primary_key.name
    for row in rows:
        for field in columns:
            value = row.get(field.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not MIN_INTEGER <= value <= MAX_INTEGER:
                errors.setdefault(model_class._meta.table_name, {}).setdefault(row[pk], {})[field.column_name] = [
                    "Row %s holds %s, beyond the target's INTEGER column (%d to %d)." % (
                        row[pk], value, MIN_INTEGER, MAX_INTEGER)]


def _usage_key(row):
    return row["model"], row.get("agent"), row.get("connector_id"), row["created_at"]


def _mirror_usage(target, source_rows, counts):
    """Counter rows, matched by model, agent, connector and time. A matched
    row keeps what the target recorded in it itself: each counter becomes
    the source's value plus what the target's grew by since the value last
    copied into it (``psai_copied_usage``; a row without that memory takes
    the source's value). That is written as a difference, the counter plus
    what the source grew by since that copy, in SQL: calls the target
    records meanwhile (another process, PolicySynth) stay counted, where a
    value computed from the row as read would have overwritten them.
    Nothing new on either side: nothing changes."""
    remembers = bool(table_columns(target, CopiedUsage._meta.table_name))
    copied = dict(cast(Iterable[tuple[int, Any]], CopiedUsage.select(CopiedUsage.usage, CopiedUsage.counters)
                       .tuples())) if remembers and source_rows else {}
    present = [name for name in COUNTERS if name in {field.name for field in _columns(PsModelUsage, target)}]
    fields = PsModelUsage._meta.fields

    def merge(existing, values):
        last = copied.get(existing["id"])
        if not isinstance(last, dict):
            return values
        merged = dict(values)
        grown = False  # the target's own calls since the last copy
        for name in present:
            source, here, copied_last = values.get(name), existing.get(name), last.get(name)
            if all(map(_is_count, (source, here, copied_last))):  # else copied as stored, as any odd value
                del merged[name]
                if source != copied_last:
                    merged[name] = fields[name] + (source - copied_last)
                grown = grown or here != copied_last
        later = [values.get("updated_at"), existing.get("updated_at")]
        if grown and all(isinstance(moment, datetime.datetime) for moment in later):
            merged["updated_at"] = max(later)  # the target's own calls since: its last update stays
        return merged

    _mirror_rows(PsModelUsage, target, source_rows, _usage_key, dict, counts, "ps_model_usage", merge)
    if not remembers or not source_rows:
        return
    here = _by_key(_read(PsModelUsage, target), _usage_key)
    memory = {}
    for group_key, rows in _by_key(source_rows, _usage_key).items():
        for row, existing in zip(rows, here.get(group_key, [])):
            memory[existing["id"]] = {name: row.get(name) or 0 for name in present}
    stale = [usage_id for usage_id, counters in memory.items() if copied.get(usage_id) != counters]
    for start in range(0, len(stale), 500):
        CopiedUsage.delete().where(CopiedUsage.usage.in_(stale[start:start + 500])).execute()
    _insert(CopiedUsage, [{"usage": usage_id, "counters": memory[usage_id]} for usage_id in stale])


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _retarget_item(data, model_id, agent_id):
    """An item's JSON names the model and agent by id: the target's ids."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if isinstance(data.get("model"), dict) and "id" in data["model"]:
        data["model"] = dict(data["model"], id=model_id)
    if isinstance(data.get("actor"), dict) and "agentId" in data["actor"]:
        data["actor"] = dict(data["actor"], agentId=agent_id)
    return data


def _unreadable_times(model_class, rows, errors):
    """Add to ``errors`` the timestamps of ``rows`` psai cannot read (they
    read as their text): one could not be written to a target of the other
    kind, and would stay unreadable on one of the same."""
    times = [f.name for f in model_class._meta.sorted_fields if isinstance(f, TimestampTzField)]
    pk = model_class._meta.primary_key.name
    for row in rows:
        for name in times:
            value = row.get(name)
            if isinstance(value, UnreadableTime):
                errors.setdefault(model_class._meta.table_name, {}).setdefault(row[pk], {})[name] = [
                    "%s; fix the row first (`psai check` lists it)." % value.problem.capitalize()]


def _checked(model_class, rows, errors, to_postgres, batch):
    """``rows``, a batch at a time, while none has a value the target cannot
    take (``_unreadable_times``, ``_beyond_integer``); from the first such
    batch on, the rest is only checked, so that ``errors`` names every row
    and the copy, refused, writes nothing more."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, batch)):
        _unreadable_times(model_class, chunk, errors)
        if to_postgres:
            _beyond_integer(model_class, chunk, errors)
        if not errors:
            yield from chunk


def _source_items(source, errors, to_postgres, batch, columns=None):
    """The source's items in time order, checked (``_checked``); ``columns``
    as ``_stream`` takes them, by default every field as it reads."""
    columns = columns if columns is not None else _as_read(_columns(PsModelUsageItem, source))
    if not columns:
        return iter(())
    rows = _stream(PsModelUsageItem, source, columns, _ITEM_ORDER, batch)
    return _checked(PsModelUsageItem, rows, errors, to_postgres, batch)


def _count(model_class, db):
    if not table_columns(db, model_class._meta.table_name):
        return 0
    with using(db):
        return model_class.select().count()


def _copy(source, target, counts, dry_run, progress, batch):
    models = _read(PsAiModel, source)
    agents = _read(PsAgent, source)
    links = _read(AgentModels, source, [AgentModels.agent, AgentModels.ai_model])
    usage = _read(PsModelUsage, source)
    versions = _read(PriceVersion, source)
    corrections = _read(PriceCorrection, source)
    provenance = _read(ModelProvenance, source)
    to_postgres = is_postgres(target)
    refused: dict[str, Any] = {}

    def refuse():
        if refused:
            for _row in _source_items(source, refused, to_postgres, batch):
                pass  # every item checked too, for the error to name them all
            raise ValidationError(refused)
    for table_class, rows in ((PsAiModel, models), (PsAgent, agents), (PsModelUsage, usage),
                              (PriceVersion, versions), (PriceCorrection, corrections), (ModelProvenance, provenance)):
        _unreadable_times(table_class, rows, refused)
    refuse()
    ensure_schema(target)
    if to_postgres:
        for table_class, rows in ((PsAiModel, models), (PsAgent, agents), (PsModelUsage, usage),
                                  (PriceCorrection, corrections)):
            _beyond_integer(table_class, rows, refused)
        refuse()
    item_count = _count(PsModelUsageItem, source)
    total = sum(map(len, (models, agents, links, usage, versions, corrections, provenance))) + item_count
    step = [0]

    def done(rows):
        step[0] += rows if isinstance(rows, int) else len(rows)
        if progress:
            progress(step[0], total)

    with using(target):
        with write_transaction(target) as transaction:
            by_uuid: dict[str, type[PsAiModel] | type[PsAgent]] = {"ps_ai_models": PsAiModel, "ps_agents": PsAgent}
            ids = {}
            for name, rows in (("ps_ai_models", models), ("ps_agents", agents)):
                by_uuid_class = by_uuid[name]
                rows = [{k: v for k, v in row.items() if k != "parent_agent"} for row in rows]
                _mirror_rows(by_uuid_class, target, rows, lambda row: str(row["uuid"]), dict, counts, name)
                # .tuples() gives tuples, which peewee's type stubs do not say (they give the query's model).
                pairs = cast(Iterable[tuple[int, Any]],
                             by_uuid_class.select(by_uuid_class.id, by_uuid_class.uuid).tuples())
                here = {str(u): i for i, u in pairs}
                ids[name] = {row["id"]: here[str(row["uuid"])] for row in rows}
                done(rows)
            model_ids, agent_ids = ids["ps_ai_models"], ids["ps_agents"]
            # Parents once every agent is there (a loop PolicySynth allowed is copied as it is).
            here_parents = dict(cast(Iterable[tuple[int, int | None]],
                                     PsAgent.select(PsAgent.id, PsAgent.parent_agent).tuples()))
            for row in agents:
                parent = agent_ids.get(row.get("parent_agent"))
                if here_parents.get(agent_ids[row["id"]]) != parent:
                    _update(PsAgent, agent_ids[row["id"]], {"parent_agent": parent})
            linked = [{"agent": agent_ids[link["agent"]], "ai_model": model_ids[link["ai_model"]]} for link in links
                      if link["agent"] in agent_ids and link["ai_model"] in model_ids]
            if linked:
                before = AgentModels.select().count()
                AgentModels.insert_many(linked, validate=False).on_conflict_ignore().execute()
                counts["AgentModels"]["created"] = AgentModels.select().count() - before
            done(links)

            def usage_row(row):
                return dict(row, model=model_ids.get(row["model"]), agent=agent_ids.get(row.get("agent")))
            # A row pointing nowhere stays behind.
            usage = [usage_row(row) for row in usage if row["model"] in model_ids]
            _mirror_usage(target, usage, counts)
            done(usage)

            def copied_items(items):  # an item pointing nowhere (translated to None) stays behind
                rows = _source_items(source, refused, to_postgres, batch, items.source_columns())
                return (row for row in map(items.translate, rows) if row is not None)
            items = _Items(source, target, model_ids, agent_ids, stored=_Items.can_be_stored(source, target))
            try:
                with target.atomic():  # a savepoint: an order the walk cannot follow is undone, then matched whole
                    _merge_items(target, copied_items(items), counts, batch, items)
            except _OutOfOrder:
                counts["ps_model_usage_item"] = {"created": 0, "updated": 0}
                # Whole, the general way: the target's items as they read, by the same rule.
                items = _Items(source, target, model_ids, agent_ids, stored=False)
                rows = list(copied_items(items))
                here = _by_key(_stream(PsModelUsageItem, target, items.target_columns(), [PsModelUsageItem.id],
                                       batch), _item_key) if rows else {}
                inserts = items.match(here, rows, counts)
                items.insert(inserts)
                counts["ps_model_usage_item"]["created"] += len(inserts)
            if refused:
                raise ValidationError(refused)
            done(item_count)
            for model_class, rows, key, name in (
                    (PriceVersion, versions, lambda r: (r["model"], r["valid_from"]), "psai_price_versions"),
                    (PriceCorrection, corrections, lambda r: (r["model"], r["applied_at"]),
                     "psai_price_corrections"),
                    (ModelProvenance, provenance, lambda r: r["model"], "psai_model_provenance")):
                rows = [dict(r, model=model_ids[r["model"]]) for r in rows if r["model"] in model_ids]
                if table_columns(target, model_class._meta.table_name):
                    _mirror_rows(model_class, target, rows, key, dict, counts, name)
                done(rows)
            if dry_run:
                transaction.rollback()


def copy(source: Database | str, target: Database | str, *, dry_run: bool = False,
         progress: Callable[[int, int], object] | None = None,
         batch: int = COPY_BATCH) -> dict[str, dict[str, int]]:
    """Copy models, agents, links, usage counters, usage items, price history
    and provenance from ``source`` to ``target`` (databases, or URLs), in one
    transaction on the target. Models and agents are matched by uuid (ids are
    the target's own); usage rows by model, agent, connector and time, so a
    second copy updates rather than duplicates. An item is matched, by
    model, agent, connector, user and time, only to a target item that holds
    its values already or that a copy wrote (``psai_copied_items``): an item
    the target recorded itself is never overwritten. Returns ``{table:
    {"created", "updated"}}``; ``dry_run`` computes the same and writes nothing.

    The items, the table that grows, are streamed: read from both sides in
    time order ``batch`` rows at a time and matched side by side, so memory
    does not grow with the store; SQLite to SQLite they move in their
    stored form (``_Items``), with the same result."""
    opened: list[Database] = []
    if isinstance(source, str):
        source = connect(source, bind=False)
        opened.append(source)
    if isinstance(target, str):
        target = connect(target, bind=False)
        opened.append(target)
    try:
        names = ["ps_ai_models", "ps_agents", "AgentModels", "ps_model_usage", "ps_model_usage_item",
                 "psai_price_versions", "psai_price_corrections", "psai_model_provenance"]
        counts = {name: {"created": 0, "updated": 0} for name in names}
        with read_transaction(source):  # one snapshot of the source, however long the copy
            _copy(source, target, counts, dry_run, progress, batch)
        return counts
    finally:
        for db in opened:
            db.close()
