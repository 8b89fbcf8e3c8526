"""Recording usage into PolicySynth's counters, and cost reports."""
import datetime
import multiprocessing
from collections import defaultdict
from decimal import Decimal

import pytest

import psai
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, rollups
from psai._sql import drop_counter_totals_triggers_sql
from psai.db import forget_schema, is_postgres
from psai.pricing import COUNTERS, Pricer, counter_buckets, resolve_prices
from psai.usage import cost_report, record_usage, report_totals

from conftest import make_configuration


def model(name, currency="USD", **prices):
    config = make_configuration()
    config["prices"].update(currency=currency, **prices)
    return PsAiModel.create(user_id=7, organization_id=2, name=name, configuration=config)


def agent(name, parent=None, user_id=3):
    return PsAgent.create(user_id=user_id, class_id=1, group_id=1, configuration={"name": name},
                          parent_agent=parent)


def counters_of(row):
    return {name: getattr(row, name) for name in COUNTERS}


# -- recording -----------------------------------------------------------------

def test_record_usage_partitions_and_accumulates(db):
    m, a = model("gpt"), agent("a")
    row = record_usage(m, a, tokens_in=1000, cached_tokens=200, cache_write_tokens=100,
                       tokens_out=300, reasoning_tokens=50)
    assert row.token_in_count == 700 and row.token_in_cached_context_count == 200
    assert row.token_in_cache_write_count == 100
    assert row.token_out_count == 250 and row.token_out_reasoning_count == 50
    assert row.user_id == 3 and row.agent_id == a.id and row.model_id == m.id
    again = record_usage(m.id, str(a.uuid), tokens_in=10, tokens_out=5)
    assert again.id == row.id
    stored = PsModelUsage.get_by_id(row.id)
    assert (stored.token_in_count, stored.token_out_count) == (710, 255)
    assert stored.updated_at >= stored.created_at
    assert PsModelUsage.select().count() == 1


def test_each_model_agent_and_connector_has_its_own_counters(db):
    m1, m2, a = model("one"), model("two"), agent("a")
    record_usage(m1, a, tokens_in=1, tokens_out=1)
    record_usage(m2, a, tokens_in=1, tokens_out=1)
    record_usage(m1, None, tokens_in=1, tokens_out=1)
    record_usage(m1, a, tokens_in=1, tokens_out=1, connector_id=9)
    record_usage(m1, a, tokens_in=1, tokens_out=1)
    assert PsModelUsage.select().count() == 4
    no_agent = PsModelUsage.get(PsModelUsage.agent.is_null())
    assert no_agent.user_id == 7  # the model's owner when there is no agent


def test_long_context_counters_and_rounding(db):
    m, a = model("long", longContextTokenThreshold=1000, longContextCostInTokensPerMillion=60), agent("a")
    row = record_usage(m, a, tokens_in=1000, cached_tokens=100, tokens_out=20)
    assert (row.long_context_token_in_count, row.long_context_token_in_cached_context_count,
            row.long_context_token_out_count, row.token_in_count) == (900, 100, 20, 0)
    row = record_usage(m, agent("b"), tokens_in=10.5, tokens_out=2.49)
    assert (row.token_in_count, row.token_out_count) == (11, 2)  # half up, like Math.round


@pytest.mark.parametrize("usage, path", [
    (dict(tokens_in=-1), "tokens_in"),
    (dict(tokens_in=10, tokens_out="5"), "tokens_out"),
    (dict(tokens_in=10, cached_tokens=float("nan")), "cached_tokens"),
    (dict(tokens_in=True), "tokens_in"),
])
def test_bad_counts_are_refused_and_nothing_is_written(db, usage, path):
    m = model("gpt")
    with pytest.raises(psai.ValidationError) as info:
        record_usage(m, **usage)
    assert list(info.value.paths) == [path]
    assert PsModelUsage.select().count() == 0


def test_unknown_model_or_agent_is_a_clear_error(db):
    m = model("gpt")
    with pytest.raises(psai.NotFoundError, match="PsAiModel 999 does not exist"):
        record_usage(999, tokens_in=1)
    with pytest.raises(psai.NotFoundError, match="PsAgent 999 does not exist"):
        record_usage(m, 999, tokens_in=1)
    assert PsModelUsage.select().count() == 0


