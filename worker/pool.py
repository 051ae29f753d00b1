"""`llmq worker`'s Celery pool: each job is a coroutine on the process's event loop, no thread per slot.

Celery's thread pool gives every slot an OS thread that only waits on the loop. A
message then crossed four threads' worth of GIL hand-offs (consumer -> slot thread
-> loop -> slot thread, which acks), and under load each hand-off waited for the
thread holding the GIL: that is what capped how many jobs one process took in per
second (bench/RESULTS.md, "overhead").

This pool keeps two threads busy, Celery's consumer and the event loop:

- `on_apply` (consumer thread) decodes the task's arguments, tells Celery the task
  started, and hands the task's coroutine to the loop: one `call_soon_threadsafe`.
- When the coroutine ends, the loop queues Celery's callback (ack for late acks,
  `task-succeeded`, or the failure/`Reject` path) and wakes the consumer's hub
  through a pipe; the consumer runs the callbacks of every job that finished since
  it last looked, in the thread that owns the broker connection.

Celery's own semantics stay: late acks (the message is acked only after the job's
outcome is recorded), `Reject(requeue=True)` hands a message back, task events
for Flower, prefetch bounded by `--concurrency`. Warm shutdown waits for running
jobs and acks them; a killed process leaves its messages unacked and its job
leases expire (docs/RELIABILITY.md).

A task runs here when it has an `llmq_coroutine(*args, **kwargs)` attribute that
returns a `concurrent.futures.Future` (worker/app.py); any other task runs on a
small thread pool the way Celery's thread pool would run it.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from time import monotonic
from typing import Any, NamedTuple

from billiard.einfo import ExceptionInfo
from celery.app.trace import LOG_FAILURE, LOG_REJECTED, LOG_SUCCESS, prepare_accept_content
from celery.app.trace import logger as trace_logger
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import Reject
from kombu.serialization import loads

log = logging.getLogger("llmq.worker")

#: Threads for tasks without a coroutine, and for callbacks when Celery runs without its hub.
OTHER_THREADS = 4

Callback = Callable[[Any], Any]


class AsyncioPool(BasePool):
    """`--pool worker.pool:AsyncioPool` (`llmq worker`'s default, `--pool async`)."""

    body_can_be_buffer = False
    signal_safe = False
    task_join_will_block = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._accept = prepare_accept_content(self.app.conf.accept_content)
        self._running: set[Future[Any]] = set()
        self._finished: collections.deque[Finished] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._hub: Any = None
        self._other = ThreadPoolExecutor(max_workers=OTHER_THREADS, thread_name_prefix="llmq-pool")

    # --- Celery's pool interface ------------------------------------------------------

    def register_with_event_loop(self, hub: Any) -> None:
        # Called again each time the consumer restarts (after a broker reconnect).
        self._hub = hub
        hub.add_reader(self._wake_read, self._run_finished)

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callback | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> Future[Any]:
        # Celery's trace functions take (task name, task id, request, body, content type, encoding).
        name, task_id, _request, body, content_type, content_encoding = (args or ())[:6]
        start = getattr(self.app.tasks.get(name), "llmq_coroutine", None)
        if start is None:
            return self._other.submit(apply_target, target, args, kwargs, callback, accept_callback)
        task_args, task_kwargs, _embed = (
            loads(body, content_type, content_encoding, accept=self._accept) if content_type else body
        )
        if accept_callback is not None:
            accept_callback(os.getpid(), monotonic())
        started = monotonic()
        future: Future[Any] = start(*task_args, **task_kwargs)
        self._running.add(future)
        future.add_done_callback(lambda done: self._finish(done, callback, started, name, task_id))
        return future

    def on_stop(self) -> None:
        """Warm shutdown: let running jobs end and run their callbacks (acks) here."""
        while self._running:
            wait(list(self._running), timeout=0.2)
            self._run_finished()
        self._run_finished()
        self._other.shutdown(cancel_futures=True)

    def on_terminate(self) -> None:
        # Cold shutdown: running jobs stay unacked; their leases expire and they run again.
        self._other.shutdown(wait=False, cancel_futures=True)

    def on_close(self) -> None:
        self._close_pipe()

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({"max-concurrency": self.limit, "running": len(self._running), "threads": 0})
        return info

    @property
    def num_processes(self) -> int:
        return self.limit

    # --- completion -------------------------------------------------------------------

    def _finish(self, future: Future[Any], callback: Callback | None, started: float, name: str, task_id: str) -> None:
        """On the loop thread: queue Celery's callback for the consumer thread and wake it."""
        self._running.discard(future)
        if callback is None:
            return
        runtime = monotonic() - started
        error = CancelledError(f"{name} was cancelled") if future.cancelled() else future.exception()
        if error is None:
            outcome: tuple[int, Any, float] = (0, repr(future.result()), runtime)
        else:
            outcome = (1, ExceptionInfo((type(error), error, error.__traceback__)), runtime)
        finished = Finished(callback, outcome, name, task_id, error)
        if self._hub is None:
            self._other.submit(finished.report)
            return
        self._finished.append(finished)
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the consumer will look
        except OSError:
            pass  # closed at shutdown; on_stop runs what is left

    def _run_finished(self) -> None:
        """On the consumer thread: the callbacks of every job that ended since the last look."""
        try:
            while os.read(self._wake_read, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._finished:
            self._finished.popleft().report()

    def _close_pipe(self) -> None:
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


class Finished(NamedTuple):
    """A job's end, as Celery's tracer would have reported it."""

    callback: Callback
    outcome: tuple[int, Any, float]
    name: str
    task_id: str
    error: BaseException | None

    def report(self) -> None:
        """Log it the way Celery's tracer does, then hand Celery its outcome (ack, events, requeue)."""
        error, fields = self.error, {"id": self.task_id, "name": self.name}
        if error is None:
            if trace_logger.isEnabledFor(logging.INFO):
                _, value, runtime = self.outcome
                trace_logger.info(LOG_SUCCESS, {**fields, "return_value": value, "runtime": runtime})
        elif isinstance(error, Reject):
            trace_logger.info(LOG_REJECTED, {**fields, "exc": error})
        else:
            trace_logger.error(LOG_FAILURE, {**fields, "exc": repr(error), "description": "raised unexpected"},
                               exc_info=(type(error), error, error.__traceback__))
        try:
            self.callback(self.outcome)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("Celery's callback for task %s[%s] failed", self.name, self.task_id)
