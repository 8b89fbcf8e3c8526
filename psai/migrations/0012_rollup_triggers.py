"""The rollups kept by triggers (docs/rollups.md): the rollup table made
anew without migration 0009's fingerprints (with 0010's sums of the tokens
priced apart), one row per day and key (the
unique index the triggers' upsert finds it by), the table of what the
triggers could not fold, the triggers on ps_model_usage_item (they touch no
column, index or constraint of PolicySynth's tables), and the rollups
rebuilt from the items in the same transaction. Also the budgets'
reservations (docs/budgets.md): estimates held until their call is recorded."""
from peewee import AutoField, BigIntegerField, CharField, Field, ForeignKeyField, IntegerField, Model, TextField

from psai.fields import TimestampTzField
from psai.rollups import enable


class NumericField(Field):
    # Unbounded NUMERIC on PostgreSQL; NUMERIC affinity on SQLite keeps whole sums integers.
    field_type = "NUMERIC"


def up(migrator, db):
    class UsageRollup(Model):
        id = AutoField()
        range_day = CharField(max_length=10)
        group_key = TextField()
        model_id = IntegerField(null=True)
        agent_id = IntegerField(null=True)
        connector_id = IntegerField(null=True)
        day = TextField(null=True)
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
        all_in = NumericField(null=True)
        all_out = NumericField(null=True)
        cache_write_1h = NumericField(null=True)
        cache_write_12h = NumericField(null=True)
        audio_in = NumericField(null=True)
        audio_out = NumericField(null=True)
        image_out = NumericField(null=True)
        # 0015's: the triggers and the rebuild below are psai's current ones, which write it.
        reasoning_out = NumericField(null=True)
        provider_cost = NumericField(null=True)
        cost_calls = BigIntegerField(null=True)

        class Meta:
            database = db
            table_name = "psai_usage_rollup"

    class RollupUnfolded(Model):
        id = AutoField()
        item_id = IntegerField(null=True, index=True)
        range_day = CharField(max_length=10, null=True)
        reason = TextField(null=True)

        class Meta:
            database = db
            table_name = "psai_rollup_unfolded"

    class Budget(Model):
        id = AutoField()

        class Meta:
            database = db
            table_name = "psai_budgets"

    class BudgetReservation(Model):
        id = AutoField()
        token = CharField(max_length=36, index=True)
        budget = ForeignKeyField(Budget, column_name="budget_id", on_delete="CASCADE")
        amount = CharField(max_length=64)
        created_at = TimestampTzField()
        expires_at = TimestampTzField(index=True)

        class Meta:
            database = db
            table_name = "psai_budget_reservations"

    db.execute_sql('DROP TABLE IF EXISTS "psai_usage_rollup"')
    db.create_tables([UsageRollup, RollupUnfolded, BudgetReservation], safe=True)
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "psai_usage_rollup_day_key" '
                   'ON "psai_usage_rollup" ("range_day", "group_key")')
    enable(db)
