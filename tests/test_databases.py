"""Several databases in one process: psai.using(db), peewee's bind_ctx,
threads on two backends, and psai.copy between databases."""
import datetime
import json
from decimal import Decimal
import threading
import tracemalloc

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsAiModel, PsModelUsage, PsModelUsageItem
from psai.cli import cli
from psai._transfer import _Items

from conftest import make_backend, make_configuration


class Two:
    """The default database (bound by connect) and another, opened without
    binding (for ``two``, of the other kind); each with its URL."""


def _two(tmp_path, kind, other_kind):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = make_backend(kind, tmp_path / "first")
    second = make_backend(other_kind, tmp_path / "second")
    pair = Two()
    pair.default, pair.default_url = first.connect(), first.url
    psai.migrate()
    pair.other, pair.other_url = psai.connect(second.url, bind=False), second.url
    psai.migrate(pair.other)
    return pair, first, second


@pytest.fixture(params=["sqlite", "postgres"])
def two(request, tmp_path):
    pair, first, second = _two(tmp_path, request.param, {"sqlite": "postgres", "postgres": "sqlite"}[request.param])
    yield pair
    pair.other.close()
    first.close()
    second.close()


@pytest.fixture(params=[("sqlite", "postgres"), ("postgres", "sqlite"), ("sqlite", "sqlite")],
                ids=["sqlite-postgres", "postgres-sqlite", "sqlite-sqlite"])
def copies(request, tmp_path):
    """``two`` for a copy from ``default`` to ``other``: each way between
    the backends, and SQLite to SQLite (the items copied as stored)."""
    pair, first, second = _two(tmp_path, *request.param)
    yield pair
    pair.other.close()
    first.close()
    second.close()


def add(name, **config):
    return psai.add_model(name=name, user_id=1, organization_id=2, configuration=make_configuration(**config))


def agent(name):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name})


def test_using_sends_every_operation_to_the_block_database(two):
    other = two.other
    add("home")
    with psai.using(other) as bound:
        assert bound is other
        assert PsAiModel.select().count() == 0  # reads go to the block's database
        model = add("away", modelSize="medium")
        lead = agent("lead")
        lead.ai_models.add(model)
        assert lead.select_model("text", "large").name == "away"
        psai.record_usage(model, lead, tokens_in=1_000_000, tokens_out=0)
        [row] = psai.cost_report("model")
        assert (row["model_name"], row["cost"]) == ("away", 30)
        assert [m.name for m in PsAiModel.where_config(modelSize="medium")] == ["away"]
        assert psai.price_history(model)[0]["model_id"] == model.id
    # Outside the block: the default database, untouched by what happened inside.
    assert [m.name for m in PsAiModel.select()] == ["home"]
    assert PsAgent.select().count() == 0 and PsModelUsageItem.select().count() == 0
    assert psai.cost_report("model") == []
    with other.bind_ctx(psai.models.ALL_MODELS):  # peewee's own way works the same
        assert [m.name for m in PsAiModel.select()] == ["away"]
        assert PsModelUsageItem.select().count() == 1


def test_blocks_nest(two):
    default, other = two.default, two.other
    with psai.using(other):
        add("outer")
        with psai.using(default):
            add("inner")
        assert [m.name for m in PsAiModel.select()] == ["outer"]
    assert [m.name for m in PsAiModel.select()] == ["inner"]
    with psai.using(two.other_url) as opened:  # a URL: opened for the block, closed after it
        assert [m.name for m in PsAiModel.select()] == ["outer"]
    assert opened.is_closed()


def test_connect_does_not_close_a_database_still_in_use(two, tmp_path):
    default, other = two.default, two.other
    add("default")
    with psai.using(other):
        add("kept")
        fresh = psai.connect("sqlite:///%s" % (tmp_path / "fresh.db"))  # binds the default to a new file
        psai.migrate(fresh)
        assert [m.name for m in PsAiModel.select()] == ["kept"]  # the block's database still works
    assert PsAiModel.select().count() == 0  # the new default
    with psai.using(default):  # the old default was not closed under anyone's feet
        assert [m.name for m in PsAiModel.select()] == ["default"]
    fresh.close()


