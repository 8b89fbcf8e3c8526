"""psai's own settings of a store, one row a key (``psai.config``): the ids
new models and agents get when none is given (user, organization, class,
group), and whether they must be given, as on a PolicySynth database."""
from peewee import CharField, Model, TextField


def up(migrator, db):
    class Setting(Model):
        key = CharField(max_length=64, primary_key=True)
        value = TextField()  # JSON text

        class Meta:
            database = db
            table_name = "psai_settings"

    db.create_tables([Setting], safe=True)
