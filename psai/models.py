"""The store: PolicySynth's tables as peewee models, bound to
``psai.db.database``, with their own queries (configuration filters, model
selection, the sub-agent tree) and the save hook that keeps price history."""
from __future__ import annotations

import datetime
import difflib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Self, TypeAlias

from peewee import (
    AutoField, BooleanField, CharField, CompositeKey, DeferredThroughModel, ForeignKeyField, IntegerField,
    IntegrityError, ModelSelect, ModelUpdate, TextField, Value,
)

from ._base import BaseModel, LinkField, check_database, compiled, load_links
from ._constants import MAX_INTEGER, strict_json_dumps
from .db import is_postgres, lock, model_db, register_models, table_columns, write_transaction
from .enums import PsAiModelSize, PsAiModelType
from .errors import AmbiguousNameError, InUseError, NotAdoptedError, NotFoundError, ValidationError
from .fields import JSONField, TimestampTzField, UUIDTextField, utcnow
from .pricing import COUNTERS
from .schemas import (
    BUDGET_FIELDS, PsAgentSchema, PsAiModelSchema, bind_row_class, merge_configuration, shape_problem, unknown_paths,
    validate_agent_row, validate_agent_values, validate_budget_values, validate_model_row, validate_model_values,
)
from ._sql import compiled_once, config_filter, slot, usage_state_sql, window

__all__ = ["BaseModel", "PsAiModel", "PsAgent", "AgentModels", "PsModelUsage", "PsModelUsageItem",
           "PriceVersion", "PriceCorrection", "ModelProvenance", "CopiedUsage", "CopiedItem", "Budget", "BudgetEvent",
           "Setting",
           "ALL_MODELS",
           "strict_json_dumps",
           "where_config", "select_model", "model_choices", "model_history", "sub_agent_tree", "SIZE_FALLBACK",
           "record_price_change", "prices_of", "provenance", "usage_counters", "usage_state",
           "ModelRef", "AgentRef", "ref_key", "find_model", "find_models", "find_agent",
           "DEFAULT_IDS", "config", "store_settings", "change_settings", "fill_default_ids",
           "default_ids", "nearest_names", "BudgetReservation", "Reservation"]

