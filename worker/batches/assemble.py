"""Grouping an entry's waiting jobs into provider batches that respect the provider's limits.

Jobs with a completion window wait in their first hop's intake (create_job.lua). Once the
oldest has waited `batch_api.gather_s` (or the intake holds a full provider batch), the one
process holding the intake's lock groups them by model, endpoint and window, cuts each group
at the provider's `max_requests` and `max_bytes`, and takes each part into a new provider batch
(provider_batch_claim.lua: the intent to submit, on record before any call). Submitting is the
poller's first step (worker/batches/poll.py), so a worker that dies in between loses nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmq.contract import keys
from llmq.contract.models import JobState
from llmq.contract.tiers import ProviderBatchLimits
from llmq.worker.batches.base import Line, ProviderBatchAPI
from llmq.worker.batches.lines import held, load_lines

if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime

#: Jobs read from an intake in one pass.
MAX_INTAKE_READ = 200_000
INTAKE_LOCK_MS = 10_000
#: A new provider batch's first poll (its submission) comes this soon, should its assembler die.
FIRST_POLL_MS = 2_000
#: What a provider batch's input holds besides its lines (brackets, a wrapper object).
ENVELOPE_BYTES = 1024


@dataclass
class Part:
    lines: list[Line]
    endpoint: str
    window_s: float
    size_bytes: int = 0


async def assemble(runtime: Runtime, api: ProviderBatchAPI, limits: ProviderBatchLimits) -> list[str]:
    """Group the intake into provider batches if it is time; returns the new provider batch ids."""
    store = runtime.provider_batches
    async with held(runtime.redis, keys.provider_batch_intake_lock(api.name), INTAKE_LOCK_MS) as mine:
        waiting = await store.intake(api.name, MAX_INTAKE_READ) if mine else []
        if not waiting:
            return []
        waited_ms = await runtime.jobs.now_ms() - waiting[0][1]
        if waited_ms < limits.gather_s * 1000 and len(waiting) < limits.max_requests:
            return []
        job_ids = [job_id for job_id, _ in waiting]
        windows = await _windows(runtime, job_ids)
        lines = await load_lines(runtime.redis, job_ids)
        gone = set(job_ids) - {line.job_id for line in lines}
        if gone:  # expired from Redis: nothing to send
            await runtime.redis.zrem(keys.provider_batch_intake(api.name), *gone)
        made: list[str] = []
        for part in cut(api, limits, lines, windows):
            provider_batch_id = "pbatch_" + uuid.uuid4().hex
            fields = {"model": part.lines[0].request.model, "endpoint": part.endpoint, "window_s": part.window_s,
                      "bytes": part.size_bytes}
            taken = await store.claim(provider_batch_id, api.name, [line.job_id for line in part.lines], fields,
                                      first_poll_ms=FIRST_POLL_MS)
            if taken:
                made.append(provider_batch_id)
        return made


def cut(
    api: ProviderBatchAPI, limits: ProviderBatchLimits, lines: list[Line], windows: dict[str, float]
) -> Iterator[Part]:
    """Lines grouped by model, endpoint and window, in parts within the provider's count and size limits."""
    groups: dict[tuple[str, str, float], list[Line]] = {}
    for line in lines:
        key = (line.request.model, api.endpoint(line.request), windows.get(line.job_id, limits.window_s))
        groups.setdefault(key, []).append(line)
    for (_, endpoint, window_s), members in groups.items():
        part = Part([], endpoint, window_s)
        for line in members:
            size = len(api.encoded(line)) + 1
            full = len(part.lines) >= limits.max_requests
            if part.lines and (full or part.size_bytes + size + ENVELOPE_BYTES > limits.max_bytes):
                yield part
                part = Part([], endpoint, window_s)
            part.lines.append(line)
            part.size_bytes += size
        if part.lines:
            yield part


async def _windows(runtime: Runtime, job_ids: list[str]) -> dict[str, float]:
    pipe = runtime.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(keys.job(job_id), "completion_window_s")
    return {job_id: float(value) for job_id, value in zip(job_ids, await pipe.execute()) if value}


async def release_intake(runtime: Runtime, provider: str) -> int:
    """An entry whose batch API was turned off: its waiting jobs go to the normal lane, no attempt spent."""
    store = runtime.provider_batches
    moved = 0
    for job_id, _ in await store.intake(provider, MAX_INTAKE_READ):
        await runtime.redis.zrem(keys.provider_batch_intake(provider), job_id)
        done = await runtime.jobs.transition(
            job_id, new_state=JobState.QUEUED, allowed=(JobState.IN_PROVIDER_BATCH,), delay_ms=0, new_dispatch=True,
            fields={"waiting_for": "the normal lane: the provider's batch API is off"},
        )
        moved += done.moved
    return moved

