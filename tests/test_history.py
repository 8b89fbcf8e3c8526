"""Usage items with price snapshots: recorded costs never change by accident,
price history, deliberate corrections, unpriced usage never a silent 0."""
import datetime
import json
import multiprocessing
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from psai import AgentModels, PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, rollups
from psai.cli import cli
from psai._history import price_history, reprice
from psai._items import item_cost
from psai.models import PriceCorrection
from psai.usage import NO_AGENT, cost_report, record_usage, report_totals

from conftest import SEED_CONFIGURATION, make_configuration, run_beside

UTC = datetime.timezone.utc


def model(name="GPT-4", provider="openai", **prices):
    config = make_configuration(provider=provider)
    config["prices"].update(prices)
    return PsAiModel.create(user_id=7, organization_id=2, name=name, configuration=config)


def agent(name="a", parent=None):
    return PsAgent.create(user_id=3, class_id=1, group_id=1, configuration={"name": name}, parent_agent=parent)


def total(by="model", **kwargs):
    totals = report_totals(cost_report(by, **kwargs), by)
    return {currency: t["cost"] for currency, t in totals.items()}


def items():
    return list(PsModelUsageItem.select().order_by(PsModelUsageItem.id))


# -- the scenario of the issue, on the command line ----------------------------------

def test_a_price_edit_does_not_rewrite_recorded_cost(backend, tmp_path):
    def run(*args):
        result = CliRunner().invoke(cli, ["--database", backend.url] + list(args))
        assert result.exit_code == 0, result.output
        return result.stdout

    def report_cost():
        """Model 1's cost in the report (the demo records calls of its own first)."""
        [row] = [row for row in json.loads(run("usage", "report", "--json")) if row["model_id"] == 1]
        return Decimal(row["cost"])

    run("demo", "--html", str(tmp_path / "page.html"))
    before = report_cost()
    run("usage", "record", "1", "--agent", "1", "--in", "1000000", "--out", "100000")
    assert report_cost() == before + 36
    run("models", "update", "1", "--set", "prices.costInTokensPerMillion=60")
    assert report_cost() == before + 36
    run("usage", "record", "1", "--agent", "1", "--in", "1000000", "--out", "100000")
    assert report_cost() == before + 36 + 66
    history = json.loads(run("models", "history", "OpenAI GPT-4 Large", "--json"))
    assert [(v["prices"]["costInTokensPerMillion"], v["source"]) for v in history] == [(30, "stored"), (60, "psai")]
    assert history[0]["valid_to"] == history[1]["valid_from"] and history[1]["valid_to"] is None


# -- recording -------------------------------------------------------------------------

def test_record_usage_writes_an_item_in_policysynths_layout(db):
    m, a = model(), agent()
    m.update_configuration({"inferenceType": "flex", "regionalProcessing": "eu"})
    record_usage(m, a, tokens_in=1000, tokens_out=300, cached_tokens=200, cache_write_tokens=100,
                 reasoning_tokens=50, web_searches=2, connector_id=9,
                 provider_metadata={"appliedServiceTier": "priority"})
    [item] = items()
    assert (item.model_id, item.agent_id, item.user_id, item.connector_id) == (m.id, a.id, 3, 9)
    data = item.data
    assert data["version"] == 1 and data["provider"] == data["apiFamily"] == "openai"
    assert data["model"] == {"id": m.id, "name": "gpt-4", "type": "text", "size": "large"}
    assert data["actor"] == {"userId": 3, "agentId": a.id, "connectorId": 9}
    assert data["pricing"] == {"configuredPrices": SEED_CONFIGURATION["prices"], "inferenceType": "flex",
                               "regionalProcessing": "eu"}
    assert data["usageNormalized"] == {"tokensIn": 1000, "tokensOut": 300, "cachedInTokens": 200,
                                       "reasoningTokens": 50, "audioTokens": 0, "imageTokens": 0}
    assert data["providerMetadata"] == {"appliedServiceTier": "priority"}
    assert data["psai"] == {"cacheWriteTokens": 100, "webSearches": 2}
    stamp = datetime.datetime.fromisoformat(data["timestamp"].replace("Z", "+00:00"))
    assert abs(stamp - item.created_at) < datetime.timedelta(milliseconds=2)


def test_usage_without_an_agent_is_kept_with_agent_id_0(db):
    m = model()
    record_usage(m, None, tokens_in=100, tokens_out=10)
    [item] = items()
    assert item.agent_id == NO_AGENT == 0 and item.data["actor"]["agentId"] is None
    m.update_configuration({"prices": {"costInTokensPerMillion": 1000}})
    [row] = cost_report("agent")
    assert row["agent_id"] is None and row["cost"] == Decimal(100 * 30 + 10 * 60) / 10 ** 6
    assert row["priced_from"] == "snapshot"