def test_two_threads_two_backends(two):
    default, other = two.default, two.other
    errors, counts = [], {}

    def work(db, label):
        try:
            with psai.using(db):
                model = add(label)
                for index in range(40):
                    psai.record_usage(model, agent("%s-%d" % (label, index)), tokens_in=1000, tokens_out=10)
                counts[label] = (PsAiModel.select().count(), PsAgent.select().count(),
                                 sum(r["tokens_in"] for r in psai.cost_report("model")))
        except Exception as exc:  # reported below, with the thread's label
            errors.append((label, exc))

    threads = [threading.Thread(target=work, args=(db, label)) for db, label in ((default, "a"), (other, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert counts == {"a": (1, 40, 40_000), "b": (1, 40, 40_000)}
    assert [m.name for m in PsAiModel.select()] == ["a"]
    with psai.using(other):
        assert [m.name for m in PsAiModel.select()] == ["b"]
        assert json.dumps(PsAiModel.get().configuration)  # JSON read back whole on its own backend


def _report(db, by):
    with psai.using(db):
        rows = psai.cost_report(by)
    return sorted((r.get("model_name") or r.get("agent_name") or "", r["tokens_in"], r["tokens_out"], r["cost"])
                  for r in rows)


def test_copy_mirrors_a_store_and_a_second_copy_changes_nothing(copies):
    source, target = copies.default, copies.other
    gpt, mini = add("GPT"), add("mini", modelSize="small")
    lead, helper = agent("lead"), agent("helper")
    helper.parent_agent = lead
    helper.save()
    lead.ai_models.add([gpt, mini])
    psai.record_usage(gpt, lead, tokens_in=1_000_000, tokens_out=100_000)
    gpt.update_configuration({"prices": {"costInTokensPerMillion": 60}})
    psai.record_usage(gpt, helper, tokens_in=500_000, tokens_out=0, cached_tokens=100_000)
    psai.record_usage(mini, None, tokens_in=10_000, tokens_out=1_000)

    preview = psai.copy(source, target, dry_run=True)
    assert preview["ps_ai_models"]["created"] == 2 and preview["ps_model_usage_item"]["created"] == 3
    with psai.using(target):
        assert PsAiModel.select().count() == 0  # a dry run writes nothing

    counts = psai.copy(source, target)
    assert counts == preview
    for by in ("model", "agent", "tree"):
        assert _report(target, by) == _report(source, by)
    with psai.using(target):
        copied = PsAiModel.get(PsAiModel.name == "GPT")
        assert copied.uuid == gpt.uuid
        assert [v["prices"]["costInTokensPerMillion"] for v in psai.price_history(copied)] == [30, 60]
        copied_lead = PsAgent.get(PsAgent.uuid == lead.uuid)
        assert sorted(m.name for m in copied_lead.ai_models) == ["GPT", "mini"]
        assert [a.uuid for a in copied_lead.sub_agent_tree()] == [lead.uuid, helper.uuid]
        item = PsModelUsageItem.select().where(PsModelUsageItem.model_id == copied.id).first()
        assert item.data["model"]["id"] == copied.id  # the item names the target's ids

    again = psai.copy(source, target)
    assert all(numbers == {"created": 0, "updated": 0} for numbers in again.values()), again
    # A change in the source reaches the target as an update, not a new row.
    psai.record_usage(gpt, lead, tokens_in=1, tokens_out=0)
    third = psai.copy(source, target)
    assert third["ps_model_usage"] == {"created": 0, "updated": 1}
    assert third["ps_model_usage_item"] == {"created": 1, "updated": 0}
    assert _report(target, "model") == _report(source, "model")


def test_a_second_copy_keeps_what_the_target_recorded(copies, clock):
    """Copy, record on the target the same day (into the copied counter row),
    copy again: the target's calls stay counted, the source's new ones are
    added, and a copy with nothing new changes nothing."""
    source, target = copies.default, copies.other
    gpt, lead = add("GPT"), agent("lead")
    psai.record_usage(gpt, lead, tokens_in=1000, tokens_out=10)
    psai.copy(source, target)

    def counters(db):
        with psai.using(db):
            return sorted((row.token_in_count, row.token_out_count) for row in PsModelUsage.select())

    clock.advance(minutes=5)
    with psai.using(target):
        psai.record_usage(PsAiModel.get(PsAiModel.uuid == gpt.uuid), PsAgent.get(PsAgent.uuid == lead.uuid),
                          tokens_in=500, tokens_out=5)
    assert counters(target) == [(1500, 15)]
    again = psai.copy(source, target)
    assert all(numbers == {"created": 0, "updated": 0} for numbers in again.values()), again
    assert counters(target) == [(1500, 15)]
    clock.advance(minutes=5)
    psai.record_usage(gpt, lead, tokens_in=200, tokens_out=2)  # the source grows too
    third = psai.copy(source, target)
    assert third["ps_model_usage"] == {"created": 0, "updated": 1}
    assert counters(target) == [(1700, 17)] and counters(source) == [(1200, 12)]
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target).values())
    assert counters(target) == [(1700, 17)]
    # What the counters say is what the items say, on the target as on the source.
    with psai.using(target):
        [row] = psai.cost_report("model")
    assert (row["calls"], row["tokens_in"], row["tokens_out"]) == (3, 1700, 17)


def input_tokens(db):
    """(what the counters hold, what the items say) of the input tokens on ``db``."""
    with psai.using(db):
        counted = sum(row.token_in_count + row.token_in_cached_context_count + row.token_in_cache_write_count
                      for row in PsModelUsage.select())
        said = sum(item.data["usageNormalized"]["tokensIn"] for item in PsModelUsageItem.select())
    return counted, said


@pytest.mark.parametrize("target_kind", ["postgres", "sqlite"])
def test_copies_while_the_target_records_lose_none_of_its_calls(tmp_path, target_kind):
    """Before, on PostgreSQL: the copy wrote each counter back as a value
    worked out from the row it had read, over the calls another process
    recorded into the row meanwhile."""
    import multiprocessing
    from workers import record_many
    pair, first, second = _two(tmp_path, "sqlite", target_kind)
    try:
        source, target = pair.default, pair.other
        gpt, lead = add("GPT"), agent("lead")
        psai.record_usage(gpt, lead, tokens_in=1000, tokens_out=10)
        psai.copy(source, target)
        with psai.using(target):
            model_id, agent_id = PsAiModel.get(PsAiModel.uuid == gpt.uuid).id, PsAgent.get(PsAgent.uuid == lead.uuid).id
        context = multiprocessing.get_context("spawn")
        copies = 0
        with context.Pool(2) as pool:
            results = [pool.apply_async(record_many, (pair.other_url, model_id, agent_id, 300, seed))
                       for seed in range(2)]
            while not all(r.ready() for r in results) or copies < 3:
                psai.record_usage(gpt, lead, tokens_in=1000, tokens_out=10)  # the source grows: each copy updates
                psai.copy(source, target)
                copies += 1
            assert all(r.get(timeout=300) for r in results)
        psai.copy(source, target)
        counted, said = input_tokens(target)
        assert counted == said == 1000 * (copies + 1) + sum(100 + (seed + i) % 7 for seed in range(2)
                                                             for i in range(300))
    finally:
        pair.other.close()
        first.close()
        second.close()


def test_copy_from_the_command_line(copies, tmp_path):
    target = copies.other
    add("GPT")
    source_url, target_url = copies.default_url, copies.other_url
    result = CliRunner().invoke(cli, ["copy", "--from", source_url, "--to", target_url, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["table"]: r["created"] for r in json.loads(result.stdout)}["ps_ai_models"] == 1
    with psai.using(target):
        assert PsAiModel.select().count() == 0
    result = CliRunner().invoke(cli, ["copy", "--from", source_url, "--to", target_url])
    assert result.exit_code == 0, result.output
    assert "ps_ai_models" in result.stdout
    with psai.using(target):
        assert [m.name for m in PsAiModel.select()] == ["GPT"]
    bad = CliRunner().invoke(cli, ["copy", "--from", "mysql://x", "--to", target_url])
    assert bad.exit_code == 2 and "unsupported database URL scheme" in bad.stderr


RESPONSE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010}}


