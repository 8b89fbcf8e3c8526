"""The attribution ledger (docs/capture.md): the rollups' sums kept also
per UTC day, attribution (kind: user, session or tag:KEY; its text value)
and rollup key, by triggers of its own on ps_model_usage_item beside the
rollups' (they touch no column, index or constraint of PolicySynth's
tables), so that reports by user, session and tag read a few rows a day.
Where the rollups are on, its triggers are installed and it is built from
the items in the same transaction."""
from peewee import AutoField, BigIntegerField, CharField, Field, IntegerField, Model, TextField

from psai.rollups import enable_ledger, enabled


class NumericField(Field):
    # Unbounded NUMERIC on PostgreSQL; NUMERIC affinity on SQLite keeps whole sums integers.
    field_type = "NUMERIC"


def up(migrator, db):
    class AttributionLedger(Model):
        id = AutoField()
        range_day = CharField(max_length=10)
        group_key = TextField()
        kind = TextField()
        value = TextField()
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
        reasoning_out = NumericField(null=True)
        provider_cost = NumericField(null=True)
        cost_calls = BigIntegerField(null=True)

        class Meta:
            database = db
            table_name = "psai_attribution_ledger"

    db.create_tables([AttributionLedger], safe=True)
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "psai_attribution_ledger_day_key" '
                   'ON "psai_attribution_ledger" ("range_day", "group_key")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_attribution_ledger_kind_day" '
                   'ON "psai_attribution_ledger" ("kind", "range_day")')
    if enabled(db):
        enable_ledger(db)
