"""The Celery app: two queues per configured provider (one per lane), one task.

Reliability settings, chosen on purpose:
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acked only after
  its job is recorded; a worker that dies mid-job leaves it unacked.
- `worker_prefetch_multiplier = 1`: a worker reserves no more messages than it
  has slots, so a dead worker strands as few as possible.
- broker `visibility_timeout` longer than any job may live (see
  llmq.contract.queueing.visibility_timeout_s): the broker's redelivery is only the
  last resort. Leases re-run a dead worker's jobs within `jobs.lease_s` (30 s by
  default); a redelivered message arriving later is recognised as stale and dropped.
- JSON serialization only; task arguments are (job_id, dispatch): no request
  text, no key, nothing secret reaches the broker, Flower or the logs. Flower shows
  each message's label instead (custom id, batch, caller, model, hop, attempt:
  contract/labels.py).
- No result backend: the job record in Redis is the source of truth. What a task
  returns or raises only tells Celery's events, and so Flower, how the message ended
  (worker/outcome.py): SUCCESS with a short summary, RETRY when the job was handed on,
  FAILURE with the typed error, REVOKED when cancelled. Every one of them acks the
  message, as `task_acks_on_failure_or_timeout` makes a failure do.

Beat (`celery -A llmq.worker.app beat`, started by `llmq up`) sends `llmq.health_check`
for each provider entry to its queue (worker/health.py), and `llmq.provider_batches` for each
entry with a batch API (worker/batches/: workers tend provider batches without it too). Every log record of the
process carries the running job's id and no secret (worker/logs.py).

Each provider entry has a queue per lane, `llm.<provider>` (batch) and
`llm.<provider>.interactive`; a worker consumes both and polls every interactive queue
first (kombu's `queue_order_strategy`, contract/queueing.py's LaneFirstCycle).

Start a worker with `llmq worker`: its pool (worker/pool.py) runs each task's
coroutine on the process's shared event loop, `--concurrency` of them at once,
with no thread per slot; `--pool threads` gives each slot a thread that waits on
the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.exceptions
from celery import Celery, signals
from celery.exceptions import Ignore, Reject, Terminated
from kombu import Queue

from llmq.contract import keys
from llmq.contract.queueing import LANE_FIRST_ORDER, make_celery
from llmq.worker.batches.tend import beat_schedule as provider_batch_beat_schedule
from llmq.worker.batches.tend import provider_batch_loop
from llmq.worker.errors import LLMQError
from llmq.worker.health import beat_schedule as health_beat_schedule
from llmq.worker.logs import configure as configure_logging
from llmq.worker.logs import with_job_id
from llmq.worker.runtime import Runtime, get_runtime, shutdown_runtime
from llmq.worker.settings import WorkerSettings

log = logging.getLogger("llmq.worker")


#: The consuming side's settings (the module docstring says why); bench/overhead's bare
#: Celery baseline runs on the same.
WORKER_SETTINGS: dict[str, object] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "task_acks_on_failure_or_timeout": True,
    "worker_prefetch_multiplier": 1,
    "worker_hijack_root_logger": False,
    "worker_cancel_long_running_tasks_on_connection_loss": False,
}


class WorkerApp(Celery):
    """A Celery app that knows the settings its worker process runs on."""

    settings: WorkerSettings
    #: Loops the runtime runs beside its own, each given the runtime.
    background_loops: tuple[Callable[[Runtime], Coroutine[Any, Any, None]], ...] = ()


def create_app(settings: WorkerSettings | None = None) -> WorkerApp:
    settings = settings or WorkerSettings.from_environment()
    config = settings.config
    app = make_celery(config, settings.redis_url, name="llmq-worker", app_class=WorkerApp)
    app.settings = settings
    app.background_loops = (provider_batch_loop,)
    app.conf.update(WORKER_SETTINGS, task_queues=[Queue(queue) for name in config.providers for queue in keys.lane_queues(name)])
    # Interactive queues first at every fetch (contract/queueing.py, LaneFirstCycle).
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **LANE_FIRST_ORDER}
    _created.append(app)
    # Job ids on every log record, no secret in any (worker/logs.py); health checks from beat (worker/health.py).
    configure_logging(config.secrets())
    app.conf.beat_schedule = {**health_beat_schedule(config), **provider_batch_beat_schedule(config)}

    async def generate_job(runtime: Runtime, job_id: str, dispatch: int) -> dict[str, Any]:
        from llmq.worker.engine import execute

        try:
            outcome = await with_job_id(job_id, execute(runtime, job_id, int(dispatch)))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # Redis went away for longer than the client's retries: hand the message back
            # rather than ack a job that never ran (a stale copy is dropped at claim).
            raise Reject(f"redis unavailable: {exc}", requeue=True) from exc
        return outcome.tell_celery()  # the summary, or Retry / the typed error / Terminated / Ignore

    async def check_health(runtime: Runtime, provider: str) -> None:
        from llmq.worker.health import run_health_check

        await run_health_check(runtime, provider)

    async def tend_provider_batches(runtime: Runtime, provider: str) -> None:
        from llmq.worker.batches.tend import tend

        await tend(runtime, provider)

    # Each task body is a coroutine on the process's loop: `llmq_coroutine` starts it there
    # for worker/pool.py's pool; under another pool the task waits for it in its thread.
    tasks = ((keys.TASK_GENERATE, generate_job), (keys.TASK_HEALTH_CHECK, check_health),
             (keys.TASK_PROVIDER_BATCHES, tend_provider_batches))
    for name, body in tasks:
        _register_coroutine_task(app, name, body)
    return app


#: A job's typed failure, its cancellation and a dropped message are outcomes, not bugs: Celery
#: (and worker/pool.py) log them in one line at INFO, without a traceback.
EXPECTED_OUTCOMES = (LLMQError, Terminated, Ignore)


def _register_coroutine_task(app: WorkerApp, name: str, body: Callable[..., Coroutine[Any, Any, Any]]) -> None:
    def start(*args: Any) -> tuple[asyncio.AbstractEventLoop, Coroutine[Any, Any, Any]]:
        runtime = runtime_for(app)
        return runtime.loop, body(runtime, *args)

    def run(*args: Any) -> Any:
        loop, coroutine = start(*args)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    task = app.task(name=name, ignore_result=True, throws=EXPECTED_OUTCOMES)(run)
    task.llmq_coroutine = start


def runtime_for(app: WorkerApp) -> Runtime:
    return get_runtime(app.settings, app)


_created: list[WorkerApp] = []


@signals.worker_ready.connect
def _start_runtime(sender: object = None, **_: object) -> None:
    # Background loops (promoter, reaper, outbox) run even while no job arrives.
    worker_app = getattr(sender, "app", None)
    if isinstance(worker_app, WorkerApp):
        # The consumer: the runtime sends some task events itself, as this node (worker/outcome.py).
        runtime_for(worker_app).consumer = sender
        prestart_threads(getattr(sender, "pool", None))


def prestart_threads(pool: object) -> None:
    """Start every slot's thread before the first message, not during a burst.

    Celery's thread pool is a ThreadPoolExecutor, which starts a thread per task while
    none is idle, and `Thread.start()` waits until the new thread runs: with the event
    loop busy that costs Celery's consumer a GIL hand-off (up to the 5 ms switch
    interval) per new thread, so a burst of a thousand jobs was taken in at a few hundred
    a second (bench/RESULTS.md, "overhead", in flight). Idle threads cost ~10 KiB each.
    """
    executor = getattr(pool, "executor", None)
    limit = getattr(pool, "limit", 0)
    if not isinstance(executor, ThreadPoolExecutor) or limit < 2:
        return
    # Each task holds its thread until all have started, so the executor starts `limit` threads.
    barrier = threading.Barrier(limit)

    def hold() -> None:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass

    for _ in range(limit):
        executor.submit(hold)


@signals.worker_process_init.connect
def _start_child_runtime(**_: object) -> None:
    # Prefork children each need their own loop, clients and background loops.
    if _created:
        runtime_for(_created[-1])


@signals.worker_shutdown.connect
def _stop_runtime(**_: object) -> None:
    shutdown_runtime()


def __getattr__(name: str) -> WorkerApp:
    """`celery -A llmq.worker.app` builds the app on first use, from the environment (WorkerSettings)."""
    if name == "app":
        if not _created:
            create_app()
        return _created[-1]
    raise AttributeError(name)
