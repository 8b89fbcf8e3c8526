"""The demo `make demo` runs: the seed model, two agents linked to it, printed."""
from .db import model_db, write_transaction
from .models import PsAgent, PsAiModel

SEED_MODEL = {
    "user_id": 1,
    "organization_id": 2,
    "name": "OpenAI GPT-4 Large",
    "configuration": {
        "type": "text", "modelSize": "large", "model": "gpt-4",
        "provider": "openai", "active": True,
        "prices": {"costInTokensPerMillion": 30, "costOutTokensPerMillion": 60,
                   "costInCachedContextTokensPerMillion": 10, "currency": "USD"},
        "maxTokensOut": 4096, "defaultTemperature": 0.7,
    },
}
SEED_AGENTS = [
    {"user_id": 1, "class_id": 1, "group_id": 1, "configuration": {"name": "Researcher"}},
    {"user_id": 1, "class_id": 1, "group_id": 1, "configuration": {"name": "Writer"}},
]


def seed():
    """Store the seed model and two agents linked to it, once: running it
    again finds them instead of adding copies. Returns (model, agents)."""
    with write_transaction(model_db(PsAiModel)):
        model = PsAiModel.get_or_none(PsAiModel.name == SEED_MODEL["name"])
        if model is None:
            model = PsAiModel.create(**SEED_MODEL)
        agents = []
        for fields in SEED_AGENTS:
            agent = (PsAgent.select()
                     .where(PsAgent.configuration["name"] == fields["configuration"]["name"])
                     .first())
            agents.append(agent or PsAgent.create(**fields))
            agents[-1].ai_models.add(model)
    return model, agents