def test_the_snapshot_is_the_stored_price_not_the_callers_stale_object(db):
    m = model()
    stale = PsAiModel.get_by_id(m.id)
    m.update_configuration({"prices": {"costInTokensPerMillion": 1}})
    record_usage(stale, None, tokens_in=1_000_000, tokens_out=0)
    assert items()[0].data["pricing"]["configuredPrices"]["costInTokensPerMillion"] == 1
    assert total() == {"USD": Decimal(1)}


class _CountingCursor:
    """psycopg2 cursors that note every message sent to the server."""
    sent = None

    @classmethod
    def install(cls, db):
        import psycopg2.extensions

        class Counting(psycopg2.extensions.cursor):
            def execute(self, sql, params=None):
                cls.sent.append(sql)
                return super().execute(sql, params)
        cls.sent = []
        db.connection().cursor_factory = Counting
        return cls.sent


def test_postgres_records_a_call_in_one_round_trip(postgres_db):
    m, a = model(), agent()
    record_usage(m, a, tokens_in=10, tokens_out=1)  # the first call prepares the statement
    sent = _CountingCursor.install(postgres_db)
    for _ in range(5):
        record_usage(m, a, tokens_in=1000, tokens_out=100, cached_tokens=10)
    assert len(sent) == 5
    assert all(sql.startswith("SELECT pg_advisory_xact_lock") and "EXECUTE psai_" in sql for sql in sent)
    [row] = PsModelUsage.select()
    counts = (row.token_in_count, row.token_in_cached_context_count, row.token_out_count)
    assert counts == (10 + 5 * 990, 50, 1 + 5 * 100)
    assert len(items()) == 6
    assert total() == {"USD": (Decimal(10 + 5 * 990) * 30 + 50 * 10 + 501 * 60) / 10 ** 6}


def test_postgres_prepares_again_what_the_server_forgot(postgres_db):
    m = model()
    record_usage(m, None, tokens_in=100, tokens_out=10)
    postgres_db.execute_sql("DEALLOCATE ALL")
    record_usage(m, None, tokens_in=100, tokens_out=10)
    postgres_db.close()  # a new connection has none of them either
    record_usage(m, None, tokens_in=100, tokens_out=10)
    assert len(items()) == 3 and PsModelUsage.get().token_in_count == 300


def test_postgres_behind_a_pooler_that_drops_prepared_statements(postgres_db):
    """A pooler handing each transaction another server connection: what
    was prepared is never there; calls go unprepared and are recorded."""
    import psycopg2.extensions

    class Pooled(psycopg2.extensions.cursor):
        def execute(self, sql, params=None):
            if "EXECUTE psai_" in sql:
                sql = "DEALLOCATE ALL; " + sql
            return super().execute(sql, params)
    postgres_db.connection().cursor_factory = Pooled
    m, a = model(), agent()
    for _ in range(3):
        record_usage(m, a, tokens_in=100, tokens_out=10)
    assert psai.usage.model_cost(m.id, tokens_in=1_000_000, tokens_out=0)["total"] == 30
    assert len(items()) == 3 and PsModelUsage.get().token_in_count == 300


def test_inside_a_transaction_a_call_is_part_of_it(db):
    m = model()
    with db.atomic() as transaction:
        record_usage(m, None, tokens_in=100, tokens_out=10)
        transaction.rollback()
    assert items() == [] and PsModelUsage.select().count() == 0
    with db.atomic():
        record_usage(m, None, tokens_in=100, tokens_out=10)
        assert psai.usage.model_cost(m.id, tokens_in=1_000_000, tokens_out=0)["total"] == 30
    assert len(items()) == 1 and PsModelUsage.get().token_in_count == 100


def test_provider_metadata_must_be_a_dict(db):
    with pytest.raises(psai.ValidationError, match="provider_metadata"):
        record_usage(model(), None, tokens_in=1, tokens_out=1, provider_metadata="flex")
    assert items() == [] and PsModelUsage.select().count() == 0


# -- pricing each call from its own snapshot --------------------------------------------

