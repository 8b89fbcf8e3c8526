"""PolicySynth's ps_ai_models, ps_agents and "AgentModels" tables."""
import uuid

from peewee import (
    AutoField, CharField, CompositeKey, ForeignKeyField, IntegerField, JSONField, Model,
)

from psai.fields import TimestampTzField, UUIDTextField, utcnow


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class PsAiModel(Base):
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

    class PsAgent(Base):
        id = AutoField()
        uuid = UUIDTextField(default=uuid.uuid4, unique=True)
        user_id = IntegerField(index=True)
        created_at = TimestampTzField(default=utcnow)
        updated_at = TimestampTzField(default=utcnow)
        class_id = IntegerField(index=True)
        group_id = IntegerField(index=True)
        configuration = JSONField()
        parent_agent = ForeignKeyField(
            "self", null=True, on_delete="SET NULL", column_name="parent_agent_id", index=True,
        )

        class Meta:
            table_name = "ps_agents"

    class AgentModels(Base):
        agent = ForeignKeyField(PsAgent, column_name="agent_id", on_delete="CASCADE", index=False)
        ai_model = ForeignKeyField(PsAiModel, column_name="ai_model_id", on_delete="CASCADE", index=False)

        class Meta:
            table_name = "AgentModels"
            primary_key = CompositeKey("agent", "ai_model")

    db.create_tables([PsAiModel, PsAgent, AgentModels], safe=True)
    # Sequelize's names for these two, so a PolicySynth sync on a psai
    # database finds them and adds no duplicates.
    for column in ("agent_id", "ai_model_id"):
        db.execute_sql('CREATE INDEX IF NOT EXISTS "agent_models_%s" ON "AgentModels" ("%s")' % (column, column))
