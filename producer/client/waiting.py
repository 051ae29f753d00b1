"""What a wait says while it waits, and when it stops waiting for Redis.

A wait polls Redis through a client that fails fast, so it can tell the caller
why nothing moves instead of hanging silently:

- Redis does not answer: `Redis unreachable for 12 s, retrying`, and after
  `client.redis_unreachable_s` of that, `RedisUnreachableError` naming how to
  resume (`llmq results ID` once Redis is back: the jobs are not lost);
- Redis restarted between two polls (its run id changed), however briefly it
  was away: `Redis restarted ...; carrying on`;
- jobs wait on a queue that no live worker consumes (workers' heartbeats,
  `keys.WORKER_PREFIX`): `no live worker on llm.x`, with how to start one.

Each reason is a `WaitNotice`; the caller hears it when it changes, and None
when it is gone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from llmq.client.errors import NoLiveWorkerError, RedisUnreachableError
from llmq.contract import keys
from llmq.contract.jobs import WAITING_STATES, JobStore
from llmq.contract.models import BatchRecord, JobRecord
from llmq.contract.queueing import REDIS_URL_ENV

#: Errors that mean Redis is away (down, restarting, or a dropped link), not a bad request.
REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
#: How often a wait looks at the workers' heartbeats.
WORKER_CHECK_S = 5.0
#: A batch's jobs looked at per worker check (a window that moves along larger batches).
JOBS_PER_CHECK = 1000
#: The fail-fast client's read timeout: above a stream read's block (client/streams.py BLOCK_MS).
POLL_SOCKET_TIMEOUT_S = 5.0

NoticeKind = Literal["redis_unreachable", "redis_restarted", "no_live_worker"]
RESTARTED = "Redis restarted (a new run id); carrying on"


@dataclass(frozen=True)
class WaitNotice:
    kind: NoticeKind
    text: str


#: What a waiting caller passes to hear notices: a WaitNotice when the reason to wait changes, None when it is gone.
Notify = Callable[[WaitNotice | None], None]


def no_worker_text(queues: Iterable[str], *, what: str = "on") -> str:
    """The one message for queues no live worker consumes, with how to start one."""
    queues = list(queues)
    names = ",".join(dict.fromkeys(keys.queue_provider(queue) for queue in queues))  # a worker takes both lanes
    return (f"no live worker {what} {', '.join(queues)}; start one with `llmq worker --queues {names}`, "
            "or the whole stack with `llmq up`")


def poll_client(url: str, connect_timeout_s: float, max_connections: int | None = None) -> aioredis.Redis:
    """A Redis client that never retries and gives up on a connection within seconds: whoever polls
    through it decides how long to keep trying, and can say why it waits meanwhile."""
    options = {"max_connections": max_connections} if max_connections else {}
    return aioredis.from_url(url, decode_responses=True, retry=AsyncRetry(NoBackoff(), 0),
                             socket_connect_timeout=connect_timeout_s,
                             socket_timeout=max(POLL_SOCKET_TIMEOUT_S, connect_timeout_s), **options)


async def ping(client: aioredis.Redis, where: str, timeout_s: float) -> None:
    """Return once Redis answers; after `timeout_s` without an answer, RedisUnreachableError naming `where`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await asyncio.wait_for(client.ping(), timeout_s)
            return
        except (*REDIS_AWAY, asyncio.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise RedisUnreachableError(
                    f"cannot reach Redis at {where} within {timeout_s:g} s ({type(exc).__name__}: {exc}); start the "
                    f"stack with `llmq up`, or point {REDIS_URL_ENV} at a running Redis"
                ) from None
            await asyncio.sleep(0.1)


async def read_heartbeats(client: aioredis.Redis) -> list[dict[str, Any]]:
    """Every live worker's heartbeat: pid, running, queues, configured (see worker/runtime.py)."""
    beat_keys = [key async for key in client.scan_iter(keys.WORKER_PREFIX + "*", count=500)]
    beats = await client.mget(beat_keys) if beat_keys else []
    return [json.loads(beat) for beat in beats if beat]


async def served_queues(client: aioredis.Redis) -> set[str]:
    """Queues at least one live worker consumes."""
    return {str(queue) for beat in await read_heartbeats(client) for queue in beat.get("queues", [])}


async def require_served(queues: Iterable[str], client: aioredis.Redis) -> None:
    """NoLiveWorkerError when no live worker consumes any of `queues` (a route's hops, in order)."""
    queues = list(dict.fromkeys(queues))
    if not set(queues) & await served_queues(client):
        raise NoLiveWorkerError(no_worker_text(queues, what="serves any hop of this route:"), queues)


class Outage:
    """How long Redis has not answered during a wait; past `give_up_s`, the wait ends."""

    def __init__(self, some_id: str, give_up_s: float) -> None:
        self.some_id = some_id
        self.give_up_s = give_up_s
        self.since: float | None = None

    def failed(self, exc: BaseException) -> WaitNotice:
        """A poll that found no Redis: the notice to show, or RedisUnreachableError past the bound."""
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        away_s = now - self.since
        if away_s >= self.give_up_s:
            raise RedisUnreachableError(
                f"Redis unreachable for {away_s:.0f} s while waiting for {self.some_id} ({type(exc).__name__}); "
                f"gave up waiting, but its jobs are not lost: once Redis is back, run `llmq results {self.some_id}`"
            ) from None
        return WaitNotice("redis_unreachable", f"Redis unreachable for {away_s:.0f} s, retrying")

    def answered(self) -> float | None:
        """Redis answered: how long it had been away (None when it had not)."""
        away_s = None if self.since is None else time.monotonic() - self.since
        self.since = None
        return away_s


class WaitWatch:
    """One wait's poller: records through a fail-fast client, notices when the reason to wait changes."""

    def __init__(
        self, jobs: JobStore, some_id: str, *, give_up_s: float,
        on_notice: Notify | None = None,
    ) -> None:
        self.jobs = jobs
        self.outage = Outage(some_id, give_up_s)
        self.on_notice = on_notice
        self.notice: WaitNotice | None = None
        self.worker_notice: WaitNotice | None = None
        self._checked_workers_at = float("-inf")
        self._window = 0
        #: Redis's run id as first seen: it changes when Redis restarts.
        self.run_id: str | None = None
        self.restarted = False

    async def poll(self, some_id: str) -> JobRecord | BatchRecord | None:
        """The record (None if Redis has no such id); raises `Unavailable` while Redis is away."""
        try:
            record = await self.jobs.batch(some_id) or await self.jobs.get(some_id)
            run_id = await self._run_id()
        except REDIS_AWAY as exc:
            self.away(exc)
            raise Unavailable from exc
        self.back(run_id)
        return record

    async def _run_id(self) -> str | None:
        try:
            return str((await self.jobs.redis.info("server")).get("run_id", "")) or None
        except redis.exceptions.ResponseError:  # INFO renamed or refused (some hosted Redis): no restart check
            return None

    def away(self, exc: BaseException) -> None:
        """A read found Redis away: say so (RedisUnreachableError once it has been away too long)."""
        self._tell(self.outage.failed(exc))

    def back(self, run_id: str | None = None) -> None:
        """A read got an answer (from Redis with `run_id`, when known): an outage, if there was one, is over."""
        away_s = self.outage.answered()
        restarted = None not in (run_id, self.run_id) and run_id != self.run_id
        self.run_id = run_id or self.run_id
        if restarted:
            self.restarted = True
            self._tell(WaitNotice("redis_restarted", RESTARTED))
        elif away_s is not None or (self.notice is not None and self.notice.kind == "redis_restarted"):
            self._tell(self.worker_notice)

    async def check_workers(self, record: JobRecord | BatchRecord) -> None:
        """Every `WORKER_CHECK_S`: do the queues its jobs wait in have a live worker?"""
        if time.monotonic() - self._checked_workers_at < WORKER_CHECK_S:
            return
        self._checked_workers_at = time.monotonic()
        try:
            waiting = await self._waiting_queues(record)
            missing = sorted(waiting - await served_queues(self.jobs.redis)) if waiting else []
        except REDIS_AWAY:
            return  # the next poll reports the outage
        self.worker_notice = WaitNotice("no_live_worker", no_worker_text(missing)) if missing else None
        self._tell(self.worker_notice)

    async def _waiting_queues(self, record: JobRecord | BatchRecord) -> set[str]:
        if isinstance(record, JobRecord):
            if record.state.value not in WAITING_STATES:
                return set()
            return {keys.queue_name(record.route[record.route_index].provider, record.lane)}
        start = self._window
        job_ids = await self.jobs.redis.lrange(keys.batch_jobs(record.batch_id), start, start + JOBS_PER_CHECK - 1)
        self._window = start + JOBS_PER_CHECK if len(job_ids) == JOBS_PER_CHECK else 0
        async with self.jobs.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), "state", "queue")
            replies = await pipe.execute()
        return {queue for state, queue in replies if state in WAITING_STATES and queue}

    def _tell(self, notice: WaitNotice | None) -> None:
        if notice != self.notice:
            self.notice = notice
            if self.on_notice is not None:
                self.on_notice(notice)


