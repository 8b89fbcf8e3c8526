"""psai's own budgets (spending limits over a scope and a calendar period)
and the threshold crossings they have recorded, beside PolicySynth's tables.
A crossing is unique per budget, period and threshold: that is what makes an
alert fire once, whatever the number of processes recording."""
from peewee import AutoField, BooleanField, CharField, ForeignKeyField, IntegerField, JSONField, Model

from psai.fields import TimestampTzField


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Budget(Base):
        id = AutoField()
        name = CharField(max_length=255, unique=True)
        amount = CharField(max_length=64)
        currency = CharField(max_length=16)
        period = CharField(max_length=8)
        timezone = CharField(max_length=64)
        agent_id = IntegerField(null=True)
        include_sub_agents = BooleanField()
        model_name = CharField(max_length=255, null=True)
        provider = CharField(max_length=64, null=True)
        organization_id = IntegerField(null=True)
        warn_at = JSONField()
        hard = BooleanField()
        unpriced = CharField(max_length=8)
        created_at = TimestampTzField()

        class Meta:
            table_name = "psai_budgets"

    class BudgetEvent(Base):
        id = AutoField()
        budget = ForeignKeyField(Budget, column_name="budget_id", on_delete="CASCADE", index=False)
        period_start = TimestampTzField()
        threshold = CharField(max_length=32)
        spent = CharField(max_length=64)
        at = TimestampTzField()

        class Meta:
            table_name = "psai_budget_events"

    db.create_tables([Budget, BudgetEvent], safe=True)
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "psai_budget_events_once" '
                   'ON "psai_budget_events" ("budget_id", "period_start", "threshold")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_budget_events_at" ON "psai_budget_events" ("at")')
