"""Connecting: one database proxy that every psai model is bound to by
default, and ``using(db)`` to bind them to another database for a block."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import weakref
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import quote, unquote, urlencode, urlsplit

from peewee import (
    Database, DatabaseError, DatabaseProxy, InterfaceError, Model, OperationalError, PostgresqlDatabase,
    SqliteDatabase,
)
from playhouse import db_url
from playhouse.shortcuts import ReconnectMixin

try:  # the PostgreSQL driver is an extra: psai[postgres]
    import psycopg2
except ImportError:  # pragma: no cover - installed in the tests
    psycopg2 = None

from .errors import DatabaseUnavailableError, DatabaseURLError, NotConnectedError

__all__ = ["database", "connect", "using", "DEFAULT_URL", "redact_url", "is_postgres", "write_transaction",
           "read_transaction", "lock", "lock_id", "execute_prepared", "table_columns", "forget_schema", "model_db",
           "current_db", "connection_lost", "NotConnectedError", "describe_database", "same_database"]

DEFAULT_URL = "sqlite:///psai.db"

# Every model's Meta.database; connect() points it at a real database.
database = DatabaseProxy()

# The model classes psai binds (psai.models registers its tables), so that
# using() and current_db() need not know them.
_registered_models: list[type[Model]] = []


def register_models(models: Iterable[type[Model]]) -> None:
    """Add model classes to those ``using()`` binds and ``current_db()`` reads."""
    _registered_models.extend(model for model in models if model not in _registered_models)


def registered_models() -> tuple[type[Model], ...]:
    return tuple(_registered_models)

SQLITE_PRAGMAS: dict[str, Any] = {
    "foreign_keys": 1,  # SQLite enforces ON DELETE CASCADE / SET NULL only with this on
    "journal_mode": "wal",  # readers do not block the writer
    "busy_timeout": 30_000,  # wait for a concurrent writer instead of failing at once
    "synchronous": "normal",  # safe with WAL: a crash loses no committed transaction's integrity
}
# PolicySynth's timestamps are timestamptz; SQLite keeps them as ISO 8601 text.
SQLITE_FIELD_TYPES = {"TIMESTAMPTZ": "DATETIME"}
POSTGRES_FIELD_TYPES = {"TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE"}

_SCHEMES = {
    "sqlite": "sqlite",
    "postgres": "postgres",
    "postgresql": "postgres",
}


class PostgresDatabase(ReconnectMixin, PostgresqlDatabase):
    """PostgreSQL that reconnects when the server has dropped the connection
    (a restart, an idle timeout, pg_terminate_backend). Only outside a
    transaction: a transaction cut off is rolled back by the server and its
    error reaches the caller; the next operation then reconnects."""

    reconnect_errors = (
        (OperationalError, "server closed the connection"),
        (OperationalError, "terminating connection"),
        (OperationalError, "connection already closed"),
        (InterfaceError, "connection already closed"),
        (InterfaceError, "cursor already closed"),
    )

    def transaction_lost(self) -> bool:
        """The server dropped the connection, and its transaction with it."""
        return not self.is_closed() and bool(self.connection().closed)

    def rollback(self) -> None:
        # Nothing to roll back, and the ROLLBACK's own "connection already
        # closed" would hide the error that ended the transaction.
        if not self.transaction_lost():
            super().rollback()

    def _initialize_connection(self, conn):
        super()._initialize_connection(conn)
        psycopg2.extensions.register_type(TIMESTAMPTZ_READER, conn)


def connection_lost(error: BaseException) -> bool:
    """True when ``error`` is a driver's "the server dropped the connection"."""
    message = str(error).lower()
    return any(isinstance(error, kind) and fragment.lower() in message
               for kind, fragment in PostgresDatabase.reconnect_errors)


