"""The store: PolicySynth's tables as peewee models, bound to ``psai.db.database``."""
import uuid

from peewee import (
    AutoField, CharField, CompositeKey, DeferredThroughModel, ForeignKeyField,
    IntegerField, IntegrityError, JSONField, ManyToManyField, ManyToManyQuery,
    Model, ModelSelect, fn, prefetch,
)
from peewee import ManyToManyFieldAccessor

from .db import database, write_transaction
from .errors import NotFoundError, ValidationError
from .fields import TimestampTzField, UUIDTextField, utcnow

__all__ = ["BaseModel", "PsAiModel", "PsAgent", "AgentModels", "ALL_MODELS"]


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False

    def save(self, *args, **kwargs):
        # PolicySynth (Sequelize) refreshes updated_at on every save.
        if "updated_at" in self._meta.fields:
            self.updated_at = utcnow()
            only = kwargs.get("only")
            if only is not None:
                field = self._meta.fields["updated_at"]
                # Field == builds SQL, so compare by identity and by name.
                if not any(f is field or (isinstance(f, str) and f == "updated_at") for f in only):
                    kwargs["only"] = list(only) + [field]
        self.validate()
        return super().save(*args, **kwargs)

    def validate(self):
        """Raise psai.ValidationError if this row may not be written."""

    @classmethod
    def get_by_key(cls, key):
        """The row with this id (int or digit string) or uuid; NotFoundError if none."""
        query = cls.select()
        text = str(key).strip()
        if text.isdigit():
            query = query.where(cls.id == int(text))
        else:
            try:
                query = query.where(cls.uuid == uuid.UUID(text))
            except ValueError:
                raise NotFoundError("%s %r is neither an id nor a uuid" % (cls.__name__, key)) from None
        row = query.first()
        if row is None:
            raise NotFoundError("%s %s does not exist" % (cls.__name__, key))
        return row


# -- links: adding twice is harmless, linking to a missing row is a clear error ----

class LinkQuery(ManyToManyQuery):
    def add(self, value, clear_existing=False):
        accessor = self._accessor
        src_id = getattr(self._instance, self._src_attr)
        with write_transaction():
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
            (accessor.through_model.insert_many(rows).on_conflict_ignore().execute())

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
    configuration = JSONField()

    class Meta:
        table_name = "ps_ai_models"

    def validate(self):
        from .schemas import validate_model_row
        self.configuration = validate_model_row(self)

    @classmethod
    def with_agents(cls, query=None):
        """Models with ``.agents`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return prefetch(query, AgentModels.select(), PsAgent.select())

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
    configuration = JSONField()
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

    @classmethod
    def with_ai_models(cls, query=None):
        """Agents with ``.ai_models`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return prefetch(query, AgentModels.select(), PsAiModel.select())

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

ALL_MODELS = [PsAiModel, PsAgent, AgentModels]