def test_the_applied_tier_wins_over_the_requested_one(db):
    m = model(flexTokensIn=1, flexTokensOut=2, priorityTokensIn=100, priorityTokensOut=200)
    m.update_configuration({"inferenceType": "flex"})
    record_usage(m, None, tokens_in=1_000_000, tokens_out=1_000_000)  # flex, as requested
    record_usage(m, None, tokens_in=1_000_000, tokens_out=1_000_000,
                 provider_metadata={"appliedServiceTier": "priority"})
    record_usage(m, None, tokens_in=1_000_000, tokens_out=1_000_000,
                 provider_metadata={"appliedServiceTier": "default"})  # standard rates
    assert total() == {"USD": Decimal(3) + Decimal(300) + Decimal(90)}


def test_the_eu_margin_applies_to_openai_calls_only(db):
    openai = model("o", regionalProcessingMargin=10)
    google = model("g", provider="google", regionalProcessingMargin=10)
    for m in (openai, google):
        m.update_configuration({"regionalProcessing": "eu"})
        record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    costs = {row["model_name"]: row["cost"] for row in cost_report("model")}
    assert costs == {"o": Decimal("33.0"), "g": Decimal(30)}


def test_each_calls_own_input_decides_long_context(db):
    m = model(longContextTokenThreshold=1000, longContextCostInTokensPerMillion=100,
              longContextCostOutTokensPerMillion=0)
    record_usage(m, None, tokens_in=600, tokens_out=10)
    record_usage(m, None, tokens_in=600, tokens_out=10)  # together 1200, each below the threshold
    record_usage(m, None, tokens_in=1000, tokens_out=10)
    # Long output rate 0 falls back to the standard rate, as PolicySynth's item cost manager does.
    expected = Decimal(1200 * 30 + 20 * 60 + 1000 * 100 + 10 * 60) / 10 ** 6
    assert total() == {"USD": expected}
    assert sum(item_cost(i.data) for i in items()) == expected


def test_calls_recorded_at_different_prices_keep_them_in_every_grouping(db):
    parent = agent("lead")
    child = agent("helper", parent)
    m = model()
    record_usage(m, parent, tokens_in=1_000_000, tokens_out=0)
    m.update_configuration({"prices": {"costInTokensPerMillion": 60}})
    record_usage(m, child, tokens_in=1_000_000, tokens_out=0)
    expected = {"USD": Decimal(90)}
    for by in ("model", "agent", "tree", "provider", "day"):
        assert total(by) == expected, by
    tree = {row["agent_id"]: row["cost"] for row in cost_report("tree")}
    assert tree == {parent.id: Decimal(90), child.id: Decimal(60)}


# -- counter usage that no item covers -------------------------------------------------

def counter_row(m, a, when, **counters):
    return PsModelUsage.insert(user_id=1, model=m.id, agent=a.id if a else None, created_at=when, updated_at=when,
                               **counters).execute()


def test_full_counters_beside_items_add_up_without_overflow(db):
    """Counters are 32-bit; what they add up to is not."""
    m, a = model(), agent()
    record_usage(m, a, tokens_in=1_000_000, tokens_out=0)
    full = 2 ** 31 - 1
    counter_row(m, a, datetime.datetime.now(UTC), token_in_count=full, token_in_cached_context_count=full,
                token_out_count=full, token_out_reasoning_count=full)
    [row] = cost_report("model")
    assert row["tokens_in"] == 1_000_000 + 2 * full and row["tokens_out"] == 2 * full
    assert row["cost"] == (Decimal(1_000_000 + full) * 30 + Decimal(full) * 10 + Decimal(2 * full) * 60) / 10 ** 6


def test_counters_without_items_are_priced_by_the_version_in_force_then(db):
    m, a = model(), agent()
    old = PsAiModel.get_by_id(m.id).updated_at
    m.update_configuration({"prices": {"costInTokensPerMillion": 60}})  # psai keeps 30 from `old` on
    changed = price_history(m)[1]["valid_from"]
    counter_row(m, a, old + datetime.timedelta(microseconds=1), token_in_count=1_000_000)  # while 30 was in force
    counter_row(m, a, changed + datetime.timedelta(seconds=1), token_in_count=1_000_000)  # at 60
    counter_row(m, a, old - datetime.timedelta(days=30), token_in_count=1_000_000)  # before psai knew: current
    record_usage(m, agent("b"), tokens_in=1_000_000, tokens_out=0)  # covered by its item: counted once
    rows = cost_report("model")
    assert [(r["cost"], r["tokens_in"], r["priced_from"]) for r in rows] == [
        (Decimal(30 + 60 + 60 + 60), 4_000_000, "current,history,snapshot")]


