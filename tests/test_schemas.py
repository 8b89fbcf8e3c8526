"""Configuration schemas: validation on every write path, dumps, round trips."""
import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings

import psai
from psai import PsAgent, PsAiModel
from psai.schemas import (
    AiModelConfigurationSchema, INCLUDE, PsAgentSchema, PsAiModelSchema,
    validate_configuration,
)

from conftest import SEED_CONFIGURATION, make_configuration
from strategies import configurations, invalid_configurations

db_settings = settings(max_examples=40, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


def with_prices(**changes):
    config = make_configuration()
    for key, value in changes.items():
        if value is None:
            del config["prices"][key]
        else:
            config["prices"][key] = value
    return config


def create(config, name="m"):
    return PsAiModel.create(user_id=1, organization_id=2, name=name, configuration=config)


# -- the seed example ---------------------------------------------------------

def test_seed_validates_and_round_trips(db):
    model = create(make_configuration(), "OpenAI GPT-4 Large")
    dump = PsAiModelSchema().dump(PsAiModel.get_by_id(model.id))
    assert dump["configuration"] == SEED_CONFIGURATION
    assert set(dump) == {"id", "uuid", "created_at", "updated_at", "user_id", "organization_id",
                         "name", "configuration"}
    assert dump["uuid"] == str(model.uuid)
    assert dump["created_at"].endswith("+00:00") or dump["created_at"][-6] in "+-"
    json.dumps(dump)  # JSON-ready
    loaded = PsAiModelSchema().load(dump)
    assert isinstance(loaded, PsAiModel)
    assert loaded.id == model.id and loaded.uuid == model.uuid
    assert loaded.created_at == model.created_at
    assert PsAiModelSchema().dump(loaded) == dump


def test_dump_with_links(db):
    model = create(make_configuration())
    agent = PsAgent.create(user_id=1, class_id=2, group_id=3, configuration={"name": "A"})
    agent.ai_models.add(model)
    model_dump = PsAiModelSchema(with_links=True).dump(model)
    assert [a["id"] for a in model_dump["agents"]] == [agent.id]
    assert model_dump["agents"][0]["configuration"] == {"name": "A"}
    agent_dump = PsAgentSchema(with_links=True).dump(agent)
    assert [m["name"] for m in agent_dump["ai_models"]] == ["m"]
    assert "ai_models" not in PsAgentSchema().dump(agent)
    loaded = PsAgentSchema().load(PsAgentSchema().dump(agent))
    assert (loaded.id, loaded.class_id, loaded.configuration) == (agent.id, 2, {"name": "A"})


def test_str_enums_are_stored_as_plain_strings(db):
    config = make_configuration(type=psai.PsAiModelType.TextReasoning, modelSize=psai.PsAiModelSize.Small)
    model = create(config)
    stored = PsAiModel.get_by_id(model.id).configuration
    assert (stored["type"], stored["modelSize"]) == ("reasoning", "small")
    assert type(stored["type"]) is str


# -- bad input: one clear message naming the field, nothing written ------------

BAD_INPUTS = [
    ("missing price", with_prices(costOutTokensPerMillion=None),
     "configuration.prices.costOutTokensPerMillion", "Missing data for required field"),
    ("negative price", with_prices(costInTokensPerMillion=-1),
     "configuration.prices.costInTokensPerMillion", "greater than or equal to 0"),
    ("unknown key", make_configuration(maxTokenOut=4096),
     "configuration.maxTokenOut", "Unknown field"),
    ("unknown price key", with_prices(costInTokensPerMilion=3),
     "configuration.prices.costInTokensPerMilion", "Unknown field"),
    ("wrong enum", make_configuration(modelSize="huge"),
     "configuration.modelSize", "Must be one of: large, medium, small"),
    ("NaN", with_prices(costOutTokensPerMillion=float("nan")),
     "configuration.prices.costOutTokensPerMillion", "finite"),
    ("infinity", make_configuration(defaultTemperature=float("inf")),
     "configuration.defaultTemperature", "finite"),
    ("string for number", make_configuration(maxTokensOut="4096"),
     "configuration.maxTokensOut", "Not an integer"),
    ("string for price", with_prices(costInTokensPerMillion="30"),
     "configuration.prices.costInTokensPerMillion", "Not a number"),
    ("bool for number", make_configuration(maxTokensOut=True),
     "configuration.maxTokensOut", "Not an integer"),
    ("integer past 2**53", make_configuration(maxTokensOut=2 ** 60),
     "configuration.maxTokensOut", "2**53"),
    ("number for bool", make_configuration(active=1),
     "configuration.active", "Not a boolean"),
    ("bad currency", with_prices(currency="usd"),
     "configuration.prices.currency", "three-letter"),
    ("temperature out of range", make_configuration(defaultTemperature=3.5),
     "configuration.defaultTemperature", "less than or equal to 2"),
    ("zero output limit", make_configuration(maxTokensOut=0),
     "configuration.maxTokensOut", "greater than or equal to 1"),
    ("accounting version", make_configuration(accountingVersion=3),
     "configuration.accountingVersion", "Must be 1 or 2"),
    ("inference type", make_configuration(inferenceType="batch"),
     "configuration.inferenceType", "flex, priority, fast"),
    ("long-context rate without threshold", with_prices(longContextCostInTokensPerMillion=60),
     "configuration.prices.longContextCostInTokensPerMillion", "longContextTokenThreshold"),
    ("NUL in a string", make_configuration(model="gpt\x00-4"),
     "configuration.model", "NUL character"),
    ("prices not an object", make_configuration(prices=[30, 60]),
     "configuration.prices", "Invalid input type"),
]


def model_count():
    return PsAiModel.select().count()


@pytest.mark.parametrize("label, config, path, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_field_and_writes_nothing(db, label, config, path, message):
    existing = create(make_configuration(), "existing")
    before = model_count()
    attempts = {
        "create": lambda: create(copy.deepcopy(config)),
        "insert": lambda: PsAiModel.insert(user_id=1, organization_id=2, name="x",
                                           configuration=copy.deepcopy(config)).execute(),
        "insert_many": lambda: PsAiModel.insert_many(
            [dict(user_id=1, organization_id=2, name="ok", configuration=make_configuration())] * 3
            + [dict(user_id=1, organization_id=2, name="bad", configuration=copy.deepcopy(config))]
        ).execute(),
        "update": lambda: PsAiModel.update(configuration=copy.deepcopy(config)).execute(),
        "save": lambda: (setattr(existing, "configuration", copy.deepcopy(config)), existing.save()),
    }
    for how, attempt in attempts.items():
        with pytest.raises(psai.ValidationError) as info:
            attempt()
        paths = info.value.paths
        if how == "insert_many":
            assert list(paths) == ["3." + path], how
        else:
            assert list(paths) == [path], how
        assert message in " ".join(next(iter(paths.values()))), how
        assert path in str(info.value)
        assert model_count() == before, how
    assert PsAiModel.get_by_id(existing.id).configuration == make_configuration()


def test_every_error_is_listed_at_once(db):
    config = make_configuration(type="txt", maxTokensOut=-3)
    config["prices"]["currency"] = "dollars"
    with pytest.raises(psai.ValidationError) as info:
        create(config)
    assert set(info.value.paths) == {"configuration.type", "configuration.maxTokensOut",
                                     "configuration.prices.currency"}


def test_row_fields_are_validated(db):
    with pytest.raises(psai.ValidationError) as info:
        PsAiModel.create(user_id=2**40, organization_id="2", name="x" * 256,  # None: the store's default
                         configuration=make_configuration())
    assert set(info.value.paths) == {"user_id", "organization_id", "name"}
    with pytest.raises(psai.ValidationError) as info:
        PsAgent.create(user_id=1, class_id=1, group_id=2**40, configuration=["not", "an", "object"])
    assert set(info.value.paths) == {"group_id", "configuration"}
    with pytest.raises(psai.ValidationError) as info:
        PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"x": float("nan")})
    assert list(info.value.paths) == ["configuration"]
    assert PsAgent.select().count() == 0 and model_count() == 0


