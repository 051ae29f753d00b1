"""The worker's side of streaming through the queue: chunks appended to the job's Redis Stream.

See llmq.contract.streams for the entry format and llmq.client.streams for the reader.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.models import LLMResponse
from llmq.contract.streams import ERROR, FINAL, RESET, chunk_fields


class StreamWriter:
    def __init__(self, client: aioredis.Redis, job_id: str, ttl_s: int) -> None:
        self.redis = client
        self.key = keys.job_stream(job_id)
        self.ttl_s = ttl_s
        self.sent_chunks = 0

    async def _add(self, fields: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.key, {name: str(value) for name, value in fields.items()})
        pipe.expire(self.key, self.ttl_s)
        await pipe.execute()

    async def chunk(self, response: LLMResponse, attempt: int) -> None:
        self.sent_chunks += 1
        await self._add(chunk_fields(response, attempt))

    async def reset(self, attempt: int, provider: str, model: str, error: dict[str, Any]) -> None:
        await self._add({"type": RESET, "attempt": attempt, "provider": provider, "model": model, "error": json.dumps(error)})

    async def final(self, response: LLMResponse, attempt: int) -> None:
        if self.sent_chunks == 0 and response.content:  # answered whole (cache, or no streaming): one chunk
            await self.chunk(response, attempt)
        await self._add({"type": FINAL, "response": response.model_dump_json(exclude_none=True)})

    async def error(self, error: dict[str, Any]) -> None:
        await self._add({"type": ERROR, "error": json.dumps(error)})