def _state(db):
    """Everything a misplaced write could change in ``db``."""
    with psai.using(db):
        return ([(m.id, m.name, m.configuration) for m in PsAiModel.select().order_by(PsAiModel.id)],
                [(a.id, a.configuration) for a in PsAgent.select().order_by(PsAgent.id)],
                sorted(psai.AgentModels.select(psai.AgentModels.agent, psai.AgentModels.ai_model).tuples()),
                PsModelUsageItem.select().count(), psai.PsModelUsage.select().count(),
                [v["prices"] for m in PsAiModel.select() for v in psai.price_history(m)])


def test_a_row_from_another_database_is_refused_on_every_write_path(two):
    """Ids repeat across databases: a row read from one and used in a block
    on the other would act on the other's row of that id. Refused, naming both."""
    home_model, home_agent = add("home"), agent("home agent")  # id 1 in the default database
    home_model.update_configuration({"prices": {"costInTokensPerMillion": 31}})
    with psai.using(two.other):
        away_model = add("away", model="other-model")  # id 1 here too
        away_model.update_configuration({"prices": {"costInTokensPerMillion": 99}})
        away_agent = agent("away agent")
    assert (home_model.id, home_agent.id) == (away_model.id, away_agent.id)
    before = _state(two.other), _state(two.default)
    with psai.using(two.other):
        attempts = {
            "record_usage": lambda: psai.record_usage(home_model, tokens_in=1000, tokens_out=10),
            "record_usage agent": lambda: psai.record_usage(away_model, home_agent, tokens_in=1, tokens_out=1),
            "record_response": lambda: psai.record_response(home_model, None, RESPONSE),
            "track": lambda: psai.track(home_agent, away_model).__enter__(),
            "track model": lambda: psai.track(away_agent, home_model).__enter__(),
            "link add": lambda: home_agent.ai_models.add(away_model),
            "link add target": lambda: away_agent.ai_models.add(home_model),
            "link add from the model": lambda: home_model.agents.add(away_agent),
            "link remove": lambda: away_agent.ai_models.remove(home_model),
            "link clear": lambda: home_agent.ai_models.clear(),
            "select_model": lambda: home_agent.select_model("text", "large"),
            "sub_agent_tree": lambda: home_agent.sub_agent_tree(),
            "update_configuration": lambda: home_model.update_configuration({"maxTokensOut": 5}),
            "deactivate": lambda: home_model.deactivate(),
            "save": lambda: home_model.save(),
            "save agent": lambda: home_agent.save(),
            "delete_instance": lambda: home_model.delete_instance(),
            "delete agent": lambda: home_agent.delete_instance(),
            "reprice": lambda: psai.reprice(home_model, {"costInTokensPerMillion": 1}, dry_run=False),
            "price_history": lambda: psai.price_history(home_model),
            "audit": lambda: psai.audit(model=home_model, dry_run=False),
            "provenance": lambda: psai.catalog.provenance(home_model),
        }
        for name, attempt in attempts.items():
            with pytest.raises(psai.WrongDatabaseError) as refused:
                attempt()
            message = str(refused.value)
            assert psai.db.describe_database(two.default) in message, (name, message)
            assert psai.db.describe_database(two.other) in message, (name, message)
            assert isinstance(refused.value, psai.PsaiError)
    assert (_state(two.other), _state(two.default)) == before  # nothing written anywhere

    # Each row goes on working on its own database, and a row created in a
    # block belongs to that block's database.
    psai.record_usage(home_model, home_agent, tokens_in=1000, tokens_out=10)
    home_agent.ai_models.add(home_model)
    [row] = psai.cost_report("model")
    assert (row["model_name"], row["cost"]) == ("home", Decimal("0.031") + Decimal("0.0006"))
    with pytest.raises(psai.WrongDatabaseError):
        away_model.update_configuration({"maxTokensOut": 5})
    with psai.using(two.other):
        away_agent.ai_models.add(away_model)
        assert away_agent.select_model("text", "large").name == "away"
    # The same database opened again (each connect() makes a new object) is the same store.
    with psai.using(two.default_url):
        home_model.update_configuration({"maxTokensOut": 5})
        psai.record_usage(home_model, home_agent, tokens_in=1, tokens_out=0)
    assert PsAiModel.get_by_id(home_model.id).configuration["maxTokensOut"] == 5


