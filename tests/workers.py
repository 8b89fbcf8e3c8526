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