# PolicySynth's size fallback: which sizes to try, in order, for a size asked for.
SIZE_FALLBACK = {
    "large": ("large", "medium", "small"),
    "medium": ("medium", "large", "small"),
    "small": ("small", "medium", "large"),
}

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
    configuration = JSONField(dumps=strict_json_dumps)

    class Meta:
        table_name = "ps_ai_models"

    def validate(self) -> None:
        stored = None
        if self.id is None:
            fill_default_ids(self, ("user_id", "organization_id"))
        if self.id is not None and unknown_paths(self.configuration):
            # Keys psai does not know may stay where the row already had them.
            stored = PsAiModel.select(PsAiModel.configuration).where(PsAiModel.id == self.id).scalar()
        self.configuration = validate_model_row(self, stored)

    @classmethod
    def _validate_values(cls, values: dict[str, Any], partial: bool) -> dict[str, Any]:
        return validate_model_values(values, partial=partial)

    def save(self, *args: Any, **kwargs: Any) -> int:
        """Save, and keep the price history (``psai.price_history``): a
        change of ``prices`` closes the version in force and opens a new one,
        in the same transaction. This writes the object as it is: to change
        some fields while other processes may change others, use
        ``update_configuration`` (it merges into the row as stored)."""
        if self.id is None or kwargs.get("force_insert"):
            return super().save(*args, **kwargs)
        check_database(self)
        with write_transaction(model_db(self)):
            # Lock the row before the new updated_at is taken, so a call
            # recorded at the same moment is either before the change or after it.
            query = PsAiModel.select(PsAiModel.configuration, PsAiModel.updated_at).where(PsAiModel.id == self.id)
            stored = (query.for_update() if is_postgres(model_db(self)) else query).tuples().first()
            result = super().save(*args, **kwargs)
            if stored is not None:
                record_price_change(self, stored[0], stored[1])
            return result

    def delete_instance(self, *args: Any, **kwargs: Any) -> int:
        """Delete the model and its links. A model with recorded usage is
        refused (InUseError): deactivate it, so reports keep its prices."""
        check_database(self)
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

    def _stored_for_update(self) -> PsAiModel:
        """Inside a write transaction: the row as stored now, locked until
        commit (PostgreSQL: FOR UPDATE; SQLite: the write transaction holds
        the database's write lock). NotFoundError when it is gone."""
        query = PsAiModel.select().where(PsAiModel.id == self.id)
        stored = (query.for_update() if is_postgres(model_db(self)) else query).first()
        if stored is None:
            raise NotFoundError("PsAiModel %s does not exist (deleted?)" % self.id)
        return stored

    def update_configuration(self, changes: dict[str, Any]) -> Self:
        """Merge ``changes`` into the configuration as stored now (nested
        dicts merge, a None value removes a key), validate the result and
        save it, reading and writing under the row's lock: two processes
        changing different fields both keep their change. A stored
        configuration that is not an object (a hand-written row) is
        replaced by ``changes``, so a bad row can be fixed. Fields set on
        the object and not saved (``name``) are saved with it; the object
        then holds the row as stored. NotFoundError when the row is gone."""
        if not isinstance(changes, dict):
            raise ValidationError({"changes": ["Must be a dict of configuration fields to change."]})
        check_database(self)
        before = self._state()
        try:
            with write_transaction(model_db(self)):
                if self.id is not None:  # else a new row, saved for the first time
                    self._take_stored(self._stored_for_update())
                base = self.configuration
                self.configuration = merge_configuration(base if isinstance(base, dict) else {}, changes)
                self.save()
        except BaseException:
            # A refused change leaves the object as it was too.
            self._restore(before)
            raise
        return self

    def deactivate(self) -> Self:
        """Mark the model inactive, in the row as stored now (under its lock:
        nothing another process changed meanwhile is written back). Unlike
        other changes this is written even when the row holds something
        psai would refuse (written by hand or by another tool): taking a
        bad row out of use never makes it worse. A configuration that is
        not an object cannot hold the flag: replace it with
        ``update_configuration``. NotFoundError when the row is gone."""
        check_database(self)
        with write_transaction(model_db(self)):
            stored = self._stored_for_update()
            problem = shape_problem(stored.configuration)
            if problem:
                raise ValidationError({"configuration": [problem + "; replace it with a whole configuration."]})
            configuration = dict(stored.configuration, active=False)
            now = utcnow()
            # peewee's own update query, not BaseModel.update: on purpose, without validation.
            ModelUpdate(PsAiModel, {PsAiModel.configuration: configuration, PsAiModel.updated_at: now}) \
                .where(PsAiModel.id == self.id).execute()
        self._saved_as(dict(stored.__data__, configuration=configuration, updated_at=now))
        return self

    @classmethod
    def where_config(cls, filters: Mapping[str, Any] | None = None, **fields: Any) -> ModelSelect[PsAiModel]:
        """Models whose configuration matches every filter, e.g.
        ``where_config(provider="openai", type="text", active=True)``; nested
        keys by path: ``where_config({"prices.currency": "EUR"})``. A list
        value matches any of its items. Same rows on SQLite and PostgreSQL."""
        return where_config(filters, **fields)

    @classmethod
    def history(cls, name: str, organization_id: int | None = None) -> list[PsAiModel]:
        """Every row that had this name, newest first."""
        return model_history(name, organization_id)

    @classmethod
    def with_agents(cls, query: ModelSelect[Self] | None = None) -> list[Self]:
        """Models with ``.agents`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return load_links(query, "agents", AgentModels, "ai_model", PsAgent, "agent")

    def __repr__(self) -> str:
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
    # Declared for type checkers only: the parent's id (peewee's accessor of
    # parent_agent), and the depth of an agent sub_agent_tree() returned.
    parent_agent_id: int | None
    level: int

    class Meta:
        table_name = "ps_agents"

    def validate(self) -> None:
        if self.id is None:
            fill_default_ids(self, ("user_id", "class_id", "group_id"))
        validate_agent_row(self)
        if self.id is not None and self.parent_agent_id is not None:
            # One change of the tree at a time: two saves each checking the
            # tree before the other's write could make a loop together.
            lock(model_db(self), "agent tree")
            self._refuse_cycle()

    def save(self, *args: Any, **kwargs: Any) -> int:
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

    def _refuse_cycle(self) -> None:
        """A sub-agent tree has no loops: the new parent may not be this
        agent or one of its sub-agents."""
        if self.parent_agent_id in {agent.id for agent in sub_agent_tree(self)}:
            raise ValidationError({"parent_agent_id": [
                "Agent %s is this agent or one of its sub-agents; a parent there would make a loop."
                % self.parent_agent_id]})

    @classmethod
    def _validate_values(cls, values: dict[str, Any], partial: bool) -> dict[str, Any]:
        return validate_agent_values(values, partial=partial)

    def select_model(self, model_type: PsAiModelType | str, size: PsAiModelSize | str, *,
                     include_inactive: bool = False) -> PsAiModel:
        """The PsAiModel this agent would use for ``model_type`` and ``size``,
        under PolicySynth's size fallback (see ``select_model``)."""
        return select_model(self, model_type, size, include_inactive=include_inactive)

    def sub_agent_tree(self, *, include_self: bool = True) -> list[PsAgent]:
        """This agent's sub-agents at every depth, each with ``.level``, in one query."""
        return sub_agent_tree(self, include_self=include_self)

    @classmethod
    def with_ai_models(cls, query: ModelSelect[Self] | None = None) -> list[Self]:
        """Agents with ``.ai_models`` loaded, in three queries whatever their number."""
        query = cls.select().order_by(cls.id) if query is None else query
        return load_links(query, "ai_models", AgentModels, "agent", PsAiModel, "ai_model")

    def __repr__(self) -> str:
        return "<PsAgent %s>" % (self.id,)


