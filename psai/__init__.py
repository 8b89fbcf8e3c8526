"""psai: PolicySynth's AI-model store in Python.

Connect and set up: connect, database, using, migrate, redact_url.
Models and agents: PsAiModel, PsAgent, AgentModels, add_model, resolve_model,
find_by_provider_model.
Recording: record_usage, record_response, usage_from_response, track, audit.
Reports and prices: cost_report, price_history, reprice, copy; the modules
pricing, catalog and report.
Budgets: set_budget, budgets, remove_budget, budget_status, check_budget,
budget_events, on_budget_event.

Every name above is in ``psai.__all__`` and has its own help, e.g.
``help(psai.record_usage)``; docs/*.md is the guide.
"""
from typing import TYPE_CHECKING, Any

from .db import connect, database, redact_url, using
from .enums import PsAiModelProvider, PsAiModelSize, PsAiModelType
from .errors import (
    AmbiguousNameError, BudgetExceededError, DatabaseUnavailableError, DatabaseURLError, InUseError, NotFoundError,
    PsaiError, UnpricedUsageError, ValidationError, WrongDatabaseError,
)
from .migrations import migrate
from .models import (
    AgentModels, AgentRef, ModelRef, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, Reservation,
    config,
    find_agent, find_model,
)
from ._responses import ResponseUsage, usage_from_response

if TYPE_CHECKING:  # the lazy names below, as type checkers and editors should see them
    from . import catalog, pricing, report
    from . import otel as otel  # psai.otel: a module, not in __all__ (its extra may not be installed)
    from . import openai_agents as openai_agents  # the same, for the OpenAI Agents SDK
    from ._history import price_history, reprice
    from .query import add_model, find_by_provider_model
    from ._audit import audit
    from .query import resolve_model
    from ._recording import RecordedCall, assign_unmatched, record_response, record_usage, recorded_response
    from ._tracking import track
    from .budget import (
        budget_events, budget_status, budgets, check_budget, on_budget_event, remove_budget, set_budget,
    )
    from .reports import cost_report
    from ._transfer import copy
    from .capture import instrument, uninstrument
    from .writer import arecord_response, flush

__all__ = [
    "connect", "database", "migrate", "redact_url", "using", "copy",
    "PsAiModel", "PsAgent", "AgentModels", "PsModelUsage", "record_usage", "cost_report", "pricing",
    "add_model", "find_by_provider_model",
    "PsAiModelType", "PsAiModelSize", "PsAiModelProvider",
    "ValidationError", "PsaiError", "DatabaseURLError", "DatabaseUnavailableError", "NotFoundError",
    "InUseError", "PsModelUsageItem", "price_history", "reprice", "UnpricedUsageError", "catalog", "report",
    "usage_from_response", "ResponseUsage", "record_response", "track", "resolve_model", "audit",
    "WrongDatabaseError", "AmbiguousNameError", "ModelRef", "AgentRef", "find_model", "find_agent", "config",
    "set_budget", "budgets", "remove_budget", "budget_status", "check_budget", "budget_events", "on_budget_event",
    "BudgetExceededError", "Reservation", "RecordedCall", "assign_unmatched", "recorded_response",
    "arecord_response", "flush", "instrument", "uninstrument",
]

# Imported on first use, so a short command does not pay for them.
_LAZY = {"record_usage": "usage", "cost_report": "usage",
         "price_history": "_history", "reprice": "_history", "add_model": "query",
         "find_by_provider_model": "query", "record_response": "_recording",
         "RecordedCall": "_recording", "assign_unmatched": "_recording", "recorded_response": "_recording",
         "track": "_tracking", "otel": None, "openai_agents": None,
         "resolve_model": "query", "audit": "_audit", "pricing": None, "catalog": None, "copy": "_transfer",
         "report": None, **dict.fromkeys(["set_budget", "budgets", "remove_budget", "budget_status", "check_budget",
                                          "budget_events", "on_budget_event"], "budget"),
         "arecord_response": "writer", "flush": "writer", "instrument": "capture", "uninstrument": "capture"}


if TYPE_CHECKING:
    __version__: str


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            installed = version(__name__)
        except PackageNotFoundError:  # psai's source on sys.path, never installed
            installed = "0+unknown"
        globals()[name] = installed
        return installed
    if name not in _LAZY:
        raise AttributeError("module 'psai' has no attribute %r" % name)
    import importlib
    module = importlib.import_module("." + (_LAZY[name] or name), __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The lazy names too, so dir() and help(psai) list every public function.
    return sorted(set(globals()) | set(__all__) | {"__version__"})