def _items(db):
    """Every item of ``db`` as what it says, with models and agents by uuid
    (ids are each database's own), sorted: a multiset to compare stores."""
    with psai.using(db):
        models = {m.id: str(m.uuid) for m in PsAiModel.select(PsAiModel.id, PsAiModel.uuid)}
        agents = {a.id: str(a.uuid) for a in PsAgent.select(PsAgent.id, PsAgent.uuid)}
        rows = []
        for item in PsModelUsageItem.select().order_by(PsModelUsageItem.id):
            assert item.data["model"]["id"] == item.model_id
            rows.append((models[item.model_id], agents.get(item.agent_id), item.connector_id, item.user_id,
                         item.created_at, json.dumps(item.data["usageNormalized"], sort_keys=True)))
    return sorted(rows, key=repr)


def _counters(db):
    with psai.using(db):
        return sorted((str(row.model.uuid), row.created_at, row.token_in_count, row.token_out_count)
                      for row in PsModelUsage.select())


def test_a_copy_streams_its_items_in_batches(copies, clock):
    """With batches of 7, runs of items with one key (same model, agent,
    user and microsecond) straddle batch boundaries, on both sides: the
    target ends equal to the source, a second copy changes nothing, and what
    the target recorded itself (items and counters) stays."""
    source, target = copies.default, copies.other
    gpt, mini = add("GPT"), add("mini", modelSize="small")
    lead, helper = agent("lead"), agent("helper")
    runs = [1, 3, 5, 8, 13, 2, 7, 7, 1, 20]  # calls that share one key
    for day in range(4):
        for index, run in enumerate(runs):
            for call in range(run):
                psai.record_usage((gpt, mini)[index % 2], (lead, helper, None)[index % 3],
                                  tokens_in=1000 + call, tokens_out=10 + index, connector_id=index % 2 or None)
            clock.advance(minutes=7)
        clock.advance(days=1)
    assert PsModelUsageItem.select().count() == 4 * sum(runs)
    counts = psai.copy(source, target, batch=7)
    assert counts["ps_model_usage_item"] == {"created": 4 * sum(runs), "updated": 0}
    assert _items(target) == _items(source)
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target, batch=7).values())

    # The target records at a time the source has items too (the last run's key), and after.
    last = PsModelUsageItem.select().order_by(PsModelUsageItem.created_at.desc()).first()
    later, clock.moment = clock.moment, last.created_at
    with psai.using(target):
        here = PsAiModel.get(PsAiModel.uuid == mini.uuid), PsAgent.get(PsAgent.uuid == lead.uuid)
        for call in range(4):
            psai.record_usage(*here, tokens_in=5, tokens_out=1, connector_id=1)
    clock.moment = later
    own = [row for row in _items(target) if row not in _items(source)]
    assert len(own) == 4 and own[0][:5] == (str(mini.uuid), str(lead.uuid), 1, 1, last.created_at)
    for call in range(9):  # the source grows under the same key, and later
        psai.record_usage(mini, lead, tokens_in=6, tokens_out=2)
        clock.advance(seconds=call % 2)
    third = psai.copy(source, target, batch=7)
    assert third["ps_model_usage_item"] == {"created": 9, "updated": 0}
    assert _items(target) == sorted(_items(source) + own, key=repr)
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target, batch=7).values())
    # The target's counters hold its own calls and the source's.
    with psai.using(target):
        target_in = sum(row.token_in_count for row in PsModelUsage.select())
        assert target_in == sum(r["tokens_in"] for r in psai.cost_report("model"))
    assert target_in == sum(row[2] for row in _counters(source)) + 4 * 5


