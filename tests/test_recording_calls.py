"""What a recorded call is, whatever the caller does: recorded once however
often its response is recorded (the provider's response id), and never
refused after the provider was paid (a model name no configured model
matches is recorded unpriced, then assigned). On both backends."""
import datetime
import json
import multiprocessing
from decimal import Decimal

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem, ResponseUsage
from psai._check import check
from psai._genai import genai_catalog
from psai.migrations import runner
from psai.cli import cli
from psai import rollups
from psai.rollups import rebuild
from psai._sql import item_by_response_id_sql

M = Decimal(10) ** 6
PRICES = {"costInTokensPerMillion": 2.5, "costOutTokensPerMillion": 10,
          "costInCachedContextTokensPerMillion": 1.25, "currency": "USD"}
# 3000 in (1024 cached), 700 out.
COST = (Decimal(3000 - 1024) * Decimal("2.5") + 1024 * Decimal("1.25") + 700 * 10) / M


def chat(response_id="chatcmpl-1", model="gpt-4o-2024-08-06"):
    response = {"object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3000, "completion_tokens": 700, "total_tokens": 3700,
                          "prompt_tokens_details": {"cached_tokens": 1024}}}
    if response_id is not None:
        response["id"] = response_id
    return response


def chat_chunks(response_id="chatcmpl-1"):
    whole = chat(response_id)
    head = {"id": response_id, "object": "chat.completion.chunk", "model": whole["model"]}
    return [dict(head, choices=[{"index": 0, "delta": {"content": "hi"}}]),
            dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            dict(head, choices=[], usage=whole["usage"])]


def gpt4o(**changes):
    return PsAiModel.create(user_id=1, organization_id=1, name="GPT-4o", configuration=dict({
        "type": "text", "modelSize": "large", "model": "gpt-4o", "provider": "openai", "active": True,
        "maxTokensOut": 4096, "defaultTemperature": 0.7, "prices": PRICES}, **changes))


@pytest.fixture
def agent(db):
    return PsAgent.create(user_id=7, class_id=1, group_id=1, configuration={"name": "Researcher"})


def counted(model_id=None):
    rows = PsModelUsage.select() if model_id is None else PsModelUsage.select().where(PsModelUsage.model == model_id)
    return sum(r.token_in_count + r.token_in_cached_context_count for r in rows), sum(r.token_out_count for r in rows)


# -- one call however often its response is recorded --------------------------------------

def test_the_same_response_recorded_twice_is_one_call(agent):
    model = gpt4o()
    first = psai.record_response(model, agent, chat())
    again = psai.record_response(model, agent, chat())
    assert (first.cost, first.currency, first.duplicate) == (COST, "USD", False)
    assert (again.cost, again.currency, again.duplicate, again.usage_row) == (COST, "USD", True, None)
    assert first.response_id == again.response_id == "chatcmpl-1"
    assert PsModelUsageItem.select().count() == 1 and counted() == (3000, 700)
    [row] = psai.cost_report("model")
    assert (row["calls"], row["cost"]) == (1, COST)
    assert PsModelUsageItem.get().data["psai"]["responseId"] == "chatcmpl-1"


def test_a_stream_then_its_final_object_is_one_call(agent):
    model = gpt4o()
    with psai.track(agent, model) as run:
        assert run.record(chat_chunks()) == COST
        assert run.record(chat()) == COST  # the SDK's accumulated object of the same stream
    assert (run.calls, run.cost) == (1, {"USD": COST})
    assert PsModelUsageItem.select().count() == 1 and counted() == (3000, 700)


def test_responses_without_an_id_are_recorded_each_time(agent):
    model = gpt4o()
    calls = [psai.record_response(model, agent, chat(response_id=None)) for _ in range(2)]
    assert [c.duplicate for c in calls] == [False, False] and calls[0].response_id is None
    assert PsModelUsageItem.select().count() == 2 and counted() == (6000, 1400)


def test_a_duplicate_inside_the_callers_transaction_leaves_it_usable(db, agent):
    model = gpt4o()
    psai.record_response(model, agent, chat())
    with db.atomic():
        assert psai.record_response(model, agent, chat()).duplicate
        psai.record_response(model, agent, chat("chatcmpl-2"))  # the transaction goes on
    assert PsModelUsageItem.select().count() == 2 and counted() == (6000, 1400)


