"""Reports a user asks for (docs/recording.md): filters on every grouping,
more token columns, one column order in table, CSV and JSON, amounts
rounded for display."""
import csv
import datetime
import io
import json
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel, cost_report
from psai.cli import cli, money_shown
from psai.report import _axis

UTC = datetime.timezone.utc


def seed(clock):
    gpt = PsAiModel.create(name="GPT", configuration=make_configuration())  # 30 in, 60 out, 10 cached, openai
    claude = PsAiModel.create(name="Claude", configuration=make_configuration(provider="anthropic", model="claude"))
    writer = PsAgent.create(configuration={"name": "Writer"})
    editor = PsAgent.create(configuration={"name": "Editor"}, parent_agent=writer)
    clock.set(datetime.datetime(2026, 11, 2, 9, tzinfo=UTC))
    psai.record_usage(gpt, writer, tokens_in=1000, tokens_out=100, cached_tokens=400, cache_write_tokens=100)
    clock.set(datetime.datetime(2026, 11, 3, 9, tzinfo=UTC))
    psai.record_usage(claude, editor, tokens_in=2000, tokens_out=10)
    psai.record_usage(gpt, None, tokens_in=10, tokens_out=1)
    return gpt, claude, writer, editor


def calls(rows):
    return sum(row["calls"] for row in rows if row.get("level") in (0, None))


@pytest.mark.parametrize("by", ["model", "agent", "tree", "provider", "day"])
def test_filters_on_every_grouping(db, clock, by):
    gpt, claude, writer, editor = seed(clock)
    assert calls(cost_report(by)) == 3
    assert calls(cost_report(by, agent="Writer")) == 1
    assert calls(cost_report(by, agent=editor.id)) == 1
    assert calls(cost_report(by, model="GPT")) == 2
    assert calls(cost_report(by, provider="anthropic")) == 1
    assert calls(cost_report(by, provider="openai", agent="Writer", since="2026-11-02", until="2026-11-02")) == 1
    assert calls(cost_report(by, model="GPT", since="2026-11-03")) == 1
    with pytest.raises(psai.NotFoundError, match="did you mean 'Writer'"):
        cost_report(by, agent="Writr")


def test_rows_count_cached_and_cache_write_tokens(db, clock):
    seed(clock)
    [row] = [r for r in cost_report("model") if r["model_name"] == "GPT"]
    assert (row["cached_tokens"], row["cache_write_tokens"]) == (400, 100)
    assert list(row)[-1] == "provider_cost"


def test_the_command_line_report(backend, clock):
    psai.migrate()
    seed(clock)

    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url, *args], catch_exceptions=False)
        psai.connect(backend.url)
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    table = run("usage", "report", "--by", "agent", "--agent", "Writer", "--columns", "cached,cache-write").stdout
    heading = table.splitlines()[0].split()
    assert heading == ["agent_id", "agent_name", "calls", "tokens_in", "tokens_out", "cached_tokens",
                       "cache_write_tokens", "cost", "currency", "unpriced_tokens", "priced_from"]
    assert "provider_cost" not in table  # no call has one
    # 1000 in (400 cached, 100 written) and 100 out: 0.028 computed, 0.03 shown, exact with --exact.
    writer_row = table.splitlines()[2].split()
    assert writer_row[5:9] == ["400", "100", "0.03", "USD"]
    assert "0.028 " in run("usage", "report", "--by", "agent", "--agent", "Writer", "--exact").stdout
    as_csv = list(csv.reader(io.StringIO(run("usage", "report", "--by", "agent", "--agent", "Writer",
                                             "--columns", "cached,cache-write", "--csv").stdout)))
    assert as_csv[0] == heading + ["unpriced_reason"]
    as_json = json.loads(run("usage", "report", "--by", "agent", "--agent", "Writer",
                             "--columns", "cached,cache-write", "--json").stdout)
    assert list(as_json[0]) == as_csv[0] and as_json[0]["cost"] == "0.028"
    for by in ("model", "agent", "tree", "provider", "day"):
        rows = json.loads(run("usage", "report", "--by", by, "--provider", "anthropic", "--json").stdout)
        assert sum(r["calls"] for r in rows if r.get("level") in (0, None)) == 1, by
        rows = json.loads(run("usage", "report", "--by", by, "--model", "GPT", "--since", "2026-11-03",
                              "--until", "2026-11-03", "--json").stdout)
        assert sum(r["calls"] for r in rows if r.get("level") in (0, None)) == 1, by
    assert "reasoning: give some of cached, cache-write" in run("usage", "report", "--columns", "reasoning",
                                                                code=2).stderr


def test_the_page_takes_the_filters(db, clock):
    seed(clock)
    page = psai.report.html("model", model="Claude", agent="Editor")
    assert "Only agent Editor · Only model Claude" in page
    assert ">GPT<" not in page and ">Claude<" in page


def test_amounts_shown_and_axis_labels():
    assert money_shown(Decimal("0.0255"), "USD") == "0.03"
    assert money_shown(Decimal("0.004"), "USD") == "<0.01"
    assert money_shown(Decimal("1234.5"), "JPY") == "1235"
    assert money_shown(Decimal("0"), "EUR") == "0.00"
    assert [_axis(Decimal(x)) for x in ("0", "0.5000", "2.5", "1000")] == ["0", "0.5", "2.5", "1,000"]
