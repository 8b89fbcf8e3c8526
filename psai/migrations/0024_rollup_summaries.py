"""The rollups' summaries (docs/rollups.md): ``psai_model_rollup``, the
rollups without the agent and connector (a row a day and price group of a
model, where the rollups keep one for each of its agents), which reports
and budgets that do not keep agents apart read; and ``psai_key_totals``,
per (model, agent, connector) every day's input and output tokens of the
items beside those of the counter rows (``ps_model_usage``), which tell a
report over all usage which counters the items cover. Triggers on
``psai_usage_rollup`` keep the first and the items' totals from each
change of a rollup row, triggers on ``ps_model_usage`` (made for the
counters it has; they touch none of its columns, indexes or constraints)
the counters' totals, in the writer's transaction. Where the rollups are
on, the summaries are built and their triggers installed."""
from peewee import SQL, AutoField, BigIntegerField, CharField, Field, IntegerField, Model, Node, TextField

from psai.rollups import enable_summaries, enabled


# The items' and the counters' sides of a key total are written apart: each starts at 0.
ZERO: list[Node] = [SQL("DEFAULT 0")]


class NumericField(Field):
    # Unbounded NUMERIC on PostgreSQL; NUMERIC affinity on SQLite keeps whole sums integers.
    field_type = "NUMERIC"


def up(migrator, db):
    class ModelRollup(Model):
        id = AutoField()
        range_day = CharField(max_length=10)
        group_key = TextField()
        model_id = IntegerField(null=True)
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
            table_name = "psai_model_rollup"

    class KeyTotals(Model):
        id = AutoField()
        group_key = TextField(unique=True)
        model_id = IntegerField(null=True)
        agent_id = IntegerField(null=True)
        connector_id = IntegerField(null=True)
        calls = BigIntegerField(constraints=ZERO)
        all_in = NumericField(constraints=ZERO)
        all_out = NumericField(constraints=ZERO)
        counter_rows = BigIntegerField(constraints=ZERO)
        counted_in = NumericField(constraints=ZERO)
        counted_out = NumericField(constraints=ZERO)
        negative_rows = BigIntegerField(constraints=ZERO)

        class Meta:
            database = db
            table_name = "psai_key_totals"

    db.create_tables([ModelRollup, KeyTotals], safe=True)
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "psai_model_rollup_day_key" '
                   'ON "psai_model_rollup" ("range_day", "group_key")')
    if enabled(db):
        enable_summaries(db)
