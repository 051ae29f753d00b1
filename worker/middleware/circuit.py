"""A circuit breaker per provider entry, shared by every worker through Redis.

It judges the provider, not one request. Calls are counted over a sliding window
(`health.window_s`); a job that fails again counts once, so a few requests the
provider can never answer (poison) cannot open it however often they are retried.
The circuit opens when at least `health.minimum_calls` calls are in the window and
`health.failure_rate` of them failed; routing then skips the provider without a
call. After `health.cooldown_s` the circuit is half-open: the next callers probe it
with a health check of the breaker's own (a tiny request, never a possibly
poisonous job; a job is the probe only for an adapter that has no such check), up
to `health.half_open_probes` at once. A probe that succeeds closes the circuit and
starts a fresh window; one that fails opens it for another cool-down. Probes run
in the worker as jobs arrive, so a bare `llmq worker` recovers without beat; beat's
health checks count as calls and probe too.

What counts as a failure: the errors that say the provider itself is unwell,
i.e. the retryable ones (5xx, overloaded, timeouts, connection errors). Not a
429 (the provider is up and the shared limiter already paces it), not an answer
that missed its JSON schema, and not an error about the request or the key (400, 401, 404).

Round trips. A process that saw the circuit closed trusts that view for
`CLEAN_VIEW_S` without asking Redis again, and reports its successes in batches
at most once a second: a healthy provider costs no Redis round trip on most calls.
A circuit opened by another worker stops this one within `CLEAN_VIEW_S`.

While the circuit is open, a job with another configured provider later on its
route is skipped there (`ProviderUnavailableError`, an attempt recorded, no
call); a job whose route has nothing after this provider waits instead (state
`retrying`, until a probe is due) rather than failing for an outage that may
last a minute.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.config import HealthSettings
from llmq.contract.models import JobResponse, JobState
from llmq.contract.scripts import read_script
from llmq.worker import errors
from llmq.worker.logs import redact
from llmq.worker.middleware.base import Defer, Middleware, Skip, Verdict

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.providers.base import LLMProvider
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.circuit")

LUA_SOURCE = read_script(__file__, "circuit.lua")
#: A probe may take the provider's whole timeout; past that plus this, another caller may probe.
PROBE_GRACE_S = 5.0
#: Longest error text kept in Redis per provider.
MAX_ERROR_CHARS = 500
#: A process reports the successes it saw at most this often (one round trip for many calls).
SUCCESS_REPORT_INTERVAL_S = 1.0
#: How long a process trusts having seen a circuit closed before asking Redis again.
CLEAN_VIEW_S = 0.5


@dataclass(frozen=True)
class Permission:
    verdict: str  # "allow", "probe" or "deny"
    state: str  # "closed", "open" or "half_open"
    wait_s: float  # with "deny": until the circuit may let a probe through

    @property
    def allowed(self) -> bool:
        return self.verdict != "deny"


@dataclass(frozen=True)
class Outcome:
    """The circuit after an outcome was recorded."""

    state: str
    #: This outcome opened or closed the circuit.
    changed: bool
    #: Calls and failed calls in the window, when the circuit is closed.
    calls: int = 0
    failures: int = 0


class CircuitBreaker:
    """The circuit.lua operations for any provider entry (redis.asyncio, decode_responses=True)."""

    def __init__(self, client: aioredis.Redis, settings: HealthSettings) -> None:
        self.settings = settings
        self._script = client.register_script(LUA_SOURCE)

    async def _run(
        self, op: str, provider: str, token: str, *, successes: int = 0, error: str = "", source: str = "",
        probe_ttl_s: float = 0.0,
    ) -> dict[str, str]:
        settings = self.settings
        flat = await self._script(
            keys=[keys.circuit(provider), keys.circuit_failures(provider), keys.circuit_successes(provider),
                  keys.circuit_probes(provider)],
            args=[op, int(settings.window_s * 1000), settings.minimum_calls, settings.failure_rate,
                  int(settings.cooldown_s * 1000), settings.half_open_probes, int(probe_ttl_s * 1000),
                  token, successes, error, source],
        )
        return dict(zip(flat[::2], flat[1::2]))

    async def allow(self, provider: str, token: str, probe_ttl_s: float) -> Permission:
        found = await self._run("allow", provider, token, probe_ttl_s=probe_ttl_s)
        return Permission(found["verdict"], found["state"], int(found["wait_ms"]) / 1000.0)

    async def record_success(self, provider: str, source: str, *, call_id: str = "", count: int = 1) -> Outcome:
        """Report `count` successful calls; a probe's success (`call_id` its token) closes the circuit."""
        outcome = _outcome(await self._run("success", provider, call_id, successes=count, source=source))
        if outcome.changed:
            log.warning("circuit of provider %s closed: a %s succeeded", provider, "probe" if source == "probe" else source)
        return outcome

    async def record_failure(self, provider: str, call_id: str, error: str, source: str) -> Outcome:
        """One failed call; the same `call_id` (a job id) fails at most once per window."""
        text = redact(error)[:MAX_ERROR_CHARS]
        outcome = _outcome(await self._run("failure", provider, call_id, error=text, source=source))
        if outcome.changed and outcome.state == "open":
            if source == "probe":
                log.warning("circuit of provider %s opened again: its probe failed: %s", provider, text)
            else:
                log.warning("circuit of provider %s opened: %d of %d calls in %gs failed; last: %s",
                            provider, outcome.failures, outcome.calls, self.settings.window_s, text)
        return outcome

    async def release(self, provider: str, token: str) -> None:
        await self._run("release", provider, token)

    async def probe(self, adapter: LLMProvider, provider: str, token: str, timeout_s: float) -> bool:
        """Run the adapter's health check as the half-open probe `token`; record and return its outcome."""
        try:
            async with asyncio.timeout(timeout_s):
                ok = await adapter.health_check()
            reason = "health check answered no"
        except Exception as exc:  # health_check should not raise; a probe must end with a verdict anyway
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if ok:
            await self.record_success(provider, "probe", call_id=token)
        else:
            await self.record_failure(provider, token, f"probe: {reason}", "probe")
        return ok


