"""worker/pool.py against Celery's pool contract, without a broker: what each outcome hands back to Celery.

The real-process side (events, many calls in one process, warm shutdown) is in
tests/worker/test_worker_process.py; Reject-on-Redis-loss in tests/reliability.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
from billiard.einfo import ExceptionWithTraceback
from celery import Celery
from celery.exceptions import Reject, Retry

from llmq.worker.errors import AuthenticationError, BadRequestError
from llmq.worker.pool import AsyncioPool, ConsumerWatchdog


class Hub:
    """The part of kombu's hub the pool uses: readers, run by hand."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def fire(self, timeout_s: float = 5.0) -> None:
        """Wait until a reader's fd is readable (as the hub's poll would), then run its callback."""
        ready, _, _ = select.select(list(self.readers), [], [], timeout_s)
        for fd in ready:
            self.readers[fd]()


@pytest.fixture()
def app() -> Celery:
    return Celery("pool-test", set_as_current=False)


@pytest.fixture()
def pool(app: Celery) -> Iterator[AsyncioPool]:
    started = AsyncioPool(limit=10, app=app)
    started.start()
    yield started
    started.stop()
    started.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The process's event loop, as the worker's runtime runs it: in a thread of its own."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    running.close()


def coroutine_task(
    app: Celery, loop: asyncio.AbstractEventLoop, name: str, outcome: Callable[[], Any],
    throws: tuple[type[BaseException], ...] = (),
) -> list[threading.Event]:
    """A task whose `llmq_coroutine` gives a coroutine that ends after 50 ms with `outcome()`;
    `throws`: the exceptions it declares (outcomes, not bugs)."""
    ended: list[threading.Event] = []

    def start(*args: Any, **kwargs: Any) -> tuple[asyncio.AbstractEventLoop, Any]:
        done = threading.Event()
        done.args = args  # type: ignore[attr-defined]
        ended.append(done)

        async def run() -> Any:
            try:
                await asyncio.sleep(0.05)
                return outcome()
            finally:
                loop.call_soon(done.set)  # the coroutine is over; the hub.fire() that follows waits for the pool

        return loop, run()

    def body(*args: Any, **kwargs: Any) -> None:
        pass

    task = app.task(name=name, throws=throws)(body)
    task.llmq_coroutine = start
    return ended


def apply(pool: AsyncioPool, name: str, args: list[Any]) -> tuple[list[Any], list[Any]]:
    accepted: list[Any] = []
    outcomes: list[Any] = []
    body = json.dumps([args, {}, {}])
    pool.apply_async(
        lambda *a: pytest.fail("the trace function must not run for a coroutine task"),
        # As Celery's Request passes it: the request dict holds the arguments it decoded from the body.
        args=(name, "task-id", {"args": args, "kwargs": {}}, body, "application/json", "utf-8"),
        accept_callback=lambda pid, at: accepted.append(pid), callback=outcomes.append,
    )
    return accepted, outcomes


def raising(error: BaseException) -> Callable[[], NoReturn]:
    """A coroutine's outcome that raises `error`."""

    def outcome() -> NoReturn:
        raise error

    return outcome


def unwrapped(info: Any) -> BaseException:
    """The exception as Celery's Request.on_failure sees it (billiard wraps it with its traceback)."""
    exc = info.exception
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def run_once(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop, name: str, outcome: Callable[[], Any],
    throws: tuple[type[BaseException], ...] = (),
) -> list[Any]:
    """One task through the pool: started at once, its end handed to Celery when the hub looks."""
    ended = coroutine_task(app, loop, name, outcome, throws)
    hub = Hub()
    pool.register_with_event_loop(hub)
    accepted, outcomes = apply(pool, name, ["job-1", 3])
    assert accepted and not outcomes  # Celery is told it started; it has not ended yet
    assert ended[0].wait(5)
    assert ended[0].args == ("job-1", 3)  # type: ignore[attr-defined]  # the task's own arguments
    for _ in range(10):  # the watchdog's poke may wake the hub first
        hub.fire()
        if outcomes:
            break
    return outcomes


