"""The budgets' 15-minute slots (docs/budgets.md): the items added up per
quarter hour of UTC time and per key (a daily rollup's, without the
connector), kept by triggers of their own beside the rollups', so that a
budget in a zone other than UTC reads the partial days at its period's ends
from them, not from the items. Where the rollups' triggers are on, the
slots' are installed too and the rollups rebuilt (slots with them) in the
same transaction; where they are off, ``psai rollup enable`` installs both."""
from peewee import AutoField, BigIntegerField, CharField, Field, IntegerField, Model, TextField

from psai.db import forget_schema
from psai.rollups import disable, enable, enabled


class NumericField(Field):
    # Unbounded NUMERIC on PostgreSQL; NUMERIC affinity on SQLite keeps whole sums integers.
    field_type = "NUMERIC"


def up(migrator, db):
    class UsageSlot(Model):
        id = AutoField()
        range_slot = CharField(max_length=16)  # 'YYYY-MM-DD HH:MM', the slot's start in UTC
        group_key = TextField()
        model_id = IntegerField(null=True)
        agent_id = IntegerField(null=True)
        provider = TextField(null=True)
        pricing = TextField(null=True)
        applied_service_tier = TextField(null=True)
        applied_speed = TextField(null=True)
        has_usage = IntegerField(null=True)
        model_priced = IntegerField(null=True)
        model_threshold = NumericField(null=True)
        long = IntegerField(null=True)
        apart = IntegerField(null=True)
        calls = BigIntegerField()
        fresh_in = NumericField(null=True)
        cached = NumericField(null=True)
        cache_write = NumericField(null=True)
        out = NumericField(null=True)
        web = NumericField(null=True)
        cache_write_1h = NumericField(null=True)
        cache_write_12h = NumericField(null=True)
        audio_in = NumericField(null=True)
        audio_out = NumericField(null=True)
        image_out = NumericField(null=True)

        class Meta:
            database = db
            table_name = "psai_usage_slots"

    db.create_tables([UsageSlot], safe=True)
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "psai_usage_slots_slot_key" '
                   'ON "psai_usage_slots" ("range_slot", "group_key")')
    forget_schema(db)  # psai's look at the tables has to see this one
    if enabled(db):
        disable(db)  # SQLite's triggers are made only if missing
        enable(db)
