"""A circuit breaker per provider entry, shared by every worker through Redis.

Fed by real calls and by the periodic health checks (worker/health.py): after
`health.failure_threshold` consecutive failures the circuit opens and routing
skips the provider without a call; after `health.cooldown_s` one probe (a job,
or the next health check) is let through (half-open); its success closes the
circuit, its failure opens it again for another cool-down.

What counts as a failure: the errors that say the provider itself is unwell,
i.e. the retryable ones (5xx, overloaded, timeouts, connection errors). Not a
429 (the provider is up and the shared limiter already paces it), and not an
error about the request or the key (400, 401, 404), which says nothing about the
provider's health. A success (not from llmq's cache) resets the count.

Round trips. A process that saw the circuit clean (closed, no failure counted)
trusts that view for `CLEAN_VIEW_S` without asking Redis again, and notes
successes at most once a second: a healthy provider costs no Redis round trip
on most calls. So a circuit opened by another worker stops this one within
`CLEAN_VIEW_S` (a few more calls to a failing provider, each counted as it
fails); a failure seen here drops the view at once.

While the circuit is open, a job with another configured provider later on its
route is skipped there (`ProviderUnavailableError`, an attempt recorded, no
call); a job whose route has nothing after this provider waits instead (state
`retrying`, until the probe is due) rather than failing for an outage that may
last a minute.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.config import HealthSettings
from llmq.contract.models import JobState, LLMResponse
from llmq.contract.scripts import read_script
from llmq.worker import errors
from llmq.worker.logs import redact
from llmq.worker.middleware.base import Defer, Middleware, Skip, Verdict

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.circuit")

LUA_SOURCE = read_script(__file__, "circuit.lua")
#: A probe may take the provider's whole timeout; past that plus this, another caller may probe.
PROBE_GRACE_S = 5.0
#: Longest error text kept in Redis per provider.
MAX_ERROR_CHARS = 500
#: While a circuit is clean, a process notes successes (their timestamp) at most this often.
SUCCESS_NOTE_INTERVAL_S = 1.0
#: How long a process trusts having seen a circuit clean before asking Redis again.
CLEAN_VIEW_S = 0.5


@dataclass(frozen=True)
class Permission:
    verdict: str  # "allow", "probe" or "deny"
    state: str  # "closed", "open" or "half_open"
    wait_s: float  # with "deny": until the circuit may let a probe through
    failures: int = 0  # consecutive failures counted so far

    @property
    def clean(self) -> bool:
        """Closed with no failure counted: a success would change nothing but its timestamp."""
        return self.state == "closed" and self.failures == 0

    @property
    def allowed(self) -> bool:
        return self.verdict != "deny"


class CircuitBreaker:
    """The circuit.lua operations for any provider entry (redis.asyncio, decode_responses=True)."""

    def __init__(self, client: aioredis.Redis, settings: HealthSettings) -> None:
        self.settings = settings
        self._script = client.register_script(LUA_SOURCE)

    async def _run(self, op: str, provider: str, token: str = "", *, error: str = "", source: str = "", probe_ttl_s: float = 0.0) -> list[Any]:
        return await self._script(
            keys=[keys.circuit(provider)],
            args=[op, self.settings.failure_threshold, int(self.settings.cooldown_s * 1000), int(probe_ttl_s * 1000),
                  token, error, source],
        )

    async def allow(self, provider: str, token: str, probe_ttl_s: float) -> Permission:
        verdict, state, wait_ms, failures = await self._run("allow", provider, token, probe_ttl_s=probe_ttl_s)
        return Permission(str(verdict), str(state), int(wait_ms) / 1000.0, int(failures))

    async def record_success(self, provider: str, source: str) -> bool:
        """Returns True when this success closed the circuit."""
        state, changed = await self._run("success", provider, source=source)
        if int(changed):
            log.warning("circuit of provider %s closed: a %s succeeded", provider, "health check" if source == "health" else "call")
        return bool(int(changed))

    async def record_failure(self, provider: str, error: str, source: str) -> str:
        """Count one failure; returns the circuit's state after it."""
        text = redact(error)[:MAX_ERROR_CHARS]
        state, failures, changed = await self._run("failure", provider, error=text, source=source)
        if int(changed):
            log.warning("circuit of provider %s opened after %s consecutive failures; last: %s", provider, failures, text)
        return str(state)

    async def release(self, provider: str, token: str) -> None:
        await self._run("release", provider, token)


