"""The shared limiter on a real redis-server, for tests that drive `RateLimiter` directly: each test
body runs in an event loop of its own, on Redis's clock or on a clock the test sets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from llmq.worker.limiter.limiter import RateLimiter
from llmq.worker.limiter.scripts import SOURCES, LimiterScripts

T = TypeVar("T")

REDIS_CLOCK = "local clock = redis.call('TIME')\nlocal now_s = tonumber(clock[1])\nlocal now = now_s + tonumber(clock[2]) / 1000000"
SIMULATED_CLOCK = "local now = tonumber(redis.call('GET', 'test:clock'))\nlocal now_s = math.floor(now)"
#: Where the simulated clock starts (epoch s).
SIMULATED_EPOCH = 1e6


def run_with_limiter(redis_url: str, body: Callable[[RateLimiter], Awaitable[T]], **options: Any) -> T:
    """Run `body` on a RateLimiter (built with `options`) over a fresh client, in an event loop of its own."""

    async def main() -> T:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await body(RateLimiter(client, **options))
        finally:
            await client.aclose()

    return asyncio.run(main())


def on_simulated_clock(limiter: RateLimiter) -> Callable[[float], Awaitable[None]]:
    """Run the limiter's scripts on a clock the test sets (seconds after SIMULATED_EPOCH)."""
    assert all(REDIS_CLOCK in source for source in SOURCES.values())
    simulated = {op: source.replace(REDIS_CLOCK, SIMULATED_CLOCK) for op, source in SOURCES.items()}
    limiter._scripts = LimiterScripts(limiter.redis, simulated)

    async def set_clock(at_s: float) -> None:
        await limiter.redis.set("test:clock", repr(SIMULATED_EPOCH + at_s))

    return set_clock
