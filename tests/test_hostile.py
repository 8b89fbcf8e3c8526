"""Reliability, round two: races on PostgreSQL, concurrent first runs, one
bad row, hostile input, secrets. Each test failed before its fix."""
import datetime
import json
import multiprocessing
import os
import uuid
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem
from psai._check import check
from psai.cli import cli
from psai.db import is_postgres
from psai.usage import cost_report, record_usage, report_totals

from conftest import make_backend, make_configuration


def run(backend, *args, code=0):
    result = CliRunner().invoke(cli, ["--database", backend.url] + list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result


def model(name="GPT-4", **changes):
    return PsAiModel.create(user_id=1, organization_id=2, name=name, configuration=make_configuration(**changes))


def agent(name="a", parent=None):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name}, parent_agent=parent)


def raw(sql, params=()):
    """SQL with ? placeholders on either backend, bypassing psai's checks."""
    return psai.database.execute_sql(sql.replace("?", "%s") if is_postgres() else sql, params)


def without_foreign_keys(statement, params=()):
    """Write a row whose reference is broken, as a hand edit can."""
    if is_postgres():
        with psai.database.atomic():
            raw("SET LOCAL session_replication_role = replica")
            raw(statement, params)
    else:
        raw("PRAGMA foreign_keys = OFF")
        raw(statement, params)
        raw("PRAGMA foreign_keys = ON")


# -- races ---------------------------------------------------------------------------------

def supersede(url, name, barrier_path):
    import time
    import psai
    from conftest import make_configuration
    psai.connect(url)
    while not os.path.exists(barrier_path):
        time.sleep(0.001)
    psai.add_model(name=name, user_id=1, organization_id=1, configuration=make_configuration())
    psai.database.close()
    return True


def set_parent(url, child_id, parent_id, barrier_path):
    import time
    import psai
    from psai import PsAgent
    psai.connect(url)
    child = PsAgent.get_by_id(child_id)
    child.parent_agent = parent_id
    while not os.path.exists(barrier_path):
        time.sleep(0.001)
    try:
        child.save()
        result = "saved"
    except psai.ValidationError:
        result = "refused"
    psai.database.close()
    return result


def start_together(pool, function, argument_lists, tmp_path):
    barrier = str(tmp_path / ("go-%s" % uuid.uuid4().hex))
    results = [pool.apply_async(function, args + (barrier,)) for args in argument_lists]
    import time
    time.sleep(0.5)  # every worker connected and waiting
    open(barrier, "w").close()
    return [r.get(timeout=120) for r in results]


