"""Hooks around each provider call: cache, budgets, circuit breaker, rate limits, metrics.

A concern is a small `Middleware` subclass (after dramatiq). Before the call,
each may return a verdict that replaces it:

- `Serve(response)`: answer from elsewhere (the response cache); no call is made
- `Defer(delay_s)`: not now; the job waits in the delayed set without holding a slot,
  and the attempt does not count against the job's retries
- `Skip(error)`: not on this provider; the job moves on as if the call had raised `error`

After the call, `after_success` / `after_error` observe the outcome and
`after_attempt` always runs (to release what `before_attempt` took). Telemetry
never breaks a job: an exception in an `after_*` hook is logged and dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmq.contract.models import JobResponse, JobState
from llmq.worker import errors

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.providers.base import LLMProvider
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker")


@dataclass(frozen=True)
class Serve:
    response: JobResponse
    cached: bool = True


@dataclass(frozen=True)
class Defer:
    delay_s: float
    state: JobState = JobState.RATE_LIMITED
    reason: str = ""


@dataclass(frozen=True)
class Skip:
    error: errors.ProviderError


Verdict = Serve | Defer | Skip


class Middleware:
    """Override only the hooks a concern needs."""

    def start(self, runtime: Runtime) -> None:
        """Called once per worker process, on the runtime's loop thread."""

    def provider_created(self, provider: LLMProvider) -> None:
        """Called when the process creates an adapter (to attach observers)."""

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        return None

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        pass

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        pass

    async def after_attempt(self, attempt: Attempt) -> None:
        pass


class MiddlewareChain:
    def __init__(self, middleware: list[Middleware]) -> None:
        self.middleware = middleware

    def start(self, runtime: Runtime) -> None:
        for item in self.middleware:
            item.start(runtime)

    def provider_created(self, provider: LLMProvider) -> None:
        for item in self.middleware:
            try:
                item.provider_created(provider)
            except Exception:
                log.exception("middleware %s failed on a new provider", type(item).__name__)

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        """The first verdict wins; middleware that already ran is told the attempt is over."""
        for index, item in enumerate(self.middleware):
            verdict = await item.before_attempt(attempt)
            if verdict is not None:
                # Earlier middleware (metrics) learns in after_attempt why no call was made.
                attempt.scratch["verdict"] = verdict
                for earlier in reversed(self.middleware[:index]):
                    await self._quietly(earlier.after_attempt(attempt), earlier)
                return verdict
        return None

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        for item in self.middleware:
            await self._quietly(item.after_success(attempt, response, usage_row), item)

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        for item in self.middleware:
            await self._quietly(item.after_error(attempt, error), item)

    async def after_attempt(self, attempt: Attempt) -> None:
        for item in reversed(self.middleware):
            await self._quietly(item.after_attempt(attempt), item)

    @staticmethod
    async def _quietly(coro: Any, item: Middleware) -> None:
        try:
            await coro
        except Exception:
            log.exception("middleware %s failed (the job goes on)", type(item).__name__)
