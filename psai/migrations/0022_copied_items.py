"""psai's own memory, on the target of a copy, of the items ``psai.copy``
wrote there (``psai_copied_items``): a later copy updates only those, never
an item the target recorded itself. A table beside PolicySynth's (no
column, index or constraint of ``ps_model_usage_item`` changes), its rows
removed with their item. Empty at first: items copied before are matched
by what they hold (docs/store.md)."""
from peewee import AutoField, ForeignKeyField, Model


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class PsModelUsageItem(Base):
        id = AutoField()

        class Meta:
            table_name = "ps_model_usage_item"

    class CopiedItem(Base):
        item = ForeignKeyField(PsModelUsageItem, column_name="item_id", primary_key=True, on_delete="CASCADE")

        class Meta:
            table_name = "psai_copied_items"

    db.create_tables([CopiedItem], safe=True)
