"""The rollups' fingerprint of a day on PostgreSQL (docs/rollups.md): the
sum of the items' offsets into their UTC day, which the created_at index
gives without reading the table (it holds no ids, so a sum of the ids read
every item's row). On PostgreSQL the rollups made before it are dropped,
having no such sum: reports read those days from the items until `psai
rollup rebuild`. SQLite, whose index holds the ids, keeps its rollups and
leaves the column NULL."""
from peewee import Field, PostgresqlDatabase


class NumericField(Field):
    field_type = "NUMERIC"


def up(migrator, db):
    migrator.migrate(migrator.add_column("psai_usage_rollup", "at_sum", NumericField(null=True)))
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql('DELETE FROM "psai_usage_rollup"')