class SqliteFileDatabase(SqliteDatabase):
    """SQLite as psai opens it. ``read_only``: the file or its directory is
    not writable (an archive), so it is opened read-only, ``"ro"``
    (``mode=ro``), or ``"immutable"`` when SQLite could not otherwise read it
    (a WAL database whose shared-memory file cannot be created, and no WAL
    content to miss); a write then fails saying the database is read-only."""

    def __init__(self, database: str, *args: Any, read_only: str | None = None, **kwargs: Any) -> None:
        self.path, self.read_only = database, read_only
        if read_only:
            # Switching to WAL writes the file: a read-only file keeps its journal mode.
            kwargs["pragmas"] = {k: v for k, v in dict(kwargs.get("pragmas") or {}).items() if k != "journal_mode"}
            kwargs["uri"] = True
            query = {"mode": "ro", **({"immutable": 1} if read_only == "immutable" else {})}
            database = "file:%s?%s" % (quote(os.path.abspath(database)), urlencode(query))
        super().__init__(database, *args, **kwargs)

    def _read_only_error(self, exc: OperationalError) -> OperationalError:
        if self.read_only and "readonly" in str(exc):
            return OperationalError("%s is read-only (the file or its directory is not writable), so psai opened "
                                    "it for reading only: %s" % (self.path, exc))
        return exc

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        try:
            return super().execute_sql(sql, params)
        except OperationalError as exc:
            error = self._read_only_error(exc)
            if error is exc:
                raise
            raise error from exc

    def begin(self, lock_type: str | None = None) -> None:
        try:
            super().begin(lock_type)
        except OperationalError as exc:
            error = self._read_only_error(exc)
            if error is exc:
                raise
            raise error from exc

    def transaction_lost(self) -> bool:
        """SQLite rolled the transaction back itself, as it does after
        "database or disk is full" and other I/O errors."""
        return not self.is_closed() and not self.connection().in_transaction

    def rollback(self) -> None:
        # Nothing to roll back, and the ROLLBACK's own "no transaction is
        # active" would hide the error that ended the transaction.
        if not self.transaction_lost():
            super().rollback()


def _readable(db: SqliteFileDatabase, parameters: dict[str, Any]) -> SqliteFileDatabase:
    """``db`` connected (read-only) if SQLite can read it, else the same file
    opened immutable: a WAL database needs its shared-memory file, which a
    read-only directory cannot take. Immutable ignores the WAL file, so only
    when there is nothing in it to miss."""
    try:
        db.connect()
        db.execute_sql("SELECT count(*) FROM sqlite_master").fetchall()
        return db
    except OperationalError:
        if not db.is_closed():
            db.close()
        wal = db.path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise
    immutable = SqliteFileDatabase(db.path, read_only="immutable", **parameters)
    immutable.connect()
    return immutable


def _writable(path: str) -> bool:
    """Whether this process may write ``path`` and create files beside it
    (SQLite's journal, WAL and shared-memory files)."""
    return os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)


def _read_timestamptz(text, cursor):
    """psycopg2's own timestamptz reader, except that a value Python cannot
    hold (a BC date, a year past 9999) comes back as its text, for
    ``TimestampTzField`` to flag, instead of failing the whole fetch."""
    try:
        return psycopg2.extensions.PYDATETIMETZ(text, cursor)
    except ValueError:
        return text


TIMESTAMPTZ_READER = psycopg2.extensions.new_type(
    psycopg2.extensions.PYDATETIMETZ.values, "PSAI_TIMESTAMPTZ", _read_timestamptz) if psycopg2 else None


# Query parameters that carry a secret (libpq's names).
SECRET_PARAMETERS = ("password", "sslpassword", "passfile", "sslkey")


