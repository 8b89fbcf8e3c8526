"""The days' change counters (docs/budgets.md): per UTC day and model, a
count of the changes of that day's items, bumped by triggers of their own
beside the rollups', in the writer's transaction, so that a budget check
reads again only the days whose count moved since it last read them and
keeps what it read of the others; and a partial index of the slot rows
split by a model's threshold, which a budget in a zone off UTC asks for at
each check. The row of day '' counts rebuilds (from a random start). Where
the rollups' triggers are on, the counters' are installed too; where they
are off, ``psai rollup enable`` installs both."""
import random

from peewee import BigIntegerField, CompositeKey, IntegerField, Model, TextField

from psai.db import forget_schema, is_postgres
from psai.rollups import enable_day_changes, enabled


def up(migrator, db):
    class DayChanges(Model):
        range_day = TextField()  # 'YYYY-MM-DD', a UTC day; '' for the count of rebuilds
        model_id = IntegerField()
        changes = BigIntegerField()

        class Meta:
            database = db
            table_name = "psai_day_changes"
            primary_key = CompositeKey("range_day", "model_id")
            # SQLite: the rows in their key's order, so a check's read of a period's counters is one range of them.
            without_rowid = not is_postgres(db)

    db.create_tables([DayChanges], safe=True)
    if is_postgres(db):  # a bump's new row version on the same page (a HOT update), as the rollups' (0018)
        db.execute_sql('ALTER TABLE "psai_day_changes" SET (fillfactor = 50)')
    # The count of rebuilds starts anywhere: a table made anew (restored, recreated) is not taken for this one.
    db.execute_sql("INSERT INTO \"psai_day_changes\" (\"range_day\", \"model_id\", \"changes\") VALUES ('', 0, %s) "
                   "ON CONFLICT DO NOTHING" % db.param, (random.SystemRandom().randrange(1, 2 ** 62),))
    # Whether a period's end can be read from its slots asks for the slot rows split by a model's threshold
    # (items without a snapshot: usually none); without this index it read every slot of the end (0018's
    # partial index of the rollups, for the slots).
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_slots_model_priced" ON "psai_usage_slots" '
                   '("range_slot", "model_id", "model_threshold", "model_priced") WHERE "model_priced" = 1')
    forget_schema(db)  # psai's look at the tables has to see this one
    if enabled(db):
        enable_day_changes(db)
