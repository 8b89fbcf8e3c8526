"""Functions run in child processes by the concurrency tests (spawned, so
each opens its own connection)."""


def record_many(url, model_id, agent_id, calls, seed):
    import psai
    psai.connect(url)
    for i in range(calls):
        psai.record_usage(model_id, agent_id, tokens_in=100 + (seed + i) % 7, tokens_out=10 + i % 3,
                          cached_tokens=i % 5)
    psai.database.close()
    return True


def busy_writer(url, worker, count):
    """Create models, link each to this worker's agent, record usage: the
    write mix of a script run many times at once."""
    import psai
    from psai.db import write_transaction
    from psai import PsAgent, PsAiModel
    from conftest import make_configuration
    psai.connect(url)
    agent = PsAgent.create(user_id=worker, class_id=1, group_id=1, configuration={"name": "w%d" % worker})
    for i in range(count):
        with write_transaction():
            model = PsAiModel.create(user_id=worker, organization_id=1, name="w%d-m%d" % (worker, i),
                                     configuration=make_configuration(model="w%d-%d" % (worker, i)))
            agent.ai_models.add(model)
        psai.record_usage(model, agent, tokens_in=100 + i, tokens_out=7)
    psai.database.close()
    return worker


def slow_import(url, rows, ready_path):
    """A large bulk insert in one transaction, signalling once it has begun."""
    import pathlib
    import psai
    from psai import PsAiModel
    from conftest import make_configuration
    psai.connect(url)
    data = [dict(user_id=1, organization_id=1, name="import-%d" % i, configuration=make_configuration())
            for i in range(rows)]
    original = PsAiModel._checked.__func__

    def checked(cls, values, partial):
        pathlib.Path(ready_path).touch()  # inside the transaction now
        return original(cls, values, partial)
    PsAiModel._checked = classmethod(checked)
    with psai.db.write_transaction():
        for start in range(0, rows, 500):
            PsAiModel.insert_many(data[start:start + 500]).execute()
    pathlib.Path(ready_path + ".done").touch()


def supersede_forever(url, ready_path):
    import pathlib
    import psai
    from conftest import make_configuration
    psai.connect(url)
    i = 0
    while True:
        config = make_configuration()
        config["prices"]["costInTokensPerMillion"] = i
        psai.add_model(name="GPT-4o", user_id=1, organization_id=1, configuration=config)
        i += 1
        if i == 20:
            pathlib.Path(ready_path).touch()


def change_prices(url, model_id, times):
    """Edit a model's input price in place, ``times`` times: 1, 2, 3, ..."""
    import psai
    from psai import PsAiModel
    psai.connect(url)
    for i in range(1, times + 1):
        PsAiModel.get_by_id(model_id).update_configuration({"prices": {"costInTokensPerMillion": i}})
    psai.database.close()
    return times


def _wait_for_start(barrier_path):
    import os
    import time
    while not os.path.exists(barrier_path):
        time.sleep(0.001)


def change_one_field(url, model_id, how, times, barrier_path):
    """Change one field of a model ``times`` times (1, 2, ...) while others
    change other fields: ``how`` is "price" (the CLI's `psai models update
    ID --set prices.costInTokensPerMillion=N`, run in this process),
    "max tokens" (a script's get + update_configuration) or "temperature"
    (the same, and deactivate() half-way)."""
    import contextlib
    import io
    import psai
    from psai import PsAiModel
    from psai.cli import cli
    psai.connect(url)
    _wait_for_start(barrier_path)
    for i in range(1, times + 1):
        if how == "price":
            with contextlib.redirect_stdout(io.StringIO()):
                cli.main(["--database", url, "models", "update", str(model_id),
                          "--set", "prices.costInTokensPerMillion=%d" % i], standalone_mode=False)
            psai.database.close()  # each command opens its own connection, as a process of its own would
        elif how == "max tokens":
            PsAiModel.get_by_id(model_id).update_configuration({"maxTokensOut": 1000 + i})
        elif i == times // 2:
            PsAiModel.get_by_id(model_id).deactivate()
        else:
            PsAiModel.get_by_id(model_id).update_configuration({"defaultTemperature": i / 100})
    psai.database.close()
    return how


def import_genai_prices(url, organization_id, barrier_path):
    import psai
    from psai import catalog
    psai.connect(url)
    _wait_for_start(barrier_path)
    result = catalog.import_catalog("genai-prices", providers=["openai", "anthropic"], user_id=1,
                                    organization_id=organization_id)
    psai.database.close()
    return sorted(row["source_model"] for row in result["models"])


def record_fixed(url, model_ids, agent_id, calls):
    """``calls`` calls of 1,000 tokens in and 10 out each, round the models:
    any report of them has exactly 1,000 tokens in per call."""
    import psai
    psai.connect(url)
    for i in range(calls):
        psai.record_usage(model_ids[i % len(model_ids)], agent_id, tokens_in=1000, tokens_out=10)
    psai.database.close()
    return calls


def record_until_refused(url, model_id, calls):
    """A worker: check, then call, then record, until the budget refuses."""
    import psai
    psai.connect(url)
    made = 0
    try:
        for _ in range(calls):
            psai.check_budget(model=model_id, estimate={"tokens_in": 10_000, "tokens_out": 1_000})
            psai.record_usage(model_id, None, tokens_in=10_000, tokens_out=1_000)
            made += 1
    except psai.BudgetExceededError:
        pass
    psai.database.close()
    return made


def reserve_and_record(url, model_id, counts):
    """Reserve the call's cost, make it, record it against the reservation,
    until a hard budget refuses: how many calls this process made."""
    import psai
    psai.connect(url)
    made = 0
    while True:
        try:
            reservation = psai.check_budget(None, model_id, estimate=counts, reserve=True)
        except psai.BudgetExceededError:
            break
        psai.record_usage(model_id, None, reservation=reservation, **counts)
        made += 1
    psai.database.close()
    return made


def set_new_budgets(url, names, amount, barrier_path):
    """Set each budget of ``names`` (new to the store), as other processes set
    the same names at once: every worker goes through them in the same order."""
    import pathlib
    import psai
    psai.connect(url)
    psai.budgets()  # connected, and the budget module loaded
    pathlib.Path("%s.ready.%s" % (barrier_path, amount)).touch()
    _wait_for_start(barrier_path)
    for name in names:
        psai.set_budget(name=name, amount=amount)
    psai.database.close()
    return amount


def record_responses(url, model_id, agent_id, responses):
    """Record each of ``responses`` (the same list in every process, at once):
    returns how many this process found recorded already."""
    import psai
    psai.connect(url)
    duplicates = sum(psai.record_response(model_id, agent_id, response).duplicate for response in responses)
    psai.database.close()
    return duplicates
