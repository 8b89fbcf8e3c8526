"""psai's exceptions."""
from typing import Any

import marshmallow

__all__ = ["PsaiError", "ValidationError", "DatabaseURLError", "DatabaseUnavailableError", "NotFoundError",
           "AmbiguousNameError", "InUseError", "UnpricedUsageError", "WrongDatabaseError", "BudgetExceededError",
           "NotConnectedError", "NotAdoptedError", "CatalogUnavailableError", "Unmappable", "flatten_messages"]


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, list[Any]]:
    """marshmallow's nested messages as ``{"prices.currency": [...]}``."""
    flat: dict[str, list[Any]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == marshmallow.exceptions.SCHEMA and prefix:
                path = prefix  # an error about the object itself, e.g. not a dict
            else:
                path = "%s.%s" % (prefix, key) if prefix else str(key)
            if isinstance(value, dict):
                flat.update(flatten_messages(value, path))
            else:
                flat[path] = list(value) if isinstance(value, (list, tuple)) else [value]
    else:
        flat[prefix or "_schema"] = list(messages) if isinstance(messages, (list, tuple)) else [messages]
    return flat


class ValidationError(marshmallow.ValidationError):
    """Bad input. A marshmallow ValidationError whose ``messages`` are
    marshmallow's nested dict and whose str() names every bad field by its
    dotted path, e.g. ``prices.costOutTokensPerMillion: Must be ...``."""

    @property
    def paths(self) -> dict[str, list[Any]]:
        return flatten_messages(self.messages)

    def __str__(self) -> str:
        return "; ".join(
            "%s: %s" % (path, " ".join(str(m) for m in msgs)) for path, msgs in self.paths.items()
        )


class PsaiError(Exception):
    """Base class for psai's own errors (other than ValidationError)."""


class DatabaseURLError(PsaiError, ValueError):
    """A database URL psai cannot use. The message never holds the password."""


class DatabaseUnavailableError(PsaiError):
    """The database could not be reached. The message never holds the password."""


class NotConnectedError(DatabaseUnavailableError):
    """psai's models are bound to no database yet."""


class NotFoundError(PsaiError, LookupError):
    """A row that was named (by id, uuid or name) does not exist."""


class AmbiguousNameError(NotFoundError):
    """A name given where one row is needed fits several rows; the message
    lists them with their ids (name one by id or uuid instead)."""


class WrongDatabaseError(PsaiError):
    """A row read from (or saved to) one database was used on another, where
    a row with the same id is a different row: refused, naming both."""


class InUseError(PsaiError):
    """A row cannot be deleted because other rows depend on it."""


class UnpricedUsageError(PsaiError):
    """A strict report found usage whose prices are missing or unusable
    (``cost_report(..., strict=True)``): it names the models and why."""


class BudgetExceededError(PsaiError):
    """A hard budget is reached, would be passed by the call about to be
    made, or cannot tell (unpriced usage) and blocks: ``psai.check_budget``."""

    def __init__(self, message: str, *, budget: str, spent: Any, limit: Any, currency: str,
                 period_end: Any) -> None:
        super().__init__(message)
        self.budget, self.spent, self.limit, self.currency, self.period_end = budget, spent, limit, currency, period_end


class NotAdoptedError(PsaiError):
    """The database is PolicySynth's and psai was not asked to add to it."""


class RollupsOffError(PsaiError):
    """The triggers that keep the rollups are not installed (``psai rollup enable``)."""


class CatalogUnavailableError(PsaiError):
    """The source's package or file is not there."""


class Unmappable(ValueError):
    """A source model whose token prices PolicySynth's configuration cannot say."""
