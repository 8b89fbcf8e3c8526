"""``psai.track``: the calls a script's block makes, recorded from their
responses, counted and priced, and, with ``budget=True``, stopped by a hard
budget before the next call (``psai.budget``)."""
import contextlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from .arguments import agent_arg, model_arg
from .budget import check_budget
from .models import AgentRef, ModelRef, PsAgent, PsAiModel
from .recording import record_response_data

__all__ = ["track", "Run"]


class Run:
    """The calls recorded in one ``track`` block: ``calls``, and ``cost`` per
    currency (Decimal; a call that cannot be priced adds to ``unpriced_calls``)."""

    def __init__(self, agent: PsAgent | None, model: PsAiModel | None, budget: bool = False) -> None:
        self.agent, self.model, self.budget = agent, model, budget
        self.calls = 0
        self.unpriced_calls = 0
        self.cost: dict[str, Decimal] = {}

    def check(self, *, model: ModelRef | None = None,
              estimate: Decimal | int | float | str | dict[str, Any] | None = None) -> None:
        """``psai.check_budget`` for this block's agent and model (or ``model``),
        with an ``estimate`` of the call about to be made if given."""
        chosen = model if model is not None else self.model
        check_budget(self.agent, chosen, estimate=estimate)

    def record(self, response: Any, *, model: ModelRef | None = None,
               provider: str | None = None) -> Decimal | None:
        """Record one call from its response (``record_response``) and return
        what it cost, None when its prices cannot price it (or no configured
        model matched its model name: it is recorded, unpriced); the calls of
        other models it reports (an advisor's) are recorded too, and counted
        in ``calls`` and ``cost``, not in what this returns. A response
        recorded already returns the first's cost and is not counted again. With
        ``budget=True`` the budgets are checked once the call is recorded (a
        call made is always recorded): BudgetExceededError stops the block
        before its next call."""
        chosen = model if model is not None else self.model
        call = record_response_data(chosen, self.agent, response, provider, None, None)
        if not call.duplicate:  # a response recorded already is the same call: counted once
            for each in (call, *call.other_calls):  # an advisor's calls are calls the block made too
                self.calls += 1
                if each.cost is None or each.currency is None:
                    self.unpriced_calls += 1
                else:
                    self.cost[each.currency] = self.cost.get(each.currency, Decimal(0)) + each.cost
        if self.budget:
            check_budget(self.agent, call.model_id)
        return call.cost


@contextlib.contextmanager
def track(agent: AgentRef | None, model: ModelRef | None = None,
          budget: bool = False) -> Iterator[Run]:
    """For scripts: ``with psai.track(agent) as run: run.record(response)``
    records each call the block makes (``record_response``; ``model`` for
    all of them, else each response's model name) and keeps their count
    and cost. A call recorded stays recorded if the block then fails.
    ``budget=True``: ``psai.check_budget`` on entry and after each recorded
    call, so a hard budget reached stops the block before its next call
    (``run.check(estimate=...)`` checks before a call with what it will cost)."""
    run = Run(agent_arg(agent), model_arg(model) if model is not None else None, budget)
    if budget:
        run.check()
    yield run