def test_a_duplicate_on_another_agent_or_model_is_still_the_first_call(agent):
    model = gpt4o()
    other = PsAgent.create(user_id=7, class_id=1, group_id=1, configuration={"name": "Other"})
    psai.record_response(model, agent, chat())
    again = psai.record_response(None, other, chat())
    assert again.duplicate and again.model_id == model.id and again.cost == COST
    assert PsModelUsageItem.select().count() == 1


def test_the_response_id_lookup_uses_the_index(db):
    explain = "EXPLAIN " if psai.database.obj.__class__.__name__.startswith("Postgres") else "EXPLAIN QUERY PLAN "
    if explain == "EXPLAIN ":
        db.execute_sql("SET enable_seqscan = off")  # an empty table: the plan the index allows
    plan = " ".join(str(row) for row in db.execute_sql(explain + item_by_response_id_sql(db), ("chatcmpl-1",)))
    assert "psai_usage_item_response_id" in plan, plan


def test_processes_recording_the_same_responses_at_once_record_each_once(backend):
    psai.migrate()
    model = gpt4o()
    agent = PsAgent.create(user_id=7, class_id=1, group_id=1, configuration={"name": "Researcher"})
    responses = [chat("chatcmpl-%d" % i) for i in range(15)]
    processes = 4
    from workers import record_responses
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = [pool.apply_async(record_responses, (backend.url, model.id, agent.id, responses))
                   for _ in range(processes)]
        duplicates = [r.get(timeout=120) for r in results]
    assert sum(duplicates) == len(responses) * (processes - 1)
    assert PsModelUsageItem.select().count() == len(responses)
    assert counted() == (3000 * len(responses), 700 * len(responses))
    assert psai.cost_report("model")[0]["cost"] == COST * len(responses)


# -- a paid call is never refused for lack of a model --------------------------------------

def test_an_unknown_model_name_is_recorded_unpriced_then_assigned(agent):
    gpt4o()
    call = psai.record_response(None, agent, chat(model="gpt-9-2027-01-01"))
    assert call.cost is None and "matched no configured model" in call.unpriced_reason
    placeholder = PsAiModel.get_by_id(call.model_id)
    assert placeholder.name == "Unmatched model: gpt-9-2027-01-01 (openai)"
    assert placeholder.configuration["active"] is False and placeholder.configuration["prices"] == {}
    item = PsModelUsageItem.get()
    assert item.model_id == placeholder.id and item.data["psai"]["unmatchedModel"] == "gpt-9-2027-01-01"
    # The same name again: the same placeholder; it is never resolved or selected.
    assert psai.record_response(None, agent, chat("chatcmpl-2", model="gpt-9-2027-01-01")).model_id == placeholder.id
    with pytest.raises(psai.NotFoundError):
        psai.resolve_model("gpt-9-2027-01-01")
    [row] = [r for r in psai.cost_report("model") if r["model_id"] == placeholder.id]
    assert row["cost"] is None and row["unpriced_tokens"] == 2 * 3700 and row["calls"] == 2
    assert "psai usage assign" in row["unpriced_reason"]
    found = [f for f in check() if f["table"] == "ps_ai_models"]
    assert [f["id"] for f in found] == [placeholder.id] and "gpt-9-2027-01-01" in found[0]["problem"]

    [nothing] = psai.assign_unmatched(dry_run=False)  # no model of that name yet: nothing moves
    assert nothing["model_id"] is None and not nothing["applied"] and nothing["calls"] == 2
    gpt9 = gpt4o(model="gpt-9")
    [planned] = psai.assign_unmatched()
    assert planned["model_id"] == gpt9.id and not planned["applied"]
    assert PsModelUsageItem.select().where(PsModelUsageItem.model_id == placeholder.id).count() == 2
    [done] = psai.assign_unmatched(dry_run=False)
    assert done["applied"]
    [row] = psai.cost_report("model")
    assert (row["model_id"], row["calls"], row["cost"], row["unpriced_tokens"]) == (gpt9.id, 2, 2 * COST, 0)
    assert counted(gpt9.id) == (6000, 1400) and PsModelUsage.select().count() >= 1
    assert PsAiModel.get_or_none(PsAiModel.id == placeholder.id) is None
    assert psai.recorded_response("chatcmpl-2").cost == COST
    assert [f for f in check() if f["table"] in ("ps_ai_models", "ps_model_usage_item")] == []


