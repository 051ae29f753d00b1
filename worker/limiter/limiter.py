"""Limits shared by every worker, held in Redis: requests/min, tokens/min, calls in flight, daily quotas.

Each check-and-reserve is one Lua script (`ratelimit.lua`) on Redis's clock, so the limits hold
for the whole fleet and no worker's clock matters. Nothing blocks: `acquire` answers granted, or
the wait (s) until the call would fit and the limit that binds; the engine sets the job aside.

Pacing. Providers enforce per-minute limits over shorter windows (OpenAI: "60,000 requests/minute
may be enforced as 1,000 requests/second", help.openai.com "Rate Limit Advice"; Anthropic refills
a token bucket continuously). So each limit is a continuously refilled token bucket with a small
capacity: one second's worth (`request_burst_s`, `token_burst_s`), at least one unit. A token
bucket grows while busy to fit the largest reservation seen (up to half a minute's tokens), so a
request larger than the burst still fits. The refill is `(limit - capacity + 1) / 60` per second
less 0.5% (room for the trip from the grant to the provider): burst plus refill over any 60 s
window stays below limit + 1, so no window, however placed, grants more than the limit (what a
provider counting over a sliding minute checks). Over a long batch that costs `capacity / limit`
of throughput, ~1/60; half a second's burst was measured slower, not faster (bench/RESULTS.md,
"ratelimit"): callers coming back late by more than the burst let tokens overflow.

Waiting in line. Told only "come back when one call fits", every refused call would come back at
the same moment and all but one be refused again: the benchmark's jobs were dispatched 1.8-3.6
times each, more with more workers, and a busy worker came back seconds late, letting the bucket
overflow. So each bucket keeps a line, first come, first served: a refused call joins at the end
and is told to come back when the refill will have covered what everyone ahead of it needs and
its own need; it keeps its place until served (or `line_grace_s` past the time it was told, when
its caller is taken to be gone). Back early, it is told again from its place. The bucket keeps
tokens for the callers ahead, but not for those more than a burst's worth of seconds late, and
never more than half the bucket: tokens no one comes for go to whoever is there. Settling returns
a high estimate's excess, so token buckets plan at what reservations end up costing (moving
averages of reserved and settled tokens). The line decides who goes first and when callers come
back; what is granted is the bucket's alone, so the limits hold whatever it says.

Fairness. A token bucket alone lets small requests, which fit sooner, starve a large one. The
line serves first come, first served, and each token bucket also keeps one claim, for the call
first in line that has waited longest (`waiting_since_s`): the tokens it needs are held back from
the others until it comes back (within its wait plus `claim_grace_s`). A call asks again with the
same `lease_id`.

Tokens are reserved before a call (`estimate_request_tokens`: prompt estimate plus `max_tokens`)
and settled to the real usage after it. Anthropic adjusts its count to the real output at the end
of a request (docs.anthropic.com/.../api/rate-limits), so `settle` returns the unused part; for a
provider that keeps counting the reservation pass `refund_unused=False`, with `counted_tokens`
(the prompt tokens it reported plus `max_tokens`) when known: the local estimate leans high so it
is never below the provider's count, and settling to that count returns the excess. A failed call (`release`)
keeps its request and tokens counted, as the provider counted them. Daily quotas count real tokens
and cost at `settle` and are checked at `acquire`, so calls in flight when one fills may pass it
by their own size. Concurrency slots are a sorted set of lease ids scored by expiry: a worker that
dies mid-call frees its slot when its lease runs out (`lease_ttl_s`; `renew` extends it).

Keys live under `{key_prefix}:{<provider>}:...`; the braces make the provider a cluster hash tag,
so one script only touches one slot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from llmq.contract.config import ModelLimits, RateLimits
from llmq.contract.models import JobRequest
from llmq.contract.scripts import read_script
from llmq.worker.limiter.headers import pause_from_headers
from llmq.worker.tokens import estimate_request_prompt_tokens

log = logging.getLogger(__name__)

LUA_SOURCE = read_script(__file__, "ratelimit.lua")

#: Limits a daily quota binds: waiting means waiting for the next UTC day.
QUOTA_LIMITS = frozenset({"daily_tokens", "daily_cost_usd"})
#: A tokens limit with less than this share of its size left counts as spent
#: (Anthropic rounds remaining tokens to the nearest thousand).
NEARLY_EXHAUSTED_FRACTION = 0.01

HeaderObserver = Callable[[str | None, Mapping[str, str]], None]


@dataclass(frozen=True)
class Decision:
    """The answer to `acquire`: granted, or the wait (seconds) until it would fit and the limit that binds."""

    granted: bool
    wait_s: float
    #: Config name of the binding limit: requests_per_minute, tokens_per_minute, max_concurrent,
    #: per_model.requests_per_minute, per_model.tokens_per_minute, daily_tokens, daily_cost_usd, paused.
    limit: str | None
    #: Redis time of the decision (epoch seconds).
    at_s: float = 0.0

    @property
    def quota_exhausted(self) -> bool:
        """A daily quota binds: the config's `on_quota_exhausted` says wait or fall back."""
        return self.limit in QUOTA_LIMITS