def test_oversized_configuration_is_refused(db):
    with pytest.raises(psai.ValidationError) as info:
        create(make_configuration(model="x" * (10 * 1024 * 1024)))
    assert list(info.value.paths) == ["configuration.model"]
    with pytest.raises(psai.ValidationError, match="configuration: Too large: 10485"):
        PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"notes": "x" * (10 * 1024 * 1024)})
    assert model_count() == 0 and PsAgent.select().count() == 0


def test_partial_update_still_checks_a_whole_configuration(db):
    model = create(make_configuration())
    PsAiModel.update(name="renamed").where(PsAiModel.id == model.id).execute()
    with pytest.raises(psai.ValidationError) as info:
        PsAiModel.update(configuration={"type": "text"}).execute()
    assert "configuration.prices" in info.value.paths
    assert PsAiModel.get_by_id(model.id).configuration == make_configuration()


def test_update_configuration_merges_and_validates(db):
    model = create(make_configuration())
    model.update_configuration({"active": False, "prices": {"costOutTokensPerMillion": 50}})
    stored = PsAiModel.get_by_id(model.id).configuration
    assert stored["active"] is False and stored["prices"]["costOutTokensPerMillion"] == 50
    assert stored["prices"]["costInTokensPerMillion"] == 30
    with pytest.raises(psai.ValidationError, match="configuration.prices.currency"):
        model.update_configuration({"prices": {"currency": None}})
    assert PsAiModel.get_by_id(model.id).configuration["prices"]["currency"] == "USD"
    assert model.configuration["prices"]["currency"] == "USD"


