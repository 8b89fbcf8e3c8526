"""Column types PolicySynth's tables need and peewee does not ship portably."""
import datetime
import uuid

from peewee import Field, FieldDatabaseHook, PostgresqlDatabase, UUIDField

__all__ = ["TimestampTzField", "UUIDTextField", "utcnow", "UTC"]

UTC = datetime.timezone.utc


def utcnow():
    return datetime.datetime.now(UTC)


def _aware(value):
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:  # e.g. Sequelize's "2026-11-24 08:00:00.000 +00:00"
            value = datetime.datetime.fromisoformat(value.strip().replace(" +", "+").replace(" -", "-"))
    if value.tzinfo is None:
        # Naive times are taken as UTC, as PostgreSQL does for a UTC session.
        value = value.replace(tzinfo=UTC)
    return value


class TimestampTzField(FieldDatabaseHook, Field):
    """``timestamptz`` on PostgreSQL; on SQLite, UTC ISO 8601 text with the
    offset, fixed-width so that text order is time order. Always returns
    timezone-aware datetimes."""

    field_type = "TIMESTAMPTZ"
    _native = False

    def _db_hook(self, database):
        self._native = isinstance(database, PostgresqlDatabase)

    def db_value(self, value):
        if value is None or not isinstance(value, (str, datetime.datetime)):
            return value
        value = _aware(value)
        if self._native:
            return value
        return value.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")

    def python_value(self, value):
        if value is None:
            return None
        return _aware(value)


class UUIDTextField(UUIDField):
    """Native ``uuid`` on PostgreSQL; the canonical dashed text on SQLite
    (peewee's own UUIDField stores 32 hex digits there)."""

    def db_value(self, value):
        if value is None or not isinstance(value, (str, uuid.UUID)):
            return value
        return str(value if isinstance(value, uuid.UUID) else uuid.UUID(value))

    def python_value(self, value):
        if value is None or isinstance(value, uuid.UUID):
            return value
        return uuid.UUID(str(value))