def test_a_copy_matches_items_whose_stored_text_is_not_in_time_order(tmp_path, clock):
    """SQLite compares times as text: an item stored by hand in another
    format sorts out of time order, and the copy matches the items whole
    instead (the same result), on the first copy and the next."""
    source = make_backend("sqlite", tmp_path).connect()
    psai.migrate()
    (tmp_path / "other").mkdir()
    target = psai.connect(make_backend("sqlite", tmp_path / "other").url, bind=False)
    try:
        gpt = add("GPT")
        for call in range(30):
            psai.record_usage(gpt, tokens_in=100 + call, tokens_out=1)
            clock.advance(hours=1)
        first = PsModelUsageItem.select().order_by(PsModelUsageItem.id).first()
        # The earliest call written ISO-style with a "T": as text it sorts after every other.
        source.execute_sql('UPDATE "ps_model_usage_item" SET "created_at" = ? WHERE "id" = ?',
                           (first.created_at.isoformat(), first.id))
        assert psai.copy(source, target, batch=7)["ps_model_usage_item"] == {"created": 30, "updated": 0}
        assert _items(target) == _items(source)
        assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target, batch=7).values())
    finally:
        target.close()
        source.close()


def _force_whole(monkeypatch):
    """The copy matches the items whole, as when an order cannot be walked (``_OutOfOrder``)."""
    def out_of_order(*args, **kwargs):
        raise psai._transfer._OutOfOrder()
    monkeypatch.setattr(psai._transfer, "_merge_items", out_of_order)


def _edit_in_place(db, item_id, **changes):
    """An item's JSON changed by hand where it is (its id, times and key kept)."""
    with psai.using(db):
        item = PsModelUsageItem.get_by_id(item_id)
        data = json.dumps(dict(item.data, **changes))
        db.execute_sql('UPDATE "ps_model_usage_item" SET "data" = %s WHERE "id" = %s' % (db.param, db.param),
                       (data, item_id))