class AgentModels(BaseModel):
    """The ``"AgentModels"`` join table: which agent may use which model."""

    agent = ForeignKeyField(PsAgent, column_name="agent_id", on_delete="CASCADE", backref="model_links")
    ai_model = ForeignKeyField(PsAiModel, column_name="ai_model_id", on_delete="CASCADE", backref="agent_links")
    # Declared for type checkers only: peewee's accessors of the foreign keys' ids.
    agent_id: int
    ai_model_id: int

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
    # Declared for type checkers only: peewee's accessors of the foreign keys' ids.
    model_id: int
    agent_id: int | None

    class Meta:
        table_name = "ps_model_usage"


class PsModelUsageItem(BaseModel):
    """One model call: a ``ps_model_usage_item`` row, PolicySynth's record of
    the call with the prices in force then (``data``, its JSON layout; see
    ``psai._items``). Usage recorded without an agent has ``agent_id`` 0: the
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
    model_id: int  # declared for type checkers only: peewee's accessor of the model's id

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
    model_id: int  # declared for type checkers only: peewee's accessor of the model's id

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
    model_id: int  # declared for type checkers only: peewee's accessor of the model's id

    class Meta:
        table_name = "psai_model_provenance"


class CopiedUsage(BaseModel):
    """psai's own, on the target of a ``psai.copy``: the counters last copied
    into a ``ps_model_usage`` row, so that a later copy keeps what the target
    recorded in that row itself since. Removed with the row."""

    usage = ForeignKeyField(PsModelUsage, column_name="usage_id", primary_key=True, on_delete="CASCADE",
                            backref="copied_rows")
    counters = JSONField(dumps=strict_json_dumps)
    usage_id: int  # declared for type checkers only: peewee's accessor of the row's id

    class Meta:
        table_name = "psai_copied_usage"


class CopiedItem(BaseModel):
    """psai's own, on the target of a ``psai.copy``: an item the copy wrote
    there (inserted, or found equal to a source item). A later copy updates
    only these: an item the target recorded itself is never overwritten,
    whatever it shares with a source item. Removed with the item, so the id
    of a deleted item cannot mark a later one."""

    item = ForeignKeyField(PsModelUsageItem, column_name="item_id", primary_key=True, on_delete="CASCADE",
                           backref="copied_rows")
    item_id: int  # declared for type checkers only: peewee's accessor of the item's id

    class Meta:
        table_name = "psai_copied_items"


class Budget(BaseModel):
    """psai's own: a spending limit over one scope and a calendar period (``psai.budgets``)."""

    id = AutoField()
    name = CharField(max_length=255, unique=True)
    amount = CharField(max_length=64)  # a Decimal's exact text
    currency = CharField(max_length=16)
    period = CharField(max_length=8)
    timezone = CharField(max_length=64)
    agent_id = IntegerField(null=True)
    include_sub_agents = BooleanField()
    model_name = CharField(max_length=255, null=True)
    provider = CharField(max_length=64, null=True)
    organization_id = IntegerField(null=True)
    # Whose calls it covers (migrations 0019, 0021): an end user, a session, or one tag's key and value;
    # none: every call.
    user = CharField(max_length=255, null=True)
    session = CharField(max_length=255, null=True)
    tag_key = CharField(max_length=64, null=True)
    tag_value = CharField(max_length=255, null=True)
    warn_at = JSONField(dumps=strict_json_dumps)
    hard = BooleanField()
    unpriced = CharField(max_length=8)
    created_at = TimestampTzField(default=utcnow)

    class Meta:
        table_name = "psai_budgets"

    def validate(self) -> None:
        self.__data__.update(validate_budget_values(
            {name: self.__data__.get(name) for name in BUDGET_FIELDS}))

    @classmethod
    def _validate_values(cls, values: dict[str, Any], partial: bool) -> dict[str, Any]:
        return values if partial else dict(values, **validate_budget_values(
            {name: values.get(name) for name in BUDGET_FIELDS}))

    def __repr__(self) -> str:
        return "<Budget %s: %r>" % (self.id, self.name)


