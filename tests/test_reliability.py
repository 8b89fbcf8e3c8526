"""Reliability: concurrent writers, processes killed mid-write, PostgreSQL
connections dropped by the server, hostile input, integrity, secrets."""
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from peewee import JOIN, DatabaseError, InterfaceError
from hypothesis import HealthCheck, given, settings, strategies as st

import psai
from psai import AgentModels, PsAgent, PsAiModel, PsModelUsage
from psai.db import is_postgres, read_transaction

from conftest import POSTGRES_URL, make_configuration, require_postgres

TESTS = os.path.dirname(os.path.abspath(__file__))


# -- 1. concurrent writers ---------------------------------------------------------

def test_eight_concurrent_writers_lose_nothing(backend):
    psai.migrate()
    from workers import busy_writer
    workers, count = 8, 500 if backend.kind == "sqlite" else 250
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        # Any "database is locked" (or any other error) in a worker fails here.
        results = [pool.apply_async(busy_writer, (backend.url, w, count)) for w in range(1, workers + 1)]
        assert sorted(r.get(timeout=240) for r in results) == list(range(1, workers + 1))
    psai.connect(backend.url)
    assert PsAiModel.select().count() == workers * count
    assert AgentModels.select().count() == workers * count
    assert PsAgent.select().count() == workers
    total_in = sum(row.token_in_count for row in PsModelUsage.select())
    assert total_in == workers * sum(100 + i for i in range(count))
    assert PsModelUsage.select().count() == workers * count  # one counter row per (model, agent)


def counted_input(model_id):
    """Every input token the counters of a model hold (ordinary, cached and cache writes)."""
    return sum(row.token_in_count + row.token_in_cached_context_count + row.token_in_cache_write_count
               for row in PsModelUsage.select().where(PsModelUsage.model == model_id))


def test_audit_apply_while_processes_record_on_its_model_and_agent(backend):
    """Before, on PostgreSQL: the audit and a recorder locked the counter row
    and the day's rollup in opposite orders, and the deadlock failed the
    call; and the audit wrote back counter values it had read, losing the
    calls recorded meanwhile."""
    psai.migrate()
    from test_responses import policysynth_claude_item
    from workers import record_many
    model = PsAiModel.create(user_id=1, organization_id=1, name="Sonnet",
                             configuration=make_configuration(provider="anthropic", model="claude-sonnet-4-5"))
    agent = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a"})
    psai.record_usage(model, agent, tokens_in=1_000_000, tokens_out=10)
    # PolicySynth's item of a Claude call: 4,500 weighted "input" tokens where the bill says 13,000.
    raw = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
           "cache_read_input_tokens": 10000}
    workers, calls = 3, 100
    corrected = 0
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        results = [pool.apply_async(record_many, (backend.url, model.id, agent.id, calls, seed))
                   for seed in range(workers)]
        while not all(r.ready() for r in results) or not corrected:
            policysynth_claude_item(model, agent, raw)
            corrected += len(psai.audit(dry_run=False)["findings"])
        assert all(r.get(timeout=300) for r in results)  # a call that failed (a deadlock) fails here
    psai.connect(backend.url)
    recorded = sum(100 + (seed + i) % 7 for seed in range(workers) for i in range(calls))
    assert counted_input(model.id) == 1_000_000 + recorded + (13_000 - 4_500) * corrected
    assert psai.audit()["findings"] == []


@pytest.mark.slow
def test_processes_changing_different_fields_of_one_model_keep_every_change(db, backend, tmp_path):
    """`psai models update --set prices...` in one process, update_configuration
    of another field in a second, of a third (and deactivate half-way) in a
    third, 25 times each at once: the row ends with every change, and the
    price history has each price once, in order (a stale configuration
    written back would open a version with an older price, which calls
    recorded then are charged)."""
    from test_hostile import start_together
    from workers import change_one_field
    times = 25
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        for round_ in range(3):
            model = PsAiModel.create(user_id=1, organization_id=1, name="race-%d" % round_,
                                     configuration=make_configuration())
            work = [(backend.url, model.id, how, times) for how in ("price", "max tokens", "temperature")]
            assert sorted(start_together(pool, change_one_field, work, tmp_path)) == \
                ["max tokens", "price", "temperature"]
            stored = PsAiModel.get_by_id(model.id).configuration
            assert (stored["prices"]["costInTokensPerMillion"], stored["maxTokensOut"],
                    stored["defaultTemperature"], stored["active"]) == (times, 1000 + times, times / 100, False), \
                round_
            prices = [v["prices"]["costInTokensPerMillion"] for v in psai.price_history(model)]
            assert prices == [30] + list(range(1, times + 1)), round_


