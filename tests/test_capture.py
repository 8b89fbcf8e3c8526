"""psai.instrument: the real openai, anthropic and google-genai SDKs, their
base_url on a local server (tests/fake_providers.py) serving recorded
bodies, every call recorded on both backends; the background writer,
flush, arecord_response and ``async with psai.track``."""
import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal

import anthropic
import openai
import pytest
from google import genai

import psai
import psai.capture
import psai.query
from conftest import make_configuration
from fake_providers import RESPONSE_IDS, ProviderServer, body_text
from psai import writer
from psai._responses import load_response

# Dumping the openai SDK's Responses objects (psai._responses reads them so) warns about its own unions.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic.*")


@pytest.fixture(scope="module")
def server():
    running = ProviderServer()
    yield running
    running.close()


@pytest.fixture(autouse=True)
def flushed():
    yield
    psai.flush()  # nothing queued by one test is written into the next one's database


@pytest.fixture
def model(db):
    return psai.PsAiModel.create(user_id=1, organization_id=2, name="Any", configuration=make_configuration())


@pytest.fixture
def agent(db):
    return psai.PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "Capture"})


# What each recorded body is billed for (tokens in, out, cached; the API), as the providers document it.
CHAT, RESPONSES, MESSAGES, GEMINI = "openai.chat.completions", "responses", "messages", "generateContent"
EXPECTED = {
    ("chat/completions", False): (4020, 4, 4012, CHAT),
    ("chat/completions", True): (53, 15, 0, CHAT),
    ("responses", False): (1349, 10, 1024, RESPONSES),
    ("responses", True): (9463, 582, 8320, RESPONSES),
    ("messages", False): (3 + 1111, 406, 1111, MESSAGES),
    ("messages", True): (338 + 20 + 500, 65, 500, MESSAGES),
    (":generateContent", False): (29, 736 + 1001, 0, GEMINI),
    (":streamGenerateContent", True): (128, 21 + 30, 0, GEMINI),
    "azure": (14, 9, 0, "chat.completions"),  # Azure's apiFamily: the provider is told from the client
}


def expected(path_end, streamed):
    return EXPECTED[(path_end, streamed)]


def chat_response(number):
    """The recorded chat completion, as the ``number``th response a provider sent (its own id)."""
    name = "chat_cache_read.json"
    return load_response(body_text(name).replace(RESPONSE_IDS[name], "%s-%d" % (RESPONSE_IDS[name], number)))


def without_id(chunk):
    return {key: value for key, value in chunk.model_dump().items() if key != "id"}


def items():
    return [row.data for row in psai.PsModelUsageItem.select().order_by(psai.PsModelUsageItem.id)]


def assert_recorded(data, usage):
    counts = data["usageNormalized"]
    assert (counts["tokensIn"], counts["tokensOut"], counts["cachedInTokens"], data["apiFamily"]) == usage


def openai_client(server, **options):
    return openai.OpenAI(api_key="test", base_url=server.url + "/v1", max_retries=0, **options)


def async_openai_client(server):
    return openai.AsyncOpenAI(api_key="test", base_url=server.url + "/v1", max_retries=0)


def anthropic_client(server):
    return anthropic.Anthropic(api_key="test", base_url=server.url, max_retries=0)


def async_anthropic_client(server):
    return anthropic.AsyncAnthropic(api_key="test", base_url=server.url, max_retries=0)


def genai_client(server):
    return genai.Client(api_key="test", http_options={"base_url": server.url})


MESSAGES = [{"role": "user", "content": "hi"}]


# -- openai -------------------------------------------------------------------------------------

def test_openai_chat_and_responses_are_recorded(server, model, agent):
    client = psai.instrument(openai_client(server), agent=agent, model=model)
    response = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert response.usage.prompt_tokens == 4020  # the caller gets the SDK's own object
    client.responses.create(model="gpt-4o", input="hi")
    recorded = items()
    assert len(recorded) == 2
    assert_recorded(recorded[0], expected("chat/completions", False))
    assert_recorded(recorded[1], expected("responses", False))
    assert {data["actor"]["agentId"] for data in recorded} == {agent.id}
    assert {data["model"]["id"] for data in recorded} == {model.id}


