"""Naming a model or an agent (docs/store.md): one rule in every function
and command, an id, a uuid or a name; a string of digits is an id."""
import json
from decimal import Decimal

import pytest

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel
from psai.models import Budget, find_agent, find_model, find_models

CALL = {"tokens_in": 10_000, "tokens_out": 1_000}  # 0.36 USD at the seed prices


def model(name, organization_id=2, **changes):
    return PsAiModel.create(user_id=1, organization_id=organization_id, name=name,
                            configuration=make_configuration(**changes))


def agent(name):
    return PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": name})


def test_a_model_is_found_by_row_id_digits_uuid_or_name(db):
    found = model("Claude Sonnet")
    model("Other")
    for ref in (found, found.id, str(found.id), " %s " % found.id, found.uuid, str(found.uuid), "Claude Sonnet"):
        assert find_model(ref).id == found.id, ref


def test_a_name_added_again_means_its_active_row(db):
    first = psai.add_model(name="Writer", user_id=1, organization_id=2, configuration=make_configuration())
    second = psai.add_model(name="Writer", user_id=1, organization_id=2, configuration=make_configuration())
    assert find_model("Writer").id == second.id
    assert [row.id for row in find_models("Writer")] == [first.id, second.id]  # every version, oldest first


def test_an_ambiguous_name_lists_the_candidates_with_their_ids(db):
    one, two = model("Shared", organization_id=2), model("Shared", organization_id=3)
    with pytest.raises(psai.AmbiguousNameError) as info:
        find_model("Shared")
    assert "2 models are named 'Shared'" in str(info.value)
    assert "id %s" % one.id in str(info.value) and "id %s" % two.id in str(info.value)
    assert isinstance(info.value, psai.NotFoundError)  # caught where a missing row is
    PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "Twin"})
    PsAgent.create(user_id=1, class_id=1, group_id=2, configuration={"name": "Twin"})
    with pytest.raises(psai.AmbiguousNameError, match="2 agents are named 'Twin'"):
        find_agent("Twin")


def test_an_unknown_name_suggests_the_nearest(db):
    model("Claude Sonnet 4.5")
    agent("Researcher")
    with pytest.raises(psai.NotFoundError, match="no model has the id, uuid or name 'Claude Sonet 4.5'; "
                                                 "did you mean 'Claude Sonnet 4.5'"):
        find_model("Claude Sonet 4.5")
    with pytest.raises(psai.NotFoundError, match="did you mean 'Researcher'"):
        find_agent("Reseacher")
    model("999")
    with pytest.raises(psai.NotFoundError, match=r"PsAiModel 999 does not exist \(a string of digits is always an id"):
        find_model("999")


def test_a_digit_string_is_an_id_in_every_function(db):
    # A model named "7" beside the row with id 7: "7" names the row with id
    # 7 in record_usage and set_budget alike (before, set_budget took it as
    # a name and record_usage as an id).
    target = model("alpha")
    named_seven = model(str(target.id))
    psai.set_budget(name="b", amount=10, model=str(target.id))
    assert Budget.get(Budget.name == "b").model_name == target.name
    row = psai.record_usage(str(target.id), **CALL)
    assert row.model_id == target.id
    assert find_model(named_seven.uuid).id == named_seven.id  # the way to name it


def test_functions_take_names(db, clock):
    writer = model("Writer")
    researcher = agent("Researcher")
    row = psai.record_usage("Writer", "Researcher", **CALL)
    assert (row.model_id, row.agent_id) == (writer.id, researcher.id)
    assert Decimal(str(psai.usage.model_cost("Writer", **CALL)["total"])) == Decimal("0.36")
    psai.set_budget(name="team", amount="0.50", agent="Researcher")
    assert Budget.get(Budget.name == "team").agent_id == researcher.id
    psai.set_budget(name="writer", amount="0.50", model="Writer")
    assert Budget.get(Budget.name == "writer").model_name == "Writer"
    with pytest.raises(psai.BudgetExceededError):
        psai.check_budget(agent="Researcher", model="Writer", estimate=CALL)
    with psai.track("Researcher", model="Writer") as run:
        with pytest.raises(psai.BudgetExceededError):
            run.check(model="Writer", estimate=CALL)
    assert psai.price_history("Writer")[0]["model_id"] == writer.id
    with pytest.raises(psai.NotFoundError, match="did you mean 'Writer'"):
        psai.set_budget(name="typo", amount=1, model="Writter")
    assert not Budget.select().where(Budget.name == "typo").exists()


def test_commands_take_names(run):
    run("models", "add", "--name", "Writer", "--user-id", "1", "--organization-id", "2",
        "--type", "text", "--size", "large", "--model", "gpt-4o", "--provider", "openai",
        "--in-price", "30", "--out-price", "60", "--cached-price", "10", "--currency", "USD",
        "--max-tokens-out", "4096", "--temperature", "0.7")
    run("agents", "add", "--user-id", "1", "--class-id", "1", "--group-id", "1", "--name", "Researcher",
        "--model", "Writer")
    assert json.loads(run("cost", "Writer", "--in", "10000", "--out", "1000", "--json").output)["cost"] == 0.36
    run("models", "update", "Writer", "--set", "prices.costInTokensPerMillion=3")
    assert find_model("Writer").configuration["prices"]["costInTokensPerMillion"] == 3
    run("usage", "record", "Writer", "--agent", "Researcher", "--in", "10", "--out", "1")
    run("budgets", "set", "--name", "r", "--amount", "5", "--agent", "Researcher")
    run("budgets", "set", "--name", "w", "--amount", "5", "--model", "Writer")
    assert Budget.get(Budget.name == "r").agent_id == find_agent("Researcher").id
    assert "Writer" in run("agents", "show", "Researcher", "--json").output
    run("agents", "unlink", "Researcher", "Writer")
    assert not find_agent("Researcher").ai_models
    bad = run("cost", "Writr", "--in", "1", "--out", "1", code=1)
    assert "did you mean 'Writer'" in bad.stderr and "Traceback" not in bad.output