class Unavailable(Exception):
    """A poll found Redis away (already told to the caller); the wait polls again."""


async def wait_until_done(
    watch: WaitWatch, some_id: str, *, timeout_s: float | None = None,
    on_progress: Callable[[BatchRecord], None] | None = None,
) -> JobRecord | BatchRecord:
    """`LLMService.wait`: poll through `watch` until the job or batch is done (see the module docstring)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interval_s = 0.02
    while True:
        try:
            record = await watch.poll(some_id)
        except Unavailable:
            record, interval_s = None, 0.5
        else:
            if record is None:
                why = ("Redis restarted during the wait without its data (no persistence?); the SQL ledger "
                       "has what finished before" if watch.restarted else "it may have expired from Redis")
                raise KeyError(f"no job or batch with id {some_id!r} ({why})")
            if isinstance(record, BatchRecord) and on_progress:
                on_progress(record)
            if record.done:
                return record
            await watch.check_workers(record)
        if deadline is not None and time.monotonic() > deadline:
            state = describe_state(record) if record is not None else "Redis unreachable"
            raise TimeoutError(f"{some_id} not finished after {timeout_s}s (state: {state})")
        await asyncio.sleep(interval_s)
        interval_s = min(0.5, interval_s * 1.5)


def describe_state(record: JobRecord | BatchRecord) -> str:
    if isinstance(record, JobRecord):
        return record.state.value
    return ", ".join(f"{state.value} {count}" for state, count in record.counts.items() if count)