def test_recorded_usage_is_never_counted_twice(db):
    m, a = model(), agent()
    for i in range(5):
        record_usage(m, a if i % 2 else None, tokens_in=1000 + i, tokens_out=100, cached_tokens=10,
                     cache_write_tokens=5, reasoning_tokens=7, connector_id=i % 2 or None)
    [row] = cost_report("model")
    assert row["priced_from"] == "snapshot" and row["calls"] == 5
    assert row["tokens_in"] == sum(1000 + i for i in range(5))
    assert row["cost"] == sum(item_cost(i.data) for i in items())


def test_items_beyond_the_counters_still_count(db):
    m = model()
    record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    PsModelUsage.delete().execute()  # a counter write that never happened
    assert total() == {"USD": Decimal(30)}


# -- price history -----------------------------------------------------------------------

def test_history_versions_are_contiguous_oldest_first(db):
    m = model()
    for price in (40, 50, 50, 60):
        m.update_configuration({"prices": {"costInTokensPerMillion": price}})
    m.update_configuration({"maxTokensOut": 100})  # not a price change
    history = price_history(m)
    assert [v["prices"]["costInTokensPerMillion"] for v in history] == [30, 40, 50, 60]
    assert history[0]["valid_from"] == m.created_at
    for earlier, later in zip(history, history[1:]):
        assert earlier["valid_to"] == later["valid_from"]
    assert history[-1]["valid_to"] is None
    assert price_history(m.id) == price_history(str(m.uuid)) == price_history("GPT-4") == history


def test_a_change_made_elsewhere_is_shown_dated_by_updated_at(db):
    m = model()
    m.update_configuration({"prices": {"costInTokensPerMillion": 40}})
    edited = datetime.datetime.now(UTC)
    config = dict(m.configuration, prices=dict(m.configuration["prices"], costInTokensPerMillion=45))
    # As PolicySynth's UI saves a row: in place, refreshing updated_at.
    PsAiModel.update(configuration=config, updated_at=edited).where(PsAiModel.id == m.id).execute()
    history = price_history(m)
    assert [(v["prices"]["costInTokensPerMillion"], v["source"]) for v in history] == [
        (30, "stored"), (40, "psai"), (45, "observed")]
    assert history[1]["valid_to"] == history[2]["valid_from"] == edited
    # psai's next save keeps what it found.
    PsAiModel.get_by_id(m.id).update_configuration({"prices": {"costInTokensPerMillion": 50}})
    assert [(v["prices"]["costInTokensPerMillion"], v["source"]) for v in price_history(m)] == [
        (30, "stored"), (40, "psai"), (45, "observed"), (50, "psai")]


def test_a_change_that_left_no_date_is_shown_undated(db):
    m = model()
    m.update_configuration({"prices": {"costInTokensPerMillion": 40}})
    config = dict(m.configuration, prices=dict(m.configuration["prices"], costInTokensPerMillion=45))
    PsAiModel.update(configuration=config).where(PsAiModel.id == m.id).execute()  # updated_at untouched
    history = price_history(m)
    assert history[-1]["source"] == "observed" and history[-1]["valid_from"] is None
    assert history[-2]["valid_to"] is None  # not guessed


def test_a_model_never_changed_has_one_version_since_it_was_written(db):
    m = model()
    assert price_history(m) == [{"model_id": m.id, "valid_from": m.updated_at, "valid_to": None,
                                 "prices": SEED_CONFIGURATION["prices"], "source": "stored", "corrections": []}]
    with pytest.raises(psai.NotFoundError):
        price_history("no such model")


def test_superseding_keeps_the_agents_on_a_model_of_that_name(db):
    a, b = agent("a"), agent("b")
    old = model()
    a.ai_models.add(old)
    b.ai_models.add(old)
    config = make_configuration()
    config["prices"]["costInTokensPerMillion"] = 25
    new = psai.add_model(name="GPT-4", user_id=7, organization_id=2, configuration=config)
    for each in (a, b):
        chosen = each.select_model("text", "large")
        assert chosen.id == new.id and chosen.configuration["prices"]["costInTokensPerMillion"] == 25
    assert AgentModels.select().where(AgentModels.ai_model == old.id).count() == 0
    # The old row's calls keep their prices; the history of the name holds both rows.
    assert [v["model_id"] for v in price_history("GPT-4")] == [old.id, new.id]


# -- corrections ---------------------------------------------------------------------------

