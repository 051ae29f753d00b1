"""The shared rate limiter as engine middleware.

Before a call: reserve one request and the estimated tokens (prompt estimate +
max_tokens) from the fleet-wide limiter, or wait here for a turn that is at most
HOLD_S away, or set the job aside (`rate_limited`) until the limiter says it
fits, or, when a daily quota is spent and the provider
is configured to fall back, move the job to the next provider. The job asks in its
lane (interactive before batch) and, in the batch lane, as its flow (its caller,
else its batch) with the flow's weight from `lanes.weights`. After it: settle
to the real usage (returning what was not used), or, for a provider that keeps
counting max_tokens (`refund_unused_tokens: false`, OpenAI), to what it counted:
its reported prompt tokens plus max_tokens; or release the slot; a 429
pauses the provider for the whole fleet, and so do rate-limit headers saying a
limit is spent (read by the adapter's header observer).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.config import ProviderConfig, RateLimits
from llmq.contract.models import Hop, JobResponse, JobState
from llmq.worker import errors
from llmq.worker.limiter.limiter import Decision, RateLimiter
from llmq.worker.limiter.limits import any_configured
from llmq.worker.middleware.base import Defer, Middleware, Skip, Verdict
from llmq.worker.providers.base import LLMProvider

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

#: How long the fleet pauses a provider after a 429 that names no retry-after.
DEFAULT_PENALTY_S = 1.0
#: Seconds a concurrency slot outlives the provider call's timeout.
LEASE_MARGIN_S = 30.0
#: Up to this much is added to a limiter's wait.
DEFER_JITTER_S = 0.02
#: A wait of at most this long is spent in the worker, asking again at its turn (the job keeps its
#: slot); a longer one sets the job aside. At most MAX_HOLD_S is spent so per attempt, and at most
#: a HELD_SHARE of the process's slots wait so at once (the rest keep taking messages: a job new
#: to the line must reach it to take its place).
HOLD_S = 0.5
MAX_HOLD_S = 2.0
HELD_SHARE = 0.25
#: A grant that leaves at least this share of the bucket full (refill nobody came for) brings the
#: first PULL_JOBS callers of its lines back now (a process does so at most every PULL_EVERY_S per
#: provider).
PULL_SPARE = 0.5
PULL_JOBS = 8
PULL_EVERY_S = 0.25
#: Scratch key: where a pool's job keeps its place in line while it tries another member (pool.py).
PLACED_AT = "pool_placed_at"
#: A pool's job that found no room at the member it tried comes back this soon to choose again.
TRY_AGAIN_S = 0.05
#: A job set aside comes back this much before its turn (or this share of its wait, if more: a
#: long wait is planned on what reservations have been costing, which can change), and waits the
#: rest here, or is told again.
RETURN_EARLY_S = 0.2
RETURN_EARLY_SHARE = 0.1
#: How many may wait so at once when the process's slots are not known.
HELD_WHEN_UNKNOWN = 16


class RateLimitMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.redis)
        slots = runtime.settings.concurrency
        self.most_held = max(1, int(slots * HELD_SHARE)) if slots else HELD_WHEN_UNKNOWN
        self.held = 0
        #: provider -> monotonic time this process last brought the front of its line forward.
        self._pulled_at: dict[str, float] = {}

    def provider_created(self, provider: LLMProvider) -> None:
        if hasattr(provider, "header_observer"):
            provider.header_observer = self.limiter.observer_for(provider.name, self.runtime.loop)

    def _limits(self, attempt: Attempt) -> RateLimits:
        return self.runtime.config.provider(attempt.hop.provider).rate_limits

    def _key_id(self, attempt: Attempt) -> str | None:
        return api_key_id(self.runtime.config.provider(attempt.hop.provider))

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        limits = self._limits(attempt)
        if not any_configured(limits):
            return None
        estimate = attempt.estimated_tokens(attempt.hop.model)
        # A pool's job trying this member while it keeps its place in another member's line.
        placed_at: Hop | None = attempt.scratch.get(PLACED_AT)
        held_s = 0.0
        while True:
            decision = await self._acquire(attempt, limits, estimate, join=placed_at is None)
            if decision.granted:
                attempt.scratch["rate_limit_reserved"] = estimate
                if placed_at is not None:
                    await self._leave(attempt, placed_at)
                if decision.spare >= PULL_SPARE:
                    await self._pull_forward(attempt, limits)
                return None
            if placed_at is not None:  # another job took the room first: back soon, to its place in line
                return Defer(TRY_AGAIN_S, JobState.RATE_LIMITED, reason=decision.limit or "rate limit")
            # A short wait is spent here, the place in line kept: set aside, the job would come back
            # through the delayed set and the broker, later than its turn by their delay, and the
            # refill no one came for would be lost. Longer waits do not hold the slot.
            wait_s = min(decision.wait_s, attempt.deadline_at_s - time.time())
            if (decision.quota_exhausted or decision.limit == "paused" or wait_s > HOLD_S
                    or held_s + wait_s > MAX_HOLD_S or self.held >= self.most_held):
                break
            self.held += 1
            try:
                await asyncio.sleep(wait_s)
            finally:
                self.held -= 1
            held_s += wait_s
        if decision.quota_exhausted and limits.on_quota_exhausted == "fallback":
            return Skip(errors.QuotaExceededError(
                f"daily quota {decision.limit} of provider {attempt.hop.provider!r} is spent",
                provider=attempt.hop.provider, model=attempt.hop.model,
            ))
        # Back a little before its turn (the delayed set and the broker take about that long), then
        # the last of the wait is spent here, so the turn is taken when it comes. A little jitter, so
        # jobs told the same wait do not all come back in the same instant.
        early_s = 0.0
        if decision.limit != "paused" and not decision.quota_exhausted:
            early_s = max(RETURN_EARLY_S, RETURN_EARLY_SHARE * decision.wait_s)
        delay_s = max(decision.wait_s - early_s, min(decision.wait_s, HOLD_S / 2)) + random.uniform(0.0, DEFER_JITTER_S)
        return Defer(delay_s, JobState.RATE_LIMITED, reason=decision.limit or "rate limit")

    async def _acquire(self, attempt: Attempt, limits: RateLimits, estimate: int, *, join: bool) -> Decision:
        timeout_s = self.runtime.config.provider(attempt.hop.provider).timeout_s
        flow = attempt.flow
        return await self.limiter.acquire(
            attempt.hop.provider, attempt.hop.model, limits, estimate,
            api_key_id=self._key_id(attempt), lease_id=lease_id(attempt),
            # The slot outlives the longest call; a dead worker's slot frees itself after that.
            lease_ttl_s=timeout_s + LEASE_MARGIN_S, waiting_since_s=attempt.created_at_s or None,
            lane=attempt.lane.value, flow=flow, weight=self.runtime.config.service.lanes.weight(flow), join=join,
        )

    async def _pull_forward(self, attempt: Attempt, limits: RateLimits) -> None:
        """Room no one in line is there for: the jobs at the front of the line come back now rather
        than when they were told. Their turns were planned on what was ahead of them, and some of
        that went elsewhere (another member of a pool) or cost less than planned."""
        provider, now_s = attempt.hop.provider, time.monotonic()
        if now_s - self._pulled_at.get(provider, -1e9) < PULL_EVERY_S:
            return
        self._pulled_at[provider] = now_s
        leases = await self.limiter.waiting(provider, attempt.hop.model, limits, PULL_JOBS,
                                            api_key_id=self._key_id(attempt))
        job_ids = {lease.rpartition(":")[0] for lease in leases} - {attempt.job_id}
        if job_ids:  # due now in the delayed set; only jobs still waiting there (XX)
            await self.runtime.redis.zadd(keys.DELAYED, dict.fromkeys(job_ids, await self.runtime.jobs.now_ms()), xx=True)

    async def _leave(self, attempt: Attempt, hop: Hop) -> None:
        """The job was granted elsewhere: nothing is kept for it in `hop`'s lines any more."""
        entry = self.runtime.config.provider(hop.provider)
        await self.limiter.leave(hop.provider, hop.model, entry.rate_limits, lease_id(attempt),
                                 api_key_id=api_key_id(entry))

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        reserved = attempt.scratch.pop("rate_limit_reserved", None)
        if reserved is None:
            return
        cost = usage_row.get("cost_usd")
        limits = self._limits(attempt)
        await self.limiter.settle(
            attempt.hop.provider, attempt.hop.model, limits, lease_id(attempt), reserved,
            response.usage.total_tokens, float(cost) if cost is not None else None, api_key_id=self._key_id(attempt),
            refund_unused=limits.refund_unused_tokens,
            counted_tokens=_counted_tokens(attempt, response),
        )

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        if isinstance(error, errors.RateLimitedError):
            cap_s = self.runtime.config.service.retry.retry_after_cap_s
            await self.limiter.penalize(
                attempt.hop.provider, min(error.retry_after_s or DEFAULT_PENALTY_S, cap_s), model=attempt.hop.model
            )

    async def after_attempt(self, attempt: Attempt) -> None:
        if attempt.scratch.pop("rate_limit_reserved", None) is not None:
            await self.limiter.release(
                attempt.hop.provider, attempt.hop.model, self._limits(attempt), lease_id(attempt),
                api_key_id=self._key_id(attempt),
            )


def _counted_tokens(attempt: Attempt, response: JobResponse) -> int | None:
    """What a provider that keeps the reservation counted: its own prompt count plus max_tokens
    (None when it reported no prompt tokens: the reservation then stands)."""
    if response.usage.prompt_tokens <= 0:
        return None
    return response.usage.prompt_tokens + attempt.request.max_tokens


def lease_id(attempt: Attempt) -> str:
    """The attempt's lease in the limiter: the same across the times it is set aside and comes back."""
    return f"{attempt.job_id}:{attempt.attempt}"


def api_key_id(entry: ProviderConfig) -> str | None:
    """How the limiter names an entry's key when its limits are kept per key (else None)."""
    if not entry.rate_limits.per_api_key or entry.api_key is None:
        return None
    # A short digest names the key in Redis without the key itself ever being stored.
    return hashlib.sha256(entry.api_key.get_secret_value().encode()).hexdigest()[:12]