def test_track_records_an_unknown_model_unpriced(agent):
    with psai.track(agent) as run:
        assert run.record(chat(model="gpt-9")) is None
    assert (run.calls, run.unpriced_calls) == (1, 1) and PsModelUsageItem.select().count() == 1


def test_only_an_inactive_model_may_have_no_prices(db):
    with pytest.raises(psai.ValidationError, match="costInTokensPerMillion"):
        gpt4o(prices={})
    assert gpt4o(prices={}, active=False).configuration["prices"] == {}


def test_a_bad_name_suggests_the_nearest_configured_names(agent):
    gpt4o()
    gpt4o(model="gpt-4o-mini")
    with pytest.raises(psai.NotFoundError, match="nearest configured: gpt-4o"):
        psai.resolve_model("gtp-4o")


# -- the command line --------------------------------------------------------------------

def test_record_response_prints_the_calls_cost(backend, agent, tmp_path):
    gpt4o()
    path = tmp_path / "response.json"
    path.write_text(json.dumps(chat()))
    runner = CliRunner()
    env = {"PSAI_DATABASE_URL": backend.url}
    result = runner.invoke(cli, ["usage", "record-response", "--agent", str(agent.id), "--file", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "%s USD" % COST in result.output and "usage row" not in result.output
    again = runner.invoke(cli, ["usage", "record-response", "--file", str(path), "--json"], env=env)
    data = json.loads(again.output)
    assert (data["cost"], data["currency"], data["duplicate"]) == (str(COST), "USD", True)
    path.write_text(json.dumps(chat("chatcmpl-2", model="gpt-9")))
    unknown = runner.invoke(cli, ["usage", "record-response", "--file", str(path)], env=env)
    assert unknown.exit_code == 0 and "unpriced" in unknown.output
    assign = runner.invoke(cli, ["usage", "assign"], env=env)
    assert assign.exit_code == 0 and "gpt-9" in assign.output and "dry run" in assign.output


# -- tokens priced apart: audio, images, 12-hour cache writes ----------------------------

MODALITY_PRICES = {"costInAudioTokensPerMillion": 40, "costOutAudioTokensPerMillion": 80,
                   "costOutImageTokensPerMillion": 30}


def report_of(model):
    """The model's rows, read from the items (the triggers dropped in a transaction rolled back after) and from
    the rollups the triggers keep, then rebuilt: the same."""
    db = psai.database.obj
    with db.atomic() as transaction:
        rollups.disable(db)
        scanned = [r for r in psai.cost_report("model") if r["model_id"] == model.id]
        transaction.rollback()
    assert rollups.enabled(db)
    assert [r for r in psai.cost_report("model") if r["model_id"] == model.id] == scanned
    rebuild()
    assert [r for r in psai.cost_report("model") if r["model_id"] == model.id] == scanned
    return scanned


@pytest.mark.parametrize("counts, key", [
    ({"audio_in_tokens": 400}, "costInAudioTokensPerMillion"),
    ({"audio_tokens": 300}, "costOutAudioTokensPerMillion"),
    ({"image_tokens": 200}, "costOutImageTokensPerMillion"),
])
def test_audio_and_image_tokens_are_unpriced_without_their_rate(agent, counts, key):
    model = gpt4o()
    psai.record_usage(model, agent, tokens_in=3000, cached_tokens=1024, tokens_out=700, **counts)
    psai.record_usage(model, agent, tokens_in=3000, cached_tokens=1024, tokens_out=700)  # text only: priced
    rows = report_of(model)
    [unpriced] = [r for r in rows if r["cost"] is None]
    assert key in unpriced["unpriced_reason"] and unpriced["unpriced_tokens"] == 3700 and unpriced["calls"] == 1
    assert [r["cost"] for r in rows if r["cost"] is not None] == [COST]


def test_a_responses_audio_output_is_unpriced_without_its_rate(agent):
    model = gpt4o()
    spoken = dict(chat(), usage=dict(chat()["usage"], completion_tokens_details={"audio_tokens": 300}))
    with psai.track(agent, model) as run:
        assert run.record(spoken) is None
    assert run.unpriced_calls == 1
    model.update_configuration({"prices": MODALITY_PRICES})
    assert psai.record_response(model, agent, dict(spoken, id="chatcmpl-2")).cost == (
        1976 * Decimal("2.5") + 1024 * Decimal("1.25") + 400 * 10 + 300 * 80) / M


def test_audio_and_image_tokens_price_at_their_own_rates(agent):
    model = gpt4o(prices=dict(PRICES, **MODALITY_PRICES))
    psai.record_usage(model, agent, tokens_in=3000, cached_tokens=1024, audio_in_tokens=400, tokens_out=700,
                      audio_tokens=300, image_tokens=200)
    text_in, text_out = 3000 - 1024 - 400, 700 - 300 - 200
    expected = (text_in * Decimal("2.5") + 1024 * Decimal("1.25") + 400 * 40 + text_out * 10 + 300 * 80
                + 200 * 30) / M
    [row] = report_of(model)
    assert row["cost"] == expected and row["tokens_in"] == 3000 and row["tokens_out"] == 700
    item = PsModelUsageItem.get()
    assert item.data["psai"]["audioInTokens"] == 400 and item.data["usageNormalized"]["audioTokens"] == 300
    assert counted() == (3000, 700 - 300 - 200)  # PolicySynth's counters: audio and image out have their own


def test_audio_in_through_a_response_is_priced_apart(agent):
    model = gpt4o(prices=dict(PRICES, **MODALITY_PRICES))
    usage = ResponseUsage(tokens_in=3000, tokens_out=700, cached_tokens=1024, audio_in_tokens=400, audio_tokens=300,
                          model="gpt-4o", provider="openai", api_family="openai.chat.completions",
                          provider_metadata={"responseId": "chatcmpl-a"})
    call = psai.record_response(model, agent, usage)
    assert call.cost == (1576 * Decimal("2.5") + 1024 * Decimal("1.25") + 400 * 40 + 400 * 10 + 300 * 80) / M


def test_calls_assigned_from_a_placeholder_move_in_the_rollups_the_triggers_keep(db, agent):
    """assign_unmatched moves items by an UPDATE: the triggers take each off
    the placeholder's rollup row and add it to the model's, audio input
    priced apart included (before the merge it dropped those days instead)."""
    usage = ResponseUsage(tokens_in=3000, tokens_out=700, cached_tokens=1024, audio_in_tokens=400,
                          model="gpt-9-2027-01-01", provider="openai", api_family="openai.chat.completions",
                          provider_metadata={"responseId": "chatcmpl-u"})
    placeholder_id = psai.record_response(None, agent, usage).model_id

    def rolled(model_id):
        return db.execute_sql('SELECT COALESCE(SUM("calls"), 0), COALESCE(SUM("audio_in"), 0) FROM '
                              '"psai_usage_rollup" WHERE "model_id" = %s' % db.param, (model_id,)).fetchone()

    assert rollups.enabled(db) and tuple(rolled(placeholder_id)) == (1, 400)
    gpt9 = gpt4o(model="gpt-9", prices=dict(PRICES, **MODALITY_PRICES))
    [done] = psai.assign_unmatched(dry_run=False)
    assert done["applied"] and done["model_id"] == gpt9.id
    assert tuple(rolled(placeholder_id)) == (0, 0) and tuple(rolled(gpt9.id)) == (1, 400)
    plan = rollups.read_plan(db)
    assert plan.days and not plan.reads_items  # the report reads the rollups alone
    [row] = report_of(gpt9)
    assert row["cost"] == (1576 * Decimal("2.5") + 1024 * Decimal("1.25") + 400 * 40 + 700 * 10) / M
    assert rollups.verify(db) == []


def openai_12h(response_id):
    usage = ResponseUsage(tokens_in=3000, tokens_out=700, cached_tokens=1024, cache_write_tokens=500,
                          cache_write_12h_tokens=600, model="gpt-5", provider="openai", api_family="responses",
                          provider_metadata={"responseId": response_id})
    return usage


def test_twelve_hour_cache_writes_price_at_their_key_or_are_unpriced(agent):
    model = gpt4o(prices=dict(PRICES, cacheWriteInputCostMultiplier=1.25))
    call = psai.record_response(model, agent, openai_12h("resp_1"))
    assert call.cost is None and "cacheWrite12hInputCostMultiplier" in call.unpriced_reason
    item = PsModelUsageItem.get()
    assert item.data["psai"]["cacheWriteTokens"] == 1100 and item.data["psai"]["cacheWrite12hTokens"] == 600
    [row] = report_of(model)
    assert row["cost"] is None and "12-hour cache writes" in row["unpriced_reason"]

    model.update_configuration({"prices": {"cacheWrite12hInputCostMultiplier": 2}})
    call = psai.record_response(model, agent, openai_12h("resp_2"))
    # 876 fresh × 2.5 + 1024 cached × 1.25 + 500 30-minute writes × 2.5 × 1.25 + 600 12-hour × 2.5 × 2 + 700 × 10
    expected = (876 * Decimal("2.5") + 1024 * Decimal("1.25") + 500 * Decimal("3.125") + 600 * 5 + 700 * 10) / M
    assert call.cost == expected
    assert [r["cost"] for r in report_of(model) if r["cost"] is not None] == [expected]


def test_catalogs_fill_the_modality_rates():
    from psai._litellm import consumed_keys, map_entry
    entry = {"mode": "chat", "litellm_provider": "openai", "max_output_tokens": 16384,
             "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
             "input_cost_per_audio_token": 4e-05, "output_cost_per_audio_token": 8e-05}
    prices = map_entry("gpt-4o-audio-preview", entry, model_size="medium")["prices"]
    assert (prices["costInAudioTokensPerMillion"], prices["costOutAudioTokensPerMillion"]) == (40, 80)
    assert "input_cost_per_audio_token" in consumed_keys(entry)
    genai = pytest.importorskip("genai_prices")
    _version, entries, _skipped = genai_catalog(["google"], lambda _source, model: model == "gemini-2.5-flash",
                                                datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
    assert genai and entries["google/gemini-2.5-flash"]["configuration"]["prices"]["costInAudioTokensPerMillion"] == 1


def test_audio_input_beyond_the_input_is_refused(agent):
    with pytest.raises(psai.ValidationError, match="audio_in_tokens"):
        psai.record_usage(gpt4o(), agent, tokens_in=100, audio_in_tokens=101)
    assert PsModelUsageItem.select().count() == 0


def test_usage_record_takes_audio_input(backend, agent):
    model = gpt4o(prices=dict(PRICES, **MODALITY_PRICES))
    result = CliRunner().invoke(cli, ["usage", "record", str(model.id), "--in", "1000", "--audio-in", "400",
                                      "--out", "10"], env={"PSAI_DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    assert PsModelUsageItem.get().data["psai"]["audioInTokens"] == 400
    assert psai.cost_report("model")[0]["cost"] == (600 * Decimal("2.5") + 400 * 40 + 10 * 10) / M


def test_the_upgrade_drops_the_rollups_split_the_old_way(backend):
    db = psai.database.obj
    runner().up(target="0009_rollup_fingerprint")
    columns = {c.name for c in db.get_columns("psai_usage_rollup")}
    assert "hour" in columns and "apart" not in columns
    row = dict.fromkeys(("model_id", "agent_id", "has_usage", "model_priced", "long", "hour", "calls", "fresh_in",
                         "cached", "cache_write", "out", "web", "all_in", "all_out", "cache_write_1h", "id_sum"), 1)
    row.update(range_day="2026-11-01", day="2026-11-01")
    db.execute_sql('INSERT INTO "psai_usage_rollup" (%s) VALUES (%s)' % (
        ", ".join('"%s"' % name for name in row), ", ".join([db.param] * len(row))), list(row.values()))
    assert psai.migrate() == ["0010_response_ids_and_apart_sums", "0011_sqlite_ids_never_reused",
                              "0012_rollup_triggers", "0013_settings",
                              "0014_rollup_triggers_read_every_count", "0015_rollup_reasoning_sum", "0016_budget_slots",
                              "0017_attribution_ledger", "0018_rollup_read_indexes", "0019_budget_attribution",
                              "0020_postgres_statement_triggers", "0021_budget_session",
                              "0022_copied_items",
                              "0023_postgres_emptied_rows", "0024_rollup_summaries", "0025_day_changes"]
    columns = {c.name for c in db.get_columns("psai_usage_rollup")}
    assert {"apart", "cache_write_12h", "audio_in", "audio_out", "image_out"} <= columns and "hour" not in columns
    assert db.execute_sql('SELECT COUNT(*) FROM "psai_usage_rollup"').fetchone()[0] == 0
    psai.record_usage(gpt4o(), None, tokens_in=10, tokens_out=1)
    rebuild()
    assert psai.cost_report("model")[0]["calls"] == 1
