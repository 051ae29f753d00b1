"""The plain client: fire every request at once with asyncio + httpx, retry each 429 after the
server's `retry-after` (plus a little jitter, as the OpenAI SDK does), give up after `max_attempts`."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Connections the client may open at once: enough that the whole batch is in the air.
MAX_CONNECTIONS = 4096


@dataclass
class PlainResult:
    makespan_s: float
    succeeded: int
    failed: int
    received_429: int
    errors: list[str] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], counter: list[int], max_attempts: int) -> bool:
    for _ in range(max_attempts):
        try:
            reply = await client.post(f"{url}/v1/chat/completions", json=body)
        except httpx.HTTPError:
            await asyncio.sleep(1.0)
            continue
        if reply.status_code == 200:
            return True
        if reply.status_code != 429:
            return False
        counter[0] += 1
        retry_after_s = float(reply.headers.get("retry-after") or 1.0)
        await asyncio.sleep(retry_after_s + random.uniform(0.0, 0.5))
    return False


async def run_plain(url: str, api_key: str, bodies: list[dict[str, Any]], max_attempts: int = 50) -> PlainResult:
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
    headers = {"authorization": f"Bearer {api_key}"}
    counter = [0]
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=httpx.Timeout(120.0)) as client:
        began = time.perf_counter()
        outcomes = await asyncio.gather(*(_one(client, url, body, counter, max_attempts) for body in bodies))
        makespan_s = time.perf_counter() - began
    succeeded = sum(1 for ok in outcomes if ok)
    return PlainResult(makespan_s, succeeded, len(bodies) - succeeded, counter[0])