@pytest.mark.parametrize("walk", ["side by side", "whole"])
def test_a_copy_never_overwrites_an_item_the_target_recorded_at_the_same_time(copies, clock, monkeypatch, walk):
    """Before, the copy matched a source item to the target's own item of
    the same model, agent, connector, user and microsecond, and wrote the
    source's JSON over it: the target's call was lost from its items (its
    counters still counted it; CI: 639800 tokens counted, 639699 in the
    items). Now a copy updates only items it wrote itself
    (``psai_copied_items``), and the target keeps both calls."""
    if walk == "whole":
        _force_whole(monkeypatch)
    source, target = copies.default, copies.other
    gpt, lead = add("GPT"), agent("lead")
    psai.record_usage(gpt, lead, tokens_in=100, tokens_out=1)
    psai.copy(source, target)  # the model, the agent (the target's ids) and the day's counter row
    clock.advance(minutes=5)
    with psai.using(target):
        here = PsAiModel.get(PsAiModel.uuid == gpt.uuid), PsAgent.get(PsAgent.uuid == lead.uuid)
        psai.record_usage(*here, tokens_in=7, tokens_out=1)  # the target's own call ...
    psai.record_usage(gpt, lead, tokens_in=1000, tokens_out=10)  # ... and the source's, at the same microsecond
    source_item = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).first()
    with psai.using(target):
        own = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).first()
    assert own.created_at == source_item.created_at and (own.user_id, own.connector_id) == (
        source_item.user_id, source_item.connector_id)

    preview = psai.copy(source, target, dry_run=True)
    assert preview["ps_model_usage_item"] == {"created": 1, "updated": 0}
    assert input_tokens(target) == (107, 107)  # a dry run writes nothing
    assert psai.copy(source, target) == preview
    assert input_tokens(target) == (1107, 1107)
    with psai.using(target):
        kept = PsModelUsageItem.get_by_id(own.id)
        assert (kept.data, kept.updated_at) == (own.data, own.updated_at)
        assert PsModelUsageItem.select().count() == 3
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target).values())

    # The source's item edited where it is: its copy follows, the target's own call stays as it was.
    _edit_in_place(source, source_item.id, note="edited")
    assert psai.copy(source, target)["ps_model_usage_item"] == {"created": 0, "updated": 1}
    with psai.using(target):
        notes = sorted((item.data.get("note") or "", item.data["usageNormalized"]["tokensIn"])
                       for item in PsModelUsageItem.select())
        assert PsModelUsageItem.get_by_id(own.id).data == own.data
    assert notes == [("", 7), ("", 100), ("edited", 1000)]
    assert input_tokens(target) == (1107, 1107)
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target).values())


@pytest.mark.parametrize("walk", ["side by side", "whole"])
def test_items_a_copy_wrote_before_it_remembered_them_are_matched_by_equality(copies, clock, monkeypatch, walk):
    """A target filled by a copy before psai remembered the items it wrote
    (here: the memory emptied) is matched by what its items hold: a second
    copy duplicates nothing and remembers them. Such an item edited in the
    source since is copied again, as new (the one limit, docs/store.md)."""
    if walk == "whole":
        _force_whole(monkeypatch)
    source, target = copies.default, copies.other
    gpt, lead = add("GPT"), agent("lead")
    for call in range(3):
        psai.record_usage(gpt, lead, tokens_in=100 + call, tokens_out=1)
        clock.advance(seconds=call % 2)  # two calls share their time
    assert psai.copy(source, target)["ps_model_usage_item"] == {"created": 3, "updated": 0}

    def remembered():
        return target.execute_sql('SELECT COUNT(*) FROM "psai_copied_items"').fetchone()[0]
    assert remembered() == 3
    target.execute_sql('DELETE FROM "psai_copied_items"')
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target).values())
    assert remembered() == 3 and _items(target) == _items(source)

    target.execute_sql('DELETE FROM "psai_copied_items"')
    first = PsModelUsageItem.select().order_by(PsModelUsageItem.id).first()
    _edit_in_place(source, first.id, note="edited")
    assert psai.copy(source, target)["ps_model_usage_item"] == {"created": 1, "updated": 0}
    with psai.using(target):
        assert PsModelUsageItem.select().count() == 4
    assert all(n == {"created": 0, "updated": 0} for n in psai.copy(source, target).values())


def _stored_items(db):
    """Every item of ``db`` as psai reads it, in id order: what a copy wrote."""
    with psai.using(db):
        return [(i.id, i.user_id, i.model_id, i.agent_id, i.connector_id, i.created_at, i.updated_at, i.data)
                for i in PsModelUsageItem.select().order_by(PsModelUsageItem.id)]


def test_a_whole_number_stored_as_a_fraction_is_copied_as_the_general_path_reads_it(tmp_path, clock, monkeypatch):
    """SQLite keeps a 7.5 given to an INTEGER column. The general path reads
    it as its field does (7); so does the copy as stored, whose second copy
    then matches what the general path wrote instead of adding the item again."""
    source = make_backend("sqlite", tmp_path).connect()
    psai.migrate()
    psai.record_usage(add("GPT"), agent("lead"), tokens_in=100, tokens_out=1, connector_id=7)
    source.execute_sql('UPDATE "ps_model_usage_item" SET "connector_id" = 7.5')
    (tmp_path / "target").mkdir()
    target = psai.connect(make_backend("sqlite", tmp_path / "target").url, bind=False)
    psai.migrate(target)
    try:
        with monkeypatch.context() as general:
            general.setattr(_Items, "can_be_stored", classmethod(lambda cls, *dbs: False))
            assert psai.copy(source, target)["ps_model_usage_item"] == {"created": 1, "updated": 0}
        assert _Items.can_be_stored(source, target)
        assert psai.copy(source, target)["ps_model_usage_item"] == {"created": 0, "updated": 0}
        assert [item[4] for item in _stored_items(target)] == [7]
    finally:
        target.close()
        source.close()


