"""The store: PolicySynth's tables as peewee models, bound to ``psai.db.database``."""
import contextvars
import json
import uuid
from functools import partial

from peewee import (
    AutoField, CharField, CompositeKey, DeferredThroughModel, ForeignKeyField,
    IntegerField, IntegrityError, ManyToManyField, ManyToManyQuery,
    Model, ModelInsert, ModelSelect, ModelUpdate, Node, PostgresqlDatabase,
)
from peewee import FieldAccessor, ManyToManyFieldAccessor
from playhouse.shortcuts import ThreadSafeDatabaseMetadata

from .db import database, is_postgres, lock, model_db, table_columns, write_transaction
from .errors import InUseError, NotFoundError, ValidationError
from .fields import JSONField, TimestampTzField, UUIDTextField, utcnow

__all__ = ["BaseModel", "PsAiModel", "PsAgent", "AgentModels", "PsModelUsage", "PsModelUsageItem",
           "PriceVersion", "PriceCorrection", "ModelProvenance", "ALL_MODELS"]


# Set while save() writes a row it has validated itself, so that insert() and
# update() (which save() calls) do not validate it twice.
_validated_by_save = contextvars.ContextVar("psai_validated_by_save", default=False)

# PolicySynth's ids are PostgreSQL INTEGERs (SQLite would overflow past 2**63).
MAX_ID = 2 ** 31 - 1

# NaN and Infinity are not JSON; PostgreSQL's jsonb refuses them, so SQLite must too.
strict_json_dumps = partial(json.dumps, allow_nan=False, separators=(",", ":"))


def _plain_fields(model, _cache={}):
    """The names of ``model``'s fields whose accessor is peewee's plain
    FieldAccessor (storing a value is ``__data__[name] = value``)."""
    names = _cache.get(model)
    if names is None:
        names = _cache[model] = frozenset(
            name for name in model._meta.fields if type(model.__dict__.get(name)) is FieldAccessor)
    return names


class BaseModel(Model):
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

    def save(self, *args, validate=True, **kwargs):
        """Save the row, validated first unless ``validate=False`` (for rows a
        schema has already checked, with its own rules: an import)."""
        # PolicySynth (Sequelize) refreshes updated_at on every save; a new
        # row has one time for both, as Sequelize gives it.
        if "updated_at" in self._meta.fields:
            inserting = self._pk is None or kwargs.get("force_insert")
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
        token = _validated_by_save.set(True)
        try:
            return super().save(*args, **kwargs)
        finally:
            _validated_by_save.reset(token)

    def validate(self):
        """Raise psai.ValidationError if this row may not be written."""

    # Writes that bypass save() are validated too. Values that are SQL
    # expressions (JSON path updates and the like) are passed through as given.

    @classmethod
    def _validate_values(cls, values, partial):
        """Validate {field name: value}; return the values to write."""
        return values

    @classmethod
    def _checked(cls, data, partial):
        if _validated_by_save.get():
            return data
        names = {field.name: value for field, value in data.items()
                 if not isinstance(value, Node) and field.name in cls._meta.fields}
        checked = cls._validate_values(names, partial)
        return {field: checked.get(field.name, value) for field, value in data.items()}

    @classmethod
    def insert(cls, __data=None, **insert):
        if _validated_by_save.get() and __data is None:
            # save() inserting a row it has validated: one cached statement.
            return _PreparedInsert(cls, insert)
        return ModelInsert(cls, cls._checked(cls._normalize_data(__data, insert), partial=False))

    @classmethod
    def bulk_insert(cls, rows, *, validate=True, batch_size=1000):
        """Insert many rows (dicts of field names) at the driver's full speed:
        one prepared statement, executemany on SQLite, multi-row VALUES on
        PostgreSQL, all in one transaction. Every row is validated first
        unless ``validate=False``. Returns the number of rows inserted."""
        if validate:
            rows = [{field.name: value for field, value in row.items()} for row in cls._checked_rows(rows)]
        else:
            rows = [{getattr(k, "name", k): v for k, v in row.items()} for row in rows]
        with write_transaction(model_db(cls)):
            for start in range(0, len(rows), batch_size):
                _PreparedInsert.many(cls, rows[start:start + batch_size])
        return len(rows)

    @classmethod
    def update(cls, __data=None, **update):
        return ModelUpdate(cls, cls._checked(cls._normalize_data(__data, update), partial=True))

    @classmethod
    def insert_many(cls, rows, fields=None, *, validate=True):
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
    def key_field(cls, key):
        """``(field, value)`` that finds the row with this id (int or digit
        string) or uuid; NotFoundError when ``key`` is neither."""
        if type(key) is int and 0 <= key <= MAX_ID:
            return cls.id, key
        text = str(key).strip()
        if text.isascii() and text.isdigit():  # not "²": str.isdigit takes other digits too
            number = int(text)
            if number > MAX_ID:
                raise NotFoundError("%s %s does not exist (ids stop at %d)" % (cls.__name__, key, MAX_ID))
            return cls.id, number
        try:
            return cls.uuid, uuid.UUID(text)
        except ValueError:
            raise NotFoundError("%s %r is neither an id nor a uuid" % (cls.__name__, key)) from None

    @classmethod
    def get_by_key(cls, key):
        """The row with this id (int or digit string) or uuid; NotFoundError if none."""
        field, value = cls.key_field(key)
        row = cls.select().where(field == value).first()
        if row is None:
            raise NotFoundError("%s %s does not exist" % (cls.__name__, key))
        return row


