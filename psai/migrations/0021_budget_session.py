"""Budgets limited to one session (a conversation's calls, docs/budgets.md):
a nullable ``session`` column of ``psai_budgets``, beside 0019's ``user``
and tag; a budget without it covers what it covered before."""
from peewee import CharField


def up(migrator, db):
    if "psai_budgets" not in db.get_tables():
        return
    if "session" not in {column.name for column in db.get_columns("psai_budgets")}:
        migrator.migrate(migrator.add_column("psai_budgets", "session", CharField(max_length=255, null=True)))
