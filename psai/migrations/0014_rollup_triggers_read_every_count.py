"""The rollups' triggers made anew, where they are on: an item whose
12-hour cache writes or audio input tokens are below 0 or beyond a counter
column's range is not usable (``sql.ITEM_COUNTS``), as in reports read from
the items; the rollups rebuilt from the items in the same transaction."""
from psai.rollups import disable, enable, enabled


def up(migrator, db):
    if enabled(db):
        disable(db)  # SQLite's triggers are made only if missing
        enable(db)