def test_a_finished_coroutine_reaches_celery_on_the_hub_thread(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        (outcome,) = run_once(app, pool, loop, "ok", lambda: None)
    assert outcome[0] == 0 and outcome[1] == "None" and outcome[2] >= 0
    assert "ok[task-id] succeeded in" in caplog.text  # the line Celery's tracer logs


def test_a_reject_goes_back_as_a_failure_celery_turns_into_a_requeue(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop
) -> None:
    ((failed, info, _),) = run_once(app, pool, loop, "reject", raising(Reject("redis unavailable", requeue=True)))
    assert failed == 1 and isinstance(unwrapped(info), Reject) and unwrapped(info).requeue


def test_an_unexpected_error_is_logged_and_reported(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="celery.app.trace"):
        ((failed, info, _),) = run_once(app, pool, loop, "boom", raising(ValueError("bug")))
    assert failed == 1 and isinstance(unwrapped(info), ValueError)
    assert "boom[task-id] raised unexpected" in caplog.text and "bug" in caplog.text


def test_a_retry_reaches_celery_bare_so_its_event_shows_the_cause(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    # Celery's Request.on_retry sends task-retried with repr(info.exception.exc): the typed error.
    hand_on = Retry("next: backup/gpt-4o-mini, attempt 2", exc=AuthenticationError("bad key"), when=0)
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        ((failed, info, _),) = run_once(app, pool, loop, "hand-on", raising(hand_on))
    assert failed == 1 and isinstance(info.exception, Retry)
    assert repr(info.exception.exc) == "AuthenticationError('bad key')"
    assert "hand-on[task-id] retry: next: backup/gpt-4o-mini, attempt 2" in caplog.text
    assert "Traceback" not in caplog.text


def test_an_error_the_task_declares_is_an_outcome_logged_in_one_line(
    app: Celery, pool: AsyncioPool, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    refused = raising(BadRequestError("prompt refused"))
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        ((failed, info, _),) = run_once(app, pool, loop, "refused", refused, throws=(BadRequestError,))
    # Bare, as a prefork child's arrives: Celery's task-failed event shows repr() of it.
    assert failed == 1 and repr(info.exception) == "BadRequestError('prompt refused')"
    assert "refused[task-id] raised expected: BadRequestError('prompt refused')" in caplog.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_stop_waits_for_running_jobs_and_runs_their_callbacks(app: Celery, loop: asyncio.AbstractEventLoop) -> None:
    pool = AsyncioPool(limit=10, app=app)
    pool.start()
    ended = coroutine_task(app, loop, "slow", lambda: None)
    pool.register_with_event_loop(Hub())  # a hub that never fires: stop must run the callbacks itself
    _, outcomes = apply(pool, "slow", ["job-4", 1])
    pool.close()  # Celery's warm shutdown closes the pool, then stops it
    pool.stop()
    assert ended[0].is_set() and len(outcomes) == 1 and outcomes[0][0] == 0


def test_a_task_without_a_coroutine_runs_in_a_thread(app: Celery, pool: AsyncioPool) -> None:
    ran = threading.Event()
    results: list[Any] = []

    def target(*args: Any) -> str:
        ran.set()
        return "traced"

    def plain() -> None:
        pass

    app.task(name="plain")(plain)
    pool.apply_async(target, args=("plain", "id", {}, "[]", "application/json", "utf-8"), callback=results.append)
    assert ran.wait(5)
    pool.stop()
    assert results == ["traced"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watchdog(redis_up: list[bool]) -> tuple[ConsumerWatchdog, Clock, list[float]]:
    clock, stalls = Clock(), []
    dog = ConsumerWatchdog(lambda: redis_up[0], stalls.append, stall_s=60, redis_grace_s=45, clock=clock)
    return dog, clock, stalls


def test_the_watchdog_leaves_a_consumer_that_runs_alone() -> None:
    dog, clock, stalls = watchdog([True])
    for _ in range(100):
        clock.now += 5
        dog.seen()
        assert not dog.check()
    assert stalls == []


def test_the_watchdog_ends_a_worker_whose_consumer_is_gone_while_redis_answers() -> None:
    dog, clock, stalls = watchdog([True])
    dog.check()
    clock.now += 59
    assert not dog.check()  # not yet: a minute of silence
    clock.now += 2
    assert dog.check() and stalls == [61]


def test_the_watchdog_waits_through_an_outage_and_the_consumers_reconnect() -> None:
    redis_up = [False]
    dog, clock, stalls = watchdog(redis_up)
    clock.now += 120
    assert not dog.check()  # Redis down: the consumer is allowed to be reconnecting
    redis_up[0] = True
    dog.check()
    clock.now += 40
    assert not dog.check()  # Redis back 40 s: the consumer may still be backing off
    clock.now += 10
    assert dog.check() and stalls == [170]


def test_the_watchdogs_poke_reaches_the_consumers_hub(app: Celery, pool: AsyncioPool) -> None:
    hub = Hub()
    pool.register_with_event_loop(hub)
    pool.watchdog.last_seen = 0.0
    pool._wake_consumer()  # what the watchdog thread does every few seconds
    hub.fire()
    assert pool.watchdog.last_seen > 0.0