@pytest.mark.parametrize("ids", ["the source's", "shifted"])
def test_sqlite_to_sqlite_copies_items_as_stored_with_the_general_paths_result(tmp_path, clock, monkeypatch, ids):
    """SQLite to SQLite a copy keeps each item's JSON text where it already
    names the target's ids and compares times as their stored text; the
    general path (every other pair of databases) reads, retargets and
    writes each item. Both leave the same rows in the target, first copy
    and next, whether the target's ids are the source's or shifted by rows
    of its own; so do calls without an agent (JSON ``agentId`` null, set to
    0 either way) and odd items: JSON that is not an object, not JSON, not
    minified, not ASCII, a model id that is text or not the item's column,
    an agent that is gone, times stored in other formats."""
    source = make_backend("sqlite", tmp_path).connect()
    psai.migrate()
    gpt, mini, lead, helper = add("GPT"), add("mini", modelSize="small"), agent("lead"), agent("helper")
    for call in range(12):
        psai.record_usage((gpt, mini)[call % 2], (lead, helper, None)[call % 3], tokens_in=100 + call, tokens_out=1,
                          connector_id=call % 2 or None)
        clock.advance(minutes=call % 3)  # some calls share their time
    stamp = PsModelUsageItem.created_at.db_value(clock.moment)
    odd = [(gpt.id, lead.id, '{\n  "model": {"id": %d},\n  "actor": {"agentId": %d}\n}' % (gpt.id, lead.id), stamp),
           (gpt.id, lead.id, '{"model":{"id":%d},"actor":{"agentId":%d},"note":"caf\u00e9 \u00e9t\u00e9"}'
            % (gpt.id, lead.id), 1700000000),
           (gpt.id, lead.id, '{"model":{"id":"%d"},"actor":{"agentId":%d}}' % (gpt.id, lead.id), stamp),
           (gpt.id, lead.id, '{"model":{"id":%d},"actor":{"agentId":%d}}' % (mini.id, lead.id), stamp),
           (mini.id, 77, '{"model":{"id":%d},"actor":{"agentId":77}}' % mini.id, "2026-11-25T09:30:00Z"),
           (mini.id, helper.id, '{"model":{"name":"mini"},"actor":"helper"}', stamp),
           (mini.id, helper.id, '[1,2]', stamp), (mini.id, helper.id, 'not JSON', stamp),
           (999, lead.id, '{"model":{"id":999}}', stamp)]  # a model that is gone: stays behind
    for model_id, agent_id, data, updated in odd:
        source.execute_sql('INSERT INTO "ps_model_usage_item" ("user_id", "model_id", "agent_id", "data", '
                           '"created_at", "updated_at") VALUES (1, ?, ?, ?, ?, ?)',
                           (model_id, agent_id, data, stamp, updated))
    targets = {}
    for way in ("as stored", "general"):
        (tmp_path / way).mkdir()
        targets[way] = psai.connect(make_backend("sqlite", tmp_path / way).url, bind=False)
        psai.migrate(targets[way])
        if ids == "shifted":  # the target's own rows first: every copied id differs from the source's
            with psai.using(targets[way]):
                add("own", model="own-model")
                agent("own")
    assert _Items.can_be_stored(source, targets["as stored"])
    try:
        def copy_each():
            counts = {"as stored": psai.copy(source, targets["as stored"], batch=5)}
            with monkeypatch.context() as general:
                general.setattr(_Items, "can_be_stored", classmethod(lambda cls, *dbs: False))
                counts["general"] = psai.copy(source, targets["general"], batch=5)
            assert counts["as stored"] == counts["general"]
            assert _stored_items(targets["as stored"]) == _stored_items(targets["general"])
            return counts["as stored"]
        assert copy_each()["ps_model_usage_item"] == {"created": 12 + len(odd) - 1, "updated": 0}
        items = _stored_items(targets["as stored"])
        with psai.using(targets["as stored"]):
            here = {m.uuid: m.id for m in PsAiModel.select()}, {a.uuid: a.id for a in PsAgent.select()}
        assert {item[2] for item in items} == {here[0][gpt.uuid], here[0][mini.uuid]}
        assert {item[3] for item in items} == {here[1][lead.uuid], here[1][helper.uuid], psai._recording.NO_AGENT}
        for item in items:  # every id the item's JSON has is the target's, a text one too
            data = item[7]
            if isinstance(data, dict) and isinstance(data["model"], dict) and "id" in data["model"]:
                assert data["model"]["id"] == item[2]
            if isinstance(data, dict) and isinstance(data.get("actor"), dict):
                assert data["actor"]["agentId"] == item[3]
        utc = datetime.timezone.utc  # updated_at: a Unix time and ISO text with a "T", read as times
        unix = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=utc)
        iso = datetime.datetime(2026, 11, 25, 9, 30, tzinfo=utc)
        assert {item[6] for item in items[12:]} == {clock.moment, unix, iso}
        assert [item[7] for item in items[-2:]] == [[1, 2], "not JSON"]
        assert all(n == {"created": 0, "updated": 0} for n in copy_each().values())
        clock.advance(minutes=1)
        psai.record_usage(mini, helper, tokens_in=5, tokens_out=1)
        source.execute_sql('UPDATE "ps_model_usage_item" SET "data" = ? WHERE "data" = ?',
                           ('{"model":{"id":%d},"actor":{"agentId":%d},"note":"edited"}' % (mini.id, lead.id),
                            '{"model":{"id":%d},"actor":{"agentId":%d}}' % (mini.id, lead.id)))
        assert copy_each()["ps_model_usage_item"] == {"created": 1, "updated": 1}
        assert all(n == {"created": 0, "updated": 0} for n in copy_each().values())
    finally:
        for db in targets.values():
            db.close()
        source.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_copy_holds_a_batch_not_the_store(kind, tmp_path):
    """The memory a copy of 20,000 items allocates at its peak stays under a
    bound that holding every item would pass (all in memory, psai's copy
    peaked at 102 MB here); the source is SQLite or PostgreSQL, the target SQLite."""
    source_backend = make_backend(kind, tmp_path)
    source = source_backend.connect()
    psai.migrate()
    (tmp_path / "target").mkdir()
    target = psai.connect(make_backend("sqlite", tmp_path / "target").url, bind=False)
    try:
        gpt, lead = add("GPT"), agent("lead")
        psai.record_usage(gpt, lead, tokens_in=1000, tokens_out=10)
        [item] = PsModelUsageItem.select()
        start = item.created_at
        with psai.db.write_transaction(source):
            for chunk in range(0, 20_000, 1000):
                PsModelUsageItem.insert_many([
                    dict(user_id=1, model_id=gpt.id, agent_id=lead.id, connector_id=None,
                         created_at=start + datetime.timedelta(seconds=index), updated_at=start,
                         data=dict(item.data, request={"note": "call %d" % index}))
                    for index in range(chunk, chunk + 1000)]).execute()
        tracemalloc.start()
        try:
            counts = psai.copy(source, target)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert counts["ps_model_usage_item"]["created"] == 20_001
        assert peak < 40 * 2**20, "a copy of 20,000 items peaked at %.1f MB" % (peak / 2**20)
    finally:
        target.close()
        source_backend.close()


