"""Errors and messages that tell a newcomer what to do: a SQLite URL with
two slashes or none, an estimate that needs a model, an audit with nothing
to correct, a correction of calls that could not be priced."""
import datetime
import json

import pytest
from click.testing import CliRunner

import psai
from psai import PsModelUsageItem
from psai.cli import cli

from conftest import make_configuration

THREE_SLASHES = "a SQLite URL has three slashes"


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def one_line(result):
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("url, shown", [
    ("sqlite://psai.db", "sqlite:///psai.db"),   # the file taken for a host: a traceback before
    ("sqlite:psai.db", "sqlite:///psai.db"),     # opened "sai.db" before
    ("sqlite:/psai.db", "sqlite:///psai.db"),
    ("sqlite://", "sqlite:///psai.db"),
])
def test_a_sqlite_url_without_three_slashes_is_one_line_saying_how_to_write_it(tmp_path, monkeypatch, url, shown):
    monkeypatch.chdir(tmp_path)
    result = invoke("--database", url, "models", "list")
    assert result.exit_code == 2
    line = one_line(result)
    assert line.startswith("Error: %s is not a SQLite URL psai reads" % url)
    assert THREE_SLASHES in line and shown in line and "sqlite:////absolute/path.db" in line
    assert list(tmp_path.iterdir()) == []  # no file made, no "sai.db"
    with pytest.raises(psai.DatabaseURLError, match=THREE_SLASHES):
        psai.connect(url)


def test_a_sqlite_url_naming_no_file_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "names no file" in one_line(invoke("--database", "sqlite:///", "models", "list"))
    # The forms that work keep working.
    for url in ("sqlite:///psai.db", "sqlite:///./other.db", "sqlite:///%s" % (tmp_path / "abs.db"),
                "sqlite:///:memory:"):
        assert invoke("--database", url, "models", "list").exit_code == 0, url
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["abs.db", "other.db", "psai.db"]


def test_an_estimate_in_counts_without_a_model_says_how_to_name_one(db):
    model = psai.add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    psai.set_budget(amount=1, period="month")
    with pytest.raises(psai.ValidationError) as error:
        psai.check_budget(estimate={"tokens_in": 1000, "tokens_out": 10})
    message = error.value.paths["estimate"][0]
    assert 'model="GPT-4o"' in message and "psai models list" in message
    # Given a model, the estimate is priced (by name once every argument takes names: issue 33, item 4).
    assert psai.check_budget(model=model.id, estimate={"tokens_in": 1000, "tokens_out": 10})
    with psai.track(None) as run:
        with pytest.raises(psai.ValidationError, match='name it, model="GPT-4o"'):
            run.check(estimate={"tokens_in": 1000, "tokens_out": 10})
        run.check(model=model.id, estimate={"tokens_in": 1000, "tokens_out": 10})


@pytest.mark.parametrize("apply", [False, True])
def test_an_audit_with_nothing_to_correct_says_so_in_one_line(db, backend, apply):
    args = ["--database", backend.url, "audit"] + (["--apply"] if apply else [])
    empty = invoke(*args)
    assert empty.exit_code == 0
    assert empty.output == "nothing to correct: no item keeps the provider's usage\n"
    model = psai.add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    psai.record_response(model, None, {"usage": {"prompt_tokens": 100, "completion_tokens": 5}},
                         provider="openai")
    read = invoke(*args)
    assert read.exit_code == 0
    assert read.output == "nothing to correct: the counts of 1 items agree with the provider's usage they keep\n"
    assert "dry run" not in read.output


def test_a_reprice_of_unpriced_calls_says_unpriced_not_zero(db, backend):
    model = psai.add_model(name="GPT-4o", user_id=1, organization_id=2, configuration=make_configuration())
    psai.record_usage(model, None, tokens_in=1000, tokens_out=10)
    # Prices as a hand-written row may hold them, and an item without a snapshot (another tool's).
    mark = "%s" if psai.db.is_postgres() else "?"
    broken = dict(model.configuration, prices=dict(model.configuration["prices"], costInTokensPerMillion="30"))
    psai.database.execute_sql('UPDATE "ps_ai_models" SET "configuration" = %s WHERE "id" = %s' % (mark, mark),
                              (json.dumps(broken), model.id))
    [item] = PsModelUsageItem.select()
    moment = item.created_at + datetime.timedelta(microseconds=1)
    PsModelUsageItem.insert(user_id=item.user_id, model_id=item.model_id, agent_id=item.agent_id,
                            created_at=moment, updated_at=moment, data=dict(item.data, pricing={})).execute()
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item.id).execute()
    result = invoke("--database", backend.url, "models", "reprice", "GPT-4o", "--set", "costInTokensPerMillion=3")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:5]}
    assert rows["before"] == ["unpriced", "1010"]
    assert rows["after"] == ["0.0036", "USD"]  # 1000 x 3 + 10 x 60 per million
    assert rows["difference"] == ["unknown"]
    assert "1010 tokens could not be priced before" in result.stdout
    assert "dry run: nothing changed" in result.stdout