class BudgetEvent(BaseModel):
    """psai's own: a budget's threshold crossed, once per budget, period and threshold."""

    id = AutoField()
    budget = ForeignKeyField(Budget, column_name="budget_id", on_delete="CASCADE", backref="events")
    period_start = TimestampTzField()
    threshold = CharField(max_length=32)  # a Decimal's exact text: "0.8", "1"
    spent = CharField(max_length=64)
    at = TimestampTzField(default=utcnow)
    budget_id: int  # declared for type checkers only: peewee's accessor of the budget's id

    class Meta:
        table_name = "psai_budget_events"


class BudgetReservation(BaseModel):
    """psai's own: an estimate held against a budget until the call is
    recorded (``record_usage(..., reservation=r)``), released, or expired."""

    id = AutoField()
    token = CharField(max_length=36, index=True)  # one reservation: a row per budget it holds against
    budget = ForeignKeyField(Budget, column_name="budget_id", on_delete="CASCADE", backref="reservations")
    amount = CharField(max_length=64)  # a Decimal's exact text, in the budget's currency
    created_at = TimestampTzField(default=utcnow)
    expires_at = TimestampTzField(index=True)
    budget_id: int  # declared for type checkers only

    class Meta:
        table_name = "psai_budget_reservations"


class Reservation:
    """An estimate held against every hard budget covering a call
    (``psai.check_budget(..., reserve=True)``): ``token``, ``amount``,
    ``budgets`` (their names) and ``expires_at``. Settled by recording the
    call with ``reservation=``; ``release()`` gives it back."""

    def __init__(self, token: str, amount: Any, budgets: tuple[str, ...], expires_at: datetime.datetime) -> None:
        self.token, self.amount, self.budgets, self.expires_at = token, amount, budgets, expires_at

    def __repr__(self) -> str:
        return "<Reservation %s of %s on %s>" % (self.token, self.amount, ", ".join(self.budgets) or "no budget")

    def release(self) -> None:
        """Give the estimate back (a call that was not made). Idempotent."""
        if table_columns(model_db(BudgetReservation), BudgetReservation._meta.table_name):
            BudgetReservation.delete().where(BudgetReservation.token == self.token).execute()



class Setting(BaseModel):
    """psai's own: one setting of the store (``psai.config``), its value as JSON text."""

    key = CharField(max_length=64, primary_key=True)
    value = TextField()

    class Meta:
        table_name = "psai_settings"


ALL_MODELS = [PsAiModel, PsAgent, AgentModels, PsModelUsage, PsModelUsageItem, PriceVersion, PriceCorrection,
              ModelProvenance, CopiedUsage, CopiedItem, Budget, BudgetEvent, BudgetReservation, Setting]


register_models(ALL_MODELS)

bind_row_class(PsAiModelSchema, PsAiModel)
bind_row_class(PsAgentSchema, PsAgent)


# -- price history: what PsAiModel.save keeps ---------------------------------------

def prices_of(configuration: Any) -> dict[str, Any]:
    """A configuration's prices, or {} when it has none that can be read."""
    prices = configuration.get("prices") if isinstance(configuration, dict) else None
    return prices if isinstance(prices, dict) else {}


def _close(version: PriceVersion, at: datetime.datetime) -> None:
    PriceVersion.update(valid_to=at).where(PriceVersion.id == version.id).execute()


def record_price_change(model: PsAiModel, stored_configuration: Any,
                        stored_updated_at: datetime.datetime | None) -> None:
    """Called by ``PsAiModel.save`` inside its transaction, with the row as
    it was stored before the save: keep the history true."""
    if not table_columns(model_db(PriceVersion), PriceVersion._meta.table_name):
        return  # a PolicySynth database psai has not adopted: nothing of psai's is written
    stored, new, now = prices_of(stored_configuration), prices_of(model.configuration), model.updated_at
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