def estimate_request_tokens(request: JobRequest) -> int:
    """Tokens to reserve before a call: the prompt estimate (images, tools and embedding inputs
    included) plus the most the reply may use."""
    return estimate_request_prompt_tokens(request) + request.max_tokens


def burst_units(per_minute: int | None, burst_s: float) -> int:
    """Bucket capacity: `burst_s` seconds of the limit, at least one unit (0 when there is no limit)."""
    if not per_minute:
        return 0
    return max(1, min(per_minute, math.floor(per_minute * burst_s / 60.0)))


class RateLimiter:
    """The fleet-wide limiter. One per worker process, sharing the process's async Redis client.

    `api_key_id` names a key (its position or label in the config), never the key itself: it
    becomes part of Redis key names.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key_prefix: str = "llmq:rl",
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
        self.key_prefix = key_prefix
        self.request_burst_s = request_burst_s
        self.token_burst_s = token_burst_s
        self.lease_ttl_s = lease_ttl_s
        self.concurrency_retry_s = concurrency_retry_s
        self.claim_grace_s = claim_grace_s
        self.line_grace_s = line_grace_s
        self.max_pause_s = max_pause_s
        self._script = redis.register_script(LUA_SOURCE)
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
        reply = await self._run(
            "acquire",
            provider,
            model,
            limits,
            api_key_id,
            lease_id,
            tokens=estimated_tokens,
            lease_ttl_s=lease_ttl_s,
            waiting_since_s=waiting_since_s,
        )
        granted, wait_s, limit, at_s = reply
        return Decision(bool(int(granted)), float(_text(wait_s)), _text(limit) or None, float(_text(at_s)))

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
        extra = (actual_tokens, cost_usd or 0.0, bucket_tokens)
        reply = await self._run(
            "settle", provider, model, limits, api_key_id, lease_id, tokens=reserved_tokens, extra=extra
        )
        return bool(int(reply))

    async def release(
        self, provider: str, model: str, limits: RateLimits, lease_id: str, *, api_key_id: str | None = None
    ) -> bool:
        """A call failed: free its slot; its request and tokens stay counted, as the provider counted them."""
        return bool(int(await self._run("release", provider, model, limits, api_key_id, lease_id)))

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
        reply = await self._run("renew", provider, model, limits, api_key_id, lease_id, lease_ttl_s=lease_ttl_s)
        return bool(int(reply))

    async def penalize(
        self, provider: str, wait_s: float, model: str | None = None, *, api_key_id: str | None = None
    ) -> float:
        """Pause the provider (or one model, or one API key) fleet-wide for `wait_s`; returns the pause end (epoch s).

        A pause only ever lengthens: a shorter penalty during a longer pause changes nothing.
        """
        if wait_s <= 0:
            raise ValueError(f"wait_s must be > 0, got {wait_s}")
        key = self._pause_key(provider, model=model, api_key_id=api_key_id)
        reply = await self._script(keys=[key], args=["penalize", _num(wait_s)])
        return float(_text(reply))

    async def snapshot(
        self, provider: str, limits: RateLimits, model: str | None = None, *, api_key_id: str | None = None
    ) -> dict[str, Any]:
        """Current usage against each limit, for `llmq providers` and `get_provider_status()`."""
        reply = await self._run("snapshot", provider, model, limits, api_key_id, "")
        now, paused, in_flight, requests, tokens, model_requests, model_tokens, daily_tokens, daily_cost = (
            _text(value) for value in reply
        )
        paused_until = float(paused) if float(paused) > float(now) else None
        report: dict[str, Any] = {
            "provider": provider,
            "at": float(now),
            "paused_until": paused_until,
            "paused_for_s": round(paused_until - float(now), 3) if paused_until else 0.0,
            "requests_per_minute": _usage(int(requests), limits.requests_per_minute),
            "tokens_per_minute": _usage(int(tokens), limits.tokens_per_minute),
            "max_concurrent": _usage(int(in_flight), limits.max_concurrent),
            "daily_tokens": _usage(int(daily_tokens), limits.daily_tokens),
            "daily_cost_usd": _usage(round(float(daily_cost), 6), limits.daily_cost_usd),
            "on_quota_exhausted": limits.on_quota_exhausted,
        }
        if model is not None:
            per_model = limits.per_model.get(model) or ModelLimits()
            report["per_model"] = {
                "model": model,
                "requests_per_minute": _usage(int(model_requests), per_model.requests_per_minute),
                "tokens_per_minute": _usage(int(model_tokens), per_model.tokens_per_minute),
            }
        return report

    # --- listening to the provider -------------------------------------------------

    async def observe_headers(self, provider: str, model: str | None, headers: Mapping[str, str]) -> float | None:
        """Pause the model fleet-wide when the provider says a limit is spent; returns the pause (s) or None."""
        pause_s = self._pause_to_send(provider, model, headers)
        if pause_s is None:
            return None
        await self.penalize(provider, pause_s, model=model)
        return pause_s

    def observer_for(self, provider: str, loop: asyncio.AbstractEventLoop) -> HeaderObserver:
        """A sync `header_observer(model, headers)` for an adapter: parses at once, writes to Redis on `loop`.

        It never blocks and never raises; a failed Redis write is logged and dropped.
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

    # --- keys and arguments --------------------------------------------------------

    def _base(self, provider: str) -> str:
        return f"{self.key_prefix}:{{{provider}}}"

    def _scope(self, provider: str, limits: RateLimits, api_key_id: str | None) -> str:
        """Where the provider-level limits live: per API key when the config says so."""
        if limits.per_api_key and api_key_id:
            return f"{self._base(provider)}:key:{api_key_id}"
        return self._base(provider)

    def _pause_key(self, provider: str, *, model: str | None = None, api_key_id: str | None = None) -> str:
        if model is not None:
            return f"{self._base(provider)}:model:{model}:pause"
        if api_key_id is not None:
            return f"{self._base(provider)}:key:{api_key_id}:pause"
        return f"{self._base(provider)}:pause"

    def _keys(self, provider: str, model: str | None, limits: RateLimits, api_key_id: str | None) -> list[str]:
        scope = self._scope(provider, limits, api_key_id)
        model_scope = f"{scope}:model:{model}" if model is not None else scope
        provider_pause = self._pause_key(provider)
        return [
            provider_pause,
            self._pause_key(provider, model=model) if model is not None else provider_pause,
            self._pause_key(provider, api_key_id=api_key_id) if api_key_id else provider_pause,
            f"{scope}:leases",
            f"{self._base(provider)}:daily",
            f"{scope}:rpm",
            f"{scope}:tpm",
            f"{model_scope}:rpm",
            f"{model_scope}:tpm",
            f"{scope}:usage",
            f"{model_scope}:usage",
            f"{scope}:rpm:line",
            f"{scope}:tpm:line",
            f"{model_scope}:rpm:line",
            f"{model_scope}:tpm:line",
        ]

    def _limit_args(self, model: str | None, limits: RateLimits) -> list[str]:
        per_model = limits.per_model.get(model) if model is not None else None
        model_rpm = per_model.requests_per_minute if per_model else None
        model_tpm = per_model.tokens_per_minute if per_model else None
        pairs = [
            (limits.requests_per_minute, self.request_burst_s),
            (limits.tokens_per_minute, self.token_burst_s),
            (model_rpm, self.request_burst_s),
            (model_tpm, self.token_burst_s),
        ]
        args: list[str] = []
        for per_minute, burst_s in pairs:
            args += [str(per_minute or 0), str(burst_units(per_minute, burst_s))]
        return args

    async def _run(
        self,
        op: str,
        provider: str,
        model: str | None,
        limits: RateLimits,
        api_key_id: str | None,
        lease_id: str,
        *,
        tokens: int = 0,
        lease_ttl_s: float | None = None,
        waiting_since_s: float | None = None,
        extra: tuple[int, float, int] = (0, 0.0, 0),
    ) -> Any:
        args = [
            op,
            lease_id,
            str(int(tokens)),
            _num(lease_ttl_s if lease_ttl_s is not None else self.lease_ttl_s),
            str(limits.max_concurrent or 0),
            *self._limit_args(model, limits),
            str(limits.daily_tokens or 0),
            _num(limits.daily_cost_usd or 0.0),
            _num(self.concurrency_retry_s),
            str(int(extra[0])),
            _num(extra[1]),
            str(int(extra[2])),
            _num(self.claim_grace_s),
            _num(waiting_since_s or 0.0),
            _num(self.line_grace_s),
        ]
        return await self._script(keys=self._keys(provider, model, limits, api_key_id), args=args)


def _usage(used: float, limit: float | None) -> dict[str, Any]:
    return {"used": used, "limit": limit}


def _num(value: float) -> str:
    return repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