@pytest.mark.slow
def test_concurrent_superseding_leaves_one_active_row(db, backend, tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        for round_ in range(5):
            name = "race-%d" % round_
            start_together(pool, supersede, [(backend.url, name)] * 8, tmp_path)
            rows = PsAiModel.select().where(PsAiModel.name == name)
            assert [r.configuration["active"] for r in rows].count(True) == 1, round_
            assert rows.count() == 8


@pytest.mark.slow
def test_concurrent_parent_changes_never_store_a_loop(db, backend, tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        for round_ in range(10):
            a, b = agent("a%d" % round_), agent("b%d" % round_)
            results = start_together(pool, set_parent, [(backend.url, a.id, b.id), (backend.url, b.id, a.id)],
                                     tmp_path)
            assert sorted(results) == ["refused", "saved"], round_
            a, b = PsAgent.get_by_id(a.id), PsAgent.get_by_id(b.id)
            assert not (a.parent_agent_id == b.id and b.parent_agent_id == a.id)


def test_tree_reports_are_right_on_a_database_that_holds_a_loop(db):
    m = model()
    a, b = agent("a"), agent("b")
    c = agent("c", parent=b)
    # PolicySynth does not prevent loops: a -> b -> a, with c under b.
    raw('UPDATE "ps_agents" SET "parent_agent_id" = ? WHERE "id" = ?', (b.id, a.id))
    raw('UPDATE "ps_agents" SET "parent_agent_id" = ? WHERE "id" = ?', (a.id, b.id))
    for each, tokens in ((a, 1000), (b, 100), (c, 10)):
        record_usage(m, each, tokens_in=tokens, tokens_out=0)
    rows = cost_report("tree")
    totals = report_totals(rows, "tree")["USD"]
    assert totals["tokens_in"] == 1110 and totals["cost"] == Decimal(1110 * 30) / 10 ** 6
    levels = {row["agent_id"]: row["level"] for row in rows}
    assert levels == {a.id: 0, b.id: 1, c.id: 2}  # the loop is cut at its smallest id
    assert {row["agent_id"]: row["tokens_in"] for row in rows} == {a.id: 1110, b.id: 110, c.id: 10}


def migrate_at_once(url, barrier_path):
    import time
    import psai
    db = psai.connect(url)
    while not os.path.exists(barrier_path):
        time.sleep(0.001)
    applied = psai.migrate()
    db.close()
    return len(applied)


def cli_at_once(url, barrier_path):
    import subprocess
    import sys
    import time
    while not os.path.exists(barrier_path):
        time.sleep(0.001)
    result = subprocess.run([sys.executable, "-m", "psai", "--database", url, "models", "list", "--json"],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


def fresh(kind, tmp_path, label):
    """A new, empty database of ``kind`` (nothing migrated)."""
    directory = tmp_path / label
    directory.mkdir()
    return make_backend(kind, directory)


MIGRATION_FILES = [name for name in os.listdir(psai.migrations.DIRECTORY) if name[:1].isdigit()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_concurrent_first_runs_all_succeed(kind, tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        for round_ in range(3):
            backend = fresh(kind, tmp_path, "migrate-%d" % round_)
            try:
                applied = start_together(pool, migrate_at_once, [(backend.url,)] * 8, tmp_path)
                # One process did the work (every migration), the others went on.
                assert sorted(applied) == [0] * 7 + [len(MIGRATION_FILES)]
            finally:
                backend.close()
            backend = fresh(kind, tmp_path, "cli-%d" % round_)
            try:
                results = start_together(pool, cli_at_once, [(backend.url,)] * 8, tmp_path)
                assert results == [(0, "")] * 8, results
            finally:
                backend.close()


# -- one bad row must not take the store down --------------------------------------------------

BAD_CONFIGURATIONS = ["null", "[1, 2]", '"text"', "42"]


@pytest.mark.parametrize("stored", BAD_CONFIGURATIONS)
def test_a_model_whose_configuration_is_not_an_object(backend, stored):
    psai.migrate()
    good, bad, a = model("good"), model("bad"), agent()
    a.ai_models.add([good, bad])
    record_usage(bad, a, tokens_in=100, tokens_out=10)
    raw('UPDATE "ps_ai_models" SET "configuration" = ? WHERE "id" = ?', (stored, bad.id))
    listed = run(backend, "models", "list")
    assert "good" in listed.stdout and "bad" in listed.stdout
    assert "model %d: configuration is not a JSON object" % bad.id in listed.stderr
    dumped = json.loads(run(backend, "models", "list", "--json").stdout)
    assert [m["name"] for m in dumped] == ["good", "bad"] and dumped[1]["configuration"] == json.loads(stored)
    run(backend, "models", "history", "bad")
    for by in ("model", "agent", "tree", "provider", "day"):
        run(backend, "usage", "report", "--by", by)
    assert "cannot be priced" in run(backend, "cost", str(bad.id), "--in", "1", "--out", "1", code=2).stderr
    record_usage(bad, a, tokens_in=5, tokens_out=5)  # recorded; reported unpriced
    [unpriced] = [r for r in cost_report("model") if r["model_id"] == bad.id and r["cost"] is None]
    assert unpriced["unpriced_tokens"] == 10
    run(backend, "agents", "list")
    run(backend, "export")
    checked = run(backend, "check", code=1).stdout
    assert "ps_ai_models  %d" % bad.id in checked
    # A bad row can be fixed: a whole configuration replaces it.
    PsAiModel.get_by_id(bad.id).update_configuration(make_configuration())
    assert run(backend, "check").stdout.strip() == "every row is fine"


@pytest.mark.parametrize("stored", BAD_CONFIGURATIONS)
def test_an_agent_whose_configuration_is_not_an_object(backend, stored):
    psai.migrate()
    m, bad = model(), agent("bad")
    agent("good")
    record_usage(m, bad, tokens_in=100, tokens_out=10)
    raw('UPDATE "ps_agents" SET "configuration" = ? WHERE "id" = ?', (stored, bad.id))
    listed = run(backend, "agents", "list")
    assert "good" in listed.stdout and "agent %d: configuration is not a JSON object" % bad.id in listed.stderr
    run(backend, "agents", "show", str(bad.id))
    run(backend, "export")
    for by in ("agent", "tree"):
        rows = json.loads(run(backend, "usage", "report", "--by", by, "--json").stdout)
        assert [r["agent_name"] for r in rows] == [None]
    assert "ps_agents" in run(backend, "check", code=1).stdout


def test_links_and_usage_that_point_to_missing_rows(db, backend):
    m, a = model(), agent()
    a.ai_models.add(m)
    record_usage(m, a, tokens_in=100, tokens_out=10)
    without_foreign_keys('INSERT INTO "AgentModels" ("agent_id", "ai_model_id") VALUES (?, ?)', (a.id, 999))
    without_foreign_keys('INSERT INTO "ps_model_usage" ("user_id", "model_id", "agent_id", "created_at", '
                         '"updated_at", "token_in_count") VALUES (1, 998, ?, ?, ?, 500)',
                         (a.id, PsModelUsage.created_at.db_value(datetime.datetime.now(datetime.timezone.utc)),
                          PsModelUsage.created_at.db_value(datetime.datetime.now(datetime.timezone.utc))))
    assert json.loads(run(backend, "agents", "list", "--json").stdout)[0]["ai_models"][0]["id"] == m.id
    rows = cost_report("model")
    assert {(r["model_id"], r["cost"] is None, r["unpriced_tokens"]) for r in rows} == {
        (m.id, False, 0), (998, True, 500)}
    from psai._check import check
    found = {(row["table"], row["problem"].split(" ")[0]) for row in check()}
    assert ("AgentModels", "links") in found and ("ps_model_usage", "model") in found


def test_a_configuration_nested_900_deep(db, backend):
    m, a = model("deep"), agent()
    deep = {"prices": 1}
    for _ in range(900):
        deep = {"x": deep}
    raw('UPDATE "ps_ai_models" SET "configuration" = ? WHERE "id" = ?', (json.dumps(deep), m.id))
    raw('UPDATE "ps_agents" SET "configuration" = ? WHERE "id" = ?', (json.dumps(deep), a.id))
    assert "nested deeper than 64 levels" in run(backend, "models", "list").stderr.lower()
    run(backend, "models", "list", "--json")
    run(backend, "agents", "list")
    run(backend, "export")
    assert "Nested deeper" in run(backend, "check", code=1).stdout


def test_negative_counters_are_unpriced_never_subtracted(db):
    m = model()
    record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    raw('INSERT INTO "ps_model_usage" ("user_id", "model_id", "created_at", "updated_at", "token_in_count", '
        '"token_out_count") VALUES (1, ?, ?, ?, -500000, 10)',
        (m.id, PsModelUsage.created_at.db_value(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)),
         PsModelUsage.created_at.db_value(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))))
    totals = report_totals(cost_report("model"))
    assert totals["USD"]["cost"] == Decimal(30) and totals["USD"]["tokens_in"] == 1_000_000
    assert totals[None]["unpriced_tokens"] == 10
    [row] = [r for r in cost_report("day") if r["cost"] is None]
    assert "negative token counters" in row["unpriced_reason"]


@pytest.mark.parametrize("counts", [{"tokensIn": -5}, {"tokensIn": 1e300}, {"tokensOut": 1e300},
                                    {"cachedInTokens": -1}, {"reasoningTokens": 2147483648}])
def test_items_whose_counts_are_negative_or_huge_are_named_and_never_priced(db, backend, counts):
    """Before: `psai check` said nothing, and the strict report priced them
    at $0 (negative) or 2.5E+294 USD (1e300 tokens)."""
    m = model()
    record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    [good] = PsModelUsageItem.select()
    data = dict(good.data, usageNormalized=dict(good.data["usageNormalized"], **counts))
    odd = PsModelUsageItem.create(user_id=1, model_id=m.id, agent_id=0, data=data, created_at=good.created_at)
    [named] = [f for f in check() if f["table"] == "ps_model_usage_item"]
    assert named["id"] == odd.id and "token counts below 0 or beyond 2147483647" in named["problem"]
    assert "token counts below 0 or beyond" in run(backend, "check", code=1).stdout
    with pytest.raises(psai.UnpricedUsageError):
        cost_report("model", strict=True)
    totals = report_totals(cost_report("model"))
    assert totals["USD"]["cost"] == Decimal(30) and totals["USD"]["tokens_in"] == 1_000_000
    [unpriced] = [r for r in cost_report("model") if r["cost"] is None]
    assert "no usable token counts" in unpriced["unpriced_reason"]


@pytest.mark.parametrize("counts", [{"cacheWrite12hTokens": -5}, {"cacheWrite12hTokens": 1e300},
                                    {"audioInTokens": -1}, {"audioInTokens": 2147483648},
                                    {"cacheWrite1hTokens": -1}, {"cacheWriteTokens": 1e300}, {"webSearches": -2}])
def test_items_whose_psai_counts_are_negative_or_huge_are_named_and_never_priced(db, backend, counts):
    """The counts of an item's psai part that reports price (12-hour cache
    writes, audio input, ...) as the others: before, a 12-hour write or audio
    count of -5 or 1e300 was priced (by the report and the rollups' trigger)
    and `psai check` said nothing."""
    m = model()
    record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    [good] = PsModelUsageItem.select()
    data = dict(good.data, psai=dict(good.data.get("psai") or {}, **counts))
    odd = PsModelUsageItem.create(user_id=1, model_id=m.id, agent_id=0, data=data, created_at=good.created_at)
    [named] = [f for f in check() if f["table"] == "ps_model_usage_item"]
    assert named["id"] == odd.id and "token counts below 0 or beyond 2147483647" in named["problem"]
    assert "token counts below 0 or beyond" in run(backend, "check", code=1).stdout
    with pytest.raises(psai.UnpricedUsageError):
        cost_report("model", strict=True)
    for rows in (cost_report("model"), cost_report("day")):  # by model from the items, by day from the rollups
        totals = report_totals(rows)
        assert totals["USD"]["cost"] == Decimal(30) and totals["USD"]["tokens_in"] == 1_000_000
        [unpriced] = [r for r in rows if r["cost"] is None]
        assert "no usable token counts" in unpriced["unpriced_reason"]
    assert psai.rollups.verify() == []


def test_a_model_with_bad_prices_can_be_deactivated(db, backend):
    m = model()
    config = dict(m.configuration, prices=dict(m.configuration["prices"], costInTokensPerMillion="30"))
    raw('UPDATE "ps_ai_models" SET "configuration" = ? WHERE "id" = ?', (json.dumps(config), m.id))
    with pytest.raises(psai.ValidationError):
        PsAiModel.get_by_id(m.id).update_configuration({"maxTokensOut": 10})
    run(backend, "models", "deactivate", str(m.id))
    stored = PsAiModel.get_by_id(m.id).configuration
    assert stored["active"] is False and stored["prices"]["costInTokensPerMillion"] == "30"
    assert "deactivate" not in run(backend, "check", code=1).stdout


# -- odd timestamps ---------------------------------------------------------------------------

# Stored timestamps psai cannot read as a time: text that is not one on
# SQLite; on PostgreSQL, times its timestamptz holds and Python cannot.
UNREADABLE_TIMES = {"sqlite": ["yesterday", "", "0044-03-15 12:00:00+00 BC", 10 ** 12],
                    "postgres": ["0044-03-15 12:00:00+00 BC", "10000-06-01 00:00:00+00"]}
# (table, column) of every timestamp psai reads.
TIME_COLUMNS = [("ps_ai_models", "created_at"), ("ps_agents", "updated_at"), ("ps_model_usage", "created_at"),
                ("ps_model_usage_item", "created_at"), ("psai_price_versions", "valid_from"),
                ("psai_price_corrections", "applied_at")]


def odd_time_store():
    """A model and an agent with usage, a price change and a correction:
    a row in every table that has a timestamp."""
    good, m, a = model("good"), model("odd"), agent()
    a.ai_models.add([good, m])
    record_usage(m, a, tokens_in=1000, tokens_out=10)
    record_usage(good, a, tokens_in=1000, tokens_out=10)
    m.update_configuration({"prices": {"costInTokensPerMillion": 40}})
    psai.reprice(m, {"costInTokensPerMillion": 35}, dry_run=False)
    return good, m, a


def row_of(table, m, a):
    """The id of ``table``'s row that belongs to model ``m`` (agent ``a``)."""
    if table == "ps_agents":
        return a.id
    if table == "ps_ai_models":
        return m.id
    return raw('SELECT MIN("id") FROM "%s" WHERE "model_id" = ?' % table, (m.id,)).fetchone()[0]


@pytest.mark.parametrize("table, column", TIME_COLUMNS)
def test_a_stored_timestamp_psai_cannot_read(db, backend, tmp_path, table, column):
    good, m, a = odd_time_store()
    row_id = row_of(table, m, a)
    target = make_backend("sqlite", tmp_path)
    for stored in UNREADABLE_TIMES[backend.kind]:
        raw('UPDATE "%s" SET "%s" = ? WHERE "id" = ?' % (table, column), (stored, row_id))
        results = [run(backend, *args) for args in (
            ["models", "list"], ["models", "list", "--json"], ["agents", "list"], ["agents", "list", "--json"],
            ["models", "show", str(m.id)], ["models", "history", "odd"], ["models", "history", "odd", "--json"],
            ["usage", "report", "--by", "model"], ["usage", "report", "--by", "day", "--json"],
            ["usage", "report", "--by", "agent", "--since", "2000-01-01"],
            ["usage", "report", "--html", str(tmp_path / "report.html")])]
        assert not any("Traceback" in r.output for r in results)
        if table in ("ps_ai_models", "ps_agents"):
            kind = "model" if table == "ps_ai_models" else "agent"
            flag = "%s %d: %s cannot be read as a time" % (kind, row_id, column)
            assert flag in results[0 if kind == "model" else 2].stderr
            listed = json.loads(results[1 if kind == "model" else 3].stdout)
            [shown] = [r for r in listed if r["id"] == row_id]
            assert shown[column] == str(stored) and column in shown["problem"]
            exported = json.loads(run(backend, "export").stdout)[table]
            assert [r[column] for r in exported if r["id"] == row_id] == [str(stored)]  # as stored
        if table == "ps_ai_models":  # a save writes the value back as it was
            run(backend, "models", "deactivate", str(row_id))
            assert PsAiModel.get_by_id(row_id).created_at == str(stored)
        checked = json.loads(run(backend, "check", "--json", code=1).stdout)
        assert [(c["table"], c["id"]) for c in checked if column in c["problem"]] == [(table, row_id)], checked
        refused = run(backend, "copy", "--from", backend.url, "--to", target.url, code=2)
        assert "%s" % table in refused.stderr and str(row_id) in refused.stderr and column in refused.stderr
    # the rest of the store was never in doubt
    raw('UPDATE "%s" SET "%s" = ? WHERE "id" = ?' % (table, column),
        (PsModelUsage.created_at.db_value(datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)), row_id))
    assert run(backend, "check").stdout.strip() == "every row is fine"
    run(backend, "copy", "--from", backend.url, "--to", target.url)


def test_counters_whose_time_cannot_be_read_are_unpriced_with_the_reason(db, backend):
    """Counter rows without items (a PolicySynth before items) are priced by
    the prices in force at their time: without one, they are unpriced."""
    m = model()
    stamp = PsModelUsage.created_at.db_value(datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc))
    for created_at in (stamp, UNREADABLE_TIMES[backend.kind][0]):
        raw('INSERT INTO "ps_model_usage" ("user_id", "model_id", "created_at", "updated_at", "token_in_count") '
            'VALUES (1, ?, ?, ?, 1000000)', (m.id, created_at, stamp))
    for by in ("model", "day", "agent"):
        rows = cost_report(by)
        assert sorted((r["cost"], r["unpriced_tokens"]) for r in rows if r["cost"] is None) == [(None, 1_000_000)]
        [unpriced] = [r for r in rows if r["cost"] is None]
        assert "created_at cannot be read as a time" in unpriced["unpriced_reason"]
        assert report_totals(rows)["USD"]["cost"] == Decimal(30)
    # With a period the row is selected by SQL on its stored value, and is never priced either way.
    windowed = cost_report("model", since="2026-10-01")
    assert [r["cost"] for r in windowed if r["currency"] == "USD"] == [Decimal(30)]
    assert all(r["cost"] is None and "cannot be read" in r["unpriced_reason"] for r in windowed if not r["currency"])
    assert "created_at cannot be read" in run(backend, "usage", "report", "--strict", code=1).stderr


@pytest.mark.parametrize("table, column", TIME_COLUMNS)
def test_a_unix_time_is_read_and_named_by_check(tmp_path, table, column):
    """A Unix time in seconds, as people write on SQLite by hand, is read as
    that time; `check` names it (reports' periods, in SQL, compare the
    stored text); `copy` writes it as psai's ISO text."""
    source, target = make_backend("sqlite", tmp_path / "source"), make_backend("sqlite", tmp_path)
    (tmp_path / "source").mkdir()
    source.connect()
    try:
        psai.migrate()
        good, m, a = odd_time_store()
        row_id = row_of(table, m, a)
        raw('UPDATE "%s" SET "%s" = ? WHERE "id" = ?' % (table, column), (1700000000, row_id))
        for args in (["models", "list"], ["agents", "list"], ["models", "history", "odd"], ["export"],
                     ["usage", "report", "--by", "day"]):
            assert "Traceback" not in run(source, *args).output
        if table in ("ps_ai_models", "ps_agents"):
            listed = json.loads(run(source, "models" if table == "ps_ai_models" else "agents", "list", "--json").stdout)
            [shown] = [r for r in listed if r["id"] == row_id]
            assert shown[column] == "2023-11-14T22:13:20+00:00" and "problem" not in shown
        [named] = json.loads(run(source, "check", "--json", code=1).stdout)
        assert (named["table"], named["id"]) == (table, row_id)
        assert "%s is stored as a Unix time (1700000000), read as 2023-11-14T22:13:20+00:00" % column \
            in named["problem"]
        run(source, "copy", "--from", source.url, "--to", target.url)
    finally:
        source.close()
    target.connect()
    try:
        assert run(target, "check").stdout.strip() == "every row is fine"
    finally:
        target.close()


# Times Python holds whose UTC falls outside years 1-9999: PostgreSQL would
# store them (year 10000, 1 BC) where nothing could read them back.
OUT_OF_RANGE_TIMES = ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"]


@pytest.mark.parametrize("moment", OUT_OF_RANGE_TIMES)
def test_psai_never_writes_a_time_it_cannot_read(db, backend, tmp_path, moment):
    m = model()
    record_usage(m, None, tokens_in=1000, tokens_out=10)
    before = run(backend, "export").stdout
    exported = json.loads(before)
    row = dict(exported["ps_ai_models"][0], id=7, uuid=str(uuid.uuid4()), name="new", created_at=moment)
    document = tmp_path / "import.json"
    document.write_text(json.dumps({"ps_ai_models": [row], "ps_agents": [], "AgentModels": []}))
    refused = run(backend, "import", str(document), code=2)
    assert "ps_ai_models.0.created_at: Out of range: in UTC it falls outside the years 1 to 9999." \
        in refused.stderr and "Traceback" not in refused.output
    for option in ("--since", "--until"):
        refused = run(backend, "models", "reprice", str(m.id), "--set", "costInTokensPerMillion=1", option, moment,
                      "--apply", code=2)
        assert "%s: Out of range" % option[2:] in refused.stderr and "Traceback" not in refused.output
        for args in (["usage", "report"], ["audit"]):
            assert "%s: Out of range" % option[2:] in run(backend, *args, option, moment, code=2).stderr
    with pytest.raises(psai.ValidationError, match="created_at: Out of range"):
        PsAiModel.create(user_id=1, organization_id=2, name="api", configuration=make_configuration(),
                         created_at=datetime.datetime.fromisoformat(moment))
    assert run(backend, "export").stdout == before
    assert raw('SELECT COUNT(*) FROM "psai_price_corrections"').fetchone()[0] == 0
    assert run(backend, "check").stdout.strip() == "every row is fine"


# -- hostile input ----------------------------------------------------------------------------

HUGE = 10 ** 400


@pytest.mark.parametrize("path", ["maxTokensOut", "defaultTemperature", "prices.costInTokensPerMillion",
                                  "prices.longContextTokenThreshold"])
def test_integers_beyond_float_range_are_a_validation_error(db, path):
    config = make_configuration()
    target = config
    *parents, last = path.split(".")
    for part in parents:
        target = target[part]
    target[last] = HUGE
    with pytest.raises(psai.ValidationError, match=path.replace(".", r"\.")):
        PsAiModel.create(user_id=1, organization_id=1, name="x", configuration=config)
    with pytest.raises(psai.ValidationError, match="tokens_in"):
        record_usage(model(), None, tokens_in=HUGE, tokens_out=1)
    with pytest.raises(psai.ValidationError, match="tokens_in"):
        psai.usage.model_cost(model(), tokens_in=HUGE, tokens_out=1)


def test_one_bad_litellm_entry_is_reported_not_fatal(db, tmp_path):
    from psai.catalog import import_catalog
    good = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "max_output_tokens": 100,
            "litellm_provider": "openai", "mode": "chat"}
    path = tmp_path / "cost_map.json"
    # HUGE is an integer past float range: JSON text can carry it.
    path.write_text(json.dumps({"good": good, "huge": dict(good, input_cost_per_token=HUGE,
                                                           cache_creation_input_token_cost=HUGE * 3)}))
    result = import_catalog("litellm", file=str(path), user_id=1, organization_id=1, size="small")
    assert [m["source_model"] for m in result["models"]] == ["good"] and "huge" in result["skipped"]


