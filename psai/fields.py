"""Column types PolicySynth's tables need and peewee does not ship portably.

A field whose conversion depends on the backend looks the backend up from the
database its model is bound to in the current thread, rather than keeping it
from the last binding (peewee's ``FieldDatabaseHook``): psai's models use
``ThreadSafeDatabaseMetadata``, so one thread may work on PostgreSQL while
another works on SQLite.
"""
import datetime
import re
import uuid
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import peewee
from peewee import Database, DatabaseProxy, Field, Node, PostgresqlDatabase, UUIDField

from ._constants import time_range_problem
from .errors import ValidationError

__all__ = ["TimestampTzField", "UUIDTextField", "JSONField", "utcnow", "UTC", "UnreadableTime", "read_time",
           "sqlite_time_text", "read_sqlite_time_text", "SQLITE_TIME_GLOB"]

UTC = datetime.timezone.utc


def system_now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


# Where every timestamp psai writes comes from; a test (or a replay) pins
# "now" by replacing it, since the fields' defaults hold ``utcnow`` itself.
now_source: Callable[[], datetime.datetime] = system_now


def utcnow() -> datetime.datetime:
    return now_source()


def _aware(value: str | datetime.datetime) -> datetime.datetime:
    if isinstance(value, str):
        text = value
        try:
            value = datetime.datetime.fromisoformat(text)
        except ValueError:  # e.g. Sequelize's "2026-11-24 08:00:00.000 +00:00"
            value = datetime.datetime.fromisoformat(text.strip().replace(" +", "+").replace(" -", "-"))
    if value.tzinfo is None:
        # Naive times are taken as UTC, as PostgreSQL does for a UTC session.
        value = value.replace(tzinfo=UTC)
    return value


class UnreadableTime(str):
    """A stored timestamp psai cannot read as a time (text that is not one,
    a BC date, a year past 9999): the text as stored, so that listings and
    exports show it and ``psai check`` names it instead of failing; writing
    the row back writes ``stored`` unchanged."""

    stored: Any

    def __new__(cls, stored: Any) -> "UnreadableTime":
        text = super().__new__(cls, stored if isinstance(stored, str) else str(stored))
        text.stored = stored
        return text

    def __repr__(self) -> str:
        return "UnreadableTime(%s)" % str.__repr__(self)

    @property
    def problem(self) -> str:
        return "cannot be read as a time (stored: %s)" % (
            repr(self.stored) if isinstance(self.stored, str) else self.stored)


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def read_time(value: Any) -> datetime.datetime | UnreadableTime:
    """psai's one rule for reading a stored timestamp: a time (naive: UTC),
    its ISO 8601 text, or a Unix time in seconds (an integer or its text,
    as people write by hand on SQLite) is read as an aware time; anything
    else, or a time whose UTC falls outside years 1-9999, is unreadable."""
    # Every timestamp of every row read comes here: the usual cases first, cheaply.
    found: datetime.datetime | None
    if isinstance(value, datetime.datetime):
        found = value
    elif isinstance(value, str):
        try:
            found = datetime.datetime.fromisoformat(value)
        except ValueError:
            found = _read_odd(value)
    else:
        found = _read_odd(value)
    if found is None:
        return UnreadableTime(value)
    if found.tzinfo is None:
        # Naive times are taken as UTC, as PostgreSQL does for a UTC session.
        found = found.replace(tzinfo=UTC)
    if 1 < found.year < 9999 or time_range_problem(found) is None:
        return found
    return UnreadableTime(value)


def _read_odd(value: Any) -> datetime.datetime | None:
    """A stored value that is not ISO text: Sequelize's text, a Unix time, or None."""
    try:
        if isinstance(value, str):
            try:  # e.g. Sequelize's "2026-11-24 08:00:00.000 +00:00"
                return datetime.datetime.fromisoformat(value.strip().replace(" +", "+").replace(" -", "-"))
            except ValueError:
                if not _NUMBER.fullmatch(value):
                    return None
                return datetime.datetime.fromtimestamp(float(value), UTC)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):  # a Unix time past year 9999, NaN
        pass
    return None


def sqlite_time_text(value: datetime.datetime) -> str:
    """How psai stores an aware time on SQLite: UTC, fixed-width ISO 8601
    text with the offset, so that text order is time order."""
    return value.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


# sqlite_time_text's output, years 2-9998 (the first and last can cross a range end: read_time decides).
_SQLITE_TIME_TEXT = re.compile(r"(?!0001|9999)[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\+00:00")
# The same form as SQLite's GLOB says it (any year), for SQL that tells it from other stored times.
SQLITE_TIME_GLOB = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]."
                    "[0-9][0-9][0-9][0-9][0-9][0-9]+00:00")


def read_sqlite_time_text(value: Any) -> str | UnreadableTime | None:
    """A timestamp stored on SQLite as the text psai would store for it
    (``sqlite_time_text``), read by ``read_time``'s rule: two equal texts
    are one time, and text order is time order, without making a datetime
    of either. Text already in psai's form is returned as it is; an
    unreadable value as ``UnreadableTime``; None as None."""
    if type(value) is str and _SQLITE_TIME_TEXT.fullmatch(value):
        try:
            datetime.datetime.fromisoformat(value)  # the form is right; the date must exist too
            return value
        except ValueError:
            return UnreadableTime(value)
    if value is None:
        return None
    found = read_time(value)
    return found if isinstance(found, UnreadableTime) else sqlite_time_text(found)