# -- naming a model or an agent -----------------------------------------------------------
#
# One rule everywhere a model or an agent is named, in Python and on the
# command line: a row; an int id; a string of ASCII digits, which is always
# an id (``"7"`` is the row with id 7, never a model named "7": name such a
# row by its uuid); a uuid (a ``uuid.UUID`` or its text); else a name. A
# model's name is its ``name`` column, an agent's its ``configuration.name``.

ModelRef: TypeAlias = PsAiModel | int | str | uuid.UUID
AgentRef: TypeAlias = PsAgent | int | str | uuid.UUID


def ref_key(ref: int | str | uuid.UUID) -> tuple[str, Any]:
    """``("id", n)``, ``("uuid", UUID)`` or ``("name", text)``: what a
    reference that is not a row names, by the rule above."""
    if isinstance(ref, bool):
        return "name", str(ref)  # never an id: True == 1 would name row 1
    if isinstance(ref, int):
        return "id", ref
    if isinstance(ref, uuid.UUID):
        return "uuid", ref
    text = str(ref).strip()
    if text.isascii() and text.isdigit():  # not "²": str.isdigit takes other digits too
        return "id", int(text)
    try:
        return "uuid", uuid.UUID(text)
    except ValueError:
        return "name", text


def nearest_names(name: str, names: Iterable[str], count: int = 3) -> list[str]:
    """The names nearest to ``name`` (at most ``count``, nearest first):
    what an error suggests instead of a name that matches none."""
    return difflib.get_close_matches(name, sorted(set(names)), n=count, cutoff=0.6)


def _named(kind: str, text: str, every: list[str]) -> NotFoundError:
    """The error for a name no row has, with the nearest names there are."""
    near = nearest_names(text, every)
    return NotFoundError("no %s has the id, uuid or name %r%s" % (
        kind, text, "; did you mean %s?" % " or ".join(repr(name) for name in near) if near else ""))


def _by_key(cls: type[BaseModel], kind: str, ref: int | str | uuid.UUID) -> Any:
    how, value = ref_key(ref)
    if how == "id" and not 0 <= value <= MAX_INTEGER:
        raise NotFoundError("%s %s does not exist (ids run from 0 to %d)" % (cls.__name__, value, MAX_INTEGER))
    # Compiled once a table and key: every recorded call and budget check looks its model up.
    field = cls.id if how == "id" else cls.uuid
    db = model_db(cls)
    statement = compiled_once(db, ("by_key", cls, how), lambda: cls.select().where(field == slot("value")).limit(1))
    row = next(iter(cls.raw(statement.sql, *statement.params({"value": field.db_value(value)})).bind(db)), None)
    if row is None:
        text = str(ref).strip()
        named = how == "id" and cls is PsAiModel and PsAiModel.select().where(PsAiModel.name == text).exists()
        raise NotFoundError("%s %s does not exist%s" % (cls.__name__, ref, (
            " (a string of digits is always an id: name the model called %r by its uuid)" % text)
            if named else ""))
    return row


def _active(row: PsAiModel) -> bool:
    return not isinstance(row.configuration, dict) or row.configuration.get("active") is not False


def find_models(ref: ModelRef) -> list[PsAiModel]:
    """Every model row a reference names, oldest first: the one row of an
    id, uuid or row, or every row with a name (its versions: older rows of a
    name are kept, inactive, when it is added again). Functions over a
    model's history (prices, repricing, audits, budgets) take this."""
    if isinstance(ref, PsAiModel):
        check_database(ref)
        return [ref]
    how, text = ref_key(ref)
    if how != "name":
        return [_by_key(PsAiModel, "model", ref)]
    rows = list(PsAiModel.select().where(PsAiModel.name == text).order_by(PsAiModel.created_at, PsAiModel.id))
    if not rows:
        every = [str(name) for name in PsAiModel.select(PsAiModel.name).distinct().scalars()]
        raise _named("model", text, every)
    return rows


