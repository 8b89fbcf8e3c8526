"""psai's own record of where an imported model's prices came from (a price
catalog: genai-prices, LiteLLM), beside PolicySynth's tables: one row per
imported model, removed with the model."""
from peewee import AutoField, CharField, ForeignKeyField, Model

from psai.fields import TimestampTzField


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class PsAiModel(Base):
        id = AutoField()

        class Meta:
            table_name = "ps_ai_models"

    class ModelProvenance(Base):
        id = AutoField()
        model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", unique=True)
        source = CharField(max_length=64)
        source_version = CharField(max_length=128)
        source_model = CharField(max_length=255)
        imported_at = TimestampTzField()

        class Meta:
            table_name = "psai_model_provenance"

    db.create_tables([ModelProvenance], safe=True)
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_model_provenance_source_source_model" '
                   'ON "psai_model_provenance" ("source", "source_model")')