def usage_over_days(m, a):
    """Three calls, one a day from 2026-11-20, at 30 per million input tokens."""
    for day in range(3):
        record_usage(m, a, tokens_in=1_000_000, tokens_out=0)
    when = datetime.datetime(2026, 11, 20, 12, tzinfo=UTC)
    for index, item in enumerate(items()):
        stamp = when + datetime.timedelta(days=index)
        PsModelUsageItem.update(created_at=stamp).where(PsModelUsageItem.id == item.id).execute()
    PsModelUsage.update(created_at=when).execute()


def test_a_dry_run_changes_nothing_and_its_difference_is_what_applying_changes(db):
    m, a = model(), agent()
    usage_over_days(m, a)
    before_items = [i.data for i in items()]
    before = total()
    dry = reprice(m, {"costInTokensPerMillion": 20}, since="2026-11-21")
    assert dry == {"before": Decimal(60), "after": Decimal(40), "difference": Decimal(-20), "currency": "USD",
                   "calls": 2, "unpriced_tokens_before": 0, "unpriced_tokens_after": 0, "applied": False}
    assert [i.data for i in items()] == before_items and total() == before
    assert price_history(m)[0]["corrections"] == []
    applied = reprice(m, {"prices.costInTokensPerMillion": 20}, since="2026-11-21", dry_run=False)
    assert applied == dict(dry, applied=True)
    assert total()["USD"] - before["USD"] == dry["difference"]
    # The original snapshot is kept, and the correction is in the history.
    corrected = items()[1].data
    assert corrected["pricing"]["configuredPrices"]["costInTokensPerMillion"] == 20
    assert corrected["psai"]["originalPricing"]["configuredPrices"]["costInTokensPerMillion"] == 30
    [correction] = price_history(m)[0]["corrections"]
    assert correction["changes"] == {"costInTokensPerMillion": 20} and correction["calls"] == 2
    assert (correction["before"], correction["after"]) == (Decimal(60), Decimal(40))
    # Calls to come are not affected: that is the model's own price.
    assert m.configuration["prices"]["costInTokensPerMillion"] == 30


def test_a_correction_reaches_counter_usage_without_items(db):
    m, a = model(), agent()
    counter_row(m, a, datetime.datetime(2026, 1, 5, tzinfo=UTC), token_in_count=1_000_000)
    counter_row(m, a, datetime.datetime(2026, 3, 5, tzinfo=UTC), token_in_count=1_000_000)
    dry = reprice(m, {"costInTokensPerMillion": 10}, until="2026-01-31")
    assert (dry["before"], dry["after"]) == (Decimal(30), Decimal(10))
    before = total()["USD"]
    reprice(m, {"costInTokensPerMillion": 10}, until="2026-01-31", dry_run=False)
    assert total()["USD"] == before + dry["difference"] == Decimal(40)


def test_a_bad_correction_is_refused_and_writes_nothing(db):
    m, a = model(), agent()
    usage_over_days(m, a)
    before_items = [i.data for i in items()]
    for changes, path in [({"costInTokensPerMillion": -1}, "prices.costInTokensPerMillion"),
                          ({"costInTokenPerMillion": 1}, "costInTokenPerMillion"),
                          ({"currency": "dollars"}, "prices.currency"),
                          ({}, "changes")]:
        with pytest.raises(psai.ValidationError, match=path):
            reprice(m, changes, dry_run=False)
    assert [i.data for i in items()] == before_items
    assert price_history(m)[0]["corrections"] == []


def old_correction(data, prices, correction_id):
    """What a correction does to one item's data, the rule written out."""
    if not isinstance(data, dict):
        return data
    data = json.loads(json.dumps(data))
    pricing = data.get("pricing") if isinstance(data.get("pricing"), dict) else {}
    configured = pricing.get("configuredPrices")
    base = configured if configured is not None else prices
    base = dict(base) if isinstance(base, dict) else {}
    base.update(costInTokensPerMillion=20)
    base.pop("costPerThousandWebSearches", None)
    extras = data.get("psai") if isinstance(data.get("psai"), dict) else {}
    extras.setdefault("originalPricing", data.get("pricing"))
    extras["corrections"] = list(extras.get("corrections") or []) + [correction_id]
    data["psai"] = extras
    data["pricing"] = dict(pricing, configuredPrices=base)
    return data


