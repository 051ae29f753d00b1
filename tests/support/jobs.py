"""Job records on a real redis-server, for tests that drive `JobStore` and its Lua scripts directly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from llmq.contract.jobs import JobStore, NewJob
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.queueing import async_redis

T = TypeVar("T")


def with_job_store(redis_url: str, scenario: Callable[[JobStore], Awaitable[T]]) -> T:
    """Run `scenario` on a JobStore over a fresh client, in an event loop of its own."""

    async def main() -> T:
        client = async_redis(redis_url)
        try:
            return await scenario(JobStore(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def new_job(
    job_id: str,
    *,
    batch_id: str | None = None,
    custom_id: str | None = None,
    deadline_s: float = 3600.0,
    route: tuple[tuple[str, str], ...] = (("openai", "gpt-4o-mini"), ("anthropic", "claude-3-haiku")),
    prompt: str = "hi",
) -> NewJob:
    """A job for gpt-4o-mini on openai, falling back to anthropic unless `route` says otherwise."""
    request = LLMRequest(messages=[{"role": "user", "content": prompt}], model=route[0][1])
    hops = [Hop(provider=provider, model=model) for provider, model in route]
    return NewJob(
        job_id=job_id, request=request, route=hops, batch_id=batch_id, custom_id=custom_id, deadline_s=deadline_s,
    )