def find_model(ref: ModelRef) -> PsAiModel:
    """The one model row a reference names (the rule above). A name fits
    the row of that name that is active; several active rows of one name
    (in several organizations), or only inactive ones, are an
    ``AmbiguousNameError`` listing them with their ids; no row of the name
    is a ``NotFoundError`` suggesting the nearest names there are."""
    rows = find_models(ref)
    if len(rows) == 1:
        return rows[0]
    active = [row for row in rows if _active(row)]
    if len(active) == 1:
        return active[0]
    raise AmbiguousNameError("%d models are named %r and %s: give one by id or uuid: %s" % (
        len(rows), rows[0].name, "%d of them are active" % len(active) if active else "none is active",
        ", ".join("id %s (organization %s, %s, created %s)" % (
            row.id, row.organization_id, "active" if _active(row) else "inactive",
            row.created_at.isoformat() if isinstance(row.created_at, datetime.datetime) else row.created_at)
            for row in reversed(active or rows))))


def find_agent(ref: AgentRef) -> PsAgent:
    """The one agent row a reference names (the rule above; a name is
    ``configuration.name``). Several agents of one name are an
    ``AmbiguousNameError`` listing their ids; none, a ``NotFoundError``
    suggesting the nearest names there are."""
    if isinstance(ref, PsAgent):
        check_database(ref)
        return ref
    how, text = ref_key(ref)
    if how != "name":
        return _by_key(PsAgent, "agent", ref)
    rows = list(PsAgent.select().where(config_filter(PsAgent.configuration, {"name": text},
                                                     is_postgres(model_db(PsAgent)))).order_by(PsAgent.id))
    if len(rows) == 1:
        return rows[0]
    if rows:
        raise AmbiguousNameError("%d agents are named %r: give one by id or uuid: %s" % (
            len(rows), text, ", ".join("id %s (class %s, group %s)" % (row.id, row.class_id, row.group_id)
                                       for row in rows)))
    every = [str(row.configuration["name"]) for row in PsAgent.select(PsAgent.configuration)
             if isinstance(row.configuration, dict) and isinstance(row.configuration.get("name"), str)]
    raise _named("agent", text, every)


# -- the store's settings: default ids ------------------------------------------------------
#
# PolicySynth's rows carry ids of its users, organizations, agent classes and
# groups. A store used on its own has none of these: new models and agents
# get the store's defaults (1 each unless ``psai.config`` changed them). A
# PolicySynth database (adopted with ``psai init --adopt``) requires them, as
# PolicySynth does, unless ``psai.config(require_ids=False)``.

DEFAULT_IDS = {"user_id": 1, "organization_id": 1, "class_id": 1, "group_id": 1}
_SETTINGS = (*DEFAULT_IDS, "require_ids")


def store_settings() -> dict[str, Any]:
    """The settings in force: ``{"user_id", "organization_id", "class_id",
    "group_id", "require_ids"}``. A database without psai's settings table
    (not migrated, or PolicySynth's not adopted) requires every id."""
    settings: dict[str, Any] = dict(DEFAULT_IDS, require_ids=False)
    if not table_columns(model_db(Setting), Setting._meta.table_name):
        return dict(settings, require_ids=True)
    for row in Setting.select().where(Setting.key.in_(_SETTINGS)):
        settings[row.key] = json.loads(row.value)
    return settings


def config(*, user_id: int | None = None, organization_id: int | None = None, class_id: int | None = None,
           group_id: int | None = None, require_ids: bool | None = None) -> dict[str, Any]:
    """The store's settings (``psai.config()``), after setting those given
    (None leaves one as it is), in one transaction: the ids new models and
    agents get when none is given, and ``require_ids`` (no defaults: every
    id must be given, as on a PolicySynth database)."""
    return change_settings(user_id=user_id, organization_id=organization_id, class_id=class_id,
                           group_id=group_id, require_ids=require_ids)


def change_settings(**changes: Any) -> dict[str, Any]:
    """Set some of the settings (a None leaves one as it is), in one
    transaction; returns the settings in force. Ids must fit PolicySynth's
    INTEGER columns; ``require_ids`` is a bool."""
    if all(value is None for value in changes.values()):
        return store_settings()
    errors: dict[str, list[str]] = {}
    for key, value in changes.items():
        if key not in _SETTINGS:
            errors[key] = ["Unknown setting: one of %s." % ", ".join(_SETTINGS)]
        elif value is None:
            continue
        elif key == "require_ids":
            if not isinstance(value, bool):
                errors[key] = ["Must be true or false."]
        elif isinstance(value, bool) or not isinstance(value, int) or not -MAX_INTEGER - 1 <= value <= MAX_INTEGER:
            errors[key] = ["Must be an integer that fits an INTEGER column."]
    if errors:
        raise ValidationError(errors)
    db = model_db(Setting)
    if not table_columns(db, Setting._meta.table_name):
        raise NotAdoptedError("this database has no psai_settings table: run `psai migrate` (psai.migrate()) or, "
                              "on a PolicySynth database, `psai init --adopt`")
    with write_transaction(db):
        for key, value in changes.items():
            if value is not None:
                Setting.insert(key=key, value=json.dumps(value)).on_conflict(
                    conflict_target=[Setting.key], update={Setting.value: json.dumps(value)}).execute()
    return store_settings()