def test_a_correction_changes_each_kind_of_snapshot_by_the_same_rule(db):
    """The correction is computed in SQL: snapshots without prices, with
    another correction already, with odd psai extras, or not objects at all
    are corrected as the rule says (or left alone)."""
    m, a = model(costPerThousandWebSearches=10), agent()
    record_usage(m, a, tokens_in=1_000_000, tokens_out=10, web_searches=2)
    [recorded] = items()
    usage = recorded.data["usageNormalized"]
    odd = [
        {"version": 1, "provider": "openai", "usageNormalized": usage},
        {"version": 1, "provider": "openai", "usageNormalized": usage, "pricing": {"configuredPrices": None}},
        {"version": 1, "provider": "openai", "usageNormalized": usage, "pricing": "weird", "psai": "x"},
        dict(recorded.data, psai={"originalPricing": {"configuredPrices": {"costInTokensPerMillion": 1}},
                                  "corrections": [99], "cacheWriteTokens": 5}),
        dict(recorded.data, psai={"originalPricing": None, "corrections": None}),
        # The usual shapes SQLite corrects by paths inside the item (its fast path): extras without
        # corrections, an original already kept (null too), empty extras.
        dict(recorded.data, psai={"cacheWriteTokens": 5}),
        dict(recorded.data, psai={"originalPricing": None, "corrections": [7]}),
        dict(recorded.data, psai={}),
        [1, 2],
    ]
    for data in odd:
        PsModelUsageItem.insert(user_id=1, model_id=m.id, agent_id=a.id, data=data).execute()
    before = {item.id: item.data for item in items()}
    result = reprice(m, {"costInTokensPerMillion": 20, "costPerThousandWebSearches": None}, dry_run=False)
    [correction] = price_history(m)[0]["corrections"]
    correction_id = PriceCorrection.select().get().id
    assert correction["calls"] == result["calls"] == len(odd) + 1
    for item in items():
        assert item.data == old_correction(before[item.id], m.configuration["prices"], correction_id), item.id
    assert total()["USD"] == result["after"]


def test_reprice_does_not_stop_calls_on_other_models(postgres_db):
    """PostgreSQL: while a correction waits (here for a row another
    transaction holds), calls on another model are recorded: it locks the
    corrected model and the items it changes, not the tables."""
    import threading
    m, other, a = model(), model(name="other"), agent()
    for _ in range(3):
        record_usage(m, a, tokens_in=1_000_000, tokens_out=0)
    blocker, watcher = (type(postgres_db)(postgres_db.database, **postgres_db.connect_params) for _ in range(2))
    outcome = {}

    def correct():
        outcome["reprice"] = reprice(m, {"costInTokensPerMillion": 20}, dry_run=False)
        postgres_db.close()

    def record():
        outcome["record"] = record_usage(other, a, tokens_in=10, tokens_out=1)
        postgres_db.close()

    with blocker.atomic():
        blocker.execute_sql('SELECT id FROM "ps_model_usage_item" WHERE model_id = %s LIMIT 1 FOR UPDATE', (m.id,))
        correcting = threading.Thread(target=correct)
        correcting.start()
        for _ in range(600):  # until the correction waits for a lock
            waiting = watcher.execute_sql(  # pg_stat_activity is read afresh outside a transaction
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                "current_database()").fetchone()[0]
            if waiting:
                break
            correcting.join(0.05)
        assert waiting and correcting.is_alive()
        recording = threading.Thread(target=record)
        recording.start()
        recording.join(60)
        finished_meanwhile = not recording.is_alive()
    correcting.join(60)
    recording.join(60)
    blocker.close()
    watcher.close()
    assert finished_meanwhile, "a call on another model waited for the correction"
    assert outcome["reprice"]["calls"] == 3 and outcome["reprice"]["difference"] == Decimal(-30)
    assert total()["USD"] == Decimal(60) + Decimal("0.00036")


def test_calls_are_recorded_while_a_correction_is_measured(db, backend, monkeypatch):
    """While a correction reads the usage it corrects, a call on another
    model is recorded (on SQLite the correction is measured before it takes
    the write lock; on PostgreSQL it locks only the corrected model). On
    SQLite a call on the corrected model itself recorded meanwhile is found
    under the write lock, measured and corrected too."""
    import psai._history
    m, other, a = model(), model(name="other"), agent()
    for _ in range(3):
        record_usage(m, a, tokens_in=1_000_000, tokens_out=0)
    measure, finished = psai._history.usage_parts, []

    def record_meanwhile(*args, **kwargs):
        parts = measure(*args, **kwargs)
        if not finished:
            calls = [other] + ([m] if backend.kind == "sqlite" else [])
            finished.extend(run_beside(lambda: [record_usage(x, a, tokens_in=1_000_000, tokens_out=0)
                                                for x in calls] and db.close()))
        return parts
    monkeypatch.setattr(psai._history, "usage_parts", record_meanwhile)
    before = total()["USD"]
    result = reprice(m, {"costInTokensPerMillion": 20}, dry_run=False)
    finished[1].join(60)
    assert finished[0], "a call on another model waited for the correction to end"
    corrected_calls = 4 if backend.kind == "sqlite" else 3
    assert result["calls"] == corrected_calls and result["difference"] == -10 * corrected_calls
    assert total()["USD"] == before + 30 * (corrected_calls - 2) + result["difference"]
    assert rollups.verify(db) == []  # on SQLite the folds prepared before the call were made again