def test_openai_chat_stream_asks_for_usage_and_hides_its_chunk(server, model):
    bare = list(openai_client(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert server.requests[-1][1].get("stream_options") is None
    client = psai.instrument(openai_client(server), model=model)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert server.requests[-1][1]["stream_options"] == {"include_usage": True}
    assert [without_id(c) for c in chunks] == [without_id(c) for c in bare]  # what the caller asked for
    [data] = items()
    assert_recorded(data, expected("chat/completions", True))


def test_openai_chat_stream_with_usage_asked_keeps_the_usage_chunk(server, model):
    client = psai.instrument(openai_client(server), model=model)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 53
    assert len(items()) == 1


def test_openai_stream_helpers_are_recorded(server, model):
    client = psai.instrument(openai_client(server), model=model)
    with client.chat.completions.stream(model="gpt-4o", messages=MESSAGES) as stream:
        for _event in stream:
            pass
    assert stream.get_final_completion().usage is None  # as without psai: the caller did not ask for usage
    with client.responses.stream(model="gpt-4o", input="hi") as events:
        events.until_done()
    chat, responses = items()
    assert_recorded(chat, expected("chat/completions", True))
    assert_recorded(responses, expected("responses", True))


def test_openai_responses_stream_is_recorded(server, model):
    client = psai.instrument(openai_client(server), model=model)
    with client.responses.create(model="gpt-4o", input="hi", stream=True) as stream:
        for _event in stream:
            pass
    [data] = items()
    assert_recorded(data, expected("responses", True))


def test_azure_openai_is_recorded_as_azure(server, model):
    client = psai.instrument(openai.AzureOpenAI(api_key="test", azure_endpoint=server.url, api_version="2024-10-21",
                                                max_retries=0), model=model)
    client.chat.completions.create(model="gpt-4o-deployment", messages=MESSAGES)
    assert "/openai/deployments/gpt-4o-deployment/" in server.requests[-1][0]
    [data] = items()
    assert_recorded(data, EXPECTED["azure"])


def test_async_openai_is_recorded_by_the_background_writer(server, model):
    async def calls():
        client = psai.instrument(async_openai_client(server), model=model)
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        seen = [chunk async for chunk in stream]
        async with client.chat.completions.stream(model="gpt-4o", messages=MESSAGES) as helper:
            async for _event in helper:
                pass
        await client.responses.create(model="gpt-4o", input="hi")
        return seen

    seen = asyncio.run(calls())
    assert all(chunk.choices for chunk in seen)  # the usage-only chunk psai asked for is not the caller's
    psai.flush()
    recorded = items()
    assert len(recorded) == 4
    assert_recorded(recorded[0], expected("chat/completions", False))
    assert_recorded(recorded[1], expected("chat/completions", True))
    assert_recorded(recorded[2], expected("chat/completions", True))
    assert_recorded(recorded[3], expected("responses", False))


# -- anthropic ----------------------------------------------------------------------------------

def test_anthropic_messages_are_recorded(server, model):
    client = psai.instrument(anthropic_client(server), model=model)
    client.messages.create(model="claude", max_tokens=10, messages=MESSAGES)
    for _event in client.messages.create(model="claude", max_tokens=10, messages=MESSAGES, stream=True):
        pass
    with client.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
    assert text  # the caller's stream is the SDK's
    client.beta.messages.create(model="claude", max_tokens=10, messages=MESSAGES)
    recorded = items()
    assert len(recorded) == 4
    whole, streamed = expected("messages", False), expected("messages", True)
    for data, usage in zip(recorded, (whole, streamed, streamed, whole)):
        assert_recorded(data, usage)
    assert recorded[1]["psai"]["cacheWrite1hTokens"] == 20  # the 1-hour writes the stream reported


def test_async_anthropic_is_recorded(server, model):
    async def calls():
        client = psai.instrument(async_anthropic_client(server), model=model)
        await client.messages.create(model="claude", max_tokens=10, messages=MESSAGES)
        async for _event in await client.messages.create(model="claude", max_tokens=10, messages=MESSAGES,
                                                           stream=True):
            pass
        async with client.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as stream:
            await stream.get_final_message()

    asyncio.run(calls())
    psai.flush()
    recorded = items()
    assert len(recorded) == 3
    assert_recorded(recorded[0], expected("messages", False))
    assert_recorded(recorded[2], expected("messages", True))


def test_an_anthropic_stream_closed_before_its_end_is_logged_unrecorded(server, model, caplog):
    client = psai.instrument(anthropic_client(server), model=model)
    with caplog.at_level(logging.WARNING, logger="psai"):
        stream = client.messages.create(model="claude", max_tokens=10, messages=MESSAGES, stream=True)
        next(stream)  # message_start: its usage is the input's, not the call's
        stream.close()
        with client.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as helper:
            next(iter(helper))
    assert items() == []  # psai never records part of a call
    assert caplog.text.count("not recorded") == 2

    strict = psai.instrument(anthropic_client(server), model=model, strict=True)
    stream = strict.messages.create(model="claude", max_tokens=10, messages=MESSAGES, stream=True)
    next(stream)
    with pytest.raises(psai.ValidationError, match="message_delta"):
        stream.close()
    with pytest.raises(psai.ValidationError, match="message_delta"):
        with strict.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as helper:
            next(iter(helper))
    assert items() == []


def test_responses_and_gemini_streams_closed_before_their_end_are_logged_unrecorded(server, model, caplog):
    openai_instrumented = psai.instrument(openai_client(server), model=model)
    genai_instrumented = psai.instrument(genai_client(server), model=model)
    with caplog.at_level(logging.WARNING, logger="psai"):
        with openai_instrumented.responses.create(model="gpt-4o", input="hi", stream=True) as stream:
            next(stream)  # response.created: no usage yet
        chunks = genai_instrumented.models.generate_content_stream(model="gemini-2.5-pro", contents="hi")
        next(chunks)  # usage so far, no finishReason
        chunks.close()
    assert items() == []
    assert caplog.text.count("not recorded") == 2


def test_a_stream_closed_after_the_provider_reported_the_whole_call_is_recorded(server, model):
    client = psai.instrument(anthropic_client(server), model=model, strict=True)
    with client.messages.create(model="claude", max_tokens=10, messages=MESSAGES, stream=True) as stream:
        for event in stream:
            if event.type == "message_delta":  # the final usage: message_stop is all that is left
                break
    [data] = items()
    assert_recorded(data, expected("messages", True))


def test_a_response_recorded_twice_is_one_call(server, model):
    client = psai.instrument(openai_client(server), model=model)
    with client.chat.completions.stream(model="gpt-4o", messages=MESSAGES,
                                        stream_options={"include_usage": True}) as stream:
        for _event in stream:
            pass
    again = psai.record_response(model, None, stream.get_final_completion())  # the stream's final object
    assert again.duplicate and again.response_id == server.response_ids[-1]
    anthropic_instrumented = psai.instrument(anthropic_client(server), model=model)
    with anthropic_instrumented.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as helper:
        message = helper.get_final_message()
    assert psai.record_response(model, None, message).duplicate
    chat, messages = items()
    assert_recorded(chat, expected("chat/completions", True))
    assert_recorded(messages, expected("messages", True))


def test_an_openai_stream_closed_before_its_usage_is_logged_unrecorded(server, model, caplog):
    client = psai.instrument(openai_client(server), model=model)
    with caplog.at_level(logging.WARNING, logger="psai"):
        with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
            next(stream)
    assert items() == []
    assert "not recorded" in caplog.text


# -- google-genai ---------------------------------------------------------------------------------

def test_genai_is_recorded_sync_and_async(server, model):
    client = psai.instrument(genai_client(server), model=model)
    client.models.generate_content(model="gemini-2.5-pro", contents="hi")
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"))
    assert len(chunks) == 3

    async def calls():
        await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
        async for _chunk in await client.aio.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"):
            pass

    asyncio.run(calls())
    psai.flush()
    recorded = items()
    assert len(recorded) == 4
    whole, streamed = expected(":generateContent", False), expected(":streamGenerateContent", True)
    for data, usage in zip(recorded, (whole, streamed, whole, streamed)):
        assert_recorded(data, usage)


# -- never breaking the call; strict; uninstrument ------------------------------------------------

def test_a_failing_recording_never_breaks_the_call(server, model, caplog):
    client = psai.instrument(openai_client(server), model=model)
    async_client = psai.instrument(async_openai_client(server), model=model)
    model.delete_instance()  # the model the calls are for is gone: they cannot be recorded
    with caplog.at_level(logging.WARNING, logger="psai"):
        response = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))

        async def call():
            return await async_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

        async_response = asyncio.run(call())
        psai.flush()
    assert response.id and chunks and async_response.id
    assert items() == []
    assert caplog.text.count("not recorded") == 3


