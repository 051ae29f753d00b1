"""The shared rate limiter as engine middleware.

Before a call: reserve one request and the estimated tokens (prompt estimate +
max_tokens) from the fleet-wide limiter, or set the job aside (`rate_limited`)
until the limiter says it fits, or, when a daily quota is spent and the provider
is configured to fall back, move the job to the next provider. After it: settle
to the real usage (returning what was not used), or, for a provider that keeps
counting max_tokens (`refund_unused_tokens: false`, OpenAI), to what it counted:
its reported prompt tokens plus max_tokens; or release the slot; a 429
pauses the provider for the whole fleet, and so do rate-limit headers saying a
limit is spent (read by the adapter's header observer).
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

from llmq.contract.config import RateLimits
from llmq.contract.models import JobResponse, JobState
from llmq.worker import errors
from llmq.worker.limiter.estimate import estimate_request_tokens
from llmq.worker.limiter.limiter import RateLimiter
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


class RateLimitMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.redis)

    def provider_created(self, provider: LLMProvider) -> None:
        if hasattr(provider, "header_observer"):
            provider.header_observer = self.limiter.observer_for(provider.name, self.runtime.loop)

    def _limits(self, attempt: Attempt) -> RateLimits:
        return self.runtime.config.provider(attempt.hop.provider).rate_limits

    def _key_id(self, attempt: Attempt) -> str | None:
        entry = self.runtime.config.provider(attempt.hop.provider)
        if not entry.rate_limits.per_api_key or entry.api_key is None:
            return None
        # A short digest names the key in Redis without the key itself ever being stored.
        return hashlib.sha256(entry.api_key.get_secret_value().encode()).hexdigest()[:12]

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        limits = self._limits(attempt)
        if not any_configured(limits):
            return None
        estimate = estimate_request_tokens(attempt.request.model_copy(update={"model": attempt.hop.model}))
        timeout_s = self.runtime.config.provider(attempt.hop.provider).timeout_s
        decision = await self.limiter.acquire(
            attempt.hop.provider, attempt.hop.model, limits, estimate,
            api_key_id=self._key_id(attempt), lease_id=_lease_id(attempt),
            # The slot outlives the longest call; a dead worker's slot frees itself after that.
            lease_ttl_s=timeout_s + LEASE_MARGIN_S, waiting_since_s=attempt.created_at_s or None,
        )
        if decision.granted:
            attempt.scratch["rate_limit_reserved"] = estimate
            return None
        if decision.quota_exhausted and limits.on_quota_exhausted == "fallback":
            return Skip(errors.QuotaExceededError(
                f"daily quota {decision.limit} of provider {attempt.hop.provider!r} is spent",
                provider=attempt.hop.provider, model=attempt.hop.model,
            ))
        # A little jitter, so jobs told the same wait do not all come back in the same instant.
        return Defer(decision.wait_s + random.uniform(0.0, DEFER_JITTER_S), JobState.RATE_LIMITED, reason=decision.limit or "rate limit")

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        reserved = attempt.scratch.pop("rate_limit_reserved", None)
        if reserved is None:
            return
        cost = usage_row.get("cost_usd")
        limits = self._limits(attempt)
        await self.limiter.settle(
            attempt.hop.provider, attempt.hop.model, limits, _lease_id(attempt), reserved,
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
                attempt.hop.provider, attempt.hop.model, self._limits(attempt), _lease_id(attempt),
                api_key_id=self._key_id(attempt),
            )


def _counted_tokens(attempt: Attempt, response: JobResponse) -> int | None:
    """What a provider that keeps the reservation counted: its own prompt count plus max_tokens
    (None when it reported no prompt tokens: the reservation then stands)."""
    if response.usage.prompt_tokens <= 0:
        return None
    return response.usage.prompt_tokens + attempt.request.max_tokens


def _lease_id(attempt: Attempt) -> str:
    return f"{attempt.job_id}:{attempt.attempt}"
