"""``psai.track``: the calls a script's block makes, recorded from their
responses, counted and priced, and, with ``budget=True``, stopped by a hard
budget before the next call (``psai.budget``). ``async with psai.track(...)``
does the same without blocking the event loop: its reads and writes run on
the background writer (``psai.writer``), and ``await run.arecord(response)``
records there."""
from decimal import Decimal
from typing import Any

from ._arguments import agent_arg, attribution_arg, model_arg
from .budget import check_before_call, check_budget
from .models import AgentRef, ModelRef, PsAgent, PsAiModel, Reservation
from ._recording import record_response_data
from .writer import run_in

__all__ = ["track", "Run"]


class Run:
    """The calls recorded in one ``track`` block: ``calls``, and ``cost`` per
    currency (Decimal; a call that cannot be priced adds to ``unpriced_calls``)."""

    def __init__(self, agent: PsAgent | None, model: PsAiModel | None, budget: bool = False,
                 attribution: dict[str, Any] | None = None) -> None:
        self.agent, self.model, self.budget = agent, model, budget
        self.attribution = attribution or {}  # whose the block's calls are (attribution_arg's)
        self.calls = 0
        self.unpriced_calls = 0
        self.cost: dict[str, Decimal] = {}
        self.reservation: Reservation | None = None

    def check(self, *, model: ModelRef | None = None,
              estimate: Decimal | int | float | str | dict[str, Any] | None = None) -> None:
        """``psai.check_budget`` for this block's agent and model (or ``model``),
        with an ``estimate`` of the call about to be made if given. With
        ``budget=True`` and an estimate, the estimate is reserved against the
        hard budgets until ``record`` settles it (the next call's check
        releases one left unsettled)."""
        chosen = model if model is not None else self.model
        self.release()
        self.reservation = check_before_call(self.agent, chosen, estimate=estimate, reserve=self.budget,
                                             **self._whose())

    def _whose(self) -> dict[str, Any]:
        """The block's user, session and tags, for ``check_budget``: the budgets of that user, session or tag
        weigh its calls."""
        return {name: self.attribution.get(name) for name in ("user", "session", "tags")}

    def release(self) -> None:
        """Give back the reservation of a call that was not made."""
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

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
        held, self.reservation = self.reservation, None
        call = record_response_data(chosen, self.agent, response, provider, None, None, held,
                                    attribution=self.attribution)
        if not call.duplicate:  # a response recorded already is the same call: counted once
            for each in (call, *call.other_calls):  # an advisor's calls are calls the block made too
                self.calls += 1
                if each.cost is None or each.currency is None:
                    self.unpriced_calls += 1
                else:
                    self.cost[each.currency] = self.cost.get(each.currency, Decimal(0)) + each.cost
        if self.budget:
            check_budget(self.agent, call.model_id, **self._whose())
        return call.cost

    async def arecord(self, response: Any, *, model: ModelRef | None = None,
                      provider: str | None = None) -> Decimal | None:
        """``record`` for async code: on the background writer's thread, the
        event loop going on meanwhile."""
        return await run_in(None, self.record, response, model=model, provider=provider)


class _Tracking:
    """``track``'s block, for ``with`` and ``async with``."""

    run: Run

    def __init__(self, agent: Any, model: Any, budget: bool, attribution: dict[str, Any]) -> None:
        self.agent, self.model, self.budget, self.attribution = agent, model, budget, attribution

    def _start(self) -> Run:
        run = Run(agent_arg(self.agent), model_arg(self.model) if self.model is not None else None, self.budget,
                  self.attribution)
        if self.budget:
            run.check()
        return run

    def __enter__(self) -> Run:
        self.run = self._start()
        return self.run

    def __exit__(self, *exc: Any) -> None:
        self.run.release()  # a reservation no call settled

    async def __aenter__(self) -> Run:
        # Resolving and checking read the database: off the event loop.
        self.run = await run_in(None, self._start)
        return self.run

    async def __aexit__(self, *exc: Any) -> None:
        await run_in(None, self.run.release)


def track(agent: AgentRef | None, model: ModelRef | None = None,
          budget: bool = False, *, user: str | None = None, session: str | None = None,
          trace: str | dict[str, str] | None = None, tags: dict[str, str] | None = None,
          environment: str | None = None) -> _Tracking:
    """For scripts: ``with psai.track(agent) as run: run.record(response)``
    records each call the block makes (``record_response``; ``model`` for
    all of them, else each response's model name) and keeps their count
    and cost. A call recorded stays recorded if the block then fails.
    ``budget=True``: ``psai.check_budget`` on entry and after each recorded
    call, so a hard budget reached stops the block before its next call
    (``run.check(estimate=...)`` checks before a call with what it will
    cost and, with ``budget=True``, reserves it until ``run.record``; the
    block's end gives back a reservation no call settled).
    ``async with psai.track(agent) as run: await run.arecord(response)``
    for async code. ``user``, ``session``, ``trace``, ``tags``,
    ``environment``: whose the block's calls are, kept in each one's item
    (``record_response``'s; checked here, before any call)."""
    attribution = attribution_arg(user=user, session=session, trace=trace, tags=tags, environment=environment)
    return _Tracking(agent, model, budget, attribution)