def test_strict_raises(server, model):
    client = psai.instrument(openai_client(server), model=model, strict=True)
    async_client = psai.instrument(async_openai_client(server), model=model, strict=True)
    model.delete_instance()
    with pytest.raises(psai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(psai.NotFoundError):
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))

    async def call():
        await async_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    with pytest.raises(psai.NotFoundError):
        asyncio.run(call())


def test_the_model_is_found_from_the_response(server, db):
    stored = psai.PsAiModel.create(user_id=1, organization_id=2, name="GPT-4o mini",
                                   configuration=make_configuration(model="gpt-4o-mini"))
    client = psai.instrument(openai_client(server))
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    [data] = items()
    assert data["model"]["id"] == stored.id


def test_uninstrument_restores_and_instrumenting_twice_records_once(server, model):
    client = openai_client(server)
    original = client.chat.completions.create
    psai.instrument(client, model=model)
    psai.instrument(client, model=model)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(items()) == 1
    assert psai.uninstrument(client) is client
    assert client.chat.completions.create == original
    assert "create" not in vars(client.chat.completions)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(items()) == 1
    other = openai_client(server)  # another client of the same SDK is never touched
    psai.instrument(client, model=model)
    other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(items()) == 1


def test_instrument_refuses_what_is_not_a_client(db):
    with pytest.raises(psai.ValidationError, match="client"):
        psai.instrument(object())


