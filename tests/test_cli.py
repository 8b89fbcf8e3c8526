"""The psai command: every command through click's CliRunner on a SQLite file,
the main paths on PostgreSQL too, and a real subprocess."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel, PsModelUsage
from psai.cli import cli
from psai.schemas import PsAiModelSchema

from conftest import SEED_CONFIGURATION, make_backend


@pytest.fixture
def run(tmp_path):
    """run(*args) → click Result, against a fresh SQLite file."""
    url = "sqlite:///%s" % (tmp_path / "cli.db")
    runner = CliRunner()

    def invoke(*args, input=None, database=url):
        result = runner.invoke(cli, ["--database", database, *args], input=input, catch_exceptions=False)
        psai.connect(database)  # the test reads the same database afterwards
        return result
    invoke.url = url
    return invoke


@pytest.fixture(params=["sqlite", "postgres"])
def run_on_both(request, tmp_path):
    backend = make_backend(request.param, tmp_path)
    runner = CliRunner()

    def invoke(*args, input=None):
        result = runner.invoke(cli, ["--database", backend.url, *args], input=input, catch_exceptions=False)
        psai.connect(backend.url)
        return result
    yield invoke
    backend.close()


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SEED_CONFIGURATION))
    return str(path)


def add_model(run, config_file, name="GPT-4", *extra):
    result = run("models", "add", "--name", name, "--user-id", "1", "--organization-id", "2",
                 "--file", config_file, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def counts():
    return (PsAiModel.select().count(), PsAgent.select().count(), PsModelUsage.select().count(),
            [m.configuration for m in PsAiModel.select().order_by(PsAiModel.id)])


def assert_bad(result, code, message):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output


# -- init, demo --------------------------------------------------------------------

def test_init_is_idempotent(run):
    first = run("init")
    assert first.exit_code == 0 and "0001_initial" in first.stdout
    assert run("init").stdout.strip() == "schema is up to date"


def test_demo_stores_its_catalog_once(run, tmp_path):
    page = tmp_path / "page.html"
    first = run("demo", "--html", str(page))
    assert first.exit_code == 0 and page.exists()
    assert PsAiModel.get_by_id(1).configuration == SEED_CONFIGURATION  # what the examples of the docs use
    run("demo", "--html", str(page))
    assert PsAiModel.select().count() == 5 and PsAgent.select().count() == 3


@pytest.mark.parametrize("url", ["mysql://root:hunter2@localhost/db", "postgresql://u:hunter2@127.0.0.1:5432"])
def test_bad_database_url_is_bad_input_without_password(run, url):
    result = CliRunner().invoke(cli, ["--database", url, "models", "list"])
    assert_bad(result, 2, "Error: ")
    assert "hunter2" not in result.output


def test_unreachable_database_is_a_failure_without_password():
    result = CliRunner().invoke(cli, ["--database", "postgresql://u:hunter2@127.0.0.1:1/x", "init"])
    assert_bad(result, 1, "cannot connect to postgresql://u:***@127.0.0.1:1/x")
    assert "hunter2" not in result.output and len(result.stderr.strip().splitlines()) == 1


# -- models --------------------------------------------------------------------------

def test_models_add_list_show_json_is_the_schema_dump(run_on_both, tmp_path):
    run = run_on_both
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SEED_CONFIGURATION))
    added = add_model(run, str(config))
    assert added == PsAiModelSchema().dump(PsAiModel.get_by_id(added["id"]))
    listed = json.loads(run("models", "list", "--json").stdout)
    assert listed == PsAiModelSchema(many=True).dump(PsAiModel.select().order_by(PsAiModel.id))
    # show adds where the prices came from (None: typed in, not imported from a catalog).
    by_uuid = json.loads(run("models", "show", added["uuid"], "--json").stdout)
    assert by_uuid == dict(added, provenance=None)
    assert json.loads(run("models", "show", str(added["id"]), "--json").stdout) == by_uuid


def test_models_add_from_stdin_and_from_flags(run):
    result = run("models", "add", "--name", "GPT-4", "--user-id", "1", "--organization-id", "2", "--file", "-",
                 input=json.dumps(SEED_CONFIGURATION))
    assert result.exit_code == 0 and "GPT-4" in result.stdout
    result = run("models", "add", "--name", "Haiku", "--user-id", "1", "--organization-id", "2",
                 "--type", "text", "--size", "small", "--model", "claude-haiku", "--provider", "anthropic",
                 "--in-price", "1", "--out-price", "5", "--cached-price", "0.1", "--currency", "USD",
                 "--max-tokens-out", "8192", "--temperature", "0.5", "--json")
    config = json.loads(result.stdout)["configuration"]
    assert config["prices"] == {"costInTokensPerMillion": 1, "costOutTokensPerMillion": 5,
                                "costInCachedContextTokensPerMillion": 0.1, "currency": "USD"}
    assert config["active"] is True and config["modelSize"] == "small"


def test_models_add_supersedes_and_history(run, config_file):
    first = add_model(run, config_file)
    second = add_model(run, config_file, "GPT-4", "--in-price", "20")
    assert PsAiModel.get_by_id(first["id"]).configuration["active"] is False
    assert second["configuration"]["prices"]["costInTokensPerMillion"] == 20
    history = json.loads(run("models", "history", "GPT-4", "--json").stdout)
    assert [(v["model_id"], v["prices"]["costInTokensPerMillion"], v["valid_to"]) for v in history] == [
        (first["id"], 30, None), (second["id"], 20, None)]


def test_models_list_filters_and_formats(run, config_file):
    add_model(run, config_file, "GPT-4")
    run("models", "add", "--name", "Claude", "--user-id", "1", "--organization-id", "2", "--file", config_file,
        "--provider", "anthropic", "--size", "medium")
    run("models", "add", "--name", "Old", "--user-id", "1", "--organization-id", "2", "--file", config_file,
        "--inactive")

    def names(*args):
        return [m["name"] for m in json.loads(run("models", "list", "--json", *args).stdout)]
    assert names() == ["GPT-4", "Claude", "Old"]
    assert names("--provider", "anthropic") == ["Claude"]
    assert names("--size", "large", "--active") == ["GPT-4"]
    assert names("--inactive") == ["Old"]
    assert names("--type", "text", "--name", "Claude") == ["Claude"]
    table = run("models", "list").stdout.splitlines()
    assert table[0].split() == ["id", "name", "provider", "type", "size", "model", "active", "in", "out",
                                "cached", "currency"]
    assert len(table) == 5
    csv_lines = run("models", "list", "--csv").stdout.splitlines()
    assert csv_lines[0] == "id,uuid,created_at,updated_at,user_id,organization_id,name,configuration"
    assert len(csv_lines) == 4
    show = run("models", "show", "1").stdout
    assert "configuration.prices.currency" in show and "USD" in show


def test_models_update_deactivate_delete(run, config_file):
    model = add_model(run, config_file)
    result = run("models", "update", str(model["id"]), "--set", "prices.costInTokensPerMillion=25",
                 "--set", "provider=azure", "--name", "GPT-4 (Azure)", "--json")
    updated = json.loads(result.stdout)
    assert updated["configuration"]["prices"]["costInTokensPerMillion"] == 25
    assert updated["configuration"]["provider"] == "azure" and updated["name"] == "GPT-4 (Azure)"
    assert run("models", "deactivate", model["uuid"]).exit_code == 0
    assert PsAiModel.get_by_id(model["id"]).configuration["active"] is False
    assert run("models", "delete", str(model["id"])).exit_code == 0
    assert PsAiModel.select().count() == 0


# -- bad input: message, exit code, nothing changed ----------------------------------

def test_models_bad_input(run, config_file, tmp_path):
    model = add_model(run, config_file)
    before = counts()
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps(dict(SEED_CONFIGURATION, modelSize="huge")))
    not_json = tmp_path / "not.json"
    not_json.write_text("{nope")
    base = ["models", "add", "--name", "X", "--user-id", "1", "--organization-id", "2"]
    cases = [
        (base + ["--file", str(bad_config)], 2, "configuration.modelSize: Must be one of"),
        (base + ["--file", str(not_json)], 2, "Not JSON"),
        (base + ["--file", str(tmp_path / "missing.json")], 2, "No such file"),
        (base + ["--file", config_file, "--in-price", "-1"], 2, "--in/--in-price: "),
        (base + ["--file", config_file, "--in-price", "lots"], 2, "'lots' is not a number"),
        (base + ["--type", "text"], 2, "give --provider, --model, --in, --out"),
        (["models", "add", "--file", config_file], 2, "Missing argument 'NAME'"),
        (["models", "list", "--size", "huge"], 2, "Invalid value for '--size'"),
        (["models", "show", "999"], 1, "PsAiModel 999 does not exist"),
        (["models", "show", "gpt-4"], 1, "no model has the id, uuid or name 'gpt-4'"),
        (["models", "update", str(model["id"]), "--set", "prices.currency=usd"], 2, "prices.currency"),
        (["models", "update", str(model["id"]), "--set", "typo=1"], 2, "configuration.typo: Unknown field"),
        (["models", "update", str(model["id"]), "--set", "novalue"], 2, "Use KEY=VALUE"),
        (["models", "update", str(model["id"])], 2, "nothing to change"),
        (["models", "update", "999", "--set", "active=false"], 1, "PsAiModel 999 does not exist"),
        (["models", "deactivate", "999"], 1, "does not exist"),
        (["models", "delete", "999"], 1, "does not exist"),
        (["models", "history"], 2, "Missing argument"),
    ]
    for args, code, message in cases:
        assert_bad(run(*args), code, message)
        assert counts() == before, args


def test_deleting_a_model_with_usage_is_refused(run, config_file):
    model = add_model(run, config_file)
    run("usage", "record", str(model["id"]), "--in", "10", "--out", "5")
    before = counts()
    assert_bad(run("models", "delete", str(model["id"])), 1, "has recorded usage; deactivate it")
    assert counts() == before


# -- agents -------------------------------------------------------------------------

def test_agents_commands(run_on_both, tmp_path):
    run = run_on_both
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SEED_CONFIGURATION))
    large = add_model(run, str(config), "Large")
    small = add_model(run, str(config), "Small", "--size", "small")
    agent = json.loads(run("agents", "add", "--user-id", "1", "--class-id", "2", "--group-id", "3",
                           "--name", "Researcher", "--model", str(large["id"]), "--json").stdout)
    assert agent["configuration"] == {"name": "Researcher"} and [m["id"] for m in agent["ai_models"]] == [large["id"]]
    child = json.loads(run("agents", "add", "--user-id", "1", "--class-id", "2", "--group-id", "3",
                           "--configuration", '{"name": "Child", "depth": 1}', "--parent", agent["uuid"],
                           "--json").stdout)
    assert child["parent_agent_id"] == agent["id"]
    assert run("agents", "link", str(agent["id"]), str(small["id"]), str(small["id"])).exit_code == 0
    choices = json.loads(run("agents", "models", str(agent["id"]), "--json").stdout)
    assert [(c["size"], c["name"]) for c in choices] == [("large", "Large"), ("medium", "Large"),
                                                        ("small", "Small")]
    assert run("agents", "unlink", str(agent["id"]), str(large["id"])).exit_code == 0
    shown = json.loads(run("agents", "show", str(agent["id"]), "--json").stdout)
    assert [m["id"] for m in shown["ai_models"]] == [small["id"]]
    listed = json.loads(run("agents", "list", "--json").stdout)
    assert [a["id"] for a in listed] == [agent["id"], child["id"]]
    assert "Researcher" in run("agents", "list").stdout
    assert "configuration.name" in run("agents", "show", str(child["id"])).stdout


def test_agents_bad_input(run, config_file):
    model = add_model(run, config_file)
    run("agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--name", "A")
    before = counts()
    cases = [
        (["agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--configuration", "[1]"],
         2, "configuration: Must be a JSON object"),
        (["agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--configuration", "{"],
         2, "configuration: Not JSON"),
        (["agents", "add", "--user-id", "x", "--class-id", "1", "--group-id", "1"], 2, "'x' is not a valid integer"),
        (["agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--parent", "42"],
         1, "PsAgent 42 does not exist"),
        (["agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--model", "42"],
         1, "PsAiModel 42 does not exist"),
        (["agents", "link", "1", str(model["id"]), "42"], 1, "PsAiModel 42 does not exist"),
        (["agents", "link", "42", str(model["id"])], 1, "PsAgent 42 does not exist"),
        (["agents", "link", "1"], 2, "Missing argument"),
        (["agents", "unlink", "42", "1"], 1, "PsAgent 42 does not exist"),
        (["agents", "show", "42"], 1, "PsAgent 42 does not exist"),
        (["agents", "models", "1"], 0, ""),
        (["agents", "models", "42"], 1, "PsAgent 42 does not exist"),
    ]
    for args, code, message in cases:
        result = run(*args)
        if code:
            assert_bad(result, code, message)
        assert counts() == before, args


# -- cost and usage ------------------------------------------------------------------

def test_cost_json(run_on_both, tmp_path):
    run = run_on_both
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SEED_CONFIGURATION))
    model = add_model(run, str(config))
    result = json.loads(run("cost", model["uuid"], "--in", "1000000", "--out", "1000000", "--json").stdout)
    assert result["cost"] == 90 and result["currency"] == "USD"
    assert result["parts"]["input"] == 30 and result["parts"]["output"] == 60
    assert result["counters"]["token_in_count"] == 1_000_000
    table = run("cost", str(model["id"]), "--in", "1000000", "--out", "0", "--cached", "500000").stdout
    assert "total" in table and "20.0" in table


def test_cost_tier_and_region_flags(run, tmp_path):
    config = dict(SEED_CONFIGURATION, prices=dict(SEED_CONFIGURATION["prices"], flexTokensIn=15,
                                                  regionalProcessingMargin=10))
    path = tmp_path / "flex.json"
    path.write_text(json.dumps(config))
    model = add_model(run, str(path))
    flex = json.loads(run("cost", str(model["id"]), "--in", "1000000", "--out", "0", "--tier", "flex",
                          "--json").stdout)
    assert flex["cost"] == 15
    eu = json.loads(run("cost", str(model["id"]), "--in", "1000000", "--out", "0", "--tier", "flex",
                        "--region", "eu", "--json").stdout)
    assert eu["cost"] == pytest.approx(16.5)


def test_usage_record_and_report(run_on_both, tmp_path):
    run = run_on_both
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SEED_CONFIGURATION))
    model = add_model(run, str(config))
    run("agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--name", "A")
    assert run("usage", "record", str(model["id"]), "--agent", "1", "--in", "1000", "--out", "200").exit_code == 0
    assert run("usage", "record", str(model["id"]), "--in", "1000", "--out", "200", "--cached", "500").exit_code == 0
    for by in ("model", "agent", "tree", "provider", "day"):
        rows = json.loads(run("usage", "report", "--by", by, "--json").stdout)
        assert rows, by
    by_agent = json.loads(run("usage", "report", "--by", "agent", "--json").stdout)
    assert {row["agent_id"]: row["cost"] for row in by_agent} == {1: "0.042", None: "0.032"}
    assert json.loads(run("usage", "report", "--since", "2999-01-01", "--json").stdout) == []
    table = run("usage", "report", "--by", "model").stdout
    assert "TOTAL" in table and " 0.07 " in table  # 0.074, rounded to cents for display
    csv_text = run("usage", "report", "--by", "provider", "--csv").stdout
    assert csv_text.splitlines()[0] == ("provider,calls,tokens_in,tokens_out,cost,currency,unpriced_tokens,"
                                        "priced_from,unpriced_reason")


def test_usage_bad_input(run, config_file):
    model = add_model(run, config_file)
    before = counts()
    cases = [
        (["usage", "record", str(model["id"]), "--in", "-5", "--out", "1"], 2, "Invalid value for '--in'"),
        (["usage", "record", str(model["id"]), "--out", "1"], 2, "Missing option '--in'"),
        (["usage", "record", "999", "--in", "1", "--out", "1"], 1, "PsAiModel 999 does not exist"),
        (["usage", "record", str(model["id"]), "--agent", "9", "--in", "1", "--out", "1"], 1, "PsAgent 9"),
        (["usage", "report", "--by", "week"], 2, "Invalid value for '--by'"),
        (["usage", "report", "--since", "yesterday"], 2, "since: Not a date or time"),
        (["cost", str(model["id"]), "--in", "x", "--out", "1"], 2, "'x' is not a valid integer"),
        (["cost", "999", "--in", "1", "--out", "1"], 1, "PsAiModel 999 does not exist"),
        (["cost", str(model["id"]), "--in", "1", "--out", "1", "--tier", "batch"], 2, "Invalid value for '--tier'"),
    ]
    for args, code, message in cases:
        assert_bad(run(*args), code, message)
        assert counts() == before, args


# -- export / import --------------------------------------------------------------------

def test_export_import_round_trip(run_on_both, tmp_path):
    run = run_on_both
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SEED_CONFIGURATION))
    run("demo", "--html", str(tmp_path / "page.html"))
    exported = tmp_path / "export.json"
    assert run("export", "-o", str(exported)).exit_code == 0
    data = json.loads(exported.read_text())
    assert len(data["ps_ai_models"]) == 5 and len(data["ps_agents"]) == 3 and len(data["AgentModels"]) == 6

    target = "sqlite:///%s" % (tmp_path / "target.db")
    runner = CliRunner()
    result = runner.invoke(cli, ["--database", target, "import", str(exported)])
    assert result.exit_code == 0 and "8 created" in result.stdout and "6 links" in result.stdout
    again = runner.invoke(cli, ["--database", target, "import", str(exported)])
    assert "0 created, 0 updated, 0 links" in again.stdout
    second = json.loads(runner.invoke(cli, ["--database", target, "export"]).stdout)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("id", "updated_at", "ai_models")} for r in rows]

    assert strip(second["ps_ai_models"]) == strip(data["ps_ai_models"])
    assert strip(second["ps_agents"]) == strip(data["ps_agents"])


def test_import_is_all_or_nothing_and_names_row_and_field(run, tmp_path):
    run("demo", "--html", str(tmp_path / "page.html"))
    data = json.loads(run("export").stdout)
    data["ps_ai_models"].append(dict(data["ps_ai_models"][0], id=99, uuid="3f1f9d1e-4a4e-4c8e-9e3b-0d6f5b1c2a77",
                                     name="second"))
    broken = json.loads(json.dumps(data))
    broken["ps_ai_models"][1]["configuration"]["prices"]["currency"] = "dollars"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    target = tmp_path / "target.db"
    result = CliRunner().invoke(cli, ["--database", "sqlite:///%s" % target, "import", str(path)])
    assert_bad(result, 2, "ps_ai_models.1.configuration.prices.currency")
    psai.connect("sqlite:///%s" % target)
    assert (PsAiModel.select().count(), PsAgent.select().count()) == (0, 0)

    dangling = json.loads(json.dumps(data))
    dangling["AgentModels"].append({"agent_id": 1, "ai_model_id": 12345})
    path.write_text(json.dumps(dangling))
    result = CliRunner().invoke(cli, ["--database", "sqlite:///%s" % target, "import", str(path)])
    assert_bad(result, 2, "AgentModels.6.ai_model_id: No model with id 12345")
    path.write_text("[1, 2]")
    result = CliRunner().invoke(cli, ["--database", "sqlite:///%s" % target, "import", str(path)])
    assert_bad(result, 2, "An import is a JSON object")
    psai.connect("sqlite:///%s" % target)
    assert (PsAiModel.select().count(), PsAgent.select().count()) == (0, 0)


# -- a real process ------------------------------------------------------------------------

def test_real_subprocess(tmp_path, config_file):
    env = dict(os.environ, PSAI_DATABASE_URL="sqlite:///%s" % (tmp_path / "proc.db"))

    def psai_process(*args, input=None):
        return subprocess.run([sys.executable, "-m", "psai", *args], input=input, capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=60)
    added = psai_process("models", "add", "--name", "GPT-4", "--user-id", "1", "--organization-id", "2",
                         "--file", "-", "--json", input=json.dumps(SEED_CONFIGURATION))
    assert added.returncode == 0, added.stderr
    listed = json.loads(psai_process("models", "list", "--json").stdout)
    assert listed == [json.loads(added.stdout)]
    bad = psai_process("models", "show", "77")
    assert bad.returncode == 1 and bad.stderr == "Error: PsAiModel 77 does not exist\n"
    usage = psai_process("models", "list", "--size", "xl")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_progress_bars_when_stderr_is_a_terminal(tmp_path, config_file):
    import pty
    url = "sqlite:///%s" % (tmp_path / "tty.db")
    env = dict(os.environ, PSAI_DATABASE_URL=url)

    def on_a_terminal(*args, stdin=None):
        master, slave = pty.openpty()
        process = subprocess.run([sys.executable, "-m", "psai", *args], stdin=stdin, stdout=subprocess.PIPE,
                                 stderr=slave, env=env, cwd=tmp_path, timeout=60)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        return process, b"".join(chunks).decode()

    subprocess.run([sys.executable, "-m", "psai", "demo"], env=env, cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "psai", "usage", "record", "1", "--in", "5", "--out", "1"],
                   env=env, cwd=tmp_path, check=True, capture_output=True)
    exported = subprocess.run([sys.executable, "-m", "psai", "export"], env=env, cwd=tmp_path, check=True,
                              capture_output=True).stdout
    (tmp_path / "export.json").write_bytes(exported)
    process, terminal = on_a_terminal("import", str(tmp_path / "export.json"))
    assert process.returncode == 0 and "checking rows" in terminal and "100%" in terminal
    process, terminal = on_a_terminal("usage", "report", "--by", "agent")
    assert process.returncode == 0 and "pricing usage" in terminal and "TOTAL" in process.stdout.decode()
    # Not a terminal: no bar at all.
    quiet = subprocess.run([sys.executable, "-m", "psai", "usage", "report"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert quiet.stderr == ""


def test_library_progress_callbacks(db):
    from psai._transfer import export_data, import_data
    from psai.usage import cost_report
    from psai._demo import seed
    seed()  # five models, three agents, six links, six calls of the three agents
    calls = []
    cost_report("agent", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    import_data(export_data(), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (14, 14) and len(calls) == 14


def test_import_allow_unknown_keys_keeps_them_on_new_rows(run, tmp_path):
    run("demo", "--html", str(tmp_path / "page.html"))
    data = json.loads(run("export").stdout)
    config = data["ps_ai_models"][0]["configuration"]
    config["someFutureKey"] = {"from": "a newer PolicySynth"}
    config["prices"]["someFuturePrice"] = 3
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    target = "sqlite:///%s" % (tmp_path / "new.db")
    refused = CliRunner().invoke(cli, ["--database", target, "import", str(path)])
    assert_bad(refused, 2, "ps_ai_models.0.configuration.someFutureKey: Unknown field")
    result = CliRunner().invoke(cli, ["--database", target, "import", "--allow-unknown-keys", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("imported: 8 created")  # the demo's five models and three agents
    psai.connect(target)
    stored = PsAiModel.get(PsAiModel.uuid == data["ps_ai_models"][0]["uuid"]).configuration
    assert stored["someFutureKey"] == {"from": "a newer PolicySynth"} and stored["prices"]["someFuturePrice"] == 3
