"""Streamed output through Redis Streams: the entry format, and the caller's reader.

The worker appends one entry per provider chunk to the job's stream
(`keys.job_stream`); the caller reads with XREAD from the last id it saw, so a
reader that reconnects (or a second reader) gets every chunk once, in order.

Entry fields: `type` is one of
- `chunk`: `content`, `provider`, `model`, `attempt`
- `reset`: the attempt that was streaming failed part-way (`attempt`, `error` JSON);
  the job moves on and the next attempt's chunks follow: drop what came before
- `final`: `response`, the whole answer as LLMResponse JSON (with the usage)
- `error`: the job failed for good (`error` JSON)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from producer import keys
from producer.jobs import JobStore
from producer.models import JobState, LLMResponse, Usage

CHUNK, RESET, FINAL, ERROR = "chunk", "reset", "final", "error"
BLOCK_MS = 1000


async def read_stream(jobs: JobStore, job_id: str, after_id: str = "0-0") -> AsyncIterator[LLMResponse]:
    from producer.service import JobFailedError

    key = keys.job_stream(job_id)
    last = after_id
    while True:
        try:
            found = await jobs.redis.xread({key: last}, count=200, block=BLOCK_MS)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await asyncio.sleep(0.2)  # Redis restarting or a dropped link: read again from `last`
            continue
        if not found:
            job = await jobs.get(job_id)
            if job is None:
                raise KeyError(f"no job {job_id!r} (expired, or never submitted)")
            if job.state.terminal and not await jobs.redis.xrange(key, min=f"({last}", count=1):
                if job.state is JobState.SUCCEEDED and job.result is not None:
                    yield job.result.model_copy(update={"metadata": {**job.result.metadata, "final": True, "job_id": job_id}})
                    return
                raise JobFailedError(job)
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


def entry_to_response(fields: dict[str, str], job_id: str, stream_id: str) -> LLMResponse:
    meta: dict[str, Any] = {"job_id": job_id, "stream_id": stream_id}
    if fields["type"] == FINAL:
        response = LLMResponse.model_validate_json(fields["response"])
        return response.model_copy(update={"content": "", "metadata": {**response.metadata, **meta, "final": True}})
    if fields["type"] == RESET:
        meta.update(reset=True, attempt=int(fields["attempt"]), error=json.loads(fields["error"]))
        return LLMResponse(content="", model=fields.get("model", ""), provider=fields.get("provider", ""), metadata=meta)
    meta["attempt"] = int(fields["attempt"])
    return LLMResponse(content=fields["content"], model=fields["model"], provider=fields["provider"], usage=Usage(), metadata=meta)