def test_trusted_bulk_insert_skips_validation(db):
    rows = [dict(user_id=1, organization_id=2, name="m%d" % i, configuration=make_configuration())
            for i in range(5)]
    PsAiModel.insert_many(rows, validate=False).execute()
    PsAiModel.insert_many([(1, 2, "tuple", make_configuration())],
                          fields=["user_id", "organization_id", "name", "configuration"]).execute()
    assert model_count() == 6
    assert {m.uuid for m in PsAiModel.select()}.__len__() == 6


# -- rows from a newer PolicySynth -------------------------------------------------

def test_rows_with_unknown_keys_load_round_trip_and_stay_editable(db):
    newer = make_configuration(eloRating=1500.5)
    newer["prices"]["costPerMillionVideoSeconds"] = 7
    # Written by someone else: straight to the table, no psai validation.
    PsAiModel.insert_many([dict(user_id=1, organization_id=2, name="newer", configuration=newer)],
                          validate=False).execute()
    model = PsAiModel.get(PsAiModel.name == "newer")
    assert model.configuration == newer
    dump = PsAiModelSchema().dump(model)
    assert dump["configuration"] == newer
    with pytest.raises(psai.ValidationError, match="eloRating"):
        PsAiModelSchema().load(dump)
    assert PsAiModelSchema(unknown=INCLUDE).load(dump).configuration == newer
    model.name = "renamed"
    model.save()  # keys the row already had are kept
    assert PsAiModel.get_by_id(model.id).configuration == newer
    model.configuration["typoKey"] = 1
    with pytest.raises(psai.ValidationError, match="configuration.typoKey"):
        model.save()
    assert PsAiModel.get_by_id(model.id).configuration == newer


# -- property-based --------------------------------------------------------------

@given(config=configurations())
def test_valid_configurations_always_load_and_round_trip(config):
    loaded = validate_configuration(copy.deepcopy(config))
    assert loaded == config
    assert AiModelConfigurationSchema().dump(loaded) == config
    assert json.loads(json.dumps(loaded)) == config


@given(case=invalid_configurations())
def test_invalid_configurations_always_raise_validation_error(case):
    config, path = case
    with pytest.raises(psai.ValidationError) as info:
        validate_configuration(config)
    assert any(p == path or p.startswith(path + ".") or path.startswith(p + ".")
               for p in info.value.paths), (path, info.value.paths)


@db_settings
@given(config=configurations())
def test_valid_configurations_store_and_read_back(db, config):
    with db.atomic() as transaction:
        model = create(copy.deepcopy(config))
        assert PsAiModel.get_by_id(model.id).configuration == config
        transaction.rollback()


@db_settings
@given(case=invalid_configurations())
def test_invalid_configurations_never_write(db, case):
    config, _path = case
    with pytest.raises(psai.ValidationError):
        create(config)
    assert model_count() == 0
