"""Job and batch records in Redis, changed only through the Lua scripts beside this file.

Every state change is one script call, so several workers and callers touching
the same job never see or write a half-made transition. The job id is the
record's key, the Celery task id and the dedup key; `dispatch` numbers the
messages sent for a job, so a stale or duplicate message is recognised and
dropped instead of running the job twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.common import replace_lone_surrogates
from llmq.contract.labels import TaskLabel
from llmq.contract.models import (
    REQUEST_MODELS,
    RESPONSE_MODELS,
    BatchRecord,
    Hop,
    JobKind,
    JobRecord,
    JobRequest,
    JobResponse,
    JobState,
    Lane,
)
from llmq.contract.queueing import Message
from llmq.contract.scripts import read_script

WAITING_STATES = (JobState.QUEUED, JobState.RETRYING, JobState.RATE_LIMITED)
#: Every state a job can still leave: a cancel or a deadline ends it from any of these.
ACTIVE_STATES = (*WAITING_STATES, JobState.RUNNING, JobState.IN_PROVIDER_BATCH)
#: A published job not claimed this long, on a queue that holds no message, is published again.
PUBLISH_GRACE_MS = 30_000
#: The same watchdog interval for jobs the promoter publishes (retries, fallbacks, re-runs).
PROMOTE_IN_FLIGHT_MS = 30_000
#: promote.lua hands out job_id, dispatch, queue, label, attempt for each message to publish,
#: and job_id, state, error for each job that ended with no message to tell it.
PROMOTED_FIELDS = 5
ENDED_FIELDS = 3
#: A published job not yet claimed while its queue still holds messages is looked at again this soon.
PROMOTE_RECHECK_MS = 5_000
#: After Redis restarted, every published, unclaimed job is looked at again this soon (recheck.lua).
RESTART_RECHECK_MS = 1_000


#: Job option (`NewJob.options`) carrying the caller's own daily budget in USD (an HTTP front
#: key's `--daily-usd`); the worker's budget middleware uses it before `per_caller_daily_usd`.
CALLER_BUDGET_OPTION = "caller_daily_usd"

#: Compare-and-delete for the locks several processes take (reaper, outbox flusher).
RELEASE_LOCK = read_script(__file__, "release_lock.lua")


def _script(name: str) -> str:
    return read_script(__file__, name)


@dataclass
class NewJob:
    job_id: str
    request: JobRequest
    route: list[Hop]
    batch_id: str | None = None
    custom_id: str | None = None
    deadline_s: float = 3600.0
    options: dict[str, Any] = field(default_factory=dict)
    lane: Lane = Lane.BATCH
    #: Seconds the caller can wait for the answer (a completion window), if it said.
    completion_window_s: float | None = None
    #: The job waits in its first hop's provider batch intake instead of being published.
    via_provider_batch: bool = False

    @property
    def first_state(self) -> JobState:
        return JobState.IN_PROVIDER_BATCH if self.via_provider_batch else JobState.QUEUED

    @cached_property
    def label(self) -> TaskLabel:
        return TaskLabel.for_job(self.request, self.route[0], batch_id=self.batch_id, custom_id=self.custom_id,
                                 lane=self.lane)

    @property
    def queue(self) -> str:
        return keys.queue_name(self.route[0].provider, self.lane)

    def first_message(self) -> Message:
        return Message(self.job_id, 1, self.queue, self.label)

    def fields(self) -> list[str]:
        values = {
            "job_id": self.job_id,
            "kind": self.request.kind.value,
            "request": dump_request(self.request),
            "route": dump_route(self.route),
            "queue": self.queue,
            "lane": self.lane.value,
            "batch_id": self.batch_id or "",
            "custom_id": self.custom_id or "",
            "options": json.dumps(self.options),
            "label": self.label.stored(),
            "completion_window_s": "" if self.completion_window_s is None else str(self.completion_window_s),
            "provider_batch": "",
        }
        return [item for pair in values.items() for item in pair]


@dataclass(frozen=True)
class Transition:
    """What transition.lua did: whether the job moved, the state it was in, its dispatch number now."""

    moved: bool
    #: None when there is no such job (expired, or never created).
    previous_state: JobState | None
    dispatch: int


class EndedJob(NamedTuple):
    """A job that ended while no worker held a message for it: cancelled, or failed by the reaper."""

    job_id: str
    state: JobState
    #: Its public error record (the job's `error` field), if it has one.
    error: dict[str, Any] | None


class Promoted(NamedTuple):
    messages: list[Message]
    ended: list[EndedJob]


@dataclass(frozen=True)
class Claim:
    outcome: str  # "ok", "skip" or "expired"
    state: str
    job: dict[str, str] = field(default_factory=dict)


class JobStore:
    """Async access to job and batch records (redis.asyncio client, decode_responses=True)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_script("create_job.lua"))
        self._transition = client.register_script(_script("transition.lua"))
        self._claim = client.register_script(_script("claim.lua"))
        self._promote = client.register_script(_script("promote.lua"))
        self._reap = client.register_script(_script("reap.lua"))
        self._recheck = client.register_script(_script("recheck.lua"))

    # --- creating ----------------------------------------------------------------

    async def create_many(self, jobs: list[NewJob], ttl_s: int) -> list[tuple[bool, str]]:
        """Create records in one pipeline; returns (created, job_id) per job, in order."""
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            batch_id = job.batch_id or ""
            await self._create(
                keys=[
                    keys.job(job.job_id), keys.batch(batch_id), keys.batch_jobs(batch_id),
                    keys.batch_custom_ids(batch_id), keys.DELAYED, keys.DEADLINES, keys.OUTBOX,
                    keys.provider_batch_intake(job.route[0].provider),
                ],
                args=[
                    job.job_id, batch_id, job.custom_id or "", int(job.deadline_s * 1000), PUBLISH_GRACE_MS,
                    ttl_s + int(job.deadline_s), job.first_state.value, *job.fields(),
                ],
                client=pipe,
            )
        results = await pipe.execute()
        return [(bool(int(created)), str(job_id)) for created, job_id in results]

    async def create_batch(self, batch_id: str, ttl_s: int) -> None:
        now_ms = await self.now_ms()
        await self.redis.hset(keys.batch(batch_id), mapping={"created_at": now_ms, "total": 0})
        await self.expire_batch(batch_id, ttl_s)

    async def expire_batch(self, batch_id: str, ttl_s: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key in (keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_custom_ids(batch_id)):
            pipe.expire(key, ttl_s)
        await pipe.execute()

    # --- reading -----------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.job_attempts(job_id), 0, -1)
        raw = await pipe.execute()
        return [parse_job(raw[index], raw[index + 1]) for index in range(0, len(raw), 2)]

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self.redis.hgetall(keys.batch(batch_id))
        if not raw:
            return None
        counts = {state: max(0, int(raw.get(state.value, 0))) for state in JobState}
        return BatchRecord(
            batch_id=batch_id, total=int(raw.get("total", 0)), counts=counts,
            created_at=_seconds(raw.get("created_at")), cancelled=raw.get("cancel_requested") == "1",
        )

    async def batch_job_ids(self, batch_id: str) -> list[str]:
        return await self.redis.lrange(keys.batch_jobs(batch_id), 0, -1)

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # --- changing ------------------------------------------------------------------

    async def claim(self, job_id: str, dispatch: int, worker: str, lease_ms: int) -> Claim:
        # The batch key is completed inside the script from the job's own batch_id: no extra round trip.
        result = await self._claim(
            keys=[keys.job(job_id), keys.BATCH_KEY_PREFIX, keys.LEASES, keys.DELAYED],
            args=[str(dispatch), worker, lease_ms],
        )
        if result[0] == "ok":
            flat = result[1]
            return Claim("ok", "running", dict(zip(flat[::2], flat[1::2])))
        return Claim(result[0], result[1])

    async def transition(
        self,
        job_id: str,
        *,
        new_state: JobState,
        allowed: tuple[JobState, ...],
        expected_dispatch: int | None = None,
        delay_ms: int = -1,
        new_dispatch: bool = False,
        ttl_s: int = 7 * 24 * 3600,
        attempt: dict[str, Any] | None = None,
        rows: list[dict[str, Any]] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Transition:
        """Move a job if it is in one of `allowed` (and on `expected_dispatch`)."""
        flat = [str(item) for pair in (fields or {}).items() for item in pair]
        moved, state, dispatch = await self._transition(
            keys=[
                keys.job(job_id), keys.job_attempts(job_id), keys.BATCH_KEY_PREFIX, keys.LEASES,
                keys.DELAYED, keys.DEADLINES, keys.OUTBOX,
            ],
            args=[
                "" if expected_dispatch is None else str(expected_dispatch), ",".join(state.value for state in allowed),
                new_state.value,
                delay_ms, "1" if new_dispatch else "0", ttl_s,
                _lua_json(attempt) if attempt else "", _lua_json(rows) if rows else "", *flat,
            ],
        )
        # 'missing': no such job (expired or never created).
        previous = None if state == "missing" else JobState(state)
        return Transition(bool(int(moved)), previous, int(dispatch))

    async def cancel(self, job_id: str, ttl_s: int) -> bool:
        error = {"type": "JobCancelledError", "message": "cancelled by the caller", "retryable": False}
        # delay 0: due now in the delayed set, where the promoter finds it and a worker tells Flower (promote.lua).
        done = await self.transition(
            job_id, new_state=JobState.CANCELLED, allowed=ACTIVE_STATES, new_dispatch=True, ttl_s=ttl_s,
            delay_ms=0, fields={"error": json.dumps(error)},
        )
        return done.moved

    async def promote_due(self, limit: int = 500, *, hand_out_ended: bool = True) -> Promoted:
        """Jobs that came due: the messages to publish (labelled for Flower with the attempt each
        starts), and the jobs that ended with no message to tell Flower so (see promote.lua).
        `hand_out_ended=False` leaves those to a process that can send Celery's events."""
        messages, ended = await self._promote(
            keys=[keys.DELAYED],
            args=[limit, PROMOTE_IN_FLIGHT_MS, keys.JOB_KEY_PREFIX, PROMOTE_RECHECK_MS, int(hand_out_ended)],
        )
        return Promoted(
            [Message(messages[index], int(messages[index + 1]), messages[index + 2],
                     TaskLabel.from_stored(messages[index + 3], attempt=int(messages[index + 4] or 0) + 1))
             for index in range(0, len(messages), PROMOTED_FIELDS)],
            [EndedJob(ended[index], JobState(ended[index + 1]),
                      json.loads(ended[index + 2]) if ended[index + 2] else None)
             for index in range(0, len(ended), ENDED_FIELDS)],
        )

    async def recheck_published(self, page: int = 1000) -> int:
        """After a Redis restart: every published job no worker has claimed is looked at within a second.

        Its message may have died with Redis (popped but never delivered); the watchdog
        then republishes it once its queue is empty instead of after the full grace.
        Returns how many jobs were brought forward.
        """
        moved_total = offset = 0
        while True:
            moved, scanned = await self._recheck(keys=[keys.DELAYED], args=[RESTART_RECHECK_MS, keys.JOB_KEY_PREFIX, offset, page])
            moved_total += int(moved)
            offset += int(scanned) - int(moved)
            if int(scanned) < page:
                return moved_total

    async def reap(self, limit: int, ttl_s: int) -> tuple[list[str], list[str]]:
        flat = await self._reap(
            keys=[keys.LEASES, keys.DEADLINES, keys.DELAYED, keys.OUTBOX],
            args=[keys.JOB_KEY_PREFIX, keys.BATCH_KEY_PREFIX, limit, ttl_s],
        )
        split = flat.index("|")
        return flat[:split], flat[split + 1 :]

    async def release_lock(self, key: str, token: str) -> None:
        """Delete a lock only if we still hold it."""
        await self.redis.eval(RELEASE_LOCK, 1, key, token)

    async def renew_leases(self, job_ids: list[str], lease_ms: int) -> None:
        if job_ids:
            expiry = await self.now_ms() + lease_ms
            await self.redis.zadd(keys.LEASES, {job_id: expiry for job_id in job_ids}, xx=True)


def _lua_json(value: Any) -> str:
    """JSON for a script that decodes it: Redis's cjson refuses a lone surrogate's escape, and a
    provider's error message may hold one, which would leave the job unable to move."""
    return json.dumps(replace_lone_surrogates(value))


def dump_request(request: JobRequest) -> str:
    """A request as the job record keeps it: fields left at None are left out (most are, in a plain chat)."""
    return request.model_dump_json(exclude_none=True)


def dump_response(response: JobResponse) -> str:
    return response.model_dump_json(exclude_none=True)


def job_kind(raw: dict[str, str]) -> JobKind:
    """A job record's kind; a record written before kinds existed is a chat."""
    return JobKind(raw.get("kind") or JobKind.CHAT.value)


def job_lane(raw: dict[str, str]) -> Lane:
    """A job record's lane; a record written before lanes existed waited in the one queue, now the batch lane."""
    return Lane(raw.get("lane") or Lane.BATCH.value)


def load_request(raw: dict[str, str]) -> JobRequest:
    return REQUEST_MODELS[job_kind(raw)].model_validate_json(raw["request"])


def load_response(kind: JobKind, text: str) -> JobResponse:
    return RESPONSE_MODELS[kind].model_validate_json(text)


def parse_job(raw: dict[str, str], attempts: list[str]) -> JobRecord | None:
    if not raw or "request" not in raw:
        return None
    kind = job_kind(raw)
    return JobRecord(
        job_id=raw["job_id"],
        kind=kind,
        state=JobState(raw["state"]),
        request=load_request(raw),
        route=[Hop.model_validate(hop) for hop in json.loads(raw["route"])],
        route_index=int(raw.get("route_index", 0)),
        attempt=int(raw.get("attempt", 0)),
        batch_id=raw.get("batch_id") or None,
        custom_id=raw.get("custom_id") or None,
        lane=job_lane(raw),
        created_at=_seconds(raw.get("created_at")),
        updated_at=_seconds(raw.get("updated_at")),
        finished_at=_seconds(raw.get("finished_at")),
        deadline_at=_seconds(raw.get("deadline_at")),
        result=load_response(kind, raw["result"]) if raw.get("result") else None,
        error=json.loads(raw["error"]) if raw.get("error") else None,
        attempts=[json.loads(item) for item in attempts],
        provider_batch=raw.get("provider_batch") or None,
        completion_window_s=float(raw["completion_window_s"]) if raw.get("completion_window_s") else None,
    )


def dump_route(route: list[Hop]) -> str:
    """A route as the job record keeps it (a hop's pool only when it has one)."""
    return json.dumps([hop.model_dump(exclude_none=True) for hop in route])


def _seconds(value: str | None) -> float | None:
    return int(value) / 1000.0 if value else None
