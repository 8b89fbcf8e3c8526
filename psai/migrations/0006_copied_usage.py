"""psai's own memory, on the target of a copy, of the counters last copied
into each ``ps_model_usage`` row (``psai.copy`` keeps what the target
recorded itself), beside PolicySynth's tables: removed with the row."""
from peewee import AutoField, ForeignKeyField, JSONField, Model


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class PsModelUsage(Base):
        id = AutoField()

        class Meta:
            table_name = "ps_model_usage"

    class CopiedUsage(Base):
        usage = ForeignKeyField(PsModelUsage, column_name="usage_id", primary_key=True, on_delete="CASCADE")
        counters = JSONField()

        class Meta:
            table_name = "psai_copied_usage"

    db.create_tables([CopiedUsage], safe=True)
