"""Versioned schema migrations, run by peewee's ``playhouse.migrations``.

Each ``NNNN_name.py`` file here defines ``up(migrator, db)`` with frozen
table definitions (never the live models, which move on), and is recorded
by name in the ``psai_migrations`` table once applied.
"""
import os

from playhouse.migrations import Runner

from ..db import database

__all__ = ["migrate", "HISTORY_TABLE", "DIRECTORY", "runner"]

HISTORY_TABLE = "psai_migrations"
DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def runner(db=None):
    db = db or database.obj
    if db is None:
        from ..db import connect
        db = connect()
    return Runner(db, DIRECTORY, table_name=HISTORY_TABLE)


def migrate(db=None):
    """Create or upgrade psai's tables; idempotent. Returns the names applied."""
    return runner(db).up()
