"""A store used without PolicySynth's ids (docs/configuration.md): new
models and agents get the store's default ids; a PolicySynth database
adopted by psai requires them, as PolicySynth does."""
import json

import pytest

import psai
from conftest import make_configuration
from psai import PsAgent, PsAiModel


def test_new_rows_get_the_default_ids(db):
    assert psai.config() == {"user_id": 1, "organization_id": 1, "class_id": 1, "group_id": 1,
                             "require_ids": False}
    model = PsAiModel.create(name="Writer", configuration=make_configuration())
    agent = PsAgent.create(configuration={"name": "Researcher"})
    assert (model.user_id, model.organization_id) == (1, 1)
    assert (agent.user_id, agent.class_id, agent.group_id) == (1, 1, 1)
    assert psai.config(organization_id=7, group_id=3)["organization_id"] == 7
    added = psai.add_model(name="Writer", configuration=make_configuration())
    assert (added.user_id, added.organization_id) == (1, 7)
    assert PsAgent.create(configuration={}).group_id == 3
    explicit = PsAiModel.create(name="Own", user_id=5, organization_id=6, configuration=make_configuration())
    assert (explicit.user_id, explicit.organization_id) == (5, 6)


def test_bad_settings_are_refused_and_nothing_changes(db):
    with pytest.raises(psai.ValidationError) as info:
        psai.config(user_id="one", organization_id=2**40, require_ids="yes")
    assert set(info.value.messages) == {"user_id", "organization_id", "require_ids"}
    assert psai.config()["user_id"] == 1


def test_required_ids_are_named_when_missing(db):
    psai.config(require_ids=True)
    with pytest.raises(psai.ValidationError) as info:
        PsAiModel.create(name="Writer", configuration=make_configuration())
    assert {"user_id", "organization_id"} <= set(info.value.messages)
    with pytest.raises(psai.ValidationError) as info:
        PsAgent.create(configuration={})
    assert {"user_id", "class_id", "group_id"} <= set(info.value.messages)
    assert PsAiModel.select().count() == PsAgent.select().count() == 0


def test_an_adopted_policysynth_database_requires_ids(backend):
    from psai.migrations import HISTORY_TABLE, adopt, is_policysynth_database, runner
    runner().up(target="0002_model_usage")  # PolicySynth's tables alone, as adopt finds them
    psai.database.execute_sql('DROP TABLE "%s"' % HISTORY_TABLE)
    assert is_policysynth_database()
    adopt()
    assert psai.config()["require_ids"] is True
    with pytest.raises(psai.ValidationError, match="user_id"):
        PsAiModel.create(name="Writer", configuration=make_configuration())
    assert psai.config(require_ids=False)["require_ids"] is False
    assert PsAiModel.create(name="Writer", configuration=make_configuration()).user_id == 1


def test_commands_without_ids(run):
    assert json.loads(run("config", "--json").output)["user_id"] == 1
    run("config", "--organization-id", "4")
    agent = json.loads(run("agents", "add", "--name", "Researcher", "--json").output)
    assert (agent["user_id"], agent["class_id"], agent["group_id"]) == (1, 1, 1)
    model = json.loads(run("models", "add", "--name", "Writer", "--type", "text", "--size", "large",
                           "--model", "gpt-4o", "--provider", "openai", "--in-price", "2.5", "--out-price", "10",
                           "--cached-price", "1.25", "--currency", "USD", "--max-tokens-out", "4096",
                           "--temperature", "0.7", "--json").output)
    assert (model["user_id"], model["organization_id"]) == (1, 4)
    assert "organization_id  4" in run("config").output
    run("config", "--require-ids")
    bad = run("agents", "add", "--name", "Other", code=2)
    assert "user_id" in bad.stderr and PsAgent.select().count() == 1
