"""Budgets scoped to whose the calls were (docs/budgets.md): a budget's
``user`` (the application's end user) or one tag (``tag_key``,
``tag_value``), nullable columns of ``psai_budgets``; a budget without them
covers every call of its scope, as before."""
from peewee import CharField


def up(migrator, db):
    if "psai_budgets" not in db.get_tables():
        return
    present = {column.name for column in db.get_columns("psai_budgets")}
    added = [migrator.add_column("psai_budgets", name, CharField(max_length=length, null=True))
             for name, length in (("user", 255), ("tag_key", 64), ("tag_value", 255)) if name not in present]
    if added:
        migrator.migrate(*added)
