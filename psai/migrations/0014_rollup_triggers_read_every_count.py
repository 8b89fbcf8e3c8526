"""The rollups' triggers made anew, where they are on: an item whose
12-hour cache writes or audio input tokens are below 0 or beyond a counter
column's range is not usable (``sql.ITEM_COUNTS``), as in reports read from
the items; the rollups rebuilt from the items in the same transaction."""
from psai.rollups import disable, enable, enabled


def up(migrator, db):
    # psai's current triggers write 0015's column: where it is missing, 0015 adds it and remakes them.
    if enabled(db) and "reasoning_out" in {column.name for column in db.get_columns("psai_usage_rollup")}:
        disable(db)  # SQLite's triggers are made only if missing
        enable(db)