def _split_secret(url: str) -> tuple[str, str, str] | None:
    """(head, password, tail) with ``url == head + password + tail``, the
    password found by the URL's structure: the userinfo is everything
    before the last "@" of the authority, so a password holding an
    unencoded "#", "/" or "?" is still found whole. No password: None."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    colon = rest.find(":", 0, at)
    if colon < 0:
        return None
    start = len(scheme) + len(sep) + colon + 1
    return url[:start], url[start:start + at - colon - 1], url[start + at - colon - 1:]


def _redact_parameters(text: str) -> str:
    return re.sub(r"(?i)\b(%s)=([^&\s'\"]*)" % "|".join(SECRET_PARAMETERS), r"\1=***", text)


def redact_url(url: str) -> str:
    """The URL with every secret replaced by ``***`` (the password, and
    query parameters such as ``password=`` and ``sslpassword=``), safe to print."""
    url = str(url)
    parts = _split_secret(url)
    if parts is not None:
        url = parts[0] + "***" + parts[2]
    return _redact_parameters(url)


def _normalize_url(url: str) -> str:
    """The URL with its password percent-encoded, so that a password holding
    "#", "/", "?" or "@" is read whole by playhouse.db_url."""
    parts = _split_secret(url)
    if parts is None:
        return url
    return parts[0] + quote(unquote(parts[1]), safe="") + parts[2]


def _scrub(message: object, url: str) -> str:
    """A driver's error message without the URL's secrets, on one line."""
    message = str(message)
    if url:
        for form in {url, _normalize_url(url)}:
            message = message.replace(form, redact_url(url))
        parts = _split_secret(url)
        if parts is not None and parts[1]:
            # The bare password too, unless it also spells part of what is
            # shown (the host, the user...): that would mangle the message.
            visible = redact_url(url)
            for password in {parts[1], unquote(parts[1])}:
                if password and password not in visible:
                    message = message.replace(password, "***")
    return " ".join(_redact_parameters(message).split())  # drivers' messages span lines; errors are one line


def _sqlite_url_problem(url: str) -> str | None:
    """What is wrong with a SQLite URL whose file the parser would take
    for a host (``sqlite://psai.db``) or lose a letter of (``sqlite:psai.db``
    opens ``sai.db``), or None."""
    parts = urlsplit(url)
    if not url[len(parts.scheme) + 1:].startswith("///"):
        return ("%s is not a SQLite URL psai reads: a SQLite URL has three slashes, sqlite:///%s for a path "
                "relative to the working directory, sqlite:////absolute/path.db for an absolute one"
                % (url, (parts.netloc + parts.path).lstrip("/") or "psai.db"))
    if not parts.path.lstrip("/"):
        return "%s names no file: sqlite:///psai.db, or sqlite:///:memory: for a database in memory" % url
    return None


def connect(url: str | None = None, *, bind: bool = True, **options: Any) -> Database:
    """Open the database at ``url`` and return it; with ``bind`` (the
    default) psai's models use it from now on, wherever no ``using`` block
    says otherwise. A database opened before stays open: another part of the
    program may still use it.

    ``url`` defaults to ``$PSAI_DATABASE_URL``, else ``sqlite:///psai.db``.
    Supported: ``sqlite:///path`` (``sqlite:///:memory:`` too) and
    ``postgresql://user:password@host:port/dbname`` (needs ``psai[postgres]``).
    Extra keyword ``options`` go to the peewee database (for example
    ``options="-c search_path=myschema"`` for psycopg2).
    """
    given = url or os.environ.get("PSAI_DATABASE_URL") or DEFAULT_URL
    url = _normalize_url(given)
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise DatabaseURLError("cannot parse database URL %s" % redact_url(given)) from None
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise DatabaseURLError(
            "unsupported database URL scheme %r in %s: use sqlite:///path.db or "
            "postgresql://user@host:port/dbname" % (scheme, redact_url(url))
        )
    if kind == "sqlite":
        problem = _sqlite_url_problem(url)
        if problem:
            raise DatabaseURLError(problem)
        options.setdefault("pragmas", SQLITE_PRAGMAS)
        options.setdefault("field_types", SQLITE_FIELD_TYPES)
        # sqlite3's own busy wait, applied before the pragmas run.
        options.setdefault("timeout", SQLITE_PRAGMAS["busy_timeout"] / 1000)
    else:
        if psycopg2 is None:
            raise DatabaseURLError(
                "%s needs the PostgreSQL driver: pip install 'psai[postgres]'" % redact_url(url))
        options.setdefault("field_types", POSTGRES_FIELD_TYPES)
    try:
        if kind == "postgres":
            parameters = db_url.parse(url, unquote_password=True, unquote_user=True)
            parameters.update(options)
            if not parameters.get("database"):
                raise ValueError("%s has no database name: postgresql://user@host:port/dbname" % url)
            db: Database = PostgresDatabase(**parameters)
        else:
            parameters = db_url.parse(url, unquote_password=True, unquote_user=True)
            parameters.update(options)
            path = parameters.pop("database")
            read_only = path != ":memory:" and os.path.exists(path) and not _writable(path)
            db = SqliteFileDatabase(path, read_only="ro" if read_only else None, **parameters)
    except (ValueError, RuntimeError) as exc:
        raise DatabaseURLError(_scrub(exc, url)) from None
    # Switching a new SQLite file to WAL takes a lock SQLite does not wait
    # for: processes opening a fresh file at once retry for the busy timeout.
    deadline = time.monotonic() + SQLITE_PRAGMAS["busy_timeout"] / 1000
    while True:
        try:
            if isinstance(db, SqliteFileDatabase) and db.read_only == "ro":
                db = _readable(db, parameters)
            else:
                db.connect()
            break
        except OperationalError as exc:
            if not db.is_closed():
                db.close()
            if kind == "sqlite" and "locked" in str(exc) and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise DatabaseUnavailableError(
                "cannot connect to %s: %s" % (redact_url(url), _scrub(exc, url))) from None
    if bind:
        database.initialize(db)
    return db


@contextlib.contextmanager
def using(db: Database | str) -> Iterator[Database]:
    """Inside the block, every psai model, and so every psai function, works
    on ``db`` (a database from ``connect(url, bind=False)``, or a URL), in
    this thread only: another thread keeps its own binding. Blocks nest. The
    same as peewee's ``db.bind_ctx(psai.models.ALL_MODELS)``."""
    opened = isinstance(db, str)
    if isinstance(db, str):
        db = connect(db, bind=False)
    try:
        with db.bind_ctx(_registered_models, bind_refs=False, bind_backrefs=False):
            yield db
    finally:
        if opened:
            db.close()


