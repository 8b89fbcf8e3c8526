"""psai's own rollups of the usage items (docs/rollups.md): per UTC day, the
sums the reports add the items up to, by model, agent, connector and
everything that prices them. A table beside PolicySynth's; nothing of
theirs changes. Empty when created: `psai rollup rebuild` fills it, and
record_usage keeps it current from then on."""
from peewee import AutoField, BigIntegerField, CharField, Field, IntegerField, Model, TextField


class NumericField(Field):
    # Unbounded NUMERIC on PostgreSQL (peewee's DecimalField has a fixed
    # precision); NUMERIC affinity on SQLite keeps whole sums integers.
    field_type = "NUMERIC"


def up(migrator, db):
    class UsageRollup(Model):
        id = AutoField()
        range_day = CharField(max_length=10)
        model_id = IntegerField()
        agent_id = IntegerField()
        connector_id = IntegerField(null=True)
        day = TextField(null=True)
        provider = TextField(null=True)
        pricing = TextField(null=True)
        applied_service_tier = TextField(null=True)
        applied_speed = TextField(null=True)
        has_usage = IntegerField()
        model_priced = IntegerField()
        model_threshold = NumericField(null=True)
        long = IntegerField()
        hour = IntegerField()
        calls = BigIntegerField()
        fresh_in = NumericField()
        cached = NumericField()
        cache_write = NumericField()
        out = NumericField()
        web = NumericField()
        all_in = NumericField()
        all_out = NumericField()
        cache_write_1h = NumericField()
        provider_cost = NumericField(null=True)
        id_sum = NumericField()

        class Meta:
            database = db
            table_name = "psai_usage_rollup"

    db.create_tables([UsageRollup], safe=True)
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_rollup_day_model_agent" '
                   'ON "psai_usage_rollup" ("range_day", "model_id", "agent_id", "connector_id")')