def test_deleting_a_model_with_usage_is_refused_and_agent_deletion_keeps_usage(db):
    m, a = model("gpt"), agent("a")
    record_usage(m, a, tokens_in=5, tokens_out=5)
    with pytest.raises(psai.InUseError, match="deactivate it"):
        m.delete_instance()
    assert PsAiModel.select().count() == 1
    a.delete_instance()
    row = PsModelUsage.get()
    assert row.agent_id is None and row.token_in_count == 5


def test_eight_processes_recording_at_once_lose_no_tokens(backend):
    """All on one counter row (on PostgreSQL, each call one round trip)."""
    psai.migrate()
    m, a = model("gpt"), agent("a")
    calls, processes = 40, 8
    context = multiprocessing.get_context("spawn")
    from workers import record_many
    with context.Pool(processes) as pool:
        results = [pool.apply_async(record_many, (backend.url, m.id, a.id, calls, seed)) for seed in range(processes)]
        assert [r.get(timeout=120) for r in results] == [True] * processes
    expected_in = sum(100 + (seed + i) % 7 for seed in range(processes) for i in range(calls))
    expected_cached = sum(i % 5 for _ in range(processes) for i in range(calls))
    expected_out = sum(10 + i % 3 for _ in range(processes) for i in range(calls))
    rows = list(PsModelUsage.select())
    assert len(rows) == 1
    row = rows[0]
    assert row.token_in_count + row.token_in_cached_context_count == expected_in
    assert row.token_in_cached_context_count == expected_cached
    assert row.token_out_count == expected_out
    assert PsModelUsageItem.select().count() == processes * calls


# -- reports ---------------------------------------------------------------------

