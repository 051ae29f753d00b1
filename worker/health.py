"""Periodic health checks of each provider entry, sent by Celery beat.

Beat sends task `llmq.health_check(provider)` every `health.interval_s` to the
provider's own queue (`llm.<provider>`), so the check runs on a worker that
serves that provider, over the same network path as its jobs, and a provider no
worker serves is never checked (its status says so). A check that waited past
its interval in a busy queue is dropped unrun (`expires`): the jobs ahead of it
already feed the circuit breaker with fresher news.

Each check calls the adapter's `health_check()` (bounded by the provider's
timeout and the interval), stores the result in the `HEALTH` hash and a bounded
history list, and feeds the provider's circuit breaker (worker/middleware/circuit.py): each check
is a call in the breaker's window, so an idle provider that goes down opens its
circuit, and a check after the cool-down is a half-open probe that closes it
again (workers probe too, as jobs arrive, so beat is not needed for recovery). The shared limiter's usage is stored
with the result, so `provider_status()` shows it without importing worker code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.config import LLMConfig
from llmq.worker.logs import redact
from llmq.worker.middleware.circuit import PROBE_GRACE_S, CircuitBreaker

if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.health")

#: Results kept per provider in the history list (newest first).
HISTORY_SIZE = 50


@dataclass
class HealthResult:
    provider: str
    ok: bool
    checked_at: float  # epoch seconds
    latency_ms: float
    error: str | None
    worker: str
    rate_limits: dict[str, Any] | None = None


def beat_schedule(config: LLMConfig) -> dict[str, dict[str, Any]]:
    """One beat entry per enabled provider entry, sent to that provider's queue.

    Enabled, not configured: beat may not hold the API keys (they belong on the workers);
    a worker that does not hold a provider's key does not serve its queue, nor check it.
    """
    interval_s = config.service.health.interval_s
    return {
        f"llmq health {name}": {
            "task": keys.TASK_HEALTH_CHECK,
            "schedule": interval_s,
            "args": (name,),
            # The interactive queue: polled first, so a check never waits behind a batch backlog.
            "options": {"queue": keys.queue_name(name, "interactive"), "routing_key": keys.queue_name(name, "interactive"),
                        "expires": interval_s},
        }
        for name, entry in config.providers.items()
        if entry.enabled
    }


async def run_health_check(runtime: Runtime, provider: str) -> HealthResult | None:
    """Check one provider entry, store the result and feed its circuit breaker."""
    entry = runtime.config.providers.get(provider)
    if entry is None or not entry.configured:
        return None
    timeout_s = min(entry.timeout_s, runtime.config.service.health.interval_s)
    breaker = CircuitBreaker(runtime.redis, runtime.config.service.health)
    # Each check is one call of its own in the breaker's window; past an open circuit's
    # cool-down it is also the half-open probe.
    token = f"health:{runtime.worker_id}:{time.time_ns()}"
    permission = await breaker.allow(provider, token, timeout_s + PROBE_GRACE_S)
    source = "probe" if permission.verdict == "probe" else "health"
    result = await _check(runtime, provider, timeout_s=timeout_s)
    result.rate_limits = await _limiter_usage(runtime, provider)
    await _store(runtime, result)
    if result.ok:
        await breaker.record_success(provider, source, call_id=token)
    else:
        await breaker.record_failure(provider, token, f"health check: {result.error}", source)
        log.warning("health check of provider %s failed: %s", provider, result.error)
    return result


async def _check(runtime: Runtime, provider: str, *, timeout_s: float) -> HealthResult:
    started = time.monotonic()
    error: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            ok = await runtime.provider(provider).health_check()
            if not ok:
                error = await _reason(runtime, provider)
    except TimeoutError:
        ok, error = False, f"no answer within {timeout_s:g}s"
    except Exception as exc:  # health_check never raises, but an adapter that cannot even be built does
        ok, error = False, redact(f"{type(exc).__name__}: {exc}")
    latency_ms = round((time.monotonic() - started) * 1000, 3)
    return HealthResult(provider, ok, time.time(), latency_ms, error, runtime.worker_id)


async def _reason(runtime: Runtime, provider: str) -> str:
    """Why a check failed: `health_check()` only says yes or no, so ask for the model list,
    which raises the adapter's typed error (one more request, only when the check failed)."""
    try:
        await runtime.provider(provider).get_available_models()
    except Exception as exc:
        return redact(str(exc))
    return "health_check() answered no (the model list loads; see the adapter's health check)"


async def _store(runtime: Runtime, result: HealthResult) -> None:
    record = json.dumps(asdict(result))
    brief = json.dumps({"ok": result.ok, "at": result.checked_at, "latency_ms": result.latency_ms, "error": result.error})
    async with runtime.redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.HEALTH, result.provider, record)
        pipe.lpush(keys.health_history(result.provider), brief)
        pipe.ltrim(keys.health_history(result.provider), 0, HISTORY_SIZE - 1)
        await pipe.execute()


async def _limiter_usage(runtime: Runtime, provider: str) -> dict[str, Any] | None:
    """The shared limiter's usage now (each limit's `used` and `limit`; None when unavailable)."""
    try:
        from llmq.worker.limiter.limiter import RateLimiter
    except ImportError:
        return None
    limits = runtime.config.provider(provider).rate_limits
    try:
        return await RateLimiter(runtime.redis).snapshot(provider, limits)
    except Exception as exc:  # status is a report: a limiter hiccup must not lose the health result
        log.debug("rate-limit snapshot of %s failed: %s", provider, exc)
        return None
