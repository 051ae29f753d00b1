"""The limiter's operations: acquire, settle, release, renew, penalize, snapshot, and the header observer.

Each operation is one Lua script (lua/<operation>.lua behind lua/prelude.lua) on Redis's clock,
so the limits hold for the whole fleet and no worker's clock matters. Nothing blocks: `acquire`
answers granted, or the wait (s) until the call would fit and the limit that binds; the engine
sets the job aside. docs/rate-limits.md explains the choices.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from llmq.contract.config import RateLimits
from llmq.worker.limiter.headers import pause_from_headers
from llmq.worker.limiter.limits import QUOTA_LIMITS, Amounts, LimitPlan, Measure, pause_key
from llmq.worker.limiter.scripts import LimiterScripts

log = logging.getLogger(__name__)

#: An adapter's `header_observer(model, headers)`, called on every response.
HeaderObserver = Callable[[str | None, Mapping[str, str]], None]


@dataclass(frozen=True)
class Decision:
    """The answer to `acquire`: granted, or the wait (seconds) until it would fit and the limit that binds."""

    granted: bool
    wait_s: float
    #: Config name of the binding limit (`LimitKind.limit`: requests_per_minute,
    #: per_model.tokens_per_minute, max_concurrent, daily_tokens, ...), or "paused".
    limit: str | None
    #: Redis time of the decision (epoch seconds).
    at_s: float = 0.0

    @classmethod
    def from_reply(cls, reply: Mapping[str, str]) -> Decision:
        return cls(reply["granted"] == "1", float(reply["wait_s"]), reply["limit"] or None, float(reply["at_s"]))

    @property
    def quota_exhausted(self) -> bool:
        """A daily quota binds: the config's `on_quota_exhausted` says wait or fall back."""
        return self.limit in QUOTA_LIMITS


