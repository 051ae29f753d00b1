"""`llmq worker`'s Celery pool: each job is a coroutine on the process's event loop, no thread per slot.

Celery's thread pool gives every slot an OS thread that only waits on the loop. A
message then crossed four threads' worth of GIL hand-offs (consumer -> slot thread
-> loop -> slot thread, which acks), and under load each hand-off waited for the
thread holding the GIL: that is what capped how many jobs one process took in per
second (bench/RESULTS.md, "overhead").

This pool keeps two threads busy, Celery's consumer and the event loop:

- `on_apply` (consumer thread) takes the arguments Celery's Request already decoded,
  tells Celery the task started, and hands the task's coroutine to the loop: one
  `call_soon_threadsafe`.
- When the coroutine ends, the loop queues Celery's callback (ack for late acks,
  `task-succeeded`, or the failure/`Reject` path) and wakes the consumer's hub
  through a pipe; the consumer runs the callbacks of every job that finished since
  it last looked, in the thread that owns the broker connection.

Celery's own semantics stay: late acks (the message is acked only after the job's
outcome is recorded), `Reject(requeue=True)` hands a message back, task events
for Flower (a `Retry` raised by the coroutine is Celery's task-retried, `Terminated`
its task-revoked, any other exception task-failed: worker/outcome.py), prefetch
bounded by `--concurrency`. Exceptions the task declares in `throws` are logged the
way Celery's tracer logs them: one line at INFO, no traceback. Warm shutdown waits for running
jobs and acks them; a killed process leaves its messages unacked and its job
leases expire (docs/reliability.md).

A task runs here when it has an `llmq_coroutine(*args, **kwargs)` attribute that
returns (event loop, coroutine) (worker/app.py); any other task runs on a
small thread pool the way Celery's thread pool would run it.

The pool also watches Celery's consumer (`ConsumerWatchdog`): kombu/celery 5.7's
Redis consumer sometimes never comes back from a Redis crash while the process
stays up (https://github.com/celery/celery/issues/10205). When the consumer's loop has not run for
`LLMQ_CONSUMER_STALL_S` (60 s) while Redis has answered for a while, the worker
exits, and its supervisor (`llmq up`, docker-compose's restart policy, systemd)
starts a fresh one; its running jobs' leases run out and they run again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import CancelledError, ThreadPoolExecutor
from time import monotonic
from typing import Any, NamedTuple

from billiard.einfo import ExceptionInfo
from celery.app.trace import LOG_FAILURE, LOG_REJECTED, LOG_RETRY, LOG_SUCCESS
from celery.app.trace import logger as trace_logger
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import Reject, Retry

log = logging.getLogger("llmq.worker")

#: Threads for tasks without a coroutine, and for callbacks when Celery runs without its hub.
OTHER_THREADS = 4
#: The consumer's loop silent this long, with Redis answering, means the consumer is gone.
CONSUMER_STALL_S = float(os.environ.get("LLMQ_CONSUMER_STALL_S", "60"))
#: Redis must have answered this long first: a consumer reconnecting after an outage backs off
#: up to ~30 s between its tries.
REDIS_BACK_GRACE_S = 45.0
#: How often the watchdog looks.
WATCH_INTERVAL_S = 5.0
#: How long a stalled worker's warm shutdown may take before the process ends anyway.
STALL_EXIT_GRACE_S = 30.0

Callback = Callable[[Any], Any]


class AsyncioPool(BasePool):
    """`--pool llmq.worker.pool:AsyncioPool` (`llmq worker`'s default, `--pool async`)."""

    body_can_be_buffer = False
    signal_safe = False
    task_join_will_block = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running = 0  # jobs handed to the loop whose end Celery has not been told yet
        self._running_lock = threading.Lock()
        self._finished: collections.deque[Finished] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._hub: Any = None
        self._other = ThreadPoolExecutor(max_workers=OTHER_THREADS, thread_name_prefix="llmq-pool")
        self.watchdog = ConsumerWatchdog(self._redis_answers, _exit_stalled, poke=self._wake_consumer)

    # --- Celery's pool interface ------------------------------------------------------

    def register_with_event_loop(self, hub: Any) -> None:
        # Called again each time the consumer restarts (after a broker reconnect).
        self._hub = hub
        hub.add_reader(self._wake_read, self._run_finished)
        self.watchdog.seen()
        self.watchdog.start()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callback | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> Any:
        # Celery's trace functions take (task name, task id, request, body, content type, encoding);
        # the request dict already holds the arguments Celery's Request decoded from the body.
        name, task_id, request = (args or ())[:3]
        task = self.app.tasks.get(name)
        start = getattr(task, "llmq_coroutine", None)
        if start is None:
            return self._other.submit(apply_target, target, args, kwargs, callback, accept_callback)
        if accept_callback is not None:
            accept_callback(os.getpid(), monotonic())
        loop, coroutine = start(*request["args"], **request["kwargs"])
        job = Job(self, callback, name, task_id, tuple(getattr(task, "throws", ())))
        loop.call_soon_threadsafe(job.spawn, loop, coroutine)  # raises if the loop is closed: nothing to wait for
        with self._running_lock:
            self._running += 1
        return job

    def on_stop(self) -> None:
        """Warm shutdown: let running jobs end and run their callbacks (acks) here."""
        self.watchdog.stop()
        while self._running:
            if self._wake_read >= 0:
                select.select([self._wake_read], [], [], 0.2)
            else:
                time.sleep(0.2)
            self._run_finished()
        self._other.shutdown(cancel_futures=True)
        self._close_pipe()

    def on_terminate(self) -> None:
        # Cold shutdown: running jobs stay unacked; their leases expire and they run again.
        self.watchdog.stop()
        self._other.shutdown(wait=False, cancel_futures=True)
        self._close_pipe()

    def on_close(self) -> None:
        # Celery closes the pool before it stops it: the wake pipe stays open for on_stop.
        self.watchdog.stop()

    def _redis_answers(self) -> bool:
        import redis

        try:
            with redis.Redis.from_url(self.app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5) as client:
                return bool(client.ping())
        except Exception:  # down, unreachable, or no Redis URL at all
            return False

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({"max-concurrency": self.limit, "running": self._running, "threads": 0,
                     "consumer-silent-s": round(monotonic() - self.watchdog.last_seen, 1)})
        return info

    @property
    def num_processes(self) -> int:
        return self.limit

    # --- completion -------------------------------------------------------------------

    def _finished_job(self, finished: Finished) -> None:
        """On the loop thread: queue Celery's callback for the consumer thread and wake it."""
        if self._hub is None:
            self._other.submit(self._report, finished)
            return
        self._finished.append(finished)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        """Make the consumer's hub run `_run_finished` (it also tells the watchdog the hub runs)."""
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the consumer will look
        except OSError:
            pass  # closed at shutdown; on_stop runs what is left

    def _run_finished(self) -> None:
        """On the consumer thread: the callbacks of every job that ended since the last look."""
        self.watchdog.seen()
        try:
            while os.read(self._wake_read, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._finished:
            self._report(self._finished.popleft())

    def _report(self, finished: Finished) -> None:
        finished.report()
        with self._running_lock:
            self._running -= 1

    def _close_pipe(self) -> None:
        if self._wake_read < 0:
            return
        if self._hub is not None:
            try:
                self._hub.remove_reader(self._wake_read)
            except Exception:
                pass
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_read = self._wake_write = -1


class Job:
    """One task's coroutine on the loop; tells the pool when it ends."""

    __slots__ = ("pool", "callback", "name", "task_id", "expected", "started", "__weakref__")

    def __init__(
        self, pool: AsyncioPool, callback: Callback | None, name: str, task_id: str,
        expected: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.pool, self.callback, self.name, self.task_id = pool, callback, name, task_id
        self.expected = expected  # the task's `throws`
        self.started = monotonic()

    def spawn(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
        """On the loop thread."""
        loop.create_task(coroutine).add_done_callback(self.done)

    def done(self, task: asyncio.Task[Any]) -> None:
        """On the loop thread: the outcome as Celery's tracer would return it."""
        runtime = monotonic() - self.started
        error = CancelledError(f"{self.name} was cancelled") if task.cancelled() else task.exception()
        if error is None:
            outcome: tuple[int, Any, float] = (0, repr(task.result()), runtime)
        else:
            info = ExceptionInfo((type(error), error, error.__traceback__))
            # Bare, as a prefork child's ExceptionInfo arrives unpickled: Celery's task-failed event
            # shows repr() of it, which for billiard's wrapper is `ExceptionWithTraceback()`.
            info.exception = error
            outcome = (1, info, runtime)
        expected = error is not None and isinstance(error, self.expected)
        self.pool._finished_job(Finished(self.callback, outcome, self.name, self.task_id, error, expected))


class Finished(NamedTuple):
    """A job's end, as Celery's tracer would have reported it."""

    callback: Callback | None
    outcome: tuple[int, Any, float]
    name: str
    task_id: str
    error: BaseException | None
    #: The error is one the task declares it raises (`throws`): an outcome, not a bug.
    expected: bool = False

    def report(self) -> None:
        """Log it the way Celery's tracer does, then hand Celery its outcome (ack, events, requeue)."""
        error, fields = self.error, {"id": self.task_id, "name": self.name}
        if error is None:
            if trace_logger.isEnabledFor(logging.INFO):
                _, value, runtime = self.outcome
                trace_logger.info(LOG_SUCCESS, {**fields, "return_value": value, "runtime": runtime})
        elif isinstance(error, Reject):
            trace_logger.info(LOG_REJECTED, {**fields, "exc": error})
        elif isinstance(error, Retry):
            trace_logger.info(LOG_RETRY, {**fields, "exc": error})
        elif self.expected:
            trace_logger.info(LOG_FAILURE, {**fields, "exc": repr(error), "description": "raised expected"})
        else:
            trace_logger.error(LOG_FAILURE, {**fields, "exc": repr(error), "description": "raised unexpected"},
                               exc_info=(type(error), error, error.__traceback__))
        if self.callback is None:
            return
        try:
            self.callback(self.outcome)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("Celery's callback for task %s[%s] failed", self.name, self.task_id)


class ConsumerWatchdog:
    """Ends the process when Celery's consumer stopped running while Redis is up (see the module docstring).

    The consumer's hub calls `seen` each time it runs the pool's reader; every
    `WATCH_INTERVAL_S` a thread of this pool pokes that reader (a byte in the wake
    pipe: a live hub answers within milliseconds, busy or idle) and calls `check`.
    No hub timer: one fired on every turn of the consumer's loop and cost a fifth of
    the in-flight intake.
    """

    def __init__(
        self, redis_answers: Callable[[], bool], on_stall: Callable[[float], None], *,
        poke: Callable[[], None] = lambda: None, stall_s: float = CONSUMER_STALL_S,
        redis_grace_s: float = REDIS_BACK_GRACE_S, clock: Callable[[], float] = monotonic,
    ) -> None:
        self._poke = poke
        self._redis_answers = redis_answers
        self._on_stall = on_stall
        self._stall_s = stall_s
        self._redis_grace_s = redis_grace_s
        self._clock = clock
        self.last_seen = clock()
        self._redis_since: float | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self) -> None:
        self.last_seen = self._clock()

    def check(self) -> bool:
        """One look; True (after calling `on_stall`) when the consumer is gone."""
        now = self._clock()
        if not self._redis_answers():
            self._redis_since = None  # an outage: the consumer is allowed to be reconnecting
            return False
        if self._redis_since is None:
            self._redis_since = now
        silent_s = now - self.last_seen
        if silent_s < self._stall_s or now - self._redis_since < self._redis_grace_s or self._stopped.is_set():
            return False
        self._on_stall(silent_s)
        return True

    def start(self) -> None:
        if self._thread is None and self._stall_s > 0:
            self._thread = threading.Thread(target=self._watch, name="llmq-consumer-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        self._poke()
        while not self._stopped.wait(WATCH_INTERVAL_S):
            if self.check():
                return
            self._poke()


def _exit_stalled(silent_s: float) -> None:
    log.critical("Celery's consumer has not run for %.0f s while Redis answers (a consumer lost in a broker "
                 "reconnect, https://github.com/celery/celery/issues/10205): this worker stops so that its supervisor starts a new one; "
                 "its running jobs run again when their leases run out", silent_s)
    os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, if its main thread still runs
    time.sleep(STALL_EXIT_GRACE_S)
    os._exit(70)  # EX_SOFTWARE: the main thread is stuck
