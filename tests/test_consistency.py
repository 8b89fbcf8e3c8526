"""Reports taken while other processes record: each report reads one
snapshot of the store, so it always agrees with itself."""
import multiprocessing
import re

import psai
from psai import PsAgent, PsAiModel
from psai.report import html
from psai.usage import cost_report, report_totals

from conftest import make_configuration


def check_rows(rows):
    """Every call recorded 1,000 tokens in and 10 out at 30 and 60 a million."""
    for row in rows:
        assert row["tokens_in"] == 1000 * row["calls"] and row["tokens_out"] == 10 * row["calls"], row
        assert row["cost"] == row["calls"] * (1000 * 30 + 10 * 60) / psai.pricing.Decimal(1_000_000), row


def test_reports_taken_while_others_record_agree_with_themselves(db, backend):
    from workers import record_fixed
    models = [PsAiModel.create(user_id=1, organization_id=1, name="m%d" % i, configuration=make_configuration())
              for i in range(2)]
    agent = PsAgent.create(user_id=1, class_id=1, group_id=1, configuration={"name": "a"})
    model_ids = [m.id for m in models]
    context = multiprocessing.get_context("spawn")
    reports = 0
    for _round in range(3):
        with context.Pool(3) as pool:
            results = [pool.apply_async(record_fixed, (backend.url, model_ids, agent.id, 60)) for _ in range(3)]
            while not all(r.ready() for r in results):
                rows = cost_report("model")
                check_rows(rows)
                total = report_totals(rows, "model")
                assert sum(r["calls"] for r in rows) == sum(t["calls"] for t in total.values())
                check_rows(cost_report("agent"))
                page = html("agent")
                for calls, tokens_in, tokens_out in re.findall(
                        r"([\d,]+) calls, ([\d,]+) tokens in, ([\d,]+) out", page):
                    calls, tokens_in, tokens_out = (int(v.replace(",", "")) for v in (calls, tokens_in, tokens_out))
                    assert (tokens_in, tokens_out) == (1000 * calls, 10 * calls), page
                reports += 1
            assert [r.get(timeout=120) for r in results] == [60] * 3
    assert reports >= 3
    rows = cost_report("model")
    check_rows(rows)
    assert sum(r["calls"] for r in rows) == 3 * 3 * 60