def test_a_copy_whose_source_connection_is_cut_writes_nothing_and_the_next_is_exact(tmp_path, clock):
    """The server ends the source's connection while the copy streams its
    items (after models and agents are written to the target): the copy
    fails, the target holds nothing of it, and the copy run again is exact."""
    postgres = make_backend("postgres", tmp_path)
    source = postgres.connect()
    psai.migrate()
    target = psai.connect("sqlite:///%s" % (tmp_path / "target.db"), bind=False)
    try:
        gpt, lead = add("GPT"), agent("lead")
        for call in range(50):
            psai.record_usage(gpt, lead, tokens_in=100 + call, tokens_out=1)
            clock.advance(minutes=1)
        [source_pid] = source.execute_sql("SELECT pg_backend_pid()").fetchone()
        admin = psai.connect(postgres.url, bind=False)

        def cut(done, total):
            if done >= 2:  # models and agents mirrored, the items not yet
                admin.execute_sql("SELECT pg_terminate_backend(%s)", (source_pid,))
        with pytest.raises(psai.db.OperationalError, match="terminating connection|server closed the connection"):
            psai.copy(source, target, batch=7, progress=cut)
        admin.close()
        with psai.using(target):
            assert (PsAiModel.select().count(), PsModelUsageItem.select().count()) == (0, 0)
        assert psai.copy(source, target, batch=7)["ps_model_usage_item"] == {"created": 50, "updated": 0}
        assert _items(target) == _items(source)
    finally:
        target.close()
        postgres.close()