class RateLimiter:
    """The fleet-wide limiter. One per worker process, sharing the process's async Redis client.

    `api_key_id` names a key (a digest of it, never the key itself): it becomes part of Redis key
    names. Bursts are seconds of a per-minute limit a bucket holds (`request_burst_s` for
    requests/min, `token_burst_s` for tokens/min).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        request_burst_s: float = 1.0,
        token_burst_s: float = 1.0,
        lease_ttl_s: float = 120.0,
        concurrency_retry_s: float = 0.25,
        claim_grace_s: float = 1.0,
        line_grace_s: float = 30.0,
        max_pause_s: float = 300.0,
    ) -> None:
        for name, value in (("request_burst_s", request_burst_s), ("token_burst_s", token_burst_s)):
            if not 0 < value <= 30:
                raise ValueError(f"{name} must be in (0, 30] seconds, got {value}")
        self.redis = redis
        self.burst_s: dict[Measure, float] = {"requests": request_burst_s, "tokens": token_burst_s}
        self.lease_ttl_s = lease_ttl_s
        self.concurrency_retry_s = concurrency_retry_s
        self.claim_grace_s = claim_grace_s
        self.line_grace_s = line_grace_s
        self.max_pause_s = max_pause_s
        self._scripts = LimiterScripts(redis)
        # Header pauses already sent, so a burst of responses makes one Redis write, not one each.
        self._known_pause_end: dict[tuple[str, str | None], float] = {}
        self._pending: set[concurrent.futures.Future[Any]] = set()

    # --- the calls the engine makes ------------------------------------------------

    async def acquire(
        self,
        provider: str,
        model: str,
        limits: RateLimits,
        estimated_tokens: int,
        *,
        api_key_id: str | None = None,
        lease_id: str,
        lease_ttl_s: float | None = None,
        waiting_since_s: float | None = None,
    ) -> Decision:
        """Reserve one request and `estimated_tokens` and take a concurrency slot, or say how long to wait.

        Ask again for the same call with the same `lease_id`, and pass `waiting_since_s` (epoch
        seconds, e.g. when the job was submitted): among refused calls, the one waiting longest
        has the tokens it needs held for it, so large requests are not starved by small ones.
        """
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        plan = LimitPlan(provider, model, limits, api_key_id)
        costs: Amounts = {"requests": 1, "tokens": int(estimated_tokens), "cost_usd": None}
        reply = await self._scripts.run("acquire", {
            "lease_id": lease_id,
            "tokens": int(estimated_tokens),
            "lease_ttl_s": self.lease_ttl_s if lease_ttl_s is None else lease_ttl_s,
            "retry_s": self.concurrency_retry_s,
            "waiting_since_s": waiting_since_s or 0.0,
            "claim_grace_s": self.claim_grace_s,
            "line_grace_s": self.line_grace_s,
            **plan.for_acquire(costs, self.burst_s),
        })
        return Decision.from_reply(reply)

    async def settle(
        self,
        provider: str,
        model: str,
        limits: RateLimits,
        lease_id: str,
        reserved_tokens: int,
        actual_tokens: int,
        cost_usd: float | None = None,
        *,
        api_key_id: str | None = None,
        refund_unused: bool = True,
        counted_tokens: int | None = None,
    ) -> bool:
        """A call finished: count its real tokens and cost, return the unused reservation, free its slot.

        Daily quotas count `actual_tokens`. The per-minute buckets settle to what the provider
        counted: `actual_tokens` when it refunds unused output (`refund_unused`); else
        `counted_tokens` when known (OpenAI: the prompt tokens it reports plus max_tokens; this
        also returns a local estimate's excess over the provider's own count), else the
        reservation, or the real usage if that was more.

        Returns False when the lease had already expired (its slot was freed without us).
        """
        if refund_unused:
            bucket_tokens = actual_tokens
        elif counted_tokens is not None:
            bucket_tokens = max(counted_tokens, actual_tokens)
        else:
            bucket_tokens = max(reserved_tokens, actual_tokens)
        plan = LimitPlan(provider, model, limits, api_key_id)
        reply = await self._scripts.run("settle", {
            "lease_id": lease_id,
            "reserved_tokens": int(reserved_tokens),
            "settled_tokens": int(bucket_tokens),
            **plan.for_settle({"requests": 1, "tokens": int(actual_tokens), "cost_usd": cost_usd or 0.0}, self.burst_s),
        })
        return reply["held"] == "1"

    async def release(
        self, provider: str, model: str, limits: RateLimits, lease_id: str, *, api_key_id: str | None = None
    ) -> bool:
        """A call failed: free its slot; its request and tokens stay counted, as the provider counted them."""
        plan = LimitPlan(provider, model, limits, api_key_id)
        reply = await self._scripts.run("release", {"lease_id": lease_id, "slots": plan.slots()})
        return reply["held"] == "1"

    async def renew(
        self,
        provider: str,
        model: str,
        limits: RateLimits,
        lease_id: str,
        *,
        api_key_id: str | None = None,
        lease_ttl_s: float | None = None,
    ) -> bool:
        """Extend a long call's lease by `lease_ttl_s` from now; False if it already expired."""
        plan = LimitPlan(provider, model, limits, api_key_id)
        reply = await self._scripts.run("renew", {
            "lease_id": lease_id,
            "lease_ttl_s": self.lease_ttl_s if lease_ttl_s is None else lease_ttl_s,
            "slots": plan.slots(),
        })
        return reply["held"] == "1"

    async def penalize(
        self, provider: str, wait_s: float, model: str | None = None, *, api_key_id: str | None = None
    ) -> float:
        """Pause the provider (or one model, or one API key) fleet-wide for `wait_s`; returns the pause end (epoch s).

        A pause only ever lengthens: a shorter penalty during a longer pause changes nothing.
        """
        if wait_s <= 0:
            raise ValueError(f"wait_s must be > 0, got {wait_s}")
        key = pause_key(provider, model=model, api_key_id=api_key_id)
        reply = await self._scripts.run("penalize", {"pause_key": key, "pause_s": float(wait_s)})
        return float(reply["paused_until_s"])

    async def snapshot(
        self, provider: str, limits: RateLimits, model: str | None = None, *, api_key_id: str | None = None
    ) -> dict[str, Any]:
        """Current usage against each limit, for `llmq providers` and `get_provider_status()`.

        Each limit reads {"used": ..., "limit": ...} under its config name; per-model limits under
        "per_model" when a `model` is given.
        """
        plan = LimitPlan(provider, model, limits, api_key_id)
        reply = await self._scripts.run("snapshot", plan.for_snapshot())
        now_s, paused_s = float(reply["at_s"]), float(reply["paused_until_s"])
        paused_until_s = paused_s if paused_s > now_s else None
        report: dict[str, Any] = {
            "provider": provider,
            "at": now_s,
            "paused_until": paused_until_s,
            "paused_for_s": round(paused_until_s - now_s, 3) if paused_until_s else 0.0,
        }
        per_model: dict[str, Any] = {"model": model}
        for kind in plan.kinds():
            used = reply[kind.limit]
            usage = {"used": round(float(used), 6) if kind.measure == "cost_usd" else int(float(used)),
                     "limit": kind.value(limits, model)}
            (per_model if kind.per_model else report)[kind.field] = usage
        report["on_quota_exhausted"] = limits.on_quota_exhausted
        if model is not None:
            report["per_model"] = per_model
        return report

    # --- listening to the provider -------------------------------------------------

    def observer_for(self, provider: str, loop: asyncio.AbstractEventLoop) -> HeaderObserver:
        """A sync `header_observer(model, headers)` for an adapter: parses at once, writes to Redis on `loop`.

        It pauses the model fleet-wide (the provider, when `model` is None) when the headers say
        a limit is spent. It never blocks and never raises; a failed Redis write is logged and dropped.
        """

        def observe(model: str | None, headers: Mapping[str, str]) -> None:
            try:
                pause_s = self._pause_to_send(provider, model, headers)
                if pause_s is None:
                    return
                future = asyncio.run_coroutine_threadsafe(self.penalize(provider, pause_s, model=model), loop)
            except Exception:  # telemetry never breaks a call
                log.warning("rate-limit header observer failed for %s", provider, exc_info=True)
                return
            self._pending.add(future)
            future.add_done_callback(self._forget)

        return observe

    async def flush(self) -> None:
        """Wait for pauses that `observer_for` callbacks are still writing (call before shutting down)."""
        while self._pending:
            await asyncio.gather(
                *(asyncio.wrap_future(future) for future in list(self._pending)), return_exceptions=True
            )

    def _pause_to_send(self, provider: str, model: str | None, headers: Mapping[str, str]) -> float | None:
        pause_s = pause_from_headers(headers)
        if pause_s is None or pause_s <= 0:
            return None
        pause_s = min(pause_s, self.max_pause_s)
        pause_end = time.monotonic() + pause_s
        if self._known_pause_end.get((provider, model), 0.0) >= pause_end - 0.05:
            return None
        self._known_pause_end[(provider, model)] = pause_end
        return pause_s

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not record a provider pause in Redis: %s", future.exception())