def test_reprice_on_the_command_line(backend):
    def run(*args, code=0):
        result = CliRunner().invoke(cli, ["--database", backend.url] + list(args))
        assert result.exit_code == code, result.output
        return result

    run("models", "add", "--name", "OpenAI GPT-4 Large", "--user-id", "1", "--organization-id", "2",
        "--type", "text", "--size", "large", "--model", "gpt-4", "--provider", "openai", "--in-price", "30",
        "--out-price", "60", "--cached-price", "10", "--currency", "USD", "--max-tokens-out", "4096",
        "--temperature", "0.7")
    run("agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--name", "Researcher")
    run("usage", "record", "1", "--agent", "1", "--in", "1000000", "--out", "0")
    dry = run("models", "reprice", "OpenAI GPT-4 Large", "--set", "costInTokensPerMillion=25").stdout
    assert "difference  -5" in dry and "dry run: nothing changed" in dry
    assert json.loads(run("usage", "report", "--json").stdout)[0]["cost"] == "30"
    result = json.loads(run("models", "reprice", "1", "--set", "costInTokensPerMillion=25", "--apply",
                            "--json").stdout)
    assert result["applied"] is True and result["difference"] == "-5"
    assert json.loads(run("usage", "report", "--json").stdout)[0]["cost"] == "25"
    assert "Not a price" in run("models", "reprice", "1", "--set", "nope=1", code=2).output
    history = run("models", "history", "1").stdout
    assert "corrections" in history.splitlines()[0] and history.splitlines()[2].rstrip().endswith("1")


# -- unpriced usage --------------------------------------------------------------------------

def break_prices(m, prices):
    """Prices as a hand-written or foreign row may hold them (psai refuses to write these)."""
    mark = "%s" if psai.db.is_postgres() else "?"
    psai.database.execute_sql('UPDATE "ps_ai_models" SET "configuration" = %s WHERE "id" = %s' % (mark, mark),
                              (json.dumps(dict(m.configuration, prices=prices)), m.id))


@pytest.mark.parametrize("prices, reason", [
    (None, "no prices"),
    ({"costInTokensPerMillion": "30", "costOutTokensPerMillion": 60, "costInCachedContextTokensPerMillion": 1,
      "currency": "USD"}, "prices.costInTokensPerMillion is not a usable rate"),
    ({"costOutTokensPerMillion": 60, "costInCachedContextTokensPerMillion": 1, "currency": "USD"},
     "prices.costInTokensPerMillion is missing"),
])
def test_usage_without_usable_prices_is_unpriced_never_zero(db, prices, reason):
    good, bad = model("good"), model("bad")
    break_prices(bad, prices)
    record_usage(good, None, tokens_in=1_000_000, tokens_out=0)
    record_usage(bad, None, tokens_in=500, tokens_out=20)
    rows = cost_report("model")
    unpriced = [r for r in rows if r["model_name"] == "bad"]
    assert [(r["cost"], r["currency"], r["unpriced_tokens"]) for r in unpriced] == [(None, None, 520)]
    assert reason in unpriced[0]["unpriced_reason"]
    totals = report_totals(rows, "model")
    assert totals["USD"]["cost"] == Decimal(30) and totals[None] == {
        "calls": 1, "tokens_in": 500, "tokens_out": 20, "cached_tokens": 0, "cache_write_tokens": 0,
        "reasoning_tokens": 0, "cost": None, "unpriced_tokens": 520, "provider_cost": None}
    with pytest.raises(psai.UnpricedUsageError, match="520 tokens .* cannot be priced: model %d" % bad.id):
        cost_report("model", strict=True)