def bound_database(field: Field) -> Database | None:
    """The database ``field``'s model is bound to in this thread, or None."""
    model = getattr(field, "model", None)  # None for a field used on its own
    db = model._meta.database if model is not None else None
    return db.obj if type(db) is DatabaseProxy else db


class TimestampTzField(Field):
    """``timestamptz`` on PostgreSQL; on SQLite, UTC ISO 8601 text with the
    offset, fixed-width so that text order is time order. Always returns
    timezone-aware datetimes."""

    field_type = "TIMESTAMPTZ"

    def db_value(self, value: Any) -> Any:
        if value is None or not isinstance(value, (str, datetime.datetime)):
            return value
        if isinstance(value, UnreadableTime):
            return value.stored  # a row read with one is written back as it was
        value = _aware(value)
        problem = time_range_problem(value)
        if problem:  # PostgreSQL would store it (a year 10000, 1 BC) where nothing can read it
            raise ValidationError({self.name: [problem]})
        if isinstance(bound_database(self), PostgresqlDatabase):
            return value
        return sqlite_time_text(value)

    def python_value(self, value: Any) -> datetime.datetime | UnreadableTime | None:
        if value is None:
            return None
        return read_time(value)

    def python_values(self, values: Sequence[Any]) -> list[Any]:
        """``python_value`` of each of ``values`` (a column of rows read
        together), each text read once: rows written together share their times."""
        texts = {text: read_time(text) for text in {value for value in values if type(value) is str}}
        return [texts[value] if type(value) is str else None if value is None else read_time(value)
                for value in values]


class UUIDTextField(UUIDField):
    """Native ``uuid`` on PostgreSQL; the canonical dashed text on SQLite
    (peewee's own UUIDField stores 32 hex digits there)."""

    def db_value(self, value: Any) -> Any:
        if value is None or not isinstance(value, (str, uuid.UUID)):
            return value
        return str(value if isinstance(value, uuid.UUID) else uuid.UUID(value))

    def python_value(self, value: Any) -> uuid.UUID | None:
        if value is None or isinstance(value, uuid.UUID):
            return value
        return uuid.UUID(str(value))

    def python_values(self, values: Sequence[Any]) -> list[Any]:
        """``python_value`` of each of ``values`` (a column of rows read together)."""
        text, read = str, uuid.UUID
        return [read(value) if type(value) is text else self.python_value(value) for value in values]


class JSONField(peewee.JSONField):
    """peewee's portable JSONField (JSON text on SQLite, jsonb on PostgreSQL)
    with its backend helpers looked up per call from the thread's database."""

    # Set by peewee's JSONField; its stubs do not say.
    _dumps: Callable[[Any], str]
    _loads: Callable[[str], Any]

    def _db_hook(self, database):
        pass  # see _backend

    def _backend(self):
        """(helper, value wrapper, value reader) for the thread's database."""
        db = bound_database(self)
        if db is None:
            return None, None, None
        by_database = self.__dict__.get("_by_database")
        if by_database is None:
            # Weak: a database nobody uses any more is freed, and its connection closed.
            by_database = self.__dict__["_by_database"] = weakref.WeakKeyDictionary()
        found = by_database.get(db)
        if found is None:
            # The helper keeps its database weakly too, or the entry would keep its own key alive.
            helper = type(db).json_methods(weakref.proxy(db))
            found = by_database[db] = (helper, helper.make_value_wrapper(self._dumps),
                                       helper.make_value_reader(self._loads))
        return found

    # peewee's JSONField reads these three attributes; they follow the database.
    _helper = property(lambda self: self._backend()[0], lambda self, value: None)
    _wrap = property(lambda self: self._backend()[1], lambda self, value: None)
    _read = property(lambda self: self._backend()[2], lambda self, value: None)

    def db_value(self, value: Any) -> Any:
        if value is None or isinstance(value, Node):
            return value
        wrap = self._backend()[1]
        return wrap(value) if wrap is not None else value

    def python_value(self, value: Any) -> Any:
        if value is None:
            return value
        read = self._backend()[2]
        return read(value) if read is not None else value

    def python_values(self, values: Sequence[Any]) -> list[Any]:
        """``python_value`` of each of ``values`` (a column of rows read
        together), the thread's database looked up once."""
        read = self._backend()[2]
        if read is None:
            return list(values)
        return [None if value is None else read(value) for value in values]

    def text(self, value: Any) -> str:
        """The JSON text this field writes for ``value`` (SQLite stores it as it is)."""
        dumps: Callable[[Any], str] = self.__dict__["_dumps"]  # peewee's JSONField keeps it; its stubs do not say
        return dumps(value)

    def read_text(self, value: Any) -> Any:
        """A value stored on SQLite as Python reads it, as ``python_value``
        does there: JSON text parsed; anything else (text that is not JSON) as it is."""
        if isinstance(value, str):
            try:
                return self.__dict__["_loads"](value)
            except (TypeError, ValueError):
                pass
        return value