def _outcome(found: dict[str, str]) -> Outcome:
    return Outcome(str(found["state"]), int(found["changed"]) == 1, int(found.get("calls", 0)), int(found.get("failures", 0)))


def counts_as_failure(error: errors.LLMQError) -> bool:
    return (
        isinstance(error, errors.ProviderError) and error.retryable
        and not isinstance(error, (errors.RateLimitedError, errors.OutputValidationError))
    )


def has_later_hop(runtime: Runtime, attempt: Attempt) -> bool:
    """Whether a configured provider follows on the route (as the engine's fallback would pick)."""
    return any(runtime.config.provider(hop.provider).configured for hop in attempt.route[attempt.route_index + 1 :])


class CircuitBreakerMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.config.service.health
        self.breaker = CircuitBreaker(runtime.redis, self.settings)
        #: provider -> successes seen here and not yet reported, and when they were last reported.
        self._unreported: dict[str, int] = {}
        self._reported_at: dict[str, float] = {}
        #: provider -> monotonic time until which this process trusts its view "closed".
        self._clean_until: dict[str, float] = {}

    def _probe_ttl_s(self, provider: str) -> float:
        return self.runtime.config.provider(provider).timeout_s + PROBE_GRACE_S

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        provider = attempt.hop.provider
        now_s = time.monotonic()
        if self._clean_until.get(provider, 0.0) > now_s:
            return None
        token = f"{attempt.job_id}:{attempt.attempt}"
        permission = await self.breaker.allow(provider, token, self._probe_ttl_s(provider))
        if permission.verdict == "probe":
            adapter = self.runtime.provider(provider)
            if not adapter.health_probe:  # no check of its own: this job is the probe
                log.info("circuit of provider %s is half-open: this call is the probe", provider)
                attempt.scratch["circuit_probe"] = token
                return None
            log.info("circuit of provider %s is half-open: probing with a health check", provider)
            if await self.breaker.probe(adapter, provider, token, self.runtime.config.provider(provider).timeout_s):
                return None
            permission = await self.breaker.allow(provider, token, self._probe_ttl_s(provider))
        if permission.verdict == "allow":
            self._clean_until[provider] = now_s + CLEAN_VIEW_S
            return None
        if has_later_hop(self.runtime, attempt):
            return Skip(errors.ProviderUnavailableError(
                f"circuit {permission.state.replace('_', '-')} after repeated failures; skipped without a call "
                f"(probed again in {permission.wait_s:.1f}s)",
                provider=provider, model=attempt.hop.model,
            ))
        return Defer(self._wait_s(permission), JobState.RETRYING, reason="circuit open")

    def _wait_s(self, permission: Permission) -> float:
        # While probes are out, look again soon (one may close the circuit any moment), not
        # after a probe's whole hold; jitter spreads the jobs that all wait for the same moment.
        wait_s = permission.wait_s if permission.state == "open" else min(permission.wait_s, max(1.0, self.settings.cooldown_s / 4))
        return max(0.05, wait_s) * random.uniform(1.0, 1.25)

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        if usage_row.get("cached"):  # an answer from llmq's cache says nothing about the provider
            return
        provider = attempt.hop.provider
        token = attempt.scratch.pop("circuit_probe", None)
        if token is not None:
            await self.breaker.record_success(provider, "probe", call_id=token)
            return
        self._unreported[provider] = self._unreported.get(provider, 0) + 1
        if time.monotonic() - self._reported_at.get(provider, -1e9) >= SUCCESS_REPORT_INTERVAL_S:
            await self._report_successes(provider)

    async def _report_successes(self, provider: str) -> None:
        count = self._unreported.pop(provider, 0)
        self._reported_at[provider] = time.monotonic()
        if count:
            await self.breaker.record_success(provider, "job", count=count)

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        if not counts_as_failure(error):
            return
        provider = attempt.hop.provider
        self._clean_until.pop(provider, None)
        await self._report_successes(provider)  # the rate is judged against every call seen so far
        token = attempt.scratch.pop("circuit_probe", None)
        if token is not None:
            await self.breaker.record_failure(provider, token, str(error), "probe")
        else:
            await self.breaker.record_failure(provider, attempt.job_id, str(error), "job")

    async def after_attempt(self, attempt: Attempt) -> None:
        token = attempt.scratch.pop("circuit_probe", None)
        if token is not None:  # the probe ended without a verdict on the provider
            await self.breaker.release(attempt.hop.provider, token)