class _PreparedInsert:
    """An INSERT compiled once per model, column set and backend, and then
    only executed: peewee builds SQL afresh for every query, which costs more
    than the insert itself for one row."""

    _cache = {}

    def __init__(self, model, data):
        self.model, self.data = model, data

    @classmethod
    def _statement(cls, model, names):
        db = model_db(model)
        key = (model, names, type(db))
        if key not in cls._cache:
            postgres = isinstance(db, PostgresqlDatabase)
            columns, marks = [], []
            for name in names:
                field = model._meta.fields[name]
                columns.append('"%s"' % field.column_name)
                json_column = isinstance(field, JSONField)
                marks.append("%s" if postgres else ("json(?)" if json_column else "?"))
            sql = 'INSERT INTO "%s" (%s) VALUES ' % (model._meta.table_name, ", ".join(columns))
            row = "(%s)" % ", ".join(marks)
            pk = model._meta.primary_key
            returning = ' RETURNING "%s"' % pk.column_name if postgres and model._meta.auto_increment else ""
            cls._cache[key] = (sql, row, returning, postgres)
        return cls._cache[key]

    @staticmethod
    def _params(model, names, data, postgres, shared=None):
        params = []
        for name in names:
            field, value = model._meta.fields[name], data[name]
            if value is not None and isinstance(field, JSONField):
                # SQLite wraps the text in json(); psycopg2 takes it as a jsonb literal.
                value = field._dumps(value)
            elif shared is not None and value is shared[0]:
                value = shared[1]  # the batch's timestamp, converted once
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
        sql, row, returning, postgres = self._statement(self.model, names)
        cursor = model_db(self.model).execute_sql(sql + row + returning,
                                                  self._params(self.model, names, data, postgres))
        if not self.model._meta.auto_increment:
            return None
        return cursor.fetchone()[0] if postgres else cursor.lastrowid

    @classmethod
    def many(cls, model, rows):
        if not rows:
            return
        now = utcnow()
        completed = [cls(model, row)._complete(now) for row in rows]
        names = tuple(sorted(completed[0]))
        if any(tuple(sorted(row)) != names for row in completed):
            raise ValueError("bulk_insert rows must all have the same fields")
        sql, row, _returning, postgres = cls._statement(model, names)
        shared = (now, TimestampTzField().db_value(now) if not postgres else now)
        params = [cls._params(model, names, data, postgres, shared) for data in completed]
        db = model_db(model)
        db.connect(reuse_if_open=True)
        cursor = db.cursor()
        if postgres:
            from psycopg2.extras import execute_values
            execute_values(cursor, sql + "%s", params, template=row, page_size=len(params))
        else:
            cursor.executemany(sql + row, params)


