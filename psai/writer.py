"""The background writer: calls recorded off the caller's thread.

An instrumented async client must not block its event loop on a database
write, so it hands each call to this writer: a bounded queue
(``QUEUE_SIZE`` calls) drained by one daemon thread, which writes on its
own connection to the same database (peewee keeps one connection per
thread on one ``Database``) and writes what it finds queued in batches of
up to ``BATCH`` calls, one transaction a batch. Having written, it waits
``LINGER_SECONDS`` for more before it sleeps on the queue: calls made
meanwhile cost the caller no wake-up of the writer, and a call may be
written that much later. ``flush()`` waits until everything queued before
it is written (it wakes the writer at once); it runs at interpreter exit.

What a SIGKILL (or a crash of the interpreter) can lose is what was not
committed yet: at most ``QUEUE_SIZE`` queued calls and the ``BATCH`` being
written. A full queue makes the caller wait for room (psai never drops a
call to keep going): the database is slower than the calls.

``submit`` runs a function on the writer and returns a
``concurrent.futures.Future`` (an async caller awaits it with
``asyncio.wrap_future``): ``arecord_response``, ``async with psai.track``
and strict or budgeted instrumented async calls use it, so their reads and
writes leave the event loop too, in the order the calls were made.
"""
import asyncio
import atexit
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from peewee import Database

from .db import current_db, using, write_transaction
from .models import AgentRef, ModelRef
from ._recording import RecordedCall, record_response

__all__ = ["QUEUE_SIZE", "BATCH", "LINGER_SECONDS", "LOG", "enqueue", "submit", "flush", "arecord_response", "run_in"]

QUEUE_SIZE = 1000
BATCH = 100
# Having written what it found, the writer waits this long for more before
# it sleeps on the queue: the calls made meanwhile are queued without waking
# it (waking a sleeping thread is most of what a hand-off costs the caller's
# thread) and written as one batch. Work a caller waits for (submit, flush)
# wakes it at once.
LINGER_SECONDS = 0.02
# Idle this long, the writer closes its connections (a test suite or a
# long-lived process does not keep one open per database it once wrote to).
IDLE_SECONDS = 1.0

LOG = logging.getLogger("psai")


class _Job:
    """One piece of work: ``function(*args, **kwargs)`` on ``db``; with a
    ``future``, its result or error goes there (and it runs alone), else a
    failure is logged with ``what``."""

    __slots__ = ("db", "function", "args", "kwargs", "future", "what")

    def __init__(self, db: Database | None, function: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], future: "Future[Any] | None", what: str) -> None:
        self.db, self.function, self.args, self.kwargs = db, function, args, kwargs
        self.future, self.what = future, what


class _Writer:
    def __init__(self) -> None:
        self.queue: queue.Queue[_Job] = queue.Queue(QUEUE_SIZE)
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.opened: set[Database] = set()
        self.hurry = threading.Event()  # set: work is waited for, the writer's linger ends

    def put(self, job: _Job) -> None:
        if self.thread is None or not self.thread.is_alive():
            with self.lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self.run, name="psai-writer", daemon=True)
                    self.thread.start()
        self.queue.put(job)
        if job.future is not None:
            self.hurry.set()

    def run(self) -> None:
        pending: _Job | None = None
        lingered = True  # nothing written yet: the first call wakes the writer
        while True:
            if pending is None:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    if not lingered:  # more calls may come: they are queued without waking the writer
                        self.hurry.wait(LINGER_SECONDS)
                        self.hurry.clear()  # set after its job was queued: get_nowait finds the job
                        lingered = True
                        continue
                    try:
                        job = self.queue.get(timeout=IDLE_SECONDS)
                    except queue.Empty:
                        self.close_connections()
                        continue
            else:
                job, pending = pending, None
            lingered = False
            if job.future is not None:
                self.run_alone(job)
                continue
            batch = [job]
            while len(batch) < BATCH:  # what is queued already, for the same database: one transaction
                try:
                    found = self.queue.get_nowait()
                except queue.Empty:
                    break
                if found.future is not None or found.db is not job.db:
                    pending = found
                    break
                batch.append(found)
            self.write(batch)

    def run_alone(self, job: _Job) -> None:
        assert job.future is not None
        try:
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(self.call(job))
                except BaseException as exc:  # the caller awaiting the future gets it
                    job.future.set_exception(exc)
        finally:
            self.queue.task_done()

    def call(self, job: _Job) -> Any:
        if job.db is None:
            return job.function(*job.args, **job.kwargs)
        self.opened.add(job.db)
        with using(job.db):
            return job.function(*job.args, **job.kwargs)

    def write(self, batch: list[_Job]) -> None:
        """The batch in one transaction, each call in a savepoint of its own
        (one that fails is logged and the others are written); the
        transaction itself failing (the database gone), each call alone."""
        try:
            db = batch[0].db
            if len(batch) > 1 and db is not None:
                self.opened.add(db)
                try:
                    with using(db), write_transaction(db):
                        for job in batch:
                            self.attempt(job)
                    return
                except Exception:
                    LOG.warning("psai: a batch of %d calls failed as a whole; writing them one by one",
                                len(batch), exc_info=True)
            for job in batch:
                self.attempt(job, alone=True)
        finally:
            for _job in batch:
                self.queue.task_done()

    def attempt(self, job: _Job, alone: bool = False) -> None:
        try:
            if alone or job.db is None:
                self.call(job)
            else:
                with write_transaction(job.db):  # a savepoint: a failure leaves the batch's others
                    job.function(*job.args, **job.kwargs)
        except Exception:
            LOG.warning("psai: %s not recorded", job.what, exc_info=True)

    def close_connections(self) -> None:
        for db in list(self.opened):
            try:
                if not db.is_closed():
                    db.close()
            except Exception:  # a connection that cannot close is gone already
                LOG.debug("psai: closing the writer's connection failed", exc_info=True)
        self.opened.clear()

    def flush(self, timeout: float | None = None) -> bool:
        if self.thread is None or not self.thread.is_alive():
            return self.queue.unfinished_tasks == 0
        done: Future[Any] = Future()
        self.put(_Job(None, lambda: None, (), {}, done, "flush"))
        try:
            done.result(timeout)
        except TimeoutError:
            return False
        return True