@pytest.fixture
def usage_world(db):
    """Two currencies, a superseded model, an agent tree, three days."""
    old_gpt = model("gpt", costInTokensPerMillion=30, costOutTokensPerMillion=60)
    new_gpt = model("gpt", costInTokensPerMillion=2.5, costOutTokensPerMillion=10)
    old_gpt.update_configuration({"active": False})
    mistral = model("mistral", currency="EUR", costInTokensPerMillion=0.7, costOutTokensPerMillion=2.1,
                    longContextTokenThreshold=100_000, longContextCostInTokensPerMillion=1.4)
    mistral.update_configuration({"provider": "mistral"})
    root = agent("root")
    child = agent("child", root)
    grandchild = agent("grandchild", child)
    other = agent("other")
    plan = [
        (old_gpt, root, 120_000, 3_000), (old_gpt, child, 5_000, 700), (new_gpt, child, 7_777, 333),
        (new_gpt, grandchild, 1_000_001, 99_999), (mistral, grandchild, 150_000, 10_000),
        (mistral, other, 99_999, 1), (new_gpt, None, 42, 42), (mistral, root, 12_345, 678),
    ]
    for m, a, tokens_in, tokens_out in plan:
        record_usage(m, a, tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=tokens_in // 10,
                     reasoning_tokens=tokens_out // 3)
    # Spread the calls over three days (psai keeps one counter row per day);
    # each call made a counter row of its own and an item, in the same order.
    day = datetime.timedelta(days=1)
    for table in (PsModelUsage, PsModelUsageItem):
        for index, row in enumerate(table.select().order_by(table.id)):
            when = datetime.datetime(2026, 11, 20, 12, tzinfo=datetime.timezone.utc) + day * (index % 3)
            table.update(created_at=when, updated_at=when).where(table.id == row.id).execute()
    return {"old_gpt": old_gpt, "new_gpt": new_gpt, "mistral": mistral, "root": root, "child": child,
            "grandchild": grandchild, "other": other}


def recompute(key_of, since=None, until=None):
    """A straightforward Python recomputation: price each usage row on its own."""
    totals = defaultdict(Decimal)
    for row in PsModelUsage.select():
        if since and row.created_at < since or until and row.created_at >= until:
            continue
        config = PsAiModel.get_by_id(row.model_id).configuration
        rates = resolve_prices(config["prices"], provider=config["provider"])
        cost = Pricer(rates).text_cost(counter_buckets(counters_of(row)))
        for key in key_of(row, config):
            totals[(key, config["prices"]["currency"])] += cost
    return dict(totals)


def as_totals(rows, key):
    return {(row[key], row["currency"]): row["cost"] for row in rows}


def test_report_by_model_prices_each_row_with_its_own_model(usage_world):
    rows = cost_report("model")
    assert as_totals(rows, "model_id") == recompute(lambda row, config: [row.model_id])
    old, new = usage_world["old_gpt"].id, usage_world["new_gpt"].id
    by_id = {row["model_id"]: row for row in rows}
    assert by_id[old]["model_name"] == by_id[new]["model_name"] == "gpt"
    # The superseded model's usage keeps its old, higher prices.
    old_tokens = by_id[old]["tokens_in"]
    assert by_id[old]["cost"] / old_tokens > by_id[new]["cost"] / by_id[new]["tokens_in"]
    assert all(isinstance(row["cost"], Decimal) for row in rows)


def test_report_by_agent_provider_and_day(usage_world):
    assert as_totals(cost_report("agent"), "agent_id") == recompute(lambda row, c: [row.agent_id])
    assert as_totals(cost_report("provider"), "provider") == recompute(lambda row, c: [c["provider"]])
    by_day = cost_report("day")
    assert as_totals(by_day, "day") == recompute(lambda row, c: [row.created_at.date().isoformat()])
    assert [row["day"] for row in by_day if row["currency"] == "USD"] == ["2026-11-20", "2026-11-21", "2026-11-22"]


def test_report_tree_includes_sub_agents(usage_world):
    w = usage_world
    rows = cost_report("tree")
    descendants = {w["root"].id: {w["root"].id, w["child"].id, w["grandchild"].id},
                   w["child"].id: {w["child"].id, w["grandchild"].id},
                   w["grandchild"].id: {w["grandchild"].id}, w["other"].id: {w["other"].id}}
    expected = recompute(lambda row, c: [root for root, ids in descendants.items() if row.agent_id in ids]
                         or ([None] if row.agent_id is None else []))
    assert as_totals(rows, "agent_id") == expected
    levels = {row["agent_id"]: row["level"] for row in rows}
    assert levels[w["root"].id] == 0 and levels[w["child"].id] == 1 and levels[w["grandchild"].id] == 2
    order = [(row["level"], row["agent_id"]) for row in rows if row["agent_id"] is not None]
    assert order == sorted(order)


def test_report_totals_are_exact_and_agree_across_groupings(usage_world):
    totals = {by: report_totals(cost_report(by), by) for by in ("model", "agent", "tree", "provider", "day")}
    everything = recompute(lambda row, c: ["all"])
    for by, per_currency in totals.items():
        assert {currency: t["cost"] for currency, t in per_currency.items()} == \
            {currency: cost for (_, currency), cost in everything.items()}, by


def test_report_since_until(usage_world):
    utc = datetime.timezone.utc
    since = datetime.datetime(2026, 11, 21, tzinfo=utc)
    until = datetime.datetime(2026, 11, 22, tzinfo=utc)
    rows = cost_report("model", since="2026-11-21", until="2026-11-21")
    assert as_totals(rows, "model_id") == recompute(lambda row, c: [row.model_id], since, until)
    assert cost_report("day", since=datetime.date(2026, 11, 22))[0]["day"] == "2026-11-22"
    assert cost_report("model", since="2030-01-01") == []


def test_unknown_grouping_is_refused(db):
    with pytest.raises(psai.ValidationError, match="by: Must be one of: model, agent, tree, provider, day"):
        cost_report("week")


def test_a_usage_table_without_cache_write_counters(db):
    # PolicySynth's npm release makes ps_model_usage without the two cache-write counters. psai's
    # triggers keeping the counters' totals name the counters: off while the table is remade that way,
    # then made again for the counters it has.
    for statement in drop_counter_totals_triggers_sql(is_postgres(db)):
        db.execute_sql(statement)
    for column in ("token_in_cache_write_count", "long_context_token_in_cache_write_count"):
        db.execute_sql('ALTER TABLE "ps_model_usage" DROP COLUMN "%s"' % column)
    db.__dict__.pop("_psai_usage_counters", None)
    forget_schema(db)
    rollups.rebuild(db)
    assert rollups.kept_counter_totals(db, None) == []
    m, a = model("gpt"), agent("a")
    row = record_usage(m, a, tokens_in=1000, cached_tokens=100, cache_write_tokens=300, tokens_out=10)
    assert row.token_in_count == 900 and row.token_in_cached_context_count == 100
    row = record_usage(m, a, tokens_in=10, tokens_out=1)
    assert row.token_in_count == 910
    [report] = cost_report("model")
    assert report["tokens_in"] == 1010 and report["cost"] == Decimal(910 * 30 + 100 * 10 + 11 * 60) / 1_000_000
    assert rollups.verify(db) == [] and rollups.kept_counter_totals(db, None) == [(m.id, a.id, None, 1010, 11)]


def test_counters_that_would_overflow_start_a_new_row(db):
    m, a = model("gpt"), agent("a")
    first = record_usage(m, a, tokens_in=2_000_000_000, tokens_out=1)
    second = record_usage(m, a, tokens_in=2_000_000_000, tokens_out=1)
    assert second.id != first.id  # 4e9 does not fit PolicySynth's INTEGER counter
    third = record_usage(m, a, tokens_in=100, tokens_out=1)
    assert third.id == first.id
    assert cost_report("model")[0]["tokens_in"] == 4_000_000_100
    with pytest.raises(psai.ValidationError, match="tokens_in: Too large for one call"):
        record_usage(m, a, tokens_in=2 ** 31, tokens_out=1)


def test_model_cost_by_key_sees_prices_another_connection_just_changed(db, backend):
    """model_cost(id or uuid) reads the row every time: a price edited
    elsewhere (another process, PolicySynth's UI) is used at once."""
    from psai.pricing import estimate_cost
    from psai.usage import model_cost
    model = PsAiModel.create(user_id=1, organization_id=2, name="m", configuration=make_configuration())
    call = dict(tokens_in=1_000_000, tokens_out=100_000, cached_tokens=200_000)
    first = model_cost(model.id, **call)
    assert first["total"] == estimate_cost(model.configuration["prices"], provider="openai", **call) == 32
    assert model_cost(str(model.uuid), **call) == first == model_cost(model, **call)
    elsewhere = psai.connect(backend.url, bind=False)
    with psai.using(elsewhere):
        PsAiModel.get_by_id(model.id).update_configuration({"prices": {"costInTokensPerMillion": 60}})
    elsewhere.close()
    assert model_cost(model.id, **call)["total"] == 60 * 0.8 + 10 * 0.2 + 60 * 0.1
    assert model_cost(str(model.uuid), **call)["total"] == 56
    with pytest.raises(psai.NotFoundError):
        model_cost(model.id + 1, **call)
    # What model_cost hands back is the caller's to change: the next call is unaffected.
    model_cost(model.id, **call)["rates"]["costInTokensPerMillion"] = 0
    assert model_cost(model.id, **call)["total"] == 56


def test_parts_above_their_total_are_refused_as_record_response_refuses_them(backend):
    """Before: `usage record --in 10 --cached 1000000` was recorded (reports
    then showed 1,000,010 input tokens) while record-response refused the
    same counts."""
    from click.testing import CliRunner
    from psai.cli import cli
    psai.migrate()
    m = PsAiModel.create(user_id=1, organization_id=1, name="m", configuration=make_configuration())
    for counts, field in [(dict(tokens_in=10, cached_tokens=1_000_000), "cached_tokens"),
                          (dict(tokens_in=10, cached_tokens=6, cache_write_tokens=5), "cached_tokens"),
                          (dict(tokens_in=10, cache_write_tokens=11), "cache_write_tokens"),
                          (dict(tokens_out=3, reasoning_tokens=2, audio_tokens=1, image_tokens=1),
                           "reasoning_tokens")]:
        with pytest.raises(psai.ValidationError, match="%s: .* above" % field):
            record_usage(m, None, **counts)
        with pytest.raises(psai.ValidationError, match="%s: .* above" % field):
            psai._recording.model_cost(m, **dict({"tokens_in": 0, "tokens_out": 0}, **counts))
    refused = CliRunner().invoke(cli, ["--database", backend.url, "usage", "record", str(m.id), "--in", "10",
                                       "--out", "1", "--cached", "1000000"])
    assert refused.exit_code == 2 and "cached_tokens" in refused.output and "Traceback" not in refused.output
    response = {"object": "chat.completion", "model": "gpt-4", "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 0,
                          "prompt_tokens_details": {"cached_tokens": 1_000_000}}}
    with pytest.raises(psai.ValidationError, match="above"):
        psai.record_response(m, None, response)
    assert PsModelUsage.select().count() == PsModelUsageItem.select().count() == 0
    record_usage(m, None, tokens_in=10, cached_tokens=4, cache_write_tokens=6, tokens_out=3, reasoning_tokens=3)
    assert PsModelUsageItem.select().count() == 1