# -- links: adding twice is harmless, linking to a missing row is a clear error ----

class LinkQuery(ManyToManyQuery):
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
        for value in values:
            if isinstance(value, Model):
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
        return super().remove(list(value)) if value else 0


class LinkAccessor(ManyToManyFieldAccessor):
    def __get__(self, instance, instance_type=None):
        if instance is not None:
            # Set by with_agents() / with_ai_models(): the links, loaded eagerly.
            loaded = instance.__dict__.get(_loaded_key(self.name))
            if loaded is not None:
                return loaded
        return super().__get__(instance, instance_type)

    def get_query(self, instance):
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

    def bind(self, model, name, set_attribute=True):
        if isinstance(self._through_model, DeferredThroughModel):
            self._through_model.set_field(model, self, name)
            return
        super(ManyToManyField, self).bind(model, name, set_attribute)
        if not self._is_backref:
            field = LinkField(self.model, backref=name, through_model=self.through_model, _is_backref=True)
            self.rel_model._meta.add_field(self.backref, field)


AgentModelsThrough = DeferredThroughModel()


def _loaded_key(name):
    return "_loaded_" + name


def _load_links(query, name, source_column, target_model, target_column):
    """Eager loading in three queries: the rows, their links as plain tuples,
    and the linked rows; each row gets a list under ``name`` (the accessor
    then returns it instead of querying)."""
    rows = list(query)
    for row in rows:
        row.__dict__[_loaded_key(name)] = []
    if not rows:
        return rows
    source, target = getattr(AgentModels, source_column), getattr(AgentModels, target_column)
    # Few rows: their ids as parameters. Many: the query itself as a subquery,
    # so no driver's parameter limit is reached, and peewee does not convert
    # and bind an id at a time (for 1,000 agents, a tenth of the load's time).
    wanted = [row.id for row in rows] if len(rows) <= _MAX_IDS else query.columns(type(rows[0]).id)
    links = list(AgentModels.select(source, target).where(source.in_(wanted)).tuples())
    linked = sorted({target_id for _source_id, target_id in links})
    wanted_targets = linked if len(linked) <= _MAX_IDS else AgentModels.select(target).where(source.in_(wanted))
    targets = {m.id: m for m in target_model.select().where(target_model.id.in_(wanted_targets))}
    by_id = {row.id: row for row in rows}
    for source_id, target_id in sorted(links):
        if target_id in targets:  # a link to a row that is gone (written by hand) is not shown
            by_id[source_id].__dict__[_loaded_key(name)].append(targets[target_id])
    return rows


_MAX_IDS = 100


# -- tables -----------------------------------------------------------------------