def counts_as_failure(error: errors.LLMQError) -> bool:
    return isinstance(error, errors.ProviderError) and error.retryable and not isinstance(error, errors.RateLimitedError)


def has_later_hop(runtime: Runtime, attempt: Attempt) -> bool:
    """Whether a configured provider follows on the route (as the engine's fallback would pick)."""
    return any(runtime.config.provider(hop.provider).configured for hop in attempt.route[attempt.route_index + 1 :])


class CircuitBreakerMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.config.service.health
        self.breaker = CircuitBreaker(runtime.redis, self.settings)
        self._success_noted_at: dict[str, float] = {}
        #: provider -> monotonic time until which this process trusts its view "clean".
        self._clean_until: dict[str, float] = {}

    def _probe_ttl_s(self, provider: str) -> float:
        return self.runtime.config.provider(provider).timeout_s + PROBE_GRACE_S

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        provider = attempt.hop.provider
        now_s = time.monotonic()
        if self._clean_until.get(provider, 0.0) > now_s:
            attempt.scratch["circuit_clean"] = True
            return None
        token = f"{attempt.job_id}:{attempt.attempt}"
        permission = await self.breaker.allow(provider, token, self._probe_ttl_s(provider))
        if permission.clean and permission.verdict == "allow":
            self._clean_until[provider] = now_s + CLEAN_VIEW_S
        if permission.verdict == "probe":
            log.info("circuit of provider %s is half-open: this call is the probe", provider)
            attempt.scratch["circuit_probe"] = token
        attempt.scratch["circuit_clean"] = permission.clean
        if permission.allowed:
            return None
        if has_later_hop(self.runtime, attempt):
            return Skip(errors.ProviderUnavailableError(
                f"circuit {permission.state.replace('_', '-')} after repeated failures; skipped without a call "
                f"(probed again in {permission.wait_s:.1f}s)",
                provider=provider, model=attempt.hop.model,
            ))
        return Defer(self._wait_s(permission), JobState.RETRYING, reason="circuit open")

    def _wait_s(self, permission: Permission) -> float:
        # While a probe is out, look again soon (it may close the circuit any moment), not
        # after its whole time-to-live; jitter spreads the jobs that all wait for the same moment.
        wait_s = permission.wait_s if permission.state == "open" else min(permission.wait_s, max(1.0, self.settings.cooldown_s / 4))
        return max(0.05, wait_s) * random.uniform(1.0, 1.25)

    async def after_success(self, attempt: Attempt, response: LLMResponse, usage_row: dict[str, Any]) -> None:
        if usage_row.get("cached"):  # an answer from llmq's cache says nothing about the provider
            return
        attempt.scratch["circuit_outcome"] = True
        provider, now_s = attempt.hop.provider, time.monotonic()
        # Clean circuit: nothing to reset, so spare the round trip on most successes; a failure
        # counted meanwhile elsewhere is reset by the next job's success, which sees it at allow.
        if attempt.scratch.get("circuit_clean") and now_s - self._success_noted_at.get(provider, -1e9) < SUCCESS_NOTE_INTERVAL_S:
            return
        self._success_noted_at[provider] = now_s
        await self.breaker.record_success(provider, "job")

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        if counts_as_failure(error):
            self._clean_until.pop(attempt.hop.provider, None)
            attempt.scratch["circuit_outcome"] = True
            await self.breaker.record_failure(attempt.hop.provider, str(error), "job")

    async def after_attempt(self, attempt: Attempt) -> None:
        token = attempt.scratch.pop("circuit_probe", None)
        if token is not None and not attempt.scratch.pop("circuit_outcome", False):
            await self.breaker.release(attempt.hop.provider, token)
