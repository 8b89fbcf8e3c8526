"""psai: PolicySynth's AI-model store in Python."""
from .db import connect, database, redact_url
from .enums import PsAiModelProvider, PsAiModelSize, PsAiModelType
from .errors import DatabaseUnavailableError, DatabaseURLError, InUseError, NotFoundError, PsaiError, ValidationError
from .migrations import migrate
from .models import AgentModels, PsAgent, PsAiModel, PsModelUsage
from .usage import cost_report, record_usage
from .query import add_model, find_by_provider_model
from . import pricing

__all__ = [
    "connect", "database", "migrate", "redact_url",
    "PsAiModel", "PsAgent", "AgentModels", "PsModelUsage", "record_usage", "cost_report", "pricing",
    "add_model", "find_by_provider_model",
    "PsAiModelType", "PsAiModelSize", "PsAiModelProvider",
    "ValidationError", "PsaiError", "DatabaseURLError", "DatabaseUnavailableError", "NotFoundError",
    "InUseError",
]