@pytest.mark.slow
def test_concurrent_catalog_imports_never_duplicate_a_model(db, backend, tmp_path):
    """Four `catalog import genai-prices --provider openai --provider
    anthropic` at once: one model and one provenance row per source model."""
    from test_hostile import start_together
    from workers import import_genai_prices
    from psai.models import ModelProvenance
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        for organization in (1, 2):  # a round each, into an empty organization
            imported = start_together(pool, import_genai_prices, [(backend.url, organization)] * 4, tmp_path)
            source_models = imported[0]
            assert all(models == source_models for models in imported) and len(source_models) > 100
            models = PsAiModel.select(PsAiModel.id).where(PsAiModel.organization_id == organization)
            provenance = ModelProvenance.select(ModelProvenance.source_model).where(ModelProvenance.model.in_(models))
            assert sorted(name for (name,) in provenance.tuples()) == source_models, organization
            assert models.count() == len(source_models), organization


# -- 2. crash safety ----------------------------------------------------------------

def spawn(function, *args):
    code = ("import sys; sys.path.insert(0, %r); import workers; workers.%s(*%r)"
            % (TESTS, function, args))
    return subprocess.Popen([sys.executable, "-c", code], cwd=TESTS)


def wait_for(path, process, seconds=60):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, "worker ended early with %s" % process.returncode
        assert time.monotonic() < deadline, "worker never got going"
        time.sleep(0.01)


def assert_consistent(backend):
    db = psai.connect(backend.url)
    if backend.kind == "sqlite":
        assert db.execute_sql("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute_sql("PRAGMA foreign_key_check").fetchall() == []
    dangling = (AgentModels.select()
                .join(PsAiModel, on=(AgentModels.ai_model == PsAiModel.id), join_type=JOIN.LEFT_OUTER)
                .where(PsAiModel.id.is_null()).count())
    assert dangling == 0
    return db


def test_kill_during_a_large_import_leaves_all_or_nothing(backend, tmp_path):
    psai.migrate()
    psai.database.close()
    ready = str(tmp_path / "ready")
    process = spawn("slow_import", backend.url, 20_000, ready)
    wait_for(ready, process)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert_consistent(backend)
    count = PsAiModel.select().count()
    finished = os.path.exists(ready + ".done")
    assert count == (20_000 if finished else 0), (count, finished)


def test_kill_during_superseding_keeps_one_active_row(backend, tmp_path):
    psai.migrate()
    psai.database.close()
    ready = str(tmp_path / "ready")
    process = spawn("supersede_forever", backend.url, ready)
    wait_for(ready, process)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert_consistent(backend)
    history = PsAiModel.history("GPT-4o")
    assert len(history) >= 20
    assert [m.configuration["active"] for m in history].count(True) == 1
    assert history[0].configuration["active"] is True


# -- 3. PostgreSQL connection loss -------------------------------------------------------

def terminate_backend_of(db):
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    import psycopg2
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True
    admin.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
    admin.close()


def test_postgres_reconnects_after_the_server_drops_the_connection(postgres_db):
    model = PsAiModel.create(user_id=1, organization_id=1, name="m", configuration=make_configuration())
    terminate_backend_of(postgres_db)
    # The next operation reconnects and succeeds.
    assert PsAiModel.get_by_id(model.id).name == "m"
    terminate_backend_of(postgres_db)
    PsAiModel.create(user_id=1, organization_id=1, name="n", configuration=make_configuration())
    assert PsAiModel.select().count() == 2


def test_postgres_reads_together_in_one_read_only_snapshot(postgres_db):
    """What a report or a budget check reads together sees one snapshot and
    writes nothing: repeatable read, read only (set by its BEGIN)."""
    with read_transaction(postgres_db):
        assert postgres_db.execute_sql("SHOW transaction_isolation").fetchone()[0] == "repeatable read"
        assert postgres_db.execute_sql("SHOW transaction_read_only").fetchone()[0] == "on"
        with pytest.raises(DatabaseError, match="read-only transaction"):
            with postgres_db.atomic():
                PsAiModel.create(user_id=1, organization_id=1, name="m", configuration=make_configuration())
    assert PsAiModel.select().count() == 0


def test_postgres_transaction_cut_off_is_rolled_back(postgres_db):
    # The error is the failed statement's, or the failed rollback's when the block ends.
    with pytest.raises((DatabaseError, InterfaceError),
                       match="terminating connection|server closed|connection already closed"):
        with psai.db.write_transaction():
            PsAiModel.create(user_id=1, organization_id=1, name="first", configuration=make_configuration())
            terminate_backend_of(postgres_db)
            PsAiModel.create(user_id=1, organization_id=1, name="second", configuration=make_configuration())
    assert PsAiModel.select().count() == 0  # reconnected; nothing of the cut-off transaction
    PsAiModel.create(user_id=1, organization_id=1, name="after", configuration=make_configuration())
    assert [m.name for m in PsAiModel.select()] == ["after"]


# -- 4. hostile input -----------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["'", '"', "';--", "; DROP TABLE ps_ai_models; --", "$.provider", "$[0]", "a.b",
                     "\\", "%s", "?", "${x}", "\u202e", "名前", "\x00", "' OR '1'='1", "*/", "/*"]),
)
hostile_values = st.one_of(hostile_text, st.integers(), st.floats(), st.booleans(), st.none(),
                           st.lists(hostile_text, max_size=3), st.dictionaries(hostile_text, hostile_text, max_size=2))