_WRITER = _Writer()


def _reset_after_fork() -> None:
    # A forked child has the parent's queue object but not its thread: it starts afresh.
    global _WRITER
    _WRITER = _Writer()


os.register_at_fork(after_in_child=_reset_after_fork)


def _shared(db: Database) -> bool:
    """Whether another thread's connection reaches the same store (an
    in-memory SQLite database is one connection's own)."""
    name = str(getattr(db, "database", "") or "")
    return bool(name) and name != ":memory:" and not name.startswith("file::memory:")


def _on_writer() -> bool:
    # Work the writer itself asks for (a budget listener's recorded call, a
    # stream collected there) runs there and then: queueing it would wait on itself.
    return threading.current_thread() is _WRITER.thread


def enqueue(db: Database | None, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``function(*args, **kwargs)`` on the writer, on ``db`` (None:
    the database bound here now), and return at once; a failure there is
    logged as ``what`` not recorded. On an in-memory SQLite database (no
    other connection reaches it) it runs here, now."""
    db = db if db is not None else current_db()
    if not _shared(db) or _on_writer():
        try:
            with using(db):
                function(*args, **kwargs)
        except Exception:
            LOG.warning("psai: %s not recorded", what, exc_info=True)
        return
    _WRITER.put(_Job(db, function, args, kwargs, None, what))


def submit(db: Database | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> "Future[Any]":
    """Run ``function(*args, **kwargs)`` on the writer, on ``db`` (None: the
    database bound here now), after what is queued already; its result or
    error goes to the future returned."""
    db = db if db is not None else current_db()
    future: Future[Any] = Future()
    if not _shared(db) or _on_writer():
        try:
            with using(db):
                future.set_result(function(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future
    _WRITER.put(_Job(db, function, args, kwargs, future, "a call"))
    return future


async def run_in(db: Database | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``await`` the result of ``function(*args, **kwargs)`` run on the
    writer (``submit``): the event loop goes on meanwhile."""
    return await asyncio.wrap_future(submit(db, function, *args, **kwargs))


def flush(timeout: float | None = None) -> bool:
    """Wait until every call handed to the background writer before now is
    written (or logged as not recorded). False when ``timeout`` seconds
    passed first. Runs at interpreter exit too."""
    if _on_writer():
        return True  # called by work the writer is doing: what is queued after it cannot be waited for here
    return _WRITER.flush(timeout)


atexit.register(flush)


async def arecord_response(model: ModelRef | None, agent: AgentRef | None, response: Any, *,
                           provider: str | None = None, user_id: int | None = None,
                           connector_id: int | None = None, user: str | None = None,
                           session: str | None = None, trace: str | dict[str, str] | None = None,
                           tags: dict[str, str] | None = None, environment: str | None = None) -> RecordedCall:
    """``record_response`` for async code: the response is read and the call
    written on the background writer's thread and connection, and the
    event loop goes on meanwhile. Returns the ``RecordedCall``, as
    ``record_response`` does; its errors are raised here. ``user``,
    ``session``, ``trace``, ``tags``, ``environment``: ``record_response``'s."""
    return await run_in(None, record_response, model, agent, response, provider=provider, user_id=user_id,
                        connector_id=connector_id, user=user, session=session, trace=trace, tags=tags,
                        environment=environment)