def test_budget_checked_before_the_call(server, model):
    client = psai.instrument(openai_client(server), model=model, budget=True)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    psai.set_budget(amount="0.000001", model=model, name="tiny")
    served = len(server.requests)
    with pytest.raises(psai.BudgetExceededError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    async def call():
        async_client = psai.instrument(async_openai_client(server), model=model, budget=True)
        await async_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    with pytest.raises(psai.BudgetExceededError):
        asyncio.run(call())
    assert len(server.requests) == served  # never called
    assert len(items()) == 1



def test_budget_of_a_user_checked_before_the_calls_of_that_user(server, model):
    alice = psai.instrument(openai_client(server), model=model, budget=True, user="alice")
    bob = psai.instrument(openai_client(server), model=model, budget=True, user="bob", tags={"team": "ads"})
    alice.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    psai.set_budget(amount="0.000001", user="alice", name="alice")
    psai.set_budget(amount="0.000001", tags={"team": "search"}, name="search")
    served = len(server.requests)
    with pytest.raises(psai.BudgetExceededError, match="alice"):
        alice.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(server.requests) == served  # never called
    bob.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # neither alice nor tagged search
    assert len(items()) == 2 and len(server.requests) == served + 1


def test_budget_of_a_session_checked_before_the_calls_of_that_session(server, model):
    one = psai.instrument(openai_client(server), model=model, budget=True, session="conv-1")
    other = psai.instrument(openai_client(server), model=model, budget=True, session="conv-2", user="conv-1")
    one.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    psai.set_budget(amount="0.000001", session="conv-1", name="conv-1")
    served = len(server.requests)
    with pytest.raises(psai.BudgetExceededError, match="conv-1"):
        one.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(server.requests) == served  # never called
    other.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # another session's
    assert len(items()) == 2 and len(server.requests) == served + 1

# -- budget=True: each call's estimate reserved ---------------------------------------------------

# The model's prices: 30 and 60 USD per million tokens in and out. MESSAGES is two characters (1 token
# in), so a call bounded to 1,000 tokens out is estimated at 0.06003 USD, one bounded to 100 at 0.00603.
LONG, SHORT = {"max_completion_tokens": 1000}, {"max_completion_tokens": 100}


def reservations():
    return psai.models.BudgetReservation.select().count()


def async_chat(server, model, bound):
    """One call of a budgeted async client (its own, on its own event loop)."""
    async def call():
        client = psai.instrument(async_openai_client(server), model=model, budget=True)
        return await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **bound)
    return asyncio.run(call())