def harmless(value):
    if isinstance(value, list):
        return [harmless(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    return {str: "x", int: 1, float: 1.5}.get(type(value), value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=hostile_text, value=hostile_values)
def test_hostile_filters_never_change_the_sql_or_write(db, key, value):
    before = PsAiModel.select().count()
    try:
        query = PsAiModel.where_config({key: value})
    except psai.ValidationError:
        return
    # The SQL is the same as for a harmless value of the same JSON type.
    sql, _params = query.sql()
    assert sql == PsAiModel.where_config({key: harmless(value)}).sql()[0]
    list(query)
    assert PsAiModel.select().count() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=hostile_text, value=hostile_values, name=hostile_text)
def test_hostile_writes_are_validation_errors_and_write_nothing(db, key, value, name):
    config = make_configuration()
    config[key] = value
    before = (PsAiModel.select().count(), PsAgent.select().count())
    try:
        with db.atomic() as transaction:
            PsAiModel.create(user_id=1, organization_id=1, name=name, configuration=config)
            transaction.rollback()  # a write that was allowed must be a known key
        assert key in config and key in psai.schemas.AiModelConfigurationSchema._declared_fields
    except psai.ValidationError:
        pass
    try:
        with db.atomic() as transaction:
            PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={key: value, "name": name})
            transaction.rollback()
    except psai.ValidationError:
        pass
    assert (PsAiModel.select().count(), PsAgent.select().count()) == before


def test_over_large_configurations_are_refused(db):
    with pytest.raises(psai.ValidationError, match="Too large"):
        PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"blob": "x" * (10 * 1024 * 1024)})
    with pytest.raises(psai.ValidationError, match="configuration.model"):
        PsAiModel.create(user_id=1, organization_id=1, name="big",
                         configuration=make_configuration(model="x" * (10 * 1024 * 1024)))
    assert PsAgent.select().count() == 0 and PsAiModel.select().count() == 0


# -- 5. integrity ---------------------------------------------------------------------

def test_deletes_never_leave_dangling_rows(db):
    models = [PsAiModel.create(user_id=1, organization_id=1, name="m%d" % i, configuration=make_configuration())
              for i in range(6)]
    agents = [PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a%d" % i}) for i in range(4)]
    agents[1].parent_agent = agents[0]
    agents[1].save()
    for agent in agents:
        agent.ai_models.add(models)
    psai.record_usage(models[0], agents[0], tokens_in=10, tokens_out=1)
    psai.record_usage(models[1], agents[1], tokens_in=10, tokens_out=1)
    for model in models[2:]:
        model.delete_instance()
    with pytest.raises(psai.InUseError):
        models[0].delete_instance()
    agents[0].delete_instance()
    PsAgent.delete().where(PsAgent.id == agents[3].id).execute()  # a bulk delete too
    links = [(link.agent_id, link.ai_model_id) for link in AgentModels.select()]
    live_agents = {a.id for a in PsAgent.select()}
    live_models = {m.id for m in PsAiModel.select()}
    assert all(a in live_agents and m in live_models for a, m in links)
    assert sorted(links) == sorted((a.id, m.id) for a in agents[1:3] for m in models[:2])
    for usage in PsModelUsage.select():
        assert usage.model_id in live_models
        assert usage.agent_id is None or usage.agent_id in live_agents
    assert PsAgent.get_by_id(agents[1].id).parent_agent_id is None
    if not is_postgres(db):
        assert db.execute_sql("PRAGMA foreign_key_check").fetchall() == []


# -- 6. secrets ------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


def test_password_never_appears_in_errors_logs_or_cli_output(caplog, tmp_path):
    require_postgres()
    from click.testing import CliRunner
    from psai.cli import cli
    urls = ["postgresql://nobody:%s@127.0.0.1:1/x" % SECRET,                 # nothing listening
            "postgresql://nobody:%s@127.0.0.1:5432/no_such_db_psai" % SECRET,  # no such database
            "mysql://nobody:%s@127.0.0.1/x" % SECRET,                         # unsupported
            "postgresql://nobody:%s@127.0.0.1:5432" % SECRET]                 # no database name
    caplog.set_level(logging.DEBUG)
    for url in urls:
        with pytest.raises(psai.PsaiError) as info:
            psai.connect(url)
        assert SECRET not in str(info.value) and SECRET not in repr(info.value)
        for args in (["init"], ["models", "list"], ["usage", "report"]):
            result = CliRunner().invoke(cli, ["--database", url] + args)
            assert result.exit_code in (1, 2)
            assert SECRET not in result.output
        result = CliRunner(env={"PSAI_DATABASE_URL": url}).invoke(cli, ["models", "list"])
        assert SECRET not in result.output and result.exit_code in (1, 2)
    assert SECRET not in caplog.text