_NOT_CONNECTED = "no database: call psai.connect(url) or use `with psai.using(db):`"


def model_db(model: type[Model] | Model) -> Database:
    """The database a model (class or row) is bound to in this thread: its
    own, never a global."""
    db = model._meta.database
    if isinstance(db, DatabaseProxy):
        db = db.obj
        if db is None:
            raise NotConnectedError(_NOT_CONNECTED)
    return db


def current_db() -> Database:
    """The database psai's models are bound to in this thread: the innermost
    ``using`` (or ``bind_ctx``) block's, else the one ``connect()`` bound."""
    if _registered_models:
        return model_db(_registered_models[0])
    if database.obj is None:
        raise NotConnectedError(_NOT_CONNECTED)
    return database.obj


def describe_database(db: Database | None = None) -> str:
    """The database as a URL with no secret in it (default: ``current_db()``);
    a PostgreSQL search_path given in the options is named too, since two
    schemas of one server are two stores."""
    db = db or current_db()
    if isinstance(db, PostgresqlDatabase):
        params = db.connect_params
        user = params.get("user")
        text = "postgresql://%s%s:%s/%s" % (user + "@" if user else "", params.get("host", ""),
                                            params.get("port", 5432), db.database)
        path = re.search(r"search_path\s*=\s*([^\s]+)", str(params.get("options") or ""))
        return text + (" (search_path %s)" % path.group(1) if path else "")
    return "sqlite:///%s" % _sqlite_path(db)


def _sqlite_path(db: Database) -> str:
    # A read-only file is opened by a file: URI; its path is what names it.
    return getattr(db, "path", None) or str(db.database)


def _identity(db: Database) -> tuple[Any, ...] | None:
    """What makes two Database objects the same store: the file, or the
    server, database and search_path. None for an in-memory SQLite database,
    which is only ever itself."""
    if isinstance(db, PostgresqlDatabase):
        params = db.connect_params
        return ("postgresql", params.get("host"), params.get("port", 5432), db.database, params.get("options"))
    name = _sqlite_path(db)
    if name == ":memory:" or name.startswith("file::memory:") or not name:
        return None
    return ("sqlite", os.path.realpath(name))


def same_database(a: Database, b: Database) -> bool:
    """Whether ``a`` and ``b`` reach one store: the same object, or opened
    from the same file or server, database and search_path (each
    ``connect(url)`` opens a new object for the same store)."""
    if a is b:
        return True
    identity = _identity(a)
    return identity is not None and identity == _identity(b)


def is_postgres(db: Database | None = None) -> bool:
    return isinstance(db if db is not None else current_db(), PostgresqlDatabase)


def lock_id(key: object) -> int:
    """The 64-bit advisory lock number of ``key`` (any repr-able value)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock(db: Database, key: object) -> None:
    """Inside a write transaction: serialise the writers of ``key`` (any
    repr-able value) until commit. SQLite: the write transaction already
    holds the database's write lock. PostgreSQL: an advisory lock for this key."""
    if is_postgres(db):
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock_id(key),))


def write_transaction(db: Database | None = None) -> contextlib.AbstractContextManager[Any, None]:
    """A transaction for writes on ``db`` (default: ``current_db()``). On
    SQLite it takes the write lock at BEGIN (IMMEDIATE), so two writers queue
    on the busy timeout instead of failing with "database is locked" when a
    read lock cannot be upgraded."""
    db = db if db is not None else current_db()
    if isinstance(db, SqliteDatabase) and not db.in_transaction():
        return _KeepingTheCause(db, db.atomic("IMMEDIATE"))
    return _KeepingTheCause(db, db.atomic())


class _KeepingTheCause:
    """A peewee atomic block whose error, when the database ended the
    transaction itself (a dropped connection, SQLite after "database or disk
    is full"), is raised as it is, not hidden by the failed rollback of a
    savepoint that is gone with it."""

    def __init__(self, db: Database, block: Any) -> None:
        self.db, self.block = db, block

    def __enter__(self) -> Any:
        return self.block.__enter__()

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> Any:
        try:
            return self.block.__exit__(exc_type, exc, traceback)
        except Exception:
            if exc is None or not getattr(self.db, "transaction_lost", lambda: False)():
                raise
            return False  # the block's own error goes on