def assert_settled(budget, response_ids):
    """No reservation left held, and the budget has spent what its calls were recorded to cost."""
    assert reservations() == 0
    costs = [psai.recorded_response(response_id).cost for response_id in response_ids]
    [status] = psai.budget_status(budget)
    assert costs and status["spent"] == sum(costs)


@pytest.fixture
def served(server):
    """The response ids the server sends from here on (a function); it answers at once again afterwards."""
    before = len(server.response_ids)
    yield lambda: server.response_ids[before:]
    server.gate, server.failing = None, None


def test_a_call_its_budget_cannot_hold_never_reaches_the_provider(server, model, served):
    psai.set_budget(amount="0.05", model=model, name="small")
    client = psai.instrument(openai_client(server), model=model, budget=True)
    before = len(server.requests)
    with pytest.raises(psai.BudgetExceededError, match="would be passed by this call: 0 spent \\+ 0.06 estimated"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)
    with pytest.raises(psai.BudgetExceededError, match="would be passed"):
        async_chat(server, model, LONG)
    assert len(server.requests) == before  # refused before the call: the provider never saw it
    assert reservations() == 0
    # A tighter bound is a smaller estimate: held, made, settled by its recording.
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **SHORT)
    assert len(server.requests) == before + 1
    assert reservations() == 0
    [status] = psai.budget_status("small")
    assert status["spent"] == psai.recorded_response(server.response_ids[-1]).cost == Decimal("0.04060")


def test_a_call_in_flight_holds_its_reservation(server, model, served):
    psai.set_budget(amount="0.1", model=model, name="b")
    before = len(server.requests)

    async def calls():
        client = psai.instrument(async_openai_client(server), model=model, budget=True)
        server.gate = threading.Event()
        first = asyncio.ensure_future(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG))
        for _ in range(6000):  # until the provider has the first call
            if len(server.requests) > before:
                break
            await asyncio.sleep(0.01)
        assert reservations() == 1
        with pytest.raises(psai.BudgetExceededError, match="0.06 held by reservations \\+ 0.06 estimated"):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)
        server.gate.set()
        await first

    asyncio.run(calls())
    psai.flush()
    assert len(server.requests) == before + 1  # the second never reached the provider
    assert_settled("b", served())


def test_a_stream_holds_its_reservation_until_it_ends(server, model, served):
    psai.set_budget(amount="0.1", model=model, name="b")
    client = psai.instrument(openai_client(server), model=model, budget=True)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, **LONG)
    assert reservations() == 1
    with pytest.raises(psai.BudgetExceededError, match="held by reservations"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)
    assert len(list(stream)) > 1  # the caller reads it to its end
    assert_settled("b", served())  # settled when the stream ended
    # One abandoned before its usage cannot be recorded: its reservation is given back.
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, **LONG) as stream:
        next(stream)
        assert reservations() == 1
    assert reservations() == 0 and len(items()) == 1


