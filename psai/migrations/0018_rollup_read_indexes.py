"""Indexes that let a report plan its read (``rollups.read_plan``) without
reading every rollup row: the days from an index of them alone (not
``range_day, group_key``'s, whose key is longer than the day), and the
rows split by a model's current long-context threshold (``model_priced``
1, items without a price snapshot: usually none) from a partial index of
just those (``model_priced`` in it too, so that SQLite reads the index
alone).
Neither holds a column the triggers' folds change (the sums): a fold
writes no entry of theirs. On PostgreSQL the table keeps half of each
page free: a fold's new row version then goes to the same page (a HOT
update, no index entry), and the page drops the old ones itself, where a
full page sends it elsewhere and the table swells with dead rows until a
vacuum (the bench's 100k items: 37 MB for 5,040 rows, which every
report reads). New pages only: existing ones get it at their next rewrite."""

from psai.db import is_postgres


def up(migrator, db):
    if "psai_usage_rollup" not in db.get_tables():
        return
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_rollup_day" ON "psai_usage_rollup" ("range_day")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "psai_usage_rollup_model_priced" '
                   'ON "psai_usage_rollup" ("range_day", "model_id", "model_threshold", "model_priced") '
                   'WHERE "model_priced" = 1')
    if is_postgres(db):
        db.execute_sql('ALTER TABLE "psai_usage_rollup" SET (fillfactor = 50)')
