"""psai's peewee base: the model class every table derives from, and every
dependency on peewee's internals in one place: rows read without a
descriptor call per field, validation on every write path, a cached INSERT
for save(), links whose ``add`` is harmless twice, eager loading of links,
and each row's database: a row read from (or saved to) one database is
refused on another, where its id names a different row."""
import re
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self, cast

from peewee import (
    AutoField, BigIntegerField, BooleanField, CharField, ColumnBase, Database, DatabaseProxy, DeferredThroughModel,
    Field, FieldAccessor, IntegerField, ManyToManyField, ManyToManyFieldAccessor, ManyToManyQuery, Model,
    ModelDictCursorWrapper, ModelInsert, ModelObjectCursorWrapper, ModelSelect, ModelTupleCursorWrapper, ModelUpdate,
    Node, PostgresqlDatabase, ROW, TextField,
)
from playhouse.hybrid import hybrid_method
from playhouse.shortcuts import ThreadSafeDatabaseMetadata

from ._constants import MAX_INTEGER
from .db import database, describe_database, model_db, same_database, write_transaction
from .errors import NotFoundError, ValidationError, WrongDatabaseError
from .fields import JSONField, TimestampTzField, utcnow

__all__ = ["BaseModel", "LinkField", "load_links", "check_database", "compiled"]


def _plain_fields(model, _cache: dict = {}):  # noqa: B006  (a cache on purpose)
    """The names of ``model``'s fields whose accessor is peewee's plain
    FieldAccessor (storing a value is ``__data__[name] = value``)."""
    names = _cache.get(model)
    if names is None:
        names = _cache[model] = frozenset(
            name for name in model._meta.fields if type(model.__dict__.get(name)) is FieldAccessor)
    return names


# Where a row's database is kept, in the row's __dict__ (beside peewee's own).
_DATABASE = "_psai_database"


def _bound(model: type[Model]) -> Database | None:
    """The database ``model`` is bound to in this thread, or None."""
    db = model._meta.database
    return db.obj if isinstance(db, DatabaseProxy) else db


def check_database(row: Model, db: Database | None = None) -> None:
    """Refuse ``row`` on ``db`` (default: where its table is bound in this
    thread) when it comes from another database (read from it, or first
    saved to it): there its id is another row. An identity check on the
    hot path, no query."""
    origin = row.__dict__.get(_DATABASE)
    if origin is None:
        return
    bound = type(row)._meta.database if db is None else db
    if origin is bound or (type(bound) is DatabaseProxy and origin is bound.obj):
        return
    db = model_db(type(row)) if db is None else db
    if same_database(origin, db):
        return
    raise WrongDatabaseError("%s %s comes from %s and cannot be used on %s, where id %s is another row "
                             "(read the row from that database instead)"
                             % (type(row).__name__, row.get_id(), describe_database(origin),
                                describe_database(db), row.get_id()))


