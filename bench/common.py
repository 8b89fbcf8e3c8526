"""Shared set-up for the benchmarks: fresh databases, raw connections, timing."""
import json
import os
import statistics
import tempfile
import time
import uuid
from urllib.parse import quote

import psai
from psai.db import SQLITE_PRAGMAS

POSTGRES_URL = os.environ.get("PSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

PROVIDERS = ["provider%02d" % i for i in range(20)]
TYPES = ["text", "reasoning", "embedding"]
SIZES = ["large", "medium", "small"]


def configuration(i):
    """The i-th model's configuration: spread over 20 providers, 3 types,
    3 sizes; one in ten inactive."""
    return {
        "type": TYPES[i % 3], "modelSize": SIZES[(i // 3) % 3], "model": "model-%d" % i,
        "provider": PROVIDERS[(i // 9) % 20], "active": i % 10 != 0,
        "prices": {"costInTokensPerMillion": 1 + i % 7, "costOutTokensPerMillion": 4 + i % 11,
                   "costInCachedContextTokensPerMillion": 0.5, "currency": "USD"},
        "maxTokensOut": 4096, "defaultTemperature": 0.7,
    }


def model_rows(count, start=0):
    return [dict(user_id=1, organization_id=2, name="model-%d" % i, configuration=configuration(i))
            for i in range(start, start + count)]


class Backend:
    """A fresh, migrated database of one kind, psai bound to it, plus a raw
    driver connection to the same database."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "sqlite":
            self._dir = tempfile.TemporaryDirectory(prefix="psai-bench-")
            self.path = os.path.join(self._dir.name, "bench.db")
            self.url = "sqlite:///" + self.path
        else:
            import psycopg2
            self.schema = "psai_bench_" + uuid.uuid4().hex[:10]
            self._admin = psycopg2.connect(POSTGRES_URL)
            self._admin.autocommit = True
            self._admin.cursor().execute('CREATE SCHEMA "%s"' % self.schema)
            self.url = POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + "options=" + quote(
                "-c search_path=%s" % self.schema)
        self.db = psai.connect(self.url)
        psai.migrate()
        self.raw = self.raw_connection()

    def raw_connection(self):
        if self.kind == "sqlite":
            import sqlite3
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            for key, value in SQLITE_PRAGMAS.items():
                conn.execute("PRAGMA %s = %s" % (key, value))
            return conn
        import psycopg2
        return psycopg2.connect(POSTGRES_URL, options="-c search_path=%s" % self.schema)

    @property
    def placeholder(self):
        return "?" if self.kind == "sqlite" else "%s"

    def raw_begin(self, immediate=False):
        if self.kind == "sqlite":
            self.raw.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def raw_commit(self):
        if self.kind == "sqlite":
            self.raw.execute("COMMIT")
        else:
            self.raw.commit()

    def sql(self, text):
        """Write SQL with ? and get this driver's placeholders."""
        return text if self.kind == "sqlite" else text.replace("?", "%s")

    def truncate(self, *tables):
        from psai import rollups
        # Emptying the items with the triggers on would fold out every row: off, emptied, on again.
        kept = "ps_model_usage_item" in tables and rollups.enabled(self.db)
        with self.db.atomic():
            if kept:
                rollups.disable(self.db)
            for table in tables + (("psai_usage_rollup", "psai_rollup_unfolded") if kept else ()):
                self.db.execute_sql('DELETE FROM "%s"' % table)
            if kept:
                rollups.enable(self.db)

    def close(self):
        self.raw.close()
        psai.database.close()
        if self.kind == "sqlite":
            self._dir.cleanup()
        else:
            self._admin.cursor().execute('DROP SCHEMA "%s" CASCADE' % self.schema)
            self._admin.close()


def timed(function, repeat=1):
    """Median wall time of ``repeat`` runs, in seconds."""
    return timed_result(function, repeat)[0]


def timed_result(function, repeat=1):
    """(median wall time of ``repeat`` runs, the last run's result): a
    result checked without running the work once more."""
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def raw_json(value):
    return json.dumps(value, separators=(",", ":"))
