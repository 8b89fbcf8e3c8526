"""Idempotent recording and the tokens priced apart (docs/recording.md,
docs/pricing.md).

A unique index on the provider's response id that psai keeps in an item's
own part (``data.psai.responseId``), so that the same response recorded
twice, or by two processes at once, is one item, and finding the first is
one index lookup. It is an expression index on ``ps_model_usage_item``,
PolicySynth's table, over a key only psai writes: PolicySynth's items
(which keep the id in ``providerMetadata``, never in ``psai``) have no
entry, and PolicySynth's writes are never refused by it. The expression is
``sql.response_id_sql``'s (frozen here: a migration never changes); SQLite
reads it only from valid JSON (its column may hold other text).

The rollups (psai's own table) get the sums of the tokens priced apart
(12-hour cache writes, audio input, audio and image output), and their
flag of calls with any of them (``apart``, which was ``hour``: 1-hour
writes alone). The rollups made before it are dropped, their groups split
otherwise: reports read those days from the items until `psai rollup
rebuild`."""
from peewee import Field, PostgresqlDatabase

INDEX = "psai_usage_item_response_id"


class NumericField(Field):
    field_type = "NUMERIC"


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        expression = "(data -> 'psai' ->> 'responseId')"
    else:
        expression = "(CASE WHEN json_valid(data) THEN json_extract(data, '$.psai.responseId') END)"
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "%s" ON "ps_model_usage_item" (%s) WHERE %s IS NOT NULL'
                   % (INDEX, expression, expression))
    if "psai_usage_rollup" not in db.get_tables():
        return
    db.execute_sql('DELETE FROM "psai_usage_rollup"')
    migrator.migrate(
        migrator.rename_column("psai_usage_rollup", "hour", "apart"),
        *[migrator.add_column("psai_usage_rollup", name, NumericField(default=0))
          for name in ("cache_write_12h", "audio_in", "audio_out", "image_out")])