def default_ids(**ids: int | None) -> dict[str, int | None]:
    """``ids`` with each None replaced by the store's default (left None
    where the store requires ids, for validation to name)."""
    if all(value is not None for value in ids.values()):
        return ids
    settings = store_settings()
    return {name: settings[name] if value is None and not settings["require_ids"] else value
            for name, value in ids.items()}


def fill_default_ids(row: BaseModel, names: tuple[str, ...]) -> None:
    """Give a new row the store's default for each of ``names`` it lacks
    (one query, and only when one is missing); a store that requires ids
    leaves them missing, for validation to name."""
    if all(getattr(row, name) is not None for name in names):
        return
    settings = store_settings()
    if settings["require_ids"]:
        return
    for name in names:
        if getattr(row, name) is None:
            setattr(row, name, settings[name])


# -- the tables' own queries --------------------------------------------------------

def usage_counters(db: Any = None) -> tuple[str, ...]:
    """The counters this database's ps_model_usage has. psai creates all 14;
    a table made by PolicySynth's npm release has 12, without the cache-write
    counters, and psai works with it as it is (see ``record_usage``)."""
    columns = table_columns(db or model_db(PsModelUsage), PsModelUsage._meta.table_name)
    return tuple(name for name in COUNTERS if name in columns)


def usage_state(db: Any, model_ids: list[int] | None, since: datetime.datetime | None,
                until: datetime.datetime | None) -> list[tuple]:
    """SQLite: what changes when the usage of ``model_ids`` (None: every
    model) in [since, until) changes: its items and the models' counter
    rows (how many, ids, latest update) and the models' rows. What a
    correction measured before the write lock is still true under it when
    this is the same (a hand edit that keeps ``updated_at`` is not seen)."""
    params: list[Any] = []
    where = window(db, "i.created_at", PsModelUsageItem.created_at, since, until, model_ids, params)
    ids = list(model_ids or ())
    return db.execute_sql(usage_state_sql(where, len(ids)), params + ids + ids).fetchall()


def provenance(model: ModelRef) -> dict[str, Any] | None:
    """Where an imported model's prices came from: ``{"source",
    "source_version", "source_model", "imported_at"}``, or None for a model
    not imported from a catalog (or a database without psai's tables)."""
    found = find_model(model)
    if not table_columns(model_db(PsAiModel), ModelProvenance._meta.table_name):
        return None
    row = ModelProvenance.select().where(ModelProvenance.model == found.id).first()
    if row is None:
        return None
    return {"source": row.source, "source_version": row.source_version, "source_model": row.source_model,
            "imported_at": row.imported_at}


def where_config(filters: Mapping[str, Any] | None = None, query: ModelSelect[PsAiModel] | None = None,
                 **fields: Any) -> ModelSelect[PsAiModel]:
    """Models whose configuration matches, e.g. ``where_config(provider="openai",
    type="text", active=True)`` or ``where_config({"prices.currency": "EUR"})``."""
    combined = dict(filters or {})
    combined.update(fields)
    query = PsAiModel.select() if query is None else query
    field = PsAiModel.configuration

    def condition() -> Any:
        return config_filter(field, combined, is_postgres(model_db(PsAiModel)))
    key = _filters_key(combined)
    return query.where(condition() if key is None else compiled(key, field, condition))


