"""psai: PolicySynth's AI-model store in Python."""
from .db import connect, database, redact_url
from .enums import PsAiModelProvider, PsAiModelSize, PsAiModelType
from .errors import DatabaseURLError, NotFoundError, PsaiError, ValidationError
from .migrations import migrate
from .models import AgentModels, PsAgent, PsAiModel

__all__ = [
    "connect", "database", "migrate", "redact_url",
    "PsAiModel", "PsAgent", "AgentModels",
    "PsAiModelType", "PsAiModelSize", "PsAiModelProvider",
    "ValidationError", "PsaiError", "DatabaseURLError", "NotFoundError",
]
