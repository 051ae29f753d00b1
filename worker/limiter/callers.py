"""Limits of one caller (an HTTP front's API key), shared by every front process through Redis.

The provider limiter (`limiter.py`) paces calls to a provider and sets jobs aside until they
fit; a caller's own limits answer at once instead, so the front can refuse with 429 and a
`retry-after`: a caller over its limit should hear so, not wait in a provider's line.

- requests per minute: a GCRA token bucket (one key, one float: the theoretical arrival
  time) on Redis's clock, so no front's clock matters and several fronts share one limit.
  `burst_s` seconds' worth of requests (10 s by default, at least one request) go through
  at once, then one every 60/rpm seconds: `--rpm 60` lets 10 through together, then one a
  second; no 60 s window passes more than rpm + burst - 1. A caller is not a provider to be
  paced to the second, and agents send in small bursts;
- daily USD budget: today's spend of the caller as the worker's budget middleware counts
  it (`keys.budget_spend("caller", name)`, micro-USD per UTC day); once spent, refused until
  the next UTC day. Jobs already queued (a batch) are held by the same middleware.

One script (`lua/caller_limits.lua`) checks both in one round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.scripts import read_script

LUA_SOURCE = read_script(__file__, "caller_limits.lua")
MICRO_USD_PER_USD = 1_000_000


@dataclass(frozen=True)
class CallerLimits:
    """What one caller may use. None: no limit of that kind."""

    name: str
    requests_per_minute: int | None = None
    daily_usd: Decimal | None = None

    @property
    def any(self) -> bool:
        return self.requests_per_minute is not None or self.daily_usd is not None


@dataclass(frozen=True)
class CallerDecision:
    allowed: bool
    #: Seconds until a call would be let through (0 when allowed).
    retry_after_s: float
    #: "requests_per_minute" or "daily_usd" when refused.
    limit: str | None


class CallerLimiter:
    def __init__(self, redis: aioredis.Redis, *, burst_s: float = 10.0) -> None:
        if not 0 < burst_s <= 60:
            raise ValueError(f"burst_s must be in (0, 60] seconds, got {burst_s}")
        self.burst_s = burst_s
        self._script = redis.register_script(LUA_SOURCE)

    async def check(self, limits: CallerLimits) -> CallerDecision:
        """Take one request from the caller's bucket, unless its budget or bucket is spent."""
        if not limits.any:
            return CallerDecision(True, 0.0, None)
        rpm = limits.requests_per_minute or 0
        budget = -1 if limits.daily_usd is None else math.floor(limits.daily_usd * MICRO_USD_PER_USD)
        allowed, retry_after_s, limit = await self._script(
            keys=[keys.caller_requests(limits.name) if rpm else "", keys.budget_spend("caller", limits.name)],
            args=[rpm, max(1, math.floor(rpm * self.burst_s / 60.0)), budget],
        )
        return CallerDecision(bool(int(allowed)), float(retry_after_s), _text(limit) or None)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
