"""Idempotent recording (docs/recording.md): a unique index on the provider's
response id that psai keeps in an item's own part (``data.psai.responseId``),
so that the same response recorded twice, or by two processes at once, is
one item, and finding the first is one index lookup.

It is an expression index on ``ps_model_usage_item``, PolicySynth's table,
over a key only psai writes: PolicySynth's items (which keep the id in
``providerMetadata``, never in ``psai``) have no entry, and PolicySynth's
writes are never refused by it. The expression is ``sql.response_id_sql``'s
(frozen here: a migration never changes). SQLite reads it only from valid
JSON (its column may hold other text)."""
from peewee import PostgresqlDatabase

INDEX = "psai_usage_item_response_id"


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        expression = "(data -> 'psai' ->> 'responseId')"
    else:
        expression = "(CASE WHEN json_valid(data) THEN json_extract(data, '$.psai.responseId') END)"
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "%s" ON "ps_model_usage_item" (%s) WHERE %s IS NOT NULL'
                   % (INDEX, expression, expression))
