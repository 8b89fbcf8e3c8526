"""Indexes for the common configuration filters and for names.

SQLite: expression indexes on the JSON paths psai.query writes as literals
(INDEXED_PATHS). PostgreSQL: one GIN index (jsonb_path_ops) that serves every
containment filter. Both: an index on name, for superseding and history.
"""
from playhouse.migrate import PostgresqlMigrator


def up(migrator, db):
    statements = ['CREATE INDEX IF NOT EXISTS "ps_ai_models_name" ON "ps_ai_models" ("name")']
    if isinstance(migrator, PostgresqlMigrator):
        statements.append(
            'CREATE INDEX IF NOT EXISTS "ps_ai_models_configuration_gin" '
            'ON "ps_ai_models" USING GIN ("configuration" jsonb_path_ops)')
    else:
        def path(key):
            return "json_extract(\"configuration\", '$.%s')" % key
        statements += [
            'CREATE INDEX IF NOT EXISTS "ps_ai_models_config_provider" ON "ps_ai_models" (%s)'
            % ", ".join(path(k) for k in ("provider", "type", "modelSize", "active")),
            'CREATE INDEX IF NOT EXISTS "ps_ai_models_config_type" ON "ps_ai_models" (%s)'
            % ", ".join(path(k) for k in ("type", "modelSize", "active")),
            'CREATE INDEX IF NOT EXISTS "ps_ai_models_config_model" ON "ps_ai_models" (%s)'
            % ", ".join(path(k) for k in ("model", "provider")),
        ]
    for statement in statements:
        db.execute_sql(statement)
