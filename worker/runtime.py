"""One per worker process: an asyncio loop in a thread, shared clients, background loops.

llmq's Celery pool (worker/pool.py) starts each job as a coroutine on this loop;
under `--pool threads` a slot thread hands its job here and waits. Provider calls
are coroutines on one shared `httpx.AsyncClient` per provider, so one process
holds hundreds of calls in flight while Celery keeps doing what it is good at:
late acks, redelivery, events for Flower.

Background loops on the same event loop:
- promoter: publishes delayed jobs (retries, rate-limited waits, fallbacks) when due
- reaper: re-runs jobs whose worker stopped renewing its lease; fails jobs past their deadline
- lease renewer: keeps this process's running jobs' leases fresh
- any the app adds: worker/app.py adds the provider batch loop (worker/batches/tend.py)
and a child process that drains the SQL outbox (worker/store/outbox.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis.asyncio as aioredis
from celery import Celery

from llmq.contract import keys
from llmq.contract.jobs import EndedJob, JobStore
from llmq.contract.provider_batches import ProviderBatchStore
from llmq.contract.queueing import Message, async_redis, publish_events, publish_messages
from llmq.worker.middleware.base import Middleware, MiddlewareChain
from llmq.worker.middleware.budget import BudgetMiddleware
from llmq.worker.middleware.cache import CacheMiddleware
from llmq.worker.middleware.circuit import CircuitBreakerMiddleware
from llmq.worker.middleware.metrics import MetricsMiddleware
from llmq.worker.middleware.pool import PoolMiddleware
from llmq.worker.middleware.ratelimit import RateLimitMiddleware
from llmq.worker.outcome import ended_events
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.registry import create_provider
from llmq.worker.settings import WorkerSettings
from llmq.worker.store import outbox

log = logging.getLogger("llmq.worker")
T = TypeVar("T")

PROMOTE_INTERVAL_S = 0.1
REAP_INTERVAL_S = 1.0



def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (C transports: a third less loop CPU per job), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def default_middleware() -> list[Middleware]:
    """The chain every worker runs, in order: the first verdict wins.

    0. pool: moves a job whose hop is a pool to the member with the most room, before anything
       else reads the hop (it gives no verdict);
    1. metrics: first of the rest, so it sees every verdict of the others and every outcome;
    2. cache: a hit answers before any budget, circuit or limit is consulted (it costs nothing);
    3. budget: a spent budget holds or reroutes the job before it takes a probe or a slot;
    4. circuit breaker: an open circuit skips the provider before the limiter reserves for it;
    5. rate limiter: reserves last, just before the call, so nothing it holds is wasted on a
       verdict that came after it.
    """

    return [PoolMiddleware(), MetricsMiddleware(), CacheMiddleware(), BudgetMiddleware(), CircuitBreakerMiddleware(),
            RateLimitMiddleware()]


class Runtime:
    def __init__(self, settings: WorkerSettings, app: Celery, *, start_background: bool = True) -> None:
        self.settings = settings
        self.config = settings.config
        self.redis_url = settings.redis_url
        self.app = app
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.running: set[str] = set()
        #: Celery's consumer in this process, once the worker is ready (worker/app.py): its event
        #: dispatcher says whether task events are on, and as which node.
        self.consumer: Any = None
        self.providers: dict[str, LLMProvider] = {}
        self._publish_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmq-publish")
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llmq-loop", daemon=True)
        self._thread.start()
        self.redis: aioredis.Redis = self.run(self._connect())
        self.jobs = JobStore(self.redis)
        self.provider_batches = ProviderBatchStore(self.redis)
        self.middleware = MiddlewareChain(default_middleware())
        self.run(self._start_middleware())
        self._tasks: list[asyncio.Future[Any]] = []
        self.outbox_flusher: subprocess.Popen[bytes] | None = None
        if start_background:
            self.start_background()

    async def _connect(self) -> aioredis.Redis:
        return async_redis(self.redis_url, max_connections=2000)

    async def _start_middleware(self) -> None:
        self.middleware.start(self)
        # Adapters made now, not after the first call's grant: building one takes a few hundred ms
        # of imports and clients, which would reach the provider as jitter the pacing must absorb.
        for name in dict.fromkeys(keys.queue_provider(queue) for queue in self.settings.consumed_queues):
            entry = self.config.providers.get(name)
            if entry is not None and entry.configured:
                try:
                    self.provider(name)
                except Exception:  # the first job on it reports the problem, as before
                    log.exception("provider %s: adapter not made at start", name)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the loop from any thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def provider(self, name: str) -> LLMProvider:
        """The adapter for a provider entry, created once per process (on the loop thread)."""
        if name not in self.providers:
            provider = create_provider(self.config.provider(name))
            self.middleware.provider_created(provider)
            self.providers[name] = provider
        return self.providers[name]

    # --- publishing ------------------------------------------------------------------

    async def publish(self, messages: list[Message]) -> None:
        """Send messages; kombu is blocking, so off the loop."""
        if messages:
            await self.loop.run_in_executor(self._publish_executor, publish_messages, self.app, messages)

    @property
    def tells_flower(self) -> bool:
        """This process runs Celery's consumer (not a prefork child): it can send task events as its node."""
        return self.consumer is not None

    async def tell_flower(self, ended: list[EndedJob]) -> None:
        """Celery's events for jobs that ended with no message to say it, if this worker sends task events now
        (`--no-events` sends none until a monitor enables them)."""
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if not ended or dispatcher is None or not dispatcher.enabled:
            return
        if dispatcher.groups and "task" not in dispatcher.groups:
            return
        await self.loop.run_in_executor(
            self._publish_executor, publish_events, self.app, ended_events(ended), dispatcher.hostname
        )

    # --- background ------------------------------------------------------------------

    def start_background(self) -> None:
        # The app may add loops of its own (worker/app.py: provider batches), each given this runtime.
        extra = [functools.partial(loop, self) for loop in getattr(self.app, "background_loops", ())]
        for loop_function in (self._promote_loop, self._reap_loop, self._renew_loop, self._heartbeat_loop, *extra):
            self._tasks.append(asyncio.run_coroutine_threadsafe(loop_function(), self.loop))
        self.outbox_flusher = outbox.start_process(self.redis_url)

    async def _promote_loop(self) -> None:
        while True:
            try:
                promoted = await self.jobs.promote_due(500, hand_out_ended=self.tells_flower)
                await self.tell_flower(promoted.ended)
                if promoted.messages or promoted.ended:
                    # Their watchdog entries stay until a worker claims them (see promote.lua).
                    await self.publish(promoted.messages)
                    continue
            except Exception as exc:  # Redis restarting: keep going, never die
                log.warning("promoter: %s", exc)
            await asyncio.sleep(PROMOTE_INTERVAL_S)

    async def _reap_loop(self) -> None:
        ttl_s = self.config.service.jobs.result_ttl_s
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                if await self.redis.set(keys.REAPER_LOCK, self.worker_id, nx=True, px=int(REAP_INTERVAL_S * 5000)):
                    try:
                        requeued, failed = await self.jobs.reap(500, ttl_s)
                    finally:
                        # Let the next sweep (ours or another worker's) run on time, a second from now.
                        await self.jobs.release_lock(keys.REAPER_LOCK, self.worker_id)
                    if requeued or failed:
                        log.warning("reaper: re-queued %d jobs of lost workers, failed %d past deadline", len(requeued), len(failed))
            except Exception as exc:
                log.warning("reaper: %s", exc)

    async def _renew_loop(self) -> None:
        lease_ms = int(self.config.service.jobs.lease_s * 1000)
        while True:
            await asyncio.sleep(self.config.service.jobs.lease_s / 3)
            try:
                await self.jobs.renew_leases(sorted(self.running), lease_ms)
            except Exception as exc:
                log.warning("lease renewal: %s", exc)

    async def _heartbeat_loop(self) -> None:
        """Say this process is alive (what `llmq up` and the tests wait for); notice Redis restarts."""
        key = keys.worker_heartbeat(self.worker_id)
        run_id: str | None = None
        while True:
            try:
                queues = sorted(self.settings.consumed_queues)
                await self.redis.set(key, json.dumps({
                    "pid": os.getpid(), "running": len(self.running), "queues": queues,
                    "configured": self.config.configured_providers(),
                }), ex=10)
                run_id = await self._notice_restart(run_id)
            except Exception as exc:
                log.warning("heartbeat: %s", exc)
            await asyncio.sleep(2)

    async def _notice_restart(self, known: str | None) -> str:
        """Redis's run id changes when it restarts: then messages may have died with it (recheck.lua)."""
        run_id = str((await self.redis.info("server"))["run_id"])
        if known is not None and run_id != known:
            # One worker per restart does it; doing it twice would be harmless.
            if await self.redis.set(keys.restart_recheck(run_id), self.worker_id, nx=True, ex=3600):
                moved = await self.jobs.recheck_published()
                log.warning("Redis restarted: %d published jobs no worker has claimed are looked at again now", moved)
        return run_id

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.outbox_flusher is not None:
            outbox.stop_process(self.outbox_flusher)
        for provider in self.providers.values():
            try:
                self.run(provider.aclose(), timeout_s=5)
            except Exception:
                pass
        self.run(self.redis.aclose(), timeout_s=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._publish_executor.shutdown(wait=False)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: WorkerSettings, app: Celery) -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.worker_id.split(":")[-1] != str(os.getpid()):
            _runtime = Runtime(settings, app)
        return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