class BaseModel(Model):
    # The key columns key_field() looks rows up by, for the type checker:
    # peewee gives every table its own fields.
    id: Any
    uuid: Any
    # peewee's Model has it; its stubs do not say.
    _normalize_data: ClassVar[Any]

    class Meta:
        database = database  # the default; psai.using(db) / bind_ctx rebind per thread
        model_metadata_class = ThreadSafeDatabaseMetadata
        legacy_table_names = False

    def __init__(self, *args, **kwargs):
        if not kwargs.get("__no_default__"):
            super().__init__(*args, **kwargs)
            return
        # A row peewee read from the database (its cursor wrappers pass
        # __no_default__ with the row's values): values of plain fields go
        # straight into __data__, as FieldAccessor.__set__ would put them,
        # without a descriptor call and a dirty mark each. The rest (foreign
        # keys, their *_id names, other columns selected) go through setattr.
        del kwargs["__no_default__"]
        super().__init__(__no_default__=True)
        plain = _plain_fields(type(self))
        data = self.__data__
        for name, value in kwargs.items():
            if name in plain:
                data[name] = value
            else:
                setattr(self, name, value)
        # The database it was read from: the one its table is bound to while
        # peewee builds it, as peewee runs the query there.
        self.__dict__[_DATABASE] = _bound(type(self))

    @classmethod
    def select(cls, *fields: Any) -> "ModelSelect[Self]":
        """peewee's select, whose rows become objects the quick way (``_ModelRows``)."""
        return cast("ModelSelect[Self]", _ModelSelect(cls, fields or cls._meta.sorted_fields, is_default=not fields))

    def save(self, *args: Any, validate: bool = True, **kwargs: Any) -> Any:
        """Save the row, validated first unless ``validate=False`` (for rows a
        schema has already checked, with its own rules: an import). A row
        from another database is refused (WrongDatabaseError); a new row
        belongs to the database it is first saved to."""
        db = model_db(type(self))
        check_database(self, db)
        # PolicySynth (Sequelize) refreshes updated_at on every save; a new
        # row has one time for both, as Sequelize gives it.
        if "updated_at" in self._meta.fields:
            inserting = self.get_id() is None or kwargs.get("force_insert")
            created = getattr(self, "created_at", None)
            self.updated_at = created if inserting and created is not None else utcnow()
            only = kwargs.get("only")
            if only is not None:
                field = self._meta.fields["updated_at"]
                # Field == builds SQL, so compare by identity and by name.
                if not any(f is field or (isinstance(f, str) and f == "updated_at") for f in only):
                    kwargs["only"] = list(only) + [field]
        if validate:
            self.validate()
        # peewee's save() writes through this row's insert() or update():
        # called on a row, they write what save() has validated.
        result = super().save(*args, **kwargs)
        self.__dict__[_DATABASE] = db
        return result

    def delete_instance(self, *args: Any, **kwargs: Any) -> Any:
        """Delete the row; one from another database is refused (WrongDatabaseError)."""
        check_database(self)
        return super().delete_instance(*args, **kwargs)

    def validate(self) -> None:
        """Raise psai.ValidationError if this row may not be written."""

    def _state(self):
        """The row's values and unsaved fields, to put back with ``_restore``."""
        return dict(self.__data__), set(self._dirty)

    def _restore(self, state):
        self.__data__, self._dirty = dict(state[0]), set(state[1])

    def _take_stored(self, stored):
        """This object becomes ``stored`` (the same row, read again), but for
        the fields the caller has set and not saved yet."""
        for name, value in stored.__data__.items():
            if name not in self._dirty:
                self.__data__[name] = value

    def _saved_as(self, values):
        """After a write of ``values`` ({field name: value}) this object did not
        make through save(): it holds them, and nothing is left unsaved."""
        self.__data__.update(values)
        self._dirty.clear()

    # Writes that bypass save() are validated too. Values that are SQL
    # expressions (JSON path updates and the like) are passed through as given.

    @classmethod
    def _validate_values(cls, values, partial):
        """Validate {field name: value}; return the values to write."""
        return values

    @classmethod
    def _checked(cls, data, partial):
        names = {field.name: value for field, value in data.items()
                 if not isinstance(value, Node) and field.name in cls._meta.fields}
        checked = cls._validate_values(names, partial)
        return {field: checked.get(field.name, value) for field, value in data.items()}

    def _insert_row(self, __data=None, **insert):
        """save() inserting this row, which it has validated: one cached statement."""
        if __data is not None:
            return type(self).insert(__data, **insert)
        return _PreparedInsert(type(self), insert)

    def _insert_checked(cls, __data=None, **insert):
        return ModelInsert(cls, cls._checked(cls._normalize_data(__data, insert), partial=False))

    # On the class (``Model.insert(...)``): validated. On a row: save()'s own write.
    insert = hybrid_method(_insert_row, _insert_checked)

    @classmethod
    def bulk_insert(cls, rows: Iterable[Mapping[Any, Any]], *, validate: bool = True, batch_size: int = 1000) -> int:
        """Insert many rows (dicts of field names) at the driver's full speed:
        one prepared statement, executemany on SQLite, multi-row VALUES on
        PostgreSQL, all in one transaction. Every row is validated first
        unless ``validate=False``. Returns the number of rows inserted."""
        rows = cls._checked_rows(rows) if validate else list(rows)
        with write_transaction(model_db(cls)):
            for start in range(0, len(rows), batch_size):
                _PreparedInsert.many(cls, rows[start:start + batch_size])
        return len(rows)

    @classmethod
    def insert_stored(cls, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Insert ``rows``, each a tuple of the fields ``names`` in that
        order, whose values are already as this database stores them and its
        driver takes them (on SQLite what a SELECT of those columns gives:
        JSON and psai's times as text): ``bulk_insert``'s prepared statement,
        with no default filled and no value converted in Python (SQLite's
        ``json(?)`` still minifies JSON text, and refuses text that is not
        JSON). Nothing is checked: for rows copied as stored. Returns the
        number of rows inserted."""
        names = tuple(names)
        with write_transaction(model_db(cls)):
            for start in range(0, len(rows), 1000):
                _PreparedInsert.stored(cls, names, rows[start:start + 1000])
        return len(rows)

    def _update_row(self, __data=None, **update):
        """save() updating this row, which it has validated."""
        return ModelUpdate(type(self), type(self)._normalize_data(__data, update))

    def _update_checked(cls, __data=None, **update):
        return ModelUpdate(cls, cls._checked(cls._normalize_data(__data, update), partial=True))

    # On the class (``Model.update(...)``): validated. On a row: save()'s own write.
    update = hybrid_method(_update_row, _update_checked)

    @classmethod
    def insert_many(cls, rows: Iterable[Any], fields: Sequence[Any] | None = None, *, validate: bool = True) -> Any:
        """Bulk insert. Every row is validated before anything is written;
        ``validate=False`` is the trusted path for rows already checked."""
        if not validate:
            return super().insert_many(rows, fields)
        if fields is not None:
            names = [f if isinstance(f, str) else f.name for f in fields]
            rows = [dict(zip(names, row)) for row in rows]
        return super().insert_many(cls._checked_rows(rows))

    @classmethod
    def _checked_rows(cls, rows):
        """Every row validated ({Field: value} each), or one ValidationError
        whose paths start with the index of each bad row."""
        checked, errors = [], {}
        for index, row in enumerate(rows):
            try:
                checked.append(cls._checked(cls._normalize_data(None, dict(row)), partial=False))
            except ValidationError as exc:
                errors[index] = exc.messages
        if errors:
            raise ValidationError(errors)
        return checked

    @classmethod
    def key_field(cls, key: int | str | uuid.UUID) -> tuple[Any, Any]:
        """``(field, value)`` that finds the row with this id (int or digit
        string) or uuid; NotFoundError when ``key`` is neither."""
        if type(key) is int and 0 <= key <= MAX_INTEGER:
            return cls.id, key
        if isinstance(key, uuid.UUID):
            return cls.uuid, key
        text = str(key).strip()
        if text.isascii() and text.isdigit():  # not "²": str.isdigit takes other digits too
            number = int(text)
            if number > MAX_INTEGER:
                raise NotFoundError("%s %s does not exist (ids stop at %d)" % (cls.__name__, key, MAX_INTEGER))
            return cls.id, number
        try:
            return cls.uuid, uuid.UUID(text)
        except ValueError:
            raise NotFoundError("%s %r is neither an id nor a uuid" % (cls.__name__, key)) from None

    @classmethod
    def get_by_key(cls, key: int | str | uuid.UUID) -> Self:
        """The row with this id (int or digit string) or uuid; NotFoundError if none."""
        field, value = cls.key_field(key)
        row = cls.select().where(field == value).first()
        if row is None:
            raise NotFoundError("%s %s does not exist" % (cls.__name__, key))
        return row


class _PreparedInsert:
    """An INSERT compiled by peewee once per model, column set, backend and
    number of rows, and then only executed: peewee builds SQL afresh for
    every query, which costs more than the insert itself for one row."""

    _cache: dict[tuple, str] = {}
    # Multi-row texts are kept for full batches only (a last, shorter batch is compiled once).
    _KEPT_ROWS = (1, 1000)

    def __init__(self, model, data):
        self.model, self.data = model, data

    @classmethod
    def statement(cls, model, names, rows=1):
        """The INSERT of ``rows`` rows of the fields ``names``, in that order
        (PostgreSQL: one row returns its id)."""
        db = model_db(model)
        key = (model, names, type(db), rows)
        sql = cls._cache.get(key)
        if sql is None:
            fields = [model._meta.fields[name] for name in names]
            # A value of each column's kind, so that peewee writes its
            # placeholder as for a real row (SQLite's json(?) for JSON).
            sample: tuple[dict[str, Any] | None, ...] = tuple(
                {} if isinstance(field, JSONField) else None for field in fields)
            query = ModelInsert(model, [sample] * rows, columns=fields)
            if rows > 1 or not model._meta.auto_increment:
                query = query.returning()  # an id only from a single row that has one
            sql = query.sql()[0]
            if rows in cls._KEPT_ROWS:
                cls._cache[key] = sql
        return sql

    @staticmethod
    def _params(model, names, data):
        params = []
        for name in names:
            field, value = model._meta.fields[name], data[name]
            if value is not None and isinstance(field, JSONField):
                # SQLite wraps the text in json(); psycopg2 takes it as a jsonb literal.
                value = field._dumps(value)
            else:
                value = field.db_value(value)
            params.append(value)
        return params

    def _complete(self, now=None):
        data = dict(self.data)
        pk = self.model._meta.primary_key
        if self.model._meta.auto_increment:
            data.pop(pk.name, None)
        for name, default in self.model._meta.defaults.items():
            name = getattr(name, "name", name)
            if name not in data:
                if default is utcnow and now is not None:
                    data[name] = now  # one time for a whole batch, as now() is in a transaction
                else:
                    data[name] = default() if callable(default) else default
        return data

    def execute(self):
        data = self._complete()
        names = tuple(sorted(data))
        db = model_db(self.model)
        cursor = db.execute_sql(self.statement(self.model, names), self._params(self.model, names, data))
        if not self.model._meta.auto_increment:
            return None
        return cursor.fetchone()[0] if isinstance(db, PostgresqlDatabase) else cursor.lastrowid

    @classmethod
    def stored(cls, model, names, rows):
        """Run the INSERT of ``rows`` (tuples in the order of ``names``) as they are."""
        if not rows:
            return
        db = model_db(model)
        db.connect(reuse_if_open=True)
        cursor = db.cursor()
        if isinstance(db, PostgresqlDatabase):
            cursor.execute(cls.statement(model, names, len(rows)), [value for row in rows for value in row])
        else:
            cursor.executemany(cls.statement(model, names), rows)

    @classmethod
    def many(cls, model, rows):
        """Insert ``rows`` (dicts of field names, or of fields): defaults
        filled and values converted a column at a time, as the rows of one
        statement share their columns (the time of ``utcnow`` defaults is
        one for the batch, converted once)."""
        if not rows:
            return
        now = utcnow()
        keys = rows[0].keys()
        given = {getattr(key, "name", key): key for key in keys}
        if len(given) != len(keys) or any(row.keys() != keys for row in rows):
            # Rows naming their fields differently: each completed on its own first.
            rows = [cls(model, {getattr(k, "name", k): v for k, v in row.items()})._complete(now) for row in rows]
            keys = rows[0].keys()
            if any(row.keys() != keys for row in rows):
                raise ValueError("bulk_insert rows must all have the same fields")
            given = {key: key for key in keys}
        meta = model._meta
        if meta.auto_increment:
            given.pop(meta.primary_key.name, None)  # the table numbers the rows
        defaults = {getattr(field, "name", field): default for field, default in meta.defaults.items()}
        names = tuple(sorted(set(given) | set(defaults)))
        db = model_db(model)
        postgres = isinstance(db, PostgresqlDatabase)
        columns = []
        for name in names:
            field = meta.fields[name]
            if name in given:
                key = given[name]
                columns.append(_db_values(field, [row[key] for row in rows]))
            elif defaults[name] is utcnow:
                # One time for a whole batch, as now() is in a transaction.
                columns.append([TimestampTzField().db_value(now) if not postgres else now] * len(rows))
            elif callable(defaults[name]):
                default = defaults[name]
                columns.append(_db_values(field, [default() for _row in rows]))
            else:
                columns.append(_db_values(field, [defaults[name]]) * len(rows))
        # PostgreSQL: one statement of all the rows, one round trip; SQLite: executemany.
        cls.stored(model, names, list(zip(*columns)))


# peewee's fields whose db_value and python_value leave a value of this exact
# type as it is: such values are passed on without a call each.
_KEPT_AS_IS = {IntegerField: int, AutoField: int, BigIntegerField: int, CharField: str, TextField: str,
               BooleanField: bool}


def _db_values(field: Field, values: list) -> list:
    """``values`` of ``field`` as its driver takes them (JSON as its text:
    SQLite wraps it in json(), psycopg2 takes it as a jsonb literal)."""
    if isinstance(field, JSONField):
        dumps = field._dumps
        return [None if value is None else dumps(value) for value in values]
    kept = _KEPT_AS_IS.get(type(field))
    db_value = field.db_value
    if kept is None:
        return [db_value(value) for value in values]
    return [value if type(value) is kept else db_value(value) for value in values]


class _ModelSelect(ModelSelect):
    # Set by peewee's ModelSelect; its stubs do not say.
    _from_list: Any
    _joins: Any
    _returning: Any
    _row_type: Any

    def _get_model_cursor_wrapper(self, cursor):
        if len(self._from_list) == 1 and not self._joins:  # peewee's own test for one table's objects
            return _ModelRows(cursor, self.model, self._returning, self.model)
        return super()._get_model_cursor_wrapper(cursor)  # type: ignore[misc]  # peewee's; its stubs do not say

    def _get_cursor_wrapper(self, cursor):
        row_type = self._row_type or self.default_row_type
        if row_type == ROW.DICT:
            return _DictRows(cursor, self.model, self._returning)
        if row_type == ROW.TUPLE:
            return _TupleRows(cursor, self.model, self._returning)
        return super()._get_cursor_wrapper(cursor)  # type: ignore[misc]  # peewee's; its stubs do not say


class _ColumnRows:
    """A mixin of peewee's model cursor wrappers: rows fetched a batch at a
    time and converted a column at a time, with peewee's own columns and
    converters; a conversion is skipped for a value of the type it would
    keep (an integer read for an integer field, NULL for a time).
    ``_rows`` makes the batch's results from its converted columns."""

    # Rows converted together when the results are kept (a list, a for loop).
    BATCH = 256

    # peewee's cursor wrapper's; its stubs do not say.
    cursor: Any
    converters: Any
    convert: Any
    fields: Any
    initialized: bool
    populated: bool
    count: int
    row_cache: list

    def initialize(self) -> None:
        super().initialize()  # type: ignore[misc]  # peewee's
        self._converting = tuple((i, _column_reader(self.fields[i], self.converters[i])) for i in self.convert)

    def iterate(self, cache: bool = True) -> Any:
        if not cache:  # iterator(): a row at a time, nothing kept
            return super().iterate(cache)  # type: ignore[misc]  # peewee's
        rows = self.cursor.fetchmany(self.BATCH)
        if not rows:
            self.populated = True
            self.cursor.close()
            raise StopIteration
        if not self.initialized:
            self.initialize()
            self.initialized = True
        results = self._rows(rows)
        self.count += len(results)
        self.row_cache.extend(results)
        return results[0]

    def _columns(self, rows: Sequence[tuple]) -> list[Any]:
        """The batch's columns, each converted."""
        columns: list[Any] = list(zip(*rows))
        for index, read in self._converting:
            columns[index] = read(columns[index])
        return columns

    def _rows(self, rows: Sequence[tuple]) -> list[Any]:
        raise NotImplementedError


class _DictRows(_ColumnRows, ModelDictCursorWrapper):
    """peewee's rows as dicts (``.dicts()``), read a batch and a column at a time."""

    unique_columns: Any

    def _rows(self, rows: Sequence[tuple]) -> list[Any]:
        names = self.unique_columns
        return [dict(zip(names, values)) for values in zip(*self._columns(rows))]


class _TupleRows(_ColumnRows, ModelTupleCursorWrapper):
    """peewee's rows as tuples (``.tuples()``), read a batch and a column at a time."""

    def _rows(self, rows: Sequence[tuple]) -> list[Any]:
        return list(zip(*self._columns(rows)))


class _ModelRows(_ColumnRows, ModelObjectCursorWrapper):
    """peewee's reader of one table's rows as objects, with peewee's own
    columns, names and conversions, that builds the objects directly
    (``__data__`` filled as BaseModel.__init__ fills it) instead of through
    a dict of keyword arguments and a call a field, a batch at a time
    (``_ColumnRows``)."""

    constructor: Any
    is_model: bool
    unique_columns: Any

    def initialize(self) -> None:
        super().initialize()
        model = self.constructor
        # A model with an __init__ of its own gets peewee's way, which calls it.
        self._direct = self.is_model and model.__init__ is BaseModel.__init__
        plain = _plain_fields(model)
        self._set = tuple(name for name in self.unique_columns if name not in plain)  # through setattr, as __init__
        self._database = _bound(model)

    def process_row(self, row: tuple) -> Any:
        return self._rows((row,))[0] if self._direct else super().process_row(row)

    def _rows(self, rows: Sequence[tuple]) -> list[Any]:
        if not self._direct:
            return [ModelObjectCursorWrapper.process_row(self, row) for row in rows]
        columns = self._columns(rows)
        model, names, database, later = self.constructor, self.unique_columns, self._database, self._set
        new = model.__new__
        objects = []
        for values in zip(*columns):
            obj = new(model)
            data = dict(zip(names, values))
            obj.__dict__.update({"__data__": data, "_dirty": set(), "__rel__": {}, _DATABASE: database})
            if later:
                for name in later:
                    setattr(obj, name, data.pop(name))
                obj._dirty.clear()
            objects.append(obj)
        return objects


def _column_reader(field: Field | None, convert: Callable[[Any], Any]) -> Callable[[Sequence[Any]], list[Any]]:
    """A function reading a column of values as peewee reads each with
    ``convert`` (its field's python_value, or another function)."""
    if field is not None and convert == field.python_value:
        kept = _KEPT_AS_IS.get(type(field))
        if kept is not None:
            return lambda values: [value if type(value) is kept else convert(value) for value in values]
        python_values = getattr(field, "python_values", None)  # psai's fields read a column at a time
        if python_values is not None:
            return python_values
    return lambda values: [convert(value) for value in values]


# -- expressions compiled once -------------------------------------------------------

class _Compiled(ColumnBase):
    """An expression over one column, as compiled once: its SQL text in
    pieces, between which the column is written (under the alias the query
    using it gives its table) and the parameters bound."""

    _COLUMN = object()  # a piece that is the column

    def __init__(self, field: Field, pieces: tuple, params: tuple) -> None:
        super().__init__()
        self.field, self.pieces, self.params = field, pieces, params

    def __sql__(self, ctx):
        params = iter(self.params)
        for piece in self.pieces:
            if piece is self._COLUMN:
                ctx.sql(self.field)
            elif piece is None:  # a parameter; a JSON one wrapped afresh for each query
                value, wrap = next(params)
                ctx.value(value if wrap is None else wrap(value), converter=False)
            else:
                ctx.literal(piece)
        return ctx


_compiled: dict[Hashable, _Compiled] = {}
_COMPILED_KEPT = 256


def compiled(key: Hashable, field: Field, build: Callable[[], Node]) -> Node:
    """The expression ``build()`` makes, compiled once for ``key`` on the
    backend of ``field``'s database (``field`` the one column it reads):
    peewee compiles every query afresh, which for a JSON filter of a few
    keys costs as much as running it. ``key`` must name everything the
    expression depends on."""
    db = model_db(field.model)
    cache_key = (type(db), field.model, field.name, key)
    found = _compiled.get(cache_key)
    if found is None:
        sql, params = db.get_sql_context().sql(build()).query()
        column = db.get_sql_context().sql(field).query()[0]
        pieces: list[Any] = []
        for index, text in enumerate(re.split("(%s|%s)" % (re.escape(column), re.escape(db.param)), sql)):
            if index % 2 == 0:
                pieces.append(text)
            else:
                pieces.append(_Compiled._COLUMN if text == column else None)
        # A wrapped JSON value (psycopg2's Json) is kept as its value and wrapped by the field each time.
        kept = tuple((p, None) if getattr(p, "adapted", None) is None else (p.adapted, field.db_value)
                     for p in params)
        found = _Compiled(field, tuple(piece for piece in pieces if piece != ""), kept)
        if len(_compiled) >= _COMPILED_KEPT:
            _compiled.clear()
        _compiled[cache_key] = found
    return found


# -- links: adding twice is harmless, linking to a missing row is a clear error ----

class LinkQuery(ManyToManyQuery):
    # Set by peewee's ManyToManyQuery; its stubs do not say.
    _accessor: Any
    _instance: Any
    _src_attr: str
    _dest_attr: str

    def add(self, value, clear_existing=False):
        accessor = self._accessor
        src_id = getattr(self._instance, self._src_attr)
        with write_transaction(model_db(accessor.through_model)):
            if clear_existing:
                self.clear()
            if isinstance(value, ModelSelect):
                query = value.columns(accessor.dest_fk.rel_field)
                ids = [row[0] for row in query.tuples()]
            else:
                value = value if isinstance(value, (list, tuple, set)) else [value]
                ids = self._ids(value)
            if not ids:
                return
            target = accessor.rel_model
            found = {
                row[0] for row in
                target.select(target._meta.primary_key).where(target._meta.primary_key.in_(ids)).tuples()
            }
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(
                    "cannot link: %s id %s does not exist"
                    % (target.__name__, ", ".join(str(i) for i in missing))
                )
            rows = [{accessor.src_fk.name: src_id, accessor.dest_fk.name: i} for i in dict.fromkeys(ids)]
            accessor.through_model.insert_many(rows).on_conflict_ignore().execute()

    def _ids(self, values):
        ids = []
        db = model_db(self._accessor.through_model)
        for value in values:
            if isinstance(value, Model):
                check_database(value, db)
                pk = getattr(value, self._dest_attr)
                if pk is None:
                    raise NotFoundError("cannot link an unsaved %s; save it first" % type(value).__name__)
                ids.append(pk)
            else:
                ids.append(int(value))
        return ids

    def remove(self, value):
        if isinstance(value, ModelSelect):
            return super().remove(value)
        value = value if isinstance(value, (list, tuple, set)) else [value]
        return super().remove(self._ids(value)) if value else 0


class LinkAccessor(ManyToManyFieldAccessor):
    def __get__(self, instance, instance_type=None):
        if instance is not None:
            # Set by with_agents() / with_ai_models(): the links, loaded eagerly.
            loaded = instance.__dict__.get(_loaded_key(self.name))
            if loaded is not None:
                return loaded
        return super().__get__(instance, instance_type)

    def get_query(self, instance):
        # Another database's links of this id are another row's: refused.
        check_database(instance, model_db(self.through_model))
        src_id = getattr(instance, self.src_fk.rel_field.name)
        if src_id is None:
            raise NotFoundError("%s is not saved yet: it has no links" % type(instance).__name__)
        return (
            LinkQuery(instance, self, self.rel_model)
            .join(self.through_model)
            .join(self.model)
            .where(self.src_fk == src_id)
        )


class LinkField(ManyToManyField):
    """ManyToManyField whose ``add`` ignores existing links and checks the
    targets exist; its backref on the other model behaves the same."""

    accessor_class = LinkAccessor
    # Set by peewee's ManyToManyField; its stubs do not say.
    _through_model: Any
    _is_backref: bool

    def bind(self, model, name, set_attribute=True):
        if isinstance(self._through_model, DeferredThroughModel):
            self._through_model.set_field(model, self, name)
            return
        super(ManyToManyField, self).bind(model, name, set_attribute)
        if not self._is_backref:
            field = LinkField(self.model, backref=name, through_model=self.through_model, _is_backref=True)
            self.rel_model._meta.add_field(self.backref, field)


def _loaded_key(name):
    return "_loaded_" + name


def load_links(query: Any, name: str, through: Any, source_column: str, target_model: Any, target_column: str) -> list:
    """Eager loading in three queries: the rows, their links as plain tuples,
    and the linked rows; each row gets a list under ``name`` (the accessor
    then returns it instead of querying)."""
    rows = list(query)
    for row in rows:
        row.__dict__[_loaded_key(name)] = []
    if not rows:
        return rows
    source, target = getattr(through, source_column), getattr(through, target_column)
    # Few rows: their ids as parameters. Many: the query itself as a subquery,
    # so no driver's parameter limit is reached, and peewee does not convert
    # and bind an id at a time (for 1,000 agents, a tenth of the load's time).
    wanted = [row.id for row in rows] if len(rows) <= _MAX_IDS else query.columns(type(rows[0]).id)
    links = list(through.select(source, target).where(source.in_(wanted)).tuples())
    linked = sorted({target_id for _source_id, target_id in links})
    wanted_targets = linked if len(linked) <= _MAX_IDS else through.select(target).where(source.in_(wanted))
    targets = {m.id: m for m in target_model.select().where(target_model.id.in_(wanted_targets))}
    by_id = {row.id: row for row in rows}
    for source_id, target_id in sorted(links):
        if target_id in targets:  # a link to a row that is gone (written by hand) is not shown
            by_id[source_id].__dict__[_loaded_key(name)].append(targets[target_id])
    return rows


_MAX_IDS = 100
