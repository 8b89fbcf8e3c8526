"""SQLite: ids of models and agents are never reused, as on PostgreSQL
(whose serial ids never go back). Without AUTOINCREMENT SQLite gives a new
row the highest id + 1, so an agent made after the newest one was deleted
took its id, and with it the deleted agent's calls (its usage keeps the
id), its budget and its links from other tools.

Each table is rebuilt as SQLite documents for a change it cannot ALTER
(https://sqlite.org/lang_altertable.html#otheralter): a copy made from the
table's own CREATE text with AUTOINCREMENT added, every row copied with its
id, the old table dropped, the copy renamed, its indexes and triggers made
again. Foreign keys must be off for the drop (``psai.migrate()`` turns them
off for its run), or the drop would cascade to the links; an empty table is
rebuilt either way. The ids already freed before this migration are beyond
its reach: SQLite remembers only the highest id in use. PostgreSQL: nothing
to do."""
import re

from peewee import SqliteDatabase

TABLES = ("ps_ai_models", "ps_agents")
# Where ids of rows deleted before this migration may still be held: the
# next id starts past them, so that a new row never takes their history.
REFERENCES = {"ps_ai_models": (("ps_model_usage", "model_id"), ("ps_model_usage_item", "model_id"),
                               ("AgentModels", "ai_model_id")),
              "ps_agents": (("ps_model_usage", "agent_id"), ("ps_model_usage_item", "agent_id"),
                            ("AgentModels", "agent_id"), ("psai_budgets", "agent_id"))}
_NAME = r'(?:"%s"|`%s`|\[%s\]|%s)'
_ID_KEY = re.compile(r'((?:"id"|`id`|\[id\]|\bid)\s+INTEGER\s+(?:NOT\s+NULL\s+)?PRIMARY\s+KEY)'
                     r'(?!\s+(?:AUTOINCREMENT|ASC|DESC))', re.IGNORECASE)


def _rebuilt_sql(table, sql):
    """The table's CREATE text for its copy, with AUTOINCREMENT; None when
    it has it already, or has no INTEGER PRIMARY KEY id psai knows."""
    if re.search(r"\bAUTOINCREMENT\b", sql, re.IGNORECASE):
        return None
    with_key, found = _ID_KEY.subn(r"\1 AUTOINCREMENT", sql, count=1)
    header = re.compile(r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?%s" % (_NAME % ((re.escape(table),) * 4)),
                        re.IGNORECASE)
    with_name, named = header.subn('CREATE TABLE "psai_rebuild_%s"' % table, with_key, count=1)
    return with_name if found and named else None


def _rebuild(db, table):
    row = db.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if row is None or row[0] is None:
        return
    sql = _rebuilt_sql(table, row[0])
    if sql is None:
        return
    (rows,) = db.execute_sql('SELECT count(*) FROM "%s"' % table).fetchone()
    if rows and db.execute_sql("PRAGMA foreign_keys").fetchone()[0]:
        raise RuntimeError("migration 0011 rebuilds %s and needs SQLite's foreign keys off, or dropping the old "
                           "table would delete its links: run psai.migrate() (not inside a transaction)" % table)
    # Indexes (but SQLite's own, of UNIQUE columns, which come with the table) and triggers go with the drop.
    again = [made for (made,) in db.execute_sql(
        "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND type IN ('index', 'trigger') AND sql IS NOT NULL "
        "ORDER BY type, name", (table,))]
    db.execute_sql(sql)
    db.execute_sql('INSERT INTO "psai_rebuild_%s" SELECT * FROM "%s"' % (table, table))
    (copied,) = db.execute_sql('SELECT count(*) FROM "psai_rebuild_%s"' % table).fetchone()
    if copied != rows:
        raise RuntimeError("migration 0011 copied %d of %d rows of %s" % (copied, rows, table))
    db.execute_sql('DROP TABLE "%s"' % table)
    # Legacy renaming: leave the text of other tables, views and triggers as
    # it is (it names the table, which the copy now is), not checked against
    # the schema half way through.
    (legacy,) = db.execute_sql("PRAGMA legacy_alter_table").fetchone()
    db.execute_sql("PRAGMA legacy_alter_table = ON")
    try:
        db.execute_sql('ALTER TABLE "psai_rebuild_%s" RENAME TO "%s"' % (table, table))
    finally:
        db.execute_sql("PRAGMA legacy_alter_table = %s" % ("ON" if legacy else "OFF"))
    for made in again:
        db.execute_sql(made)
    tables = set(db.get_tables())
    # The bound keeps text written by hand out (text sorts after numbers) and lets the index answer.
    held = [row[0] for other, column in REFERENCES[table] if other in tables for row in db.execute_sql(
        'SELECT max("%s") FROM "%s" WHERE "%s" <= 9223372036854775807' % (column, other, column))]
    highest = max([value for value in held if value is not None], default=0)
    if highest:
        db.execute_sql("INSERT INTO sqlite_sequence (name, seq) SELECT ?, 0 WHERE NOT EXISTS "
                       "(SELECT 1 FROM sqlite_sequence WHERE name = ?)", (table, table))
        db.execute_sql("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (highest, table))


def up(migrator, db):
    if not isinstance(db, SqliteDatabase):
        return
    for table in TABLES:
        _rebuild(db, table)
