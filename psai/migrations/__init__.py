"""Versioned schema migrations, run by peewee's ``playhouse.migrations``.

Each ``NNNN_name.py`` file here defines ``up(migrator, db)`` with frozen
table definitions (never the live models, which move on). The runner applies
the missing ones in order, each in its own transaction, and records their
names in the ``psai_migrations`` table.

A database created by PolicySynth (Sequelize) already has the tables. psai
works with them as they are and adds nothing until asked: ``adopt()`` (``psai
init --adopt``) records the migrations whose tables PolicySynth made as
applied and creates only psai's own additions beside them.
"""
import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from peewee import Database, DatabaseError, PostgresqlDatabase, Table

from ..db import NotConnectedError, connect, current_db, forget_schema
from ..errors import NotAdoptedError

if TYPE_CHECKING:
    from playhouse.migrations import Runner

__all__ = ["migrate", "adopt", "ensure_schema", "is_policysynth_database", "HISTORY_TABLE", "DIRECTORY",
           "runner", "NotAdoptedError"]

HISTORY_TABLE = "psai_migrations"
SETTINGS_TABLE = "psai_settings"  # psai.models.Setting
DIRECTORY = os.path.dirname(os.path.abspath(__file__))
POLICYSYNTH_TABLES = {"ps_ai_models", "ps_agents", "AgentModels"}
# Migrations that create tables PolicySynth's own sync creates too.
POLICYSYNTH_MIGRATIONS = {"0001_initial": {"ps_ai_models", "ps_agents", "AgentModels"},
                          "0002_model_usage": {"ps_model_usage"}}


def _db(db: Database | None) -> Database:
    """``db``, else the database psai's models are bound to in this thread
    (``psai.using``), else the one ``connect()`` opens by default."""
    if db is not None:
        return db
    try:
        return current_db()
    except NotConnectedError:
        return connect()


def runner(db: Database | None = None) -> "Runner":
    # Imported here: every command checks the schema (_up_to_date, one
    # query), and only a schema that is behind needs the runner.
    from playhouse.migrations import Runner
    return Runner(_db(db), DIRECTORY, table_name=HISTORY_TABLE)


def _up_to_date(db: Database) -> bool:
    """True when every migration file is recorded: one query, no runner
    (the command line asks this before every command)."""
    names = {name[:-3] for name in os.listdir(DIRECTORY) if name[:1].isdigit() and name.endswith(".py")}
    try:
        with db.atomic():
            applied = {row[0] for row in db.execute_sql('SELECT "name" FROM "%s"' % HISTORY_TABLE)}
    except DatabaseError:  # no history table yet: not up to date
        return False
    return names <= applied


def is_policysynth_database(db: Database | None = None) -> bool:
    """True when PolicySynth's tables are there and psai's history is not."""
    tables = set(_db(db).get_tables())
    return POLICYSYNTH_TABLES <= tables and HISTORY_TABLE not in tables


# The key of PostgreSQL's advisory lock that serialises psai's migrations.
MIGRATION_LOCK = 0x70736169  # "psai"


@contextlib.contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """One process at a time runs migrations; the others wait, then find the
    work done. PostgreSQL: a session advisory lock (each migration keeps its
    own transaction). SQLite: the write lock, taken at BEGIN IMMEDIATE, for
    the whole run (each migration a savepoint in it), with foreign keys off
    (SQLite's way to rebuild a table: dropping the old one would cascade to
    its links; the pragma can only change outside a transaction), as they
    were after."""
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    else:
        (enforced,) = db.execute_sql("PRAGMA foreign_keys").fetchone()
        if enforced and not db.in_transaction():
            db.execute_sql("PRAGMA foreign_keys = OFF")
        try:
            with db.atomic("IMMEDIATE"):
                yield
        finally:
            if enforced and not db.in_transaction():
                db.execute_sql("PRAGMA foreign_keys = ON")


def migrate(db: Database | None = None) -> list[str]:
    """Create or upgrade psai's tables; idempotent, and safe when several
    processes run it at once. Returns the names applied (by this process).
    On a PolicySynth database psai has not adopted, changes nothing and
    raises NotAdoptedError."""
    db = _db(db)
    with _migration_lock(db):
        if is_policysynth_database(db):
            raise NotAdoptedError(
                "this database has PolicySynth's tables but not psai's: run `psai init --adopt` "
                "(psai.migrations.adopt()) to add psai's migration table and indexes beside them; "
                "psai reads and writes PolicySynth's tables without it")
        return _forget_columns(db, runner(db).up())


def _forget_columns(db: Database, applied: list[str]) -> list[str]:
    # What psai knows of this database's tables may have changed.
    forget_schema(db)
    return applied


def adopt(db: Database | None = None) -> list[str]:
    """Adopt a PolicySynth database: record as applied the migrations whose
    tables PolicySynth already made, then apply the rest (psai's indexes).
    PolicySynth's tables are not altered. Returns the names applied."""
    db = _db(db)
    with _migration_lock(db):
        if not is_policysynth_database(db):
            return _forget_columns(db, runner(db).up())
        tables = set(db.get_tables())
        run = runner(db)
        faked: list[str] = []
        with db.atomic():
            for name, needs in POLICYSYNTH_MIGRATIONS.items():
                if needs <= tables:
                    run.fake(name)
                    faked.append(name)
                else:
                    break
        applied = faked + run.up()
        # PolicySynth requires its ids on every row: no defaults here until
        # `psai config --no-require-ids` says otherwise.
        settings = Table(SETTINGS_TABLE).bind(db)
        with db.atomic():
            if not settings.select(settings.c.key).where(settings.c.key == "require_ids").exists():
                settings.insert({settings.c.key: "require_ids", settings.c.value: "true"}).execute()
        return _forget_columns(db, applied)


def ensure_schema(db: Database | None = None) -> list[str]:
    """What the CLI runs first: bring psai's schema up to date, but leave an
    un-adopted PolicySynth database exactly as it is."""
    db = _db(db)
    if _up_to_date(db):
        return []
    with _migration_lock(db):
        if is_policysynth_database(db):
            return []
        return _forget_columns(db, runner(db).up())
