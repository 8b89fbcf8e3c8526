"""The rollups' sum of the reasoning tokens among the output
(``reasoning_out``; cost reports' ``reasoning_tokens``, ``psai usage report
--columns reasoning``): the column where missing (0012 makes it in a store
made since), and where the rollups are on, their triggers made anew to
fold it and the rollups rebuilt from the items in the same transaction."""
from peewee import Field

from psai.rollups import disable, enable, enabled


class NumericField(Field):
    field_type = "NUMERIC"


def up(migrator, db):
    if "psai_usage_rollup" not in db.get_tables():
        return
    if "reasoning_out" not in {column.name for column in db.get_columns("psai_usage_rollup")}:
        migrator.migrate(migrator.add_column("psai_usage_rollup", "reasoning_out", NumericField(null=True)))
    if enabled(db):
        disable(db)  # SQLite's triggers are made only if missing
        enable(db)