def test_anthropic_streams_settle_their_reservations_sync_and_async(server, model, served):
    # The recorded stream writes the cache for an hour: these prices cannot price that part.
    psai.set_budget(amount="1", model=model, name="b", unpriced="allow")
    client = psai.instrument(anthropic_client(server), model=model, budget=True)
    with client.messages.stream(model="claude", max_tokens=1000, messages=MESSAGES) as stream:
        assert reservations() == 1
        stream.get_final_message()

    async def call():
        async_client = psai.instrument(async_anthropic_client(server), model=model, budget=True)
        async with async_client.messages.stream(model="claude", max_tokens=1000, messages=MESSAGES) as stream:
            assert reservations() == 1
            await stream.get_final_message()

    asyncio.run(call())
    psai.flush()
    assert len(items()) == 2 and len(served()) == 2
    assert reservations() == 0


def test_a_failing_call_gives_its_reservation_back(server, model, served):
    # Room for one estimate (0.06 of 0.1): a reservation left held would refuse the next call.
    psai.set_budget(amount="0.1", model=model, name="b")
    client = psai.instrument(openai_client(server), model=model, budget=True)
    before = len(server.requests)
    server.failing = 500
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)
    with pytest.raises(openai.InternalServerError):
        async_chat(server, model, LONG)
    psai.flush()
    assert len(server.requests) == before + 2 and reservations() == 0
    server.failing = None
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)
    async_chat(server, model, SHORT)
    psai.flush()
    assert len(items()) == 2
    assert_settled("b", served())


def test_a_call_that_cannot_be_recorded_gives_its_reservation_back(server, model, agent, caplog):
    # Room for one estimate at a time: each call below is refused if the one before still holds its own.
    psai.set_budget(amount="0.1", agent=agent, name="b")
    client = psai.instrument(openai_client(server), agent=agent, model=model, budget=True)

    async def call():
        async_client = psai.instrument(async_openai_client(server), agent=agent, model=model, budget=True)
        return await async_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG)

    model.delete_instance()  # the model the calls are for is gone: they cannot be recorded
    with caplog.at_level(logging.WARNING, logger="psai"):
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **LONG).id
        assert list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, **LONG))
        assert asyncio.run(call()).id  # recorded (not) on the writer
        psai.flush()
    assert items() == [] and caplog.text.count("not recorded") == 3
    assert reservations() == 0


def test_without_a_model_the_request_names_the_model_reserved_for(server, model, served):
    psai.set_budget(amount="0.05", model=model, name="small")
    client = psai.instrument(openai_client(server), budget=True)
    before = len(server.requests)
    with pytest.raises(psai.BudgetExceededError, match="small"):  # "gpt-4" is the stored model's name
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, **LONG)
    assert len(server.requests) == before
    # A name no stored model has: nothing to price an estimate with, the other budgets are checked.
    client.chat.completions.create(model="gpt-unknown", messages=MESSAGES, **LONG)
    assert len(server.requests) == before + 1 and reservations() == 0


def test_the_estimate_is_the_output_bound_and_the_text_over_four_characters(db, model):
    estimate = psai.capture.request_estimate
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}  # not text
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
            "max_completion_tokens": 300}
    assert estimate(chat, model) == {"tokens_in": 6, "tokens_out": 300}  # 22 characters
    assert estimate({"system": [{"type": "text", "text": "x" * 40}], "messages": MESSAGES, "max_tokens": 50},
                    model) == {"tokens_in": 11, "tokens_out": 50}
    assert estimate({"instructions": "abcd", "input": "abcdefgh", "max_output_tokens": 7}, model) == {
        "tokens_in": 3, "tokens_out": 7}
    config = genai.types.GenerateContentConfig(max_output_tokens=9, system_instruction="abcd")
    contents = [genai.types.Content(role="user", parts=[genai.types.Part(text="abcdefgh")])]
    assert estimate({"contents": contents, "config": config}, model) == {"tokens_in": 3, "tokens_out": 9}
    assert estimate({"contents": "abcd", "config": {"max_output_tokens": 5}}, model) == {
        "tokens_in": 1, "tokens_out": 5}
    assert estimate({"messages": MESSAGES}, model) == {"tokens_in": 1, "tokens_out": 4096}  # its maxTokensOut
    placeholder = psai.query.unmatched_model("gpt-unknown", "openai", user_id=1)  # its prices are {}
    assert estimate({"messages": MESSAGES}, placeholder) is None  # the budgets are then checked without one


