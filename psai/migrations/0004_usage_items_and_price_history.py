"""PolicySynth's ps_model_usage_item (one row a call, with the prices in force
then), and psai's own price history and corrections beside it.

ps_model_usage_item is created only where it is absent, column for column and
with the index names PolicySynth's Sequelize sync gives it, so a PolicySynth
database keeps its own table and a later PolicySynth sync on a psai database
adds nothing. It has no foreign keys, as PolicySynth's has none.
"""
from peewee import SQL, AutoField, CharField, ForeignKeyField, IntegerField, JSONField, Model, TextField

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

    class PsModelUsageItem(Base):
        id = AutoField()
        user_id = IntegerField()
        created_at = TimestampTzField(default=utcnow)
        updated_at = TimestampTzField(default=utcnow)
        model_id = IntegerField()
        agent_id = IntegerField()
        connector_id = IntegerField(null=True)
        data = JSONField()

        class Meta:
            table_name = "ps_model_usage_item"

    class PriceVersion(Base):
        id = AutoField()
        model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", index=False)
        valid_from = TimestampTzField()
        valid_to = TimestampTzField(null=True)
        prices = JSONField()
        source = CharField(max_length=32)

        class Meta:
            table_name = "psai_price_versions"

    class PriceCorrection(Base):
        id = AutoField()
        model = ForeignKeyField(PsAiModel, column_name="model_id", on_delete="CASCADE", index=False)
        applied_at = TimestampTzField()
        since = TimestampTzField(null=True)
        until = TimestampTzField(null=True)
        changes = JSONField()
        calls = IntegerField()
        currency = CharField(max_length=16, null=True)
        cost_before = TextField(constraints=[SQL("DEFAULT '0'")])
        cost_after = TextField(constraints=[SQL("DEFAULT '0'")])

        class Meta:
            table_name = "psai_price_corrections"

    db.create_tables([PsModelUsageItem, PriceVersion, PriceCorrection], safe=True)
    statements = ['CREATE INDEX IF NOT EXISTS "ps_model_usage_item_%s" ON "ps_model_usage_item" ("%s")' % (c, c)
                  for c in ("user_id", "model_id", "agent_id", "connector_id", "created_at")]
    statements += [
        'CREATE INDEX IF NOT EXISTS "psai_price_versions_model_id_valid_from" '
        'ON "psai_price_versions" ("model_id", "valid_from")',
        'CREATE INDEX IF NOT EXISTS "psai_price_corrections_model_id" ON "psai_price_corrections" ("model_id")',
    ]
    for statement in statements:
        db.execute_sql(statement)
