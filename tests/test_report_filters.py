"""Reports a user asks for (docs/recording.md): filters on every grouping,
more token columns (cached, cache-write, reasoning: from the rollups, the
items and the counters alike), one column order in table, CSV and JSON,
amounts rounded for display."""
import csv
import datetime
import io
import json
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel, PsModelUsage, cost_report, rollups
from psai.usage import daily_costs, report_totals
from psai.cli import cli, money_shown
from psai.report import _axis

UTC = datetime.timezone.utc


def seed(clock):
    gpt = PsAiModel.create(name="GPT", configuration=make_configuration())  # 30 in, 60 out, 10 cached, openai
    claude = PsAiModel.create(name="Claude", configuration=make_configuration(provider="anthropic", model="claude"))
    writer = PsAgent.create(configuration={"name": "Writer"})
    editor = PsAgent.create(configuration={"name": "Editor"}, parent_agent=writer)
    clock.set(datetime.datetime(2026, 11, 2, 9, tzinfo=UTC))
    psai.record_usage(gpt, writer, tokens_in=1000, tokens_out=100, cached_tokens=400, cache_write_tokens=100,
                      reasoning_tokens=30)
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


def long_context_model():
    """A model whose calls of 1000 input tokens or more are priced on the long-context side."""
    prices = dict(make_configuration()["prices"], longContextTokenThreshold=1000, longContextCostInTokensPerMillion=60,
                  longContextCostOutTokensPerMillion=120, longContextCostInCachedContextTokensPerMillion=20)
    return PsAiModel.create(name="Long", configuration=make_configuration(provider="anthropic", model="claude-long",
                                                                          prices=prices))


def reasoning_of(rows, key):
    return {row[key]: row["reasoning_tokens"] for row in rows}


def test_rows_count_reasoning_tokens_from_the_rollups_and_from_the_items(db, clock):
    gpt, claude, writer, editor = seed(clock)  # the Writer's call to GPT: 30 of its 100 output tokens reasoning
    long = long_context_model()
    clock.set(datetime.datetime(2026, 11, 4, 9, tzinfo=UTC))
    psai.record_usage(long, editor, tokens_in=5000, tokens_out=500, reasoning_tokens=200)
    clock.set(datetime.datetime(2026, 11, 4, 15, tzinfo=UTC))
    psai.record_usage(long, editor, tokens_in=10, tokens_out=50, reasoning_tokens=50)
    # The first call is on the long-context side (its counter says so), the second is not.
    [counters] = PsModelUsage.select().where(PsModelUsage.model == long)
    assert (counters.long_context_token_out_reasoning_count, counters.token_out_reasoning_count) == (200, 50)
    plan = rollups.read_plan(db)
    assert plan.days == ("2026-11-02", "2026-11-03", "2026-11-04") and not plan.reads_items

    def reports():
        return {by: cost_report(by) for by in ("model", "agent", "tree", "provider", "day")}

    rolled = reports()
    assert reasoning_of(rolled["model"], "model_name") == {"GPT": 30, "Claude": 0, "Long": 250}
    assert reasoning_of(rolled["agent"], "agent_name") == {"Writer": 30, "Editor": 250, None: 0}
    assert reasoning_of(rolled["tree"], "agent_name") == {"Writer": 280, "Editor": 250, None: 0}
    assert reasoning_of(rolled["day"], "day") == {"2026-11-02": 30, "2026-11-03": 0, "2026-11-04": 250}
    assert report_totals(rolled["tree"], "tree")["USD"]["reasoning_tokens"] == 280
    assert all(row["reasoning_tokens"] <= row["tokens_out"] for rows in rolled.values() for row in rows)
    # A period that ends inside a day: that day's calls are read from the items.
    since, until = datetime.datetime(2026, 11, 2, tzinfo=UTC), datetime.datetime(2026, 11, 4, 12, tzinfo=UTC)
    assert rollups.read_plan(db, since, until).scan
    assert reasoning_of(cost_report("model", since=since, until=until), "model_name") == {
        "GPT": 30, "Claude": 0, "Long": 200}
    rollups.disable(db)  # every report reads the items
    assert not rollups.enabled(db)
    assert reports() == rolled
    assert reasoning_of(cost_report("model", since=since, until=until), "model_name")["Long"] == 200
    assert daily_costs()[-1]["reasoning_tokens"] == 250


def test_reasoning_tokens_of_counters_no_item_covers(db, clock):
    """Counter rows without items (usage from before items, or another
    tool's) and counters beyond their items give their reasoning tokens,
    long-context side included; never more than the output they hold."""
    old, topped, odd = (PsAiModel.create(name=name, configuration=make_configuration(model=name))
                        for name in ("old", "topped", "odd"))
    PsModelUsage.create(user_id=1, model=old, token_in_count=1000, token_out_count=70, token_out_reasoning_count=30,
                        long_context_token_in_count=300_000, long_context_token_out_count=5,
                        long_context_token_out_reasoning_count=20)
    # A call recorded with its item, and its counters raised by another tool by 40 output tokens, 15 reasoning.
    psai.record_usage(topped, None, tokens_in=100, tokens_out=100, reasoning_tokens=60)
    PsModelUsage.update(token_out_count=PsModelUsage.token_out_count + 25,
                        token_out_reasoning_count=PsModelUsage.token_out_reasoning_count + 15).where(
        PsModelUsage.model == topped).execute()
    # A call whose item says no reasoning, and counters that say 100 reasoning tokens of 110 output:
    # the item covers 100 of the output, so at most the 10 left are reasoning.
    psai.record_usage(odd, None, tokens_in=100, tokens_out=100)
    PsModelUsage.update(token_out_count=10, token_out_reasoning_count=100).where(PsModelUsage.model == odd).execute()
    rows = {row["model_name"]: row for row in cost_report("model")}
    assert {name: (row["tokens_out"], row["reasoning_tokens"]) for name, row in rows.items()} == {
        "old": (125, 50), "topped": (140, 75), "odd": (110, 10)}
    assert report_totals(rows.values())["USD"]["reasoning_tokens"] == 135
    for by in ("agent", "day", "provider"):
        assert report_totals(cost_report(by))["USD"]["reasoning_tokens"] == 135, by
    rollups.disable(db)
    assert {row["model_name"]: row for row in cost_report("model")} == rows


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
    assert "audio: give some of cached, cache-write, reasoning" in run("usage", "report", "--columns", "audio",
                                                                       code=2).stderr
    # Reasoning tokens (of the output): after tokens_out, in the order asked, in table, CSV and JSON alike.
    table = run("usage", "report", "--by", "agent", "--columns", "reasoning,cached").stdout.splitlines()
    heading = table[0].split()
    assert heading[4:8] == ["tokens_out", "reasoning_tokens", "cached_tokens", "cost"]
    writer_row, total_row = table[2].split(), table[-1].split()
    assert writer_row[1] == "Writer" and writer_row[5] == "30"
    assert total_row[:5] == ["TOTAL", "3", "3010", "111", "30"]  # TOTAL in the first key column, the name blank
    as_csv = list(csv.reader(io.StringIO(run("usage", "report", "--by", "agent", "--columns", "reasoning,cached",
                                             "--csv").stdout)))
    as_json = json.loads(run("usage", "report", "--by", "agent", "--columns", "reasoning,cached", "--json").stdout)
    assert as_csv[0] == heading + ["unpriced_reason"] and list(as_json[0]) == as_csv[0]
    assert {row["agent_name"]: row["reasoning_tokens"] for row in as_json} == {"Writer": 30, "Editor": 0, None: 0}


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
