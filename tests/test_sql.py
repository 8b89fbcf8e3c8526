"""The SQL psai keeps as text: compiled by peewee once and cached, the same
statements as the hand-built ones they replaced."""
from peewee import ModelSelect

import psai
from psai._base import _PreparedInsert
from psai.models import PsModelUsage
from psai._sql import Slot, compiled, slot

MODEL_COLUMNS = ("configuration", "created_at", "name", "organization_id", "updated_at", "user_id", "uuid")


def test_the_prepared_insert_is_peewees_and_todays(db, backend):
    """The INSERT save() runs: compiled by peewee, the text psai wrote by
    hand before (PostgreSQL's RETURNING now names its table)."""
    columns = '"configuration", "created_at", "name", "organization_id", "updated_at", "user_id", "uuid"'
    if backend.kind == "sqlite":
        today = 'INSERT INTO "ps_ai_models" (%s) VALUES (json(?), ?, ?, ?, ?, ?, ?)' % columns
        links = 'INSERT INTO "AgentModels" ("agent_id", "ai_model_id") VALUES (?, ?)'
    else:
        today = ('INSERT INTO "ps_ai_models" (%s) VALUES (%%s, %%s, %%s, %%s, %%s, %%s, %%s) '
                 'RETURNING "ps_ai_models"."id"' % columns)
        links = 'INSERT INTO "AgentModels" ("agent_id", "ai_model_id") VALUES (%s, %s)'
    assert _PreparedInsert.statement(psai.PsAiModel, MODEL_COLUMNS) == today
    assert _PreparedInsert.statement(psai.AgentModels, ("agent", "ai_model")) == links
    # A batch: one statement of all its rows, no ids asked for.
    batch = _PreparedInsert.statement(psai.PsAiModel, MODEL_COLUMNS, 3)
    assert batch.count("(json(?)" if backend.kind == "sqlite" else "(%s, %s") == 3 and "RETURNING" not in batch
    # And it writes: a saved row and a bulk insert read back.
    model = psai.PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=_configuration())
    psai.PsAiModel.bulk_insert([dict(user_id=1, organization_id=2, name="b%d" % i, configuration=_configuration())
                                for i in range(3)])
    assert [m.name for m in psai.PsAiModel.select().order_by(psai.PsAiModel.id)] == ["m", "b0", "b1", "b2"]
    assert psai.PsAiModel.get_by_id(model.id).configuration == _configuration()


def test_a_compiled_statement_takes_its_values_by_name(db):
    usage = PsModelUsage
    query: ModelSelect = usage.select(usage.id).where(
        (usage.created_at < slot("end")) & (usage.model == slot("model_id"))).limit(1)
    statement = compiled(query, db)
    assert statement.sql.count(db.param) == 3 and "end" not in statement.sql
    assert [type(name) is Slot for name in statement.order] == [True, True, False]  # LIMIT's 1 bound by peewee
    assert statement.params({"model_id": 7, "end": "e", "other": 0}) == ["e", 7, 1]


def _configuration():
    return {"type": "text", "modelSize": "large", "model": "gpt-4", "provider": "openai", "active": True,
            "prices": {"costInTokensPerMillion": 30, "costOutTokensPerMillion": 60,
                       "costInCachedContextTokensPerMillion": 10, "currency": "USD"},
            "maxTokensOut": 4096, "defaultTemperature": 0.7}