def test_strict_report_on_the_command_line(backend):
    psai.migrate()
    m = model()
    record_usage(m, None, tokens_in=100, tokens_out=10)
    ok = CliRunner().invoke(cli, ["--database", backend.url, "usage", "report", "--strict"])
    assert ok.exit_code == 0, ok.output
    break_prices(m, None)
    # An item without a snapshot, written by another tool: a row of its own, a moment later (at the
    # same moment it would be an edit in place to PostgreSQL's rollup check: test_rollups).
    item = items()[0]
    moment = item.created_at + datetime.timedelta(microseconds=1)
    PsModelUsageItem.insert(user_id=item.user_id, model_id=item.model_id, agent_id=item.agent_id,
                            created_at=moment, updated_at=moment, data=dict(item.data, pricing={})).execute()
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item.id).execute()
    table = CliRunner().invoke(cli, ["--database", backend.url, "usage", "report"])
    assert table.exit_code == 0 and "unpriced: model_id %d: 110 tokens: no prices" % m.id in table.stderr
    strict = CliRunner().invoke(cli, ["--database", backend.url, "usage", "report", "--strict"])
    assert strict.exit_code == 1 and "cannot be priced" in strict.stderr


# -- concurrency ------------------------------------------------------------------------------

@pytest.mark.slow
def test_processes_recording_while_prices_change(backend):
    psai.migrate()
    m, a = model(), agent()
    from workers import change_prices, record_many
    context = multiprocessing.get_context("spawn")
    calls, changes = (150, 30) if backend.kind == "sqlite" else (60, 20)
    with context.Pool(5) as pool:
        results = [pool.apply_async(record_many, (backend.url, m.id, a.id, calls, seed)) for seed in range(4)]
        results.append(pool.apply_async(change_prices, (backend.url, m.id, changes)))
        for result in results:
            result.get(timeout=300)
    psai.connect(backend.url)
    recorded = items()
    assert len(recorded) == 4 * calls
    # Every call carries the price in force when it was recorded, by the history.
    history = price_history(m)
    assert [v["prices"]["costInTokensPerMillion"] for v in history] == [30] + list(range(1, changes + 1))
    for item in recorded:
        [version] = [v for v in history if v["valid_from"] <= item.created_at
                     and (v["valid_to"] is None or item.created_at < v["valid_to"])]
        assert item.data["pricing"]["configuredPrices"] == version["prices"]
    assert total() == {"USD": sum(item_cost(i.data) for i in recorded)}
    [row] = cost_report("model")
    assert row["priced_from"] == "snapshot"
    assert row["tokens_in"] == sum(c.token_in_count + c.token_in_cached_context_count for c in PsModelUsage.select())


def test_items_that_cannot_be_read_are_reported_not_dropped(db):
    m = model()
    record_usage(m, None, tokens_in=1_000_000, tokens_out=0)
    mark = "%s" if psai.db.is_postgres() else "?"
    insert = ('INSERT INTO "ps_model_usage_item" (user_id, created_at, updated_at, model_id, agent_id, data) '
              'VALUES (1, %s, %s, %s, 0, %s)' % (mark, mark, mark, mark))
    stamp = PsModelUsageItem.created_at.db_value(datetime.datetime.now(UTC))
    odd = ['[1, 2]', '{"usageNormalized": "many"}', '{"usageNormalized": {"tokensIn": "5"}, "pricing": 7}']
    if not psai.db.is_postgres():
        odd.append("not json at all")  # only SQLite's text column can hold it
    for data in odd:
        psai.database.execute_sql(insert, (stamp, stamp, m.id, data))
    rows = cost_report("model")
    assert [(r["currency"], r["cost"], r["calls"]) for r in rows] == [("USD", Decimal(30), 1), (None, None, len(odd))]
    assert "no usable token counts" in rows[1]["unpriced_reason"]
    with pytest.raises(psai.UnpricedUsageError):
        cost_report("day", strict=True)


def test_counters_without_items_price_alike_row_by_row_and_summed(db, monkeypatch):
    """A database from before items: SQL adds the rows up per price period,
    or, past a few hundred period bounds, takes each row on its own; the
    same report either way."""
    m, a, b = model(), agent("a"), agent("b")
    first = PsAiModel.get_by_id(m.id).updated_at
    m.update_configuration({"prices": {"costInTokensPerMillion": 60}})
    for when, who in ((first - datetime.timedelta(days=3), a), (first + datetime.timedelta(microseconds=5), a),
                      (datetime.datetime.now(UTC) + datetime.timedelta(hours=1), b)):
        counter_row(m, who, when, token_in_count=1_000_000, token_out_count=1000)
    reports = {by: cost_report(by) for by in ("model", "agent", "tree", "day")}
    monkeypatch.setattr("psai.reports.MAX_PERIOD_BRANCHES", 0)
    assert {by: cost_report(by) for by in reports} == reports
    assert report_totals(reports["model"])["USD"]["cost"] == Decimal(60 + 30 + 60) + Decimal(3 * 1000 * 60) / 10 ** 6
