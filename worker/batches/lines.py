"""Reading the jobs of a provider batch as its lines, and the locks its tenders take."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.jobs import RELEASE_LOCK, load_request
from llmq.contract.models import EmbeddingRequest, Hop
from llmq.worker.batches.base import Line

#: Job hashes read per pipeline.
READ_CHUNK = 500


async def load_lines(client: aioredis.Redis, job_ids: list[str]) -> list[Line]:
    """Each job as a line: its request with the model of its current hop (jobs that are gone are left out)."""
    lines: list[Line] = []
    for start in range(0, len(job_ids), READ_CHUNK):
        chunk = job_ids[start : start + READ_CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), "request", "route", "route_index", "kind")
        for job_id, (request, route, route_index, kind) in zip(chunk, await pipe.execute()):
            if request and route:
                hop = Hop.model_validate(json.loads(route)[int(route_index or 0)])
                loaded = load_request({"request": request, "kind": kind or ""})
                update = {"model": hop.model} if isinstance(loaded, EmbeddingRequest) else {
                    "model": hop.model, "service_tier": None}  # a batch line has no tier of its own
                lines.append(Line(job_id, loaded.model_copy(update=update)))
    return lines


@asynccontextmanager
async def held(client: aioredis.Redis, key: str, ttl_ms: int) -> AsyncIterator[bool]:
    """A lock one process holds at a time, renewed while held; yields whether this one got it."""
    token = uuid.uuid4().hex
    if not await client.set(key, token, nx=True, px=ttl_ms):
        yield False
        return

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            if await client.get(key) != token:
                return
            await client.pexpire(key, ttl_ms)

    renewer = asyncio.ensure_future(renew())
    try:
        yield True
    finally:
        renewer.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await renewer
        await client.eval(RELEASE_LOCK, 1, key, token)