def _filters_key(filters: dict[Any, Any]) -> tuple | None:
    """A key naming ``filters`` exactly (each value with its type: 1, 1.0
    and True are other filters), or None for filters that are not kept."""
    def value_key(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return (type(value),) + tuple(value_key(v) for v in value)
        return type(value), repr(value) if type(value) is float else value  # -0.0 is not 0.0
    try:
        key = tuple((name, value_key(value)) for name, value in filters.items())
        hash(key)
    except TypeError:  # a value config_filter refuses (a dict, a set)
        return None
    return key


def newest_first(query: ModelSelect[PsAiModel]) -> ModelSelect[PsAiModel]:
    return query.order_by(PsAiModel.created_at.desc(), PsAiModel.id.desc())


def select_model(agent: PsAgent, model_type: PsAiModelType | str, size: PsAiModelSize | str, *,
                 include_inactive: bool = False) -> PsAiModel:
    """The model ``agent`` uses for ``model_type`` and ``size`` under
    PolicySynth's rules: the first size of SIZE_FALLBACK[size] the agent has a
    model for, else any model of the type. Inactive models are skipped unless
    ``include_inactive``. Among equals the newest row wins."""
    model_type = getattr(model_type, "value", model_type)
    size = getattr(size, "value", size)
    if not isinstance(size, str) or size not in SIZE_FALLBACK:
        raise ValidationError({"size": ["Must be one of: %s." % ", ".join(s.value for s in PsAiModelSize)]})
    if not isinstance(model_type, str):
        raise ValidationError({"model_type": ["Must be a model type such as 'text'."]})
    filters: dict[str, Any] = {"type": model_type}
    if not include_inactive:
        filters["active"] = True
    candidates = list(newest_first(where_config(filters, query=agent.ai_models)))
    chosen = _choose(candidates, size)
    if chosen is None:
        raise NotFoundError("agent %s has no %s%r model" % (
            agent.id, "" if include_inactive else "active ", model_type))
    return chosen


def _choose(candidates: list[PsAiModel], size: str) -> PsAiModel | None:
    """From models of one type, newest first: PolicySynth's pick for ``size``."""
    by_size: dict[Any, PsAiModel] = {}
    for model in candidates:
        by_size.setdefault(model.configuration.get("modelSize"), model)
    for wanted in SIZE_FALLBACK[size]:
        if wanted in by_size:
            return by_size[wanted]
    return candidates[0] if candidates else None


def model_choices(agent: PsAgent, *, include_inactive: bool = False) -> list[dict[str, Any]]:
    """For each type among the agent's models and each size: the model
    select_model would pick. One query."""
    query = agent.ai_models if include_inactive else where_config({"active": True}, query=agent.ai_models)
    by_type: dict[Any, list[PsAiModel]] = {}
    for model in newest_first(query):
        by_type.setdefault(model.configuration.get("type"), []).append(model)
    rows = []
    for model_type in sorted(by_type, key=str):
        for size in SIZE_FALLBACK:
            chosen = _choose(by_type[model_type], size)
            assert chosen is not None  # by_type holds no empty list
            rows.append({"type": model_type, "size": size, "model_id": chosen.id, "name": chosen.name,
                         "model_size": chosen.configuration.get("modelSize"),
                         "model": chosen.configuration.get("model")})
    return rows


def model_history(name: str, organization_id: int | None = None) -> list[PsAiModel]:
    """Every row that had this name, newest first."""
    query = PsAiModel.select().where(PsAiModel.name == name)
    if organization_id is not None:
        query = query.where(PsAiModel.organization_id == organization_id)
    return list(newest_first(query))


MAX_TREE_DEPTH = 64


def sub_agent_tree(agent: PsAgent, *, include_self: bool = True) -> list[PsAgent]:
    """The agents under ``agent`` (and itself), each with ``.level`` (0 for
    ``agent``), in one recursive query, by level then id. A loop in
    parent_agent_id (which PolicySynth does not prevent) ends the walk."""
    check_database(agent)
    tree = (PsAgent.select(PsAgent.id, Value(0).alias("level"))
            .where(PsAgent.id == agent.id)
            .cte("agent_tree", recursive=True, columns=("id", "level")))
    child = PsAgent.alias("child")
    step = (child.select(child.id, tree.c.level + 1)
            .join(tree, on=(child.parent_agent == tree.c.id))
            .where(tree.c.level < MAX_TREE_DEPTH))
    tree = tree.union_all(step)
    query = (PsAgent.select(PsAgent, tree.c.level.alias("level"))
             .join(tree, on=(PsAgent.id == tree.c.id))
             .with_cte(tree)
             .order_by(tree.c.level, PsAgent.id)
             .objects())  # level lands on each agent, not on a joined object
    seen: set[int] = set()
    result: list[PsAgent] = []
    for row in query:
        if row.id in seen:
            continue
        seen.add(row.id)
        if include_self or row.level > 0:
            result.append(row)
    return result