# -- async recording and the writer ---------------------------------------------------------------

def test_arecord_response_and_async_track(model, agent):
    async def record():
        call = await psai.arecord_response(model, agent, chat_response(1))
        async with psai.track(agent, model=model) as run:
            cost = await run.arecord(chat_response(2))
            again = await run.arecord(chat_response(1))  # recorded already: the same call
        return call, run, cost, again

    call, run, cost, again = asyncio.run(record())
    assert isinstance(call, psai.RecordedCall) and not call.duplicate
    assert call.model_id == model.id and call.response_id == RESPONSE_IDS["chat_cache_read.json"] + "-1"
    assert run.calls == 1 and cost is not None and cost > 0 and again == call.cost
    assert len(items()) == 2


def test_the_writer_batches_and_one_failure_loses_no_other(model, caplog):
    with caplog.at_level(logging.WARNING, logger="psai"):
        for number in range(25):
            writer.enqueue(None, "call %d" % number, psai.record_response, model if number != 7 else 10**9, None,
                           chat_response(number))
        psai.flush()
    assert len(items()) == 24
    assert "call 7 not recorded" in caplog.text


def test_queued_calls_are_written_at_interpreter_exit(backend, model, tmp_path):
    script = textwrap.dedent("""
        import sys
        import psai
        from psai import writer
        psai.connect(sys.argv[1])
        response = {"object": "chat.completion", "model": "gpt-4", "choices": [],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
        for _ in range(50):
            writer.enqueue(None, "a call", psai.record_response, int(sys.argv[2]), None, response)
        # no flush: the interpreter's exit does it
    """)
    subprocess.run([sys.executable, "-c", script, backend.url, str(model.id)], check=True, timeout=120)
    assert len(items()) == 50


def test_no_database_bound_never_breaks_the_call(server, db, monkeypatch, caplog):
    monkeypatch.setattr(psai.database, "obj", None)  # psai not connected at all
    client = psai.instrument(openai_client(server))

    async def call():
        async_client = psai.instrument(async_openai_client(server))
        return await async_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    with caplog.at_level(logging.WARNING, logger="psai"):
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).id
        assert list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        assert asyncio.run(call()).id
    assert caplog.text.count("not recorded") >= 3  # each call said so (a stream at its start and its end)


def test_work_on_the_writer_may_queue_and_flush_without_waiting_on_itself(model):
    response = load_response(body_text("chat_cache_read.json"))
    flushed_there = []

    def on_the_writer():  # as a budget listener run there would
        writer.enqueue(None, "a nested call", psai.record_response, model, None, response)
        flushed_there.append(psai.flush(timeout=30))

    writer.enqueue(None, "a call", on_the_writer)
    assert psai.flush(timeout=60)
    assert flushed_there == [True]
    assert len(items()) == 1


def test_instrumented_calls_keep_their_attribution(server, model):
    """user, session, trace, tags, environment on every call, sync, async and streamed."""
    given = {"user": "user-42", "session": "conversation-7", "trace": "4bf92f35", "tags": {"team": "search"},
             "environment": "prod"}
    client = psai.instrument(openai_client(server), model=model, **given)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))

    async def calls():
        async_client = psai.instrument(async_anthropic_client(server), model=model, **given)
        await async_client.messages.create(model="claude", max_tokens=10, messages=MESSAGES)
        async with async_client.messages.stream(model="claude", max_tokens=10, messages=MESSAGES) as stream:
            await stream.get_final_message()

    asyncio.run(calls())
    psai.flush()
    recorded = items()
    assert len(recorded) == 4
    for data in recorded:
        assert {key: data["psai"][key] for key in given} == dict(given, trace={"traceId": "4bf92f35"})
    with pytest.raises(psai.ValidationError, match="tags"):
        psai.instrument(openai_client(server), model=model, tags={"team": 1})
