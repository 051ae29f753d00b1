"""The caller's reader of a streamed job (the entry format is `llmq.contract.streams`).

The caller reads with XREAD from the last id it saw, so a reader that
reconnects (or a second reader) gets every chunk once, in order. While Redis
is away the reader keeps trying and tells its `WaitWatch`, which says so and
ends the read after `client.redis_unreachable_s` (client/waiting.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmq.client.errors import JobFailedError
from llmq.client.waiting import REDIS_AWAY, WaitWatch
from llmq.contract import keys
from llmq.contract.jobs import JobStore
from llmq.contract.models import JobRecord, JobState, LLMResponse
from llmq.contract.streams import ERROR, FINAL, entry_to_response

BLOCK_MS = 1000


async def read_stream(
    jobs: JobStore, job_id: str, after_id: str = "0-0", *, watch: WaitWatch | None = None
) -> AsyncIterator[LLMResponse]:
    key = keys.job_stream(job_id)
    last = after_id
    while True:
        try:
            found = await jobs.redis.xread({key: last}, count=200, block=BLOCK_MS)
            # Nothing new: has the job ended with nothing more to read?
            job, ended = (None, False) if found else await _ended(jobs, job_id, key, last)
        except REDIS_AWAY as exc:
            if watch is not None:
                watch.away(exc)
            await asyncio.sleep(0.2)  # Redis restarting or a dropped link: read again from `last`
            continue
        if watch is not None:
            watch.back()
        if job is not None and ended:
            if job.state is JobState.SUCCEEDED and job.result is not None:
                yield job.result.model_copy(update={"metadata": {**job.result.metadata, "final": True, "job_id": job_id}})
                return
            raise JobFailedError(job)
        if job is not None and watch is not None:
            await watch.check_workers(job)  # still waiting: is a live worker on its queue?
        if not found:
            continue
        for stream_id, fields in found[0][1]:
            last = stream_id
            if fields["type"] == ERROR:
                job = await jobs.get(job_id)
                if job is not None:
                    raise JobFailedError(job)
                raise RuntimeError(f"job {job_id} failed: {fields.get('error')}")
            chunk = entry_to_response(fields, job_id, stream_id)
            yield chunk
            if fields["type"] == FINAL:
                return


async def _ended(jobs: JobStore, job_id: str, key: str, last: str) -> tuple[JobRecord, bool]:
    """The job, and whether it is over with nothing in its stream after `last`."""
    job = await jobs.get(job_id)
    if job is None:
        raise KeyError(f"no job {job_id!r} (expired, or never submitted)")
    return job, job.state.terminal and not await jobs.redis.xrange(key, min=f"({last}", count=1)