def test_ids_that_are_not_ids(db, backend):
    for key in ("²", "١٢", "10" * 10, str(2 ** 63), "0"):
        result = run(backend, "models", "show", key, code=1)
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    for field in ("user_id", "organization_id"):
        with pytest.raises(psai.ValidationError, match=field):
            PsAiModel.create(**dict(dict(user_id=1, organization_id=1), **{field: 2 ** 31}), name="x",
                             configuration=make_configuration())
    with pytest.raises(psai.ValidationError, match="user_id"):
        record_usage(model(), None, tokens_in=1, tokens_out=1, user_id="evil")
    with pytest.raises(psai.ValidationError, match="connector_id"):
        record_usage(model(), None, tokens_in=1, tokens_out=1, connector_id=2 ** 40)
    assert PsModelUsage.select().count() == 0
    with pytest.raises(psai.ValidationError, match="2\\*\\*53"):
        PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"budget": HUGE})


def test_json_nested_deeper_than_the_limit_is_refused(db, backend, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    for args in (["models", "add", "--name", "x", "--user-id", "1", "--organization-id", "1", "--file", str(path)],
                 ["models", "update", "1", "--file", str(path)], ["import", str(path)],
                 ["agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1",
                  "--configuration", '{"a":' * 100 + "1" + "}" * 100]):
        result = run(backend, *args, code=2)
        assert "Nested deeper than" in result.stderr and "Traceback" not in result.output


def test_dates_and_periods(db, backend):
    record_usage(model(), None, tokens_in=100, tokens_out=1)
    assert json.loads(run(backend, "usage", "report", "--until", "9999-12-31", "--json").stdout)[0]["calls"] == 1
    for bad in (5, [2026], "2026-13-01"):
        with pytest.raises(psai.ValidationError, match="since"):
            cost_report("model", since=bad)


def test_api_type_errors_are_validation_errors(db):
    m, a = model(), agent()
    a.ai_models.add(m)
    with pytest.raises(psai.ValidationError, match="size"):
        a.select_model("text", ["large"])
    with pytest.raises(psai.ValidationError, match="changes"):
        m.update_configuration(None)
    from psai._transfer import import_data
    with pytest.raises(psai.ValidationError, match="agent_id"):
        import_data({"ps_ai_models": [], "ps_agents": [], "AgentModels": [{"agent_id": [1], "ai_model_id": 1}]})
    for tokens in ("5", float("nan"), True):
        with pytest.raises(psai.ValidationError, match="tokens_in"):
            psai.usage.model_cost(m, tokens_in=tokens, tokens_out=1)


@pytest.mark.parametrize("count", [78, 500, 5000])
def test_list_filters_scale(db, count):
    for name in ("a", "b", "c"):
        model(name, model=name)
    model("n", model="n", maxTokensOut=7)
    wanted = ["m%d" % i for i in range(count)] + ["a", "c"]
    assert sorted(m.name for m in PsAiModel.where_config(model=wanted)) == ["a", "c"]
    numbers = list(range(10_000, 10_000 + count)) + [7]  # the seed has maxTokensOut 4096
    assert [m.name for m in PsAiModel.where_config(maxTokensOut=numbers)] == ["n"]
    # Types still matter: "7" is not 7, and true is not 1.
    assert list(PsAiModel.where_config(maxTokensOut=["7"] * 3 + [True])) == []


def test_lone_surrogates_are_refused_on_write_and_survive_reading(db, backend):
    with pytest.raises(psai.ValidationError, match="surrogate"):
        agent("bad \ud800 name")
    with pytest.raises(psai.ValidationError, match="surrogate"):
        model("bad \udfff")
    if not is_postgres():  # SQLite alone stores one, when written by hand
        a = agent("fine")
        raw('UPDATE "ps_agents" SET "configuration" = ? WHERE "id" = ?',
            (json.dumps({"name": "bad \ud800"}), a.id))
        listed = run(backend, "agents", "list")
        assert listed.stdout.splitlines()[2].startswith(str(a.id)) and "lone surrogate" in listed.stderr
        assert "\\ud800" in run(backend, "export").stdout


def test_a_float_price_past_2_to_53_is_refused_on_both_backends(db):
    with pytest.raises(psai.ValidationError, match="costInTokensPerMillion"):
        model(prices=dict(make_configuration()["prices"], costInTokensPerMillion=1e16))


# -- nothing lost, nothing leaked ----------------------------------------------------------------

def test_a_failed_export_leaves_the_old_backup_whole(db, backend, tmp_path, monkeypatch):
    model()
    backup = tmp_path / "backup.json"
    backup.write_text("the old backup\n")
    import psai.cli as cli_module
    monkeypatch.setattr(cli_module, "json_text", lambda value, **options: "cannot be written \ud800")
    result = CliRunner().invoke(cli, ["--database", backend.url, "export", "-o", str(backup)])
    assert result.exit_code != 0
    assert backup.read_text() == "the old backup\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".backup")) == []
    monkeypatch.undo()
    run(backend, "export", "-o", str(backup))
    assert json.loads(backup.read_text())["ps_ai_models"][0]["name"] == "GPT-4"


@pytest.mark.parametrize("url, secret", [
    ("postgresql://nobody@127.0.0.1:1/x?password=Sekr1tPw", "Sekr1tPw"),
    ("postgresql://nobody@127.0.0.1:1/x?sslpassword=Sekr1tPw&sslmode=require", "Sekr1tPw"),
    ("postgresql://nobody:Sek%23r1t@127.0.0.1:1/x", "Sek#r1t"),
    ("postgresql://nobody:Sek#r1t/pw@127.0.0.1:1/x", "Sek"),
    ("postgresql://nobody:Sek/r1t@127.0.0.1:1/x", "Sek"),
])
def test_secrets_never_reach_a_message(url, secret, monkeypatch):
    pytest.importorskip("psycopg2")
    for args, env in ((["--database", url], {}), ([], {"PSAI_DATABASE_URL": url})):
        result = CliRunner().invoke(cli, args + ["models", "list"], env=env)
        assert result.exit_code == 1 and secret not in result.output, result.output
        assert "cannot connect to postgresql://nobody" in result.stderr and "127.0.0.1:1" in result.stderr
    with pytest.raises(psai.DatabaseUnavailableError) as raised:
        psai.connect(url)
    assert secret not in str(raised.value)
    assert secret not in psai.redact_url(url)


def test_a_password_that_spells_part_of_the_host_leaves_the_host_alone():
    pytest.importorskip("psycopg2")
    with pytest.raises(psai.DatabaseUnavailableError) as raised:
        psai.connect("postgresql://nobody:127@127.0.0.1:1/x")
    assert "127.0.0.1" in str(raised.value) and "***.0.0.1" not in str(raised.value)
    assert psai.redact_url("postgresql://nobody:127@127.0.0.1:1/x") == "postgresql://nobody:***@127.0.0.1:1/x"


def test_a_number_past_pythons_digit_limit_in_a_file_is_one_line_and_writes_nothing(db, backend, tmp_path):
    """Before: `models add --file` and `import` of JSON holding a whole number
    of more than 4,300 digits ended in a ValueError traceback."""
    huge = "9" * 5000
    configuration = tmp_path / "configuration.json"
    configuration.write_text(json.dumps(make_configuration()).replace("4096", huge))
    export = tmp_path / "export.json"
    export.write_text('{"version": 1, "ps_ai_models": [{"id": %s}]}' % huge)
    added = run(backend, "models", "add", "Huge", "--user-id", "1", "--organization-id", "2",
                "--file", str(configuration), code=2)
    imported = run(backend, "import", str(export), code=2)
    for result in (added, imported):
        assert "A number too long to read" in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert PsAiModel.select().count() == 0