@contextlib.contextmanager
def read_transaction(db: Database | None = None) -> Iterator[Database]:
    """A block whose reads on ``db`` (default: ``current_db()``) all see one
    snapshot of it, so that what they read together agrees: PostgreSQL
    ``REPEATABLE READ READ ONLY``; SQLite a deferred BEGIN (under WAL the
    first read fixes the snapshot until the block ends, and writers go on).
    Inside a transaction already, the block is part of it."""
    db = db if db is not None else current_db()
    if db.in_transaction():
        yield db
    elif isinstance(db, PostgresqlDatabase):
        # peewee writes "BEGIN TRANSACTION ISOLATION LEVEL <this>": read only in
        # the same statement, not a round trip of its own (every check and report).
        with db.atomic(isolation_level="REPEATABLE READ READ ONLY"):
            yield db
    else:
        with db.atomic("DEFERRED"):
            yield db


# Statements prepared on each PostgreSQL connection: {sql: name}. Keyed by
# the driver's connection, so a reconnected database prepares them again.
_prepared_names: weakref.WeakKeyDictionary[Any, dict[str | None, str | bool]] = weakref.WeakKeyDictionary()
PREPARED_STATEMENT_MISSING = "26000"  # SQLSTATE invalid_sql_statement_name
_NOT_KEPT = None  # the key saying a connection's prepared statements do not stay


def _execute_text(db: Database, names: dict[str | None, str | bool], sql: str) -> str:
    """The ``EXECUTE`` text for ``sql`` (one statement, ``%s`` placeholders),
    prepared on this thread's connection the first time."""
    count = sql.count("%s")
    name = names.get(sql)
    if name is None:
        name = "psai_" + hashlib.blake2b(sql.encode(), digest_size=8).hexdigest()
        numbers = iter(range(1, count + 1))
        # No parameters: psycopg2 sends the text as is (no % interpolation).
        db.connection().cursor().execute(
            "PREPARE %s AS %s" % (name, re.sub(r"%s", lambda _: "$%d" % next(numbers), sql)))
        names[sql] = name
    return "EXECUTE %s (%s)" % (name, ", ".join(["%s"] * count))


def execute_prepared(db: Database, sql: str, params: Sequence[Any], before: str = "") -> Any:
    """PostgreSQL: run ``sql`` (one statement, ``%s`` placeholders) as a
    statement prepared on this thread's connection the first time: the
    server parses and plans it once per connection, not on every call.
    ``before``: statements sent ahead of it in the same message (their
    parameters first in ``params``). Returns the cursor.

    A statement the server has forgotten (``DEALLOCATE``, a reconnect) is
    prepared again; forgotten twice running, as behind a pooler that hands
    each transaction another server connection, the connection sends its
    statements unprepared from then on. Inside a transaction the statement
    goes unprepared: a forgotten one would fail the caller's transaction."""
    if db.in_transaction():
        return db.execute_sql(before + sql, params)
    for _attempt in (1, 2):
        names = _prepared_names.setdefault(db.connection(), {})
        if names.get(_NOT_KEPT):
            break
        try:
            return db.execute_sql(before + _execute_text(db, names, sql), params)
        except DatabaseError as exc:
            if getattr(exc.__context__, "pgcode", None) != PREPARED_STATEMENT_MISSING:
                raise
            names.clear()
    else:
        _prepared_names.setdefault(db.connection(), {})[_NOT_KEPT] = True
    return db.execute_sql(before + sql, params)


# Which tables and columns a database has, looked up once per database: psai
# works on PolicySynth databases whose schema may lack a table or a column.
_schema: weakref.WeakKeyDictionary[Database, dict[str, frozenset[str]]] = weakref.WeakKeyDictionary()


def table_columns(db: Database, table: str) -> frozenset[str]:
    """The column names of ``table`` in ``db`` as a frozenset (empty when the
    table does not exist), cached until ``forget_schema(db)``."""
    tables = _schema.setdefault(db, {})
    if table not in tables:
        tables[table] = frozenset(c.name for c in db.get_columns(table)) if db.table_exists(table) else frozenset()
    return tables[table]


def forget_schema(db: Database) -> None:
    """Drop what ``table_columns`` knows of ``db`` (after a migration)."""
    _schema.pop(db, None)
