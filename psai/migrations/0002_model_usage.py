"""PolicySynth's ps_model_usage table, with the cache-write counters."""
from peewee import SQL, AutoField, ForeignKeyField, IntegerField, Model

from psai.fields import TimestampTzField, utcnow


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class PsAiModel(Base):
        id = AutoField()

        class Meta:
            table_name = "ps_ai_models"

    class PsAgent(Base):
        id = AutoField()

        class Meta:
            table_name = "ps_agents"

    def counter():
        # DEFAULT 0 in the table too, as PolicySynth's: writers that name only
        # some counters (PolicySynth's own inserts do) get 0 for the rest.
        return IntegerField(default=0, constraints=[SQL("DEFAULT 0")])

    class PsModelUsage(Base):
        id = AutoField()
        user_id = IntegerField(index=True)
        created_at = TimestampTzField(default=utcnow)
        updated_at = TimestampTzField(default=utcnow)
        model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="RESTRICT")
        token_in_count = counter()
        token_in_cached_context_count = counter()
        long_context_token_in_count = counter()
        long_context_token_in_cached_context_count = counter()
        token_out_count = counter()
        token_out_reasoning_count = counter()
        token_out_audio_count = counter()
        token_out_image_count = counter()
        long_context_token_out_count = counter()
        long_context_token_out_reasoning_count = counter()
        long_context_token_out_audio_count = counter()
        long_context_token_out_image_count = counter()
        agent = ForeignKeyField(PsAgent, column_name="agent_id", null=True, on_delete="SET NULL")
        connector_id = IntegerField(null=True, index=True)
        token_in_cache_write_count = counter()
        long_context_token_in_cache_write_count = counter()

        class Meta:
            table_name = "ps_model_usage"

    db.create_tables([PsModelUsage], safe=True)