class PsAiModel(BaseModel):
    """An AI model configuration: a ``ps_ai_models`` row."""

    id = AutoField()
    uuid = UUIDTextField(default=uuid.uuid4, unique=True)
    user_id = IntegerField(index=True)
    organization_id = IntegerField(index=True)
    created_at = TimestampTzField(default=utcnow)
    updated_at = TimestampTzField(default=utcnow)
    name = CharField(max_length=255)
    configuration = JSONField(dumps=strict_json_dumps)

    class Meta:
        table_name = "ps_ai_models"

    def validate(self):
        from .schemas import validate_model_row
        self.configuration = validate_model_row(self)

    @classmethod
    def _validate_values(cls, values, partial):
        from .schemas import validate_model_values
        return validate_model_values(values, partial=partial)

    def save(self, *args, **kwargs):
        """Save, and keep the price history (``psai.price_history``): a
        change of ``prices`` closes the version in force and opens a new one,
        in the same transaction."""
        if self.id is None or kwargs.get("force_insert"):
            return super().save(*args, **kwargs)
        from .history import record_price_change
        with write_transaction(model_db(self)):
            # Lock the row before the new updated_at is taken, so a call
            # recorded at the same moment is either before the change or after it.
            query = PsAiModel.select(PsAiModel.configuration, PsAiModel.updated_at).where(PsAiModel.id == self.id)
            stored = (query.for_update() if is_postgres(model_db(self)) else query).tuples().first()
            result = super().save(*args, **kwargs)
            if stored is not None:
                record_price_change(self, stored[0], stored[1])
            return result

    def delete_instance(self, *args, **kwargs):
        """Delete the model and its links. A model with recorded usage is
        refused (InUseError): deactivate it, so reports keep its prices."""
        in_use = InUseError("model %s (%s) has recorded usage; deactivate it instead of deleting it"
                            % (self.id, self.name))
        try:
            with write_transaction(model_db(self)):
                if (table_columns(model_db(self), PsModelUsageItem._meta.table_name)
                        and PsModelUsageItem.select().where(PsModelUsageItem.model_id == self.id).exists()):
                    raise in_use
                return super().delete_instance(*args, **kwargs)
        except IntegrityError:
            if PsModelUsage.select().where(PsModelUsage.model == self.id).exists():
                raise in_use from None
            raise

    def update_configuration(self, changes):
        """Merge ``changes`` into the configuration (nested dicts merge, a
        None value removes a key), validate the result and save it. A stored
        configuration that is not an object (a hand-written row) is replaced
        by ``changes``, so a bad row can be fixed."""
        from .schemas import merge_configuration
        if not isinstance(changes, dict):
            raise ValidationError({"changes": ["Must be a dict of configuration fields to change."]})
        before = self.configuration
        self.configuration = merge_configuration(before if isinstance(before, dict) else {}, changes)
        try:
            self.save()
        except ValidationError:
            self.configuration = before  # a refused change leaves the object as it was too
            raise
        return self

    def deactivate(self):
        """Mark the model inactive. Unlike other changes this is written even
        when the row holds something psai would refuse (written by hand or by
        another tool): taking a bad row out of use never makes it worse. A
        configuration that is not an object cannot hold the flag: replace it
        with ``update_configuration``."""
        from .check import shape_problem
        problem = shape_problem(self.configuration)
        if problem:
            raise ValidationError({"configuration": [problem + "; replace it with a whole configuration."]})
        self.configuration = dict(self.configuration, active=False)
        self.updated_at = utcnow()
        # peewee's own update query, not BaseModel.update: on purpose, without validation.
        ModelUpdate(PsAiModel, {PsAiModel.configuration: self.configuration, PsAiModel.updated_at: self.updated_at}) \
            .where(PsAiModel.id == self.id).execute()
        return self

    @classmethod
    def where_config(cls, filters=None, **fields):
        """Models whose configuration matches every filter, e.g.
        ``where_config(provider="openai", type="text", active=True)``; nested
        keys by path: ``where_config({"prices.currency": "EUR"})``. A list
        value matches any of its items. Same rows on SQLite and PostgreSQL."""
        from .query import where_config
        return where_config(filters, **fields)

    @classmethod
    def history(cls, name, organization_id=None):
        """Every row that had this name, newest first."""
        from .query import model_history
        return model_history(name, organization_id)

    @classmethod
    def with_agents(cls, query=None):
        """Models with ``.agents`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return _load_links(query, "agents", "ai_model", PsAgent, "agent")

    def __repr__(self):
        return "<PsAiModel %s %r>" % (self.id, self.name)


class PsAgent(BaseModel):
    """An agent: a ``ps_agents`` row, linked to the AI models it may use."""

    id = AutoField()
    uuid = UUIDTextField(default=uuid.uuid4, unique=True)
    user_id = IntegerField(index=True)
    created_at = TimestampTzField(default=utcnow)
    updated_at = TimestampTzField(default=utcnow)
    class_id = IntegerField(index=True)
    group_id = IntegerField(index=True)
    configuration = JSONField(dumps=strict_json_dumps)
    parent_agent = ForeignKeyField(
        "self", null=True, backref="sub_agents", on_delete="SET NULL",
        column_name="parent_agent_id", index=True,
    )
    ai_models = LinkField(PsAiModel, backref="agents", through_model=AgentModelsThrough)

    class Meta:
        table_name = "ps_agents"

    def validate(self):
        from .schemas import validate_agent_row
        validate_agent_row(self)
        if self.id is not None and self.parent_agent_id is not None:
            # One change of the tree at a time: two saves each checking the
            # tree before the other's write could make a loop together.
            lock(model_db(self), "agent tree")
            self._refuse_cycle()

    def save(self, *args, **kwargs):
        try:
            # The cycle check reads before the write: take the write lock first
            # on SQLite, or a concurrent writer makes the upgrade fail.
            with write_transaction(model_db(self)):
                return super().save(*args, **kwargs)
        except IntegrityError as exc:
            # PolicySynth's own schema (its Sequelize association) makes
            # parent_agent_id refer to ps_ai_models; say so instead of failing darkly.
            text = str(exc)
            if self.parent_agent_id is not None and "parent_agent_id" in text and "ps_ai_models" in text:
                raise ValidationError({"parent_agent_id": [
                    "This database was created by PolicySynth, whose schema makes parent_agent_id "
                    "refer to ps_ai_models: a parent agent's id must also be a model id here "
                    "(agent %s is not)." % self.parent_agent_id]}) from None
            raise

    def _refuse_cycle(self):
        """A sub-agent tree has no loops: the new parent may not be this
        agent or one of its sub-agents."""
        from .query import sub_agent_tree
        if self.parent_agent_id in {agent.id for agent in sub_agent_tree(self)}:
            raise ValidationError({"parent_agent_id": [
                "Agent %s is this agent or one of its sub-agents; a parent there would make a loop."
                % self.parent_agent_id]})

    @classmethod
    def _validate_values(cls, values, partial):
        from .schemas import validate_agent_values
        return validate_agent_values(values, partial=partial)

    def select_model(self, model_type, size, *, include_inactive=False):
        """The PsAiModel this agent would use for ``model_type`` and ``size``,
        under PolicySynth's size fallback (see ``psai.query.select_model``)."""
        from .query import select_model
        return select_model(self, model_type, size, include_inactive=include_inactive)

    def sub_agent_tree(self, *, include_self=True):
        """This agent's sub-agents at every depth, each with ``.level``, in one query."""
        from .query import sub_agent_tree
        return sub_agent_tree(self, include_self=include_self)

    @classmethod
    def with_ai_models(cls, query=None):
        """Agents with ``.ai_models`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return _load_links(query, "ai_models", "agent", PsAiModel, "ai_model")

    def __repr__(self):
        return "<PsAgent %s>" % (self.id,)


class AgentModels(BaseModel):
    """The ``"AgentModels"`` join table: which agent may use which model."""

    agent = ForeignKeyField(PsAgent, column_name="agent_id", on_delete="CASCADE", backref="model_links")
    ai_model = ForeignKeyField(PsAiModel, column_name="ai_model_id", on_delete="CASCADE", backref="agent_links")

    class Meta:
        table_name = "AgentModels"
        primary_key = CompositeKey("agent", "ai_model")


AgentModelsThrough.set_model(AgentModels)


def _counter():
    return IntegerField(default=0)


class PsModelUsage(BaseModel):
    """Token counters: a ``ps_model_usage`` row. psai keeps one row per model,
    agent, connector and UTC day (``psai.record_usage``); PolicySynth keeps one
    per model and agent. Either way a report adds them all up."""

    id = AutoField()
    user_id = IntegerField(index=True)
    created_at = TimestampTzField(default=utcnow)
    updated_at = TimestampTzField(default=utcnow)
    # RESTRICT: a model with recorded usage is deactivated, not deleted, so
    # the cost history keeps the prices it was charged at.
    model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="RESTRICT", backref="usage")
    token_in_count = _counter()
    token_in_cached_context_count = _counter()
    long_context_token_in_count = _counter()
    long_context_token_in_cached_context_count = _counter()
    token_out_count = _counter()
    token_out_reasoning_count = _counter()
    token_out_audio_count = _counter()
    token_out_image_count = _counter()
    long_context_token_out_count = _counter()
    long_context_token_out_reasoning_count = _counter()
    long_context_token_out_audio_count = _counter()
    long_context_token_out_image_count = _counter()
    agent = ForeignKeyField(PsAgent, column_name="agent_id", null=True, on_delete="SET NULL", backref="usage")
    connector_id = IntegerField(null=True, index=True)
    # Cache-write input, added by a later PolicySynth; appended as its migration does.
    token_in_cache_write_count = _counter()
    long_context_token_in_cache_write_count = _counter()

    class Meta:
        table_name = "ps_model_usage"


class PsModelUsageItem(BaseModel):
    """One model call: a ``ps_model_usage_item`` row, PolicySynth's record of
    the call with the prices in force then (``data``, its JSON layout; see
    ``psai.items``). Usage recorded without an agent has ``agent_id`` 0: the
    column is NOT NULL in PolicySynth, and no agent has id 0."""

    id = AutoField()
    user_id = IntegerField(index=True)
    created_at = TimestampTzField(default=utcnow, index=True)
    updated_at = TimestampTzField(default=utcnow)
    model_id = IntegerField(index=True)
    agent_id = IntegerField(index=True)
    connector_id = IntegerField(null=True, index=True)
    data = JSONField(dumps=strict_json_dumps)

    class Meta:
        table_name = "ps_model_usage_item"


class PriceVersion(BaseModel):
    """psai's own: the prices a model had from ``valid_from`` until
    ``valid_to`` (None: still in force). ``source`` says how psai knows them:
    ``stored`` (the row's prices before psai first changed them), ``psai`` (a
    change made through psai), ``observed`` (a change made elsewhere, found
    when psai next saved the row)."""

    id = AutoField()
    model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", backref="price_versions")
    valid_from = TimestampTzField()
    valid_to = TimestampTzField(null=True)
    prices = JSONField(dumps=strict_json_dumps)
    source = CharField(max_length=32)

    class Meta:
        table_name = "psai_price_versions"


class PriceCorrection(BaseModel):
    """psai's own: a deliberate correction of recorded usage (``psai.reprice``)."""

    id = AutoField()
    model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", backref="price_corrections")
    applied_at = TimestampTzField()
    since = TimestampTzField(null=True)
    until = TimestampTzField(null=True)
    changes = JSONField(dumps=strict_json_dumps)
    calls = IntegerField()
    currency = CharField(max_length=16, null=True)
    cost_before = CharField()
    cost_after = CharField()

    class Meta:
        table_name = "psai_price_corrections"


class ModelProvenance(BaseModel):
    """psai's own: where an imported model's prices came from (``psai.catalog``)."""

    id = AutoField()
    model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", unique=True,
                            backref="provenance_rows")
    source = CharField(max_length=64)
    source_version = CharField(max_length=128)
    source_model = CharField(max_length=255)
    imported_at = TimestampTzField()

    class Meta:
        table_name = "psai_model_provenance"


ALL_MODELS = [PsAiModel, PsAgent, AgentModels, PsModelUsage, PsModelUsageItem, PriceVersion, PriceCorrection,
              ModelProvenance]
