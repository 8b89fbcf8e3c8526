"""Fixtures: every store test runs on a real SQLite file and on a real PostgreSQL
server (each test in a schema of its own, dropped afterwards)."""
import ctypes
import datetime
import os
import threading
import uuid
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

import psai
from psai.cli import cli

# Property tests assert behaviour, not speed: no per-example deadline, and no
# "too slow" health check failing a run on a busy machine.
settings.register_profile("psai", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("psai")

POSTGRES_URL = os.environ.get("PSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ["sqlite", "postgres"]

_postgres_error = None


def _postgres_reachable():
    global _postgres_error
    if _postgres_error is None:
        try:
            import psycopg2
            psycopg2.connect(POSTGRES_URL, connect_timeout=5).close()
            _postgres_error = ""
        except Exception as exc:  # any failure means "no server for the tests"
            _postgres_error = "%s: %s" % (type(exc).__name__, psai.redact_url(str(exc)))
    return not _postgres_error


# The capabilities that let root ignore permission bits (linux/capability.h):
# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER.
ROOT_OVERRIDES = (1, 2, 3)
PR_CAPBSET_DROP = 24


def obey_permission_bits():
    """In the child before exec: drop root's overrides from the bounding set,
    so the command runs as root but meets permission bits as any user does.
    The same user keeps reaching the interpreter and the checkout wherever
    they live (switching to another user, who may not, is what failed in a
    clone under a private directory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in ROOT_OVERRIDES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, %d)" % capability)


def require_postgres():
    if not _postgres_reachable():
        message = "PostgreSQL at %s unavailable (%s)" % (psai.redact_url(POSTGRES_URL), _postgres_error)
        if IN_CI:
            pytest.fail(message + "; with CI=true this is a failure, not a skip")
        pytest.skip(message)


class Backend:
    """A fresh, migrated database of one kind; ``url`` reaches the same database
    from another process (the CLI, a worker)."""

    def __init__(self, kind, url, cleanup=None):
        self.kind, self.url, self._cleanup = kind, url, cleanup

    def connect(self):
        return psai.connect(self.url)

    def close(self):
        psai.database.obj and psai.database.close()
        if self._cleanup:
            self._cleanup()


def make_backend(kind, tmp_path):
    if kind == "sqlite":
        return Backend(kind, "sqlite:///%s" % (tmp_path / "psai.db"))
    require_postgres()
    import psycopg2
    schema = "psai_test_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True
    admin.cursor().execute('CREATE SCHEMA "%s"' % schema)

    def drop():
        admin.cursor().execute('DROP SCHEMA "%s" CASCADE' % schema)
        admin.close()

    separator = "&" if "?" in POSTGRES_URL else "?"
    url = POSTGRES_URL + separator + "options=" + quote("-c search_path=%s" % schema)
    return Backend(kind, url, drop)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """An empty database (no tables) of each kind."""
    backend = make_backend(request.param, tmp_path)
    backend.connect()
    yield backend
    backend.close()


@pytest.fixture
def postgres_db(tmp_path):
    """A migrated PostgreSQL database, for what only PostgreSQL has."""
    backend = make_backend("postgres", tmp_path)
    backend.connect()
    psai.migrate()
    yield psai.database.obj
    backend.close()


@pytest.fixture
def db(backend):
    """A migrated database of each kind, bound to psai's models."""
    psai.migrate()
    return psai.database.obj


@pytest.fixture(params=BACKENDS)
def run(request, tmp_path):
    """run(*args, code=0) → click Result: the command line on a fresh store
    of each kind (``init`` already run), its exit code checked, and never a
    traceback; psai's models are bound to the same database afterwards."""
    backend = make_backend(request.param, tmp_path)
    runner = CliRunner()

    def invoke(*args, code=0):
        result = runner.invoke(cli, ["--database", backend.url, *args], catch_exceptions=False)
        psai.connect(backend.url)
        assert result.exit_code == code, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        return result
    invoke("init")
    yield invoke
    backend.close()


SEED_CONFIGURATION = {
    "type": "text", "modelSize": "large", "model": "gpt-4",
    "provider": "openai", "active": True,
    "prices": {"costInTokensPerMillion": 30, "costOutTokensPerMillion": 60,
               "costInCachedContextTokensPerMillion": 10, "currency": "USD"},
    "maxTokensOut": 4096, "defaultTemperature": 0.7,
}


def make_configuration(**changes):
    """The seed configuration with top-level keys changed (None removes a key)."""
    import copy
    config = copy.deepcopy(SEED_CONFIGURATION)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def run_beside(target, wait=10):
    """Start ``target`` in a thread and wait up to ``wait`` seconds for it:
    (True when it ended by then, the thread: join it before the test ends).
    What a writer beside a long operation (reprice, audit) measures."""
    worker = threading.Thread(target=target)
    worker.start()
    worker.join(wait)
    return not worker.is_alive(), worker


@pytest.fixture
def seed_model(db):
    return psai.PsAiModel.create(
        user_id=1, organization_id=2, name="OpenAI GPT-4 Large", configuration=make_configuration()
    )


class PinnedClock:
    """psai's "now", pinned: ``set`` and ``advance`` move it, nothing else does."""

    def __init__(self, moment):
        self.moment = moment

    def __call__(self):
        return self.moment

    def set(self, moment):
        self.moment = moment

    def advance(self, **delta):
        self.moment += datetime.timedelta(**delta)


@pytest.fixture
def clock(monkeypatch):
    """Pins the time psai stamps rows with (and reports read as now) for this
    test's process: a morning, before 11:00 UTC, so that nothing passes only
    in the afternoon."""
    pinned = PinnedClock(datetime.datetime(2026, 11, 25, 9, 30, tzinfo=datetime.timezone.utc))
    monkeypatch.setattr(psai.fields, "now_source", pinned)
    return pinned


# -- the suite in another order ------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--reverse-files", action="store_true",
                     help="run the test files in reversed order (each file's tests in their own order), "
                          "to catch state one file leaves for the next")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-files"):
        files = list(dict.fromkeys(item.path for item in items))
        rank = {path: position for position, path in enumerate(reversed(files))}
        items.sort(key=lambda item: rank[item.path])  # stable: a file's own order is kept
