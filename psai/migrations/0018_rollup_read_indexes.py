"""Indexes that let a report plan its read (``rollups.read_plan``) without
reading every rollup row: the days and their calls from an index alone
(a few entries a row, not its price snapshot), and the rows split by a
model's current long-context threshold (``model_priced`` 1, items without
a price snapshot: usually none) from a partial index of just those
(``model_priced`` in it too, so that SQLite reads the index alone)."""


def up(migrator, db):
    if "psai_usage_rollup" not in db.get_tables():
        return
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_rollup_day_calls" '
                   'ON "psai_usage_rollup" ("range_day", "calls")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_rollup_model_priced" '
                   'ON "psai_usage_rollup" ("range_day", "model_id", "model_threshold", "model_priced") '
                   'WHERE "model_priced" = 1')
