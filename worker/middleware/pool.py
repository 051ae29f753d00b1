"""Pools as engine middleware: each job runs on the member of its hop's pool that can take it best.

A pool's members stand side by side on a job's route (contract/routing.py). Before the rest of
the chain looks at the hop, this middleware ranks the members still ahead on the route (those
this worker holds keys for) and moves the job to the best one:

- every member's limiter is asked what it would answer (`RateLimiter.probe`: one round trip,
  nothing taken): can it take the call now, else how long would the call wait, and how much room
  is left; a member whose circuit is open goes last;
- `headroom` (the default) takes the member that can take the call soonest, then the one with the
  most room left, the fewest calls in flight, the lowest recent latency; `weighted` draws among
  those that can take it now by the pool's weights; `latency` takes the fastest lately among those
  that can take it now. Whatever the strategy, a member that would set the job aside loses to one
  that can take it now, so a job waits only when no member has room (and then in the line of the
  member it would wait least at, or the one its weight draws).

A move rewrites the job record (route, queue, Flower's label) in one transition.lua step that
keeps the job `running`, so its id, attempts and dispatch stay; a job that waited in another
member's line leaves it. The route moves past the pool only when no member can serve: a member
that fails a job falls back to the next member, as any hop does.

`llmq providers` shows each pool's split: the calls each member served (keys.pool_split).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.jobs import dump_route
from llmq.contract.models import JobState, LLMResponse
from llmq.contract.routing import pool_group
from llmq.worker.limiter.estimate import estimate_request_tokens
from llmq.worker.limiter.limiter import Ask, Headroom, RateLimiter
from llmq.worker.limiter.limits import any_configured
from llmq.worker.middleware.base import Middleware, Verdict
from llmq.worker.middleware.ratelimit import api_key_id, lease_id

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

#: How long a process trusts what it read of a member's circuit.
CIRCUIT_VIEW_S = 0.5
#: Weight of the newest call in a member's moving average of latency.
LATENCY_WEIGHT = 0.2
#: What a member with no limits set answers a probe: room, and no wait.
UNLIMITED = Headroom(fits=True, wait_s=0.0, limit=None, room=1.0, in_flight=0)


@dataclass(frozen=True)
class Member:
    """One member of a job's pool, as this worker sees it now."""

    index: int
    provider: str
    headroom: Headroom
    circuit_open: bool
    in_flight: int
    latency_s: float
    weight: float


class PoolMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.redis)
        #: provider -> (circuit open, monotonic time it was read).
        self._circuits: dict[str, tuple[bool, float]] = {}
        #: provider -> moving average of its calls' latency (s), and calls in flight in this process.
        self._latency_s: dict[str, float] = {}
        self._in_flight: Counter[str] = Counter()

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        group = pool_group(attempt.route, attempt.route_index)
        config = self.runtime.config
        candidates = [index for index in group if config.provider(attempt.route[index].provider).configured]
        if len(candidates) > 1:
            best = (await self.rank(attempt, candidates))[0]
            if best.index != attempt.route_index:
                await self._move(attempt, best.index)
        if attempt.hop.pool is not None:
            self._in_flight[attempt.hop.provider] += 1
            attempt.scratch["pool_member"] = attempt.hop.provider
        return None

    async def rank(self, attempt: Attempt, candidates: list[int]) -> list[Member]:
        """The candidates (route indexes), best first, by the pool's strategy."""
        hops = [attempt.route[index] for index in candidates]
        headrooms = await self._probe(attempt, hops)
        circuits = await self._circuits_open([hop.provider for hop in hops])
        pool = self.runtime.config.pools.get(attempt.hop.pool or "")
        weights = self.runtime.config.pool_weights(attempt.hop.pool) if pool else {}
        members = [
            Member(index, hop.provider, headroom, circuits[hop.provider], max(headroom.in_flight, self._in_flight[hop.provider]),
                   self._latency_s.get(hop.provider, 0.0), weights.get(hop.provider, 1.0))
            for index, hop, headroom in zip(candidates, hops, headrooms)
        ]
        strategy = pool.strategy if pool else "headroom"
        draws = {member.index: -math.log(1.0 - random.random()) / member.weight for member in members}

        def order(member: Member) -> tuple[Any, ...]:
            waits = not member.headroom.fits
            if strategy == "weighted":
                chosen: tuple[Any, ...] = (draws[member.index],)
            elif strategy == "latency":
                chosen = (member.headroom.wait_s, member.latency_s) if waits else (member.latency_s,)
            else:
                chosen = (member.headroom.wait_s, -member.headroom.room, member.in_flight, member.latency_s)
            # On a tie the job stays where it is: a move costs a round trip.
            return (member.circuit_open, waits, *chosen, member.index != attempt.route_index)

        return sorted(members, key=order)

    async def _probe(self, attempt: Attempt, hops: list[Any]) -> list[Headroom]:
        """What each member's limiter would answer this call now, in one round trip."""
        config = self.runtime.config
        asks, limited = [], []
        for position, hop in enumerate(hops):
            limits = config.provider(hop.provider).rate_limits
            if any_configured(limits):
                request = attempt.request.model_copy(update={"model": hop.model})
                asks.append(Ask(hop.provider, hop.model, limits, estimate_request_tokens(request), lease_id(attempt),
                                api_key_id=api_key_id(config.provider(hop.provider)),
                                waiting_since_s=attempt.created_at_s or None,
                                lane=attempt.lane.value, flow=attempt.flow,
                                weight=config.service.lanes.weight(attempt.flow)))
                limited.append(position)
        answers = dict(zip(limited, await self.limiter.probe(asks)))
        return [answers.get(position, UNLIMITED) for position in range(len(hops))]

    async def _circuits_open(self, providers: list[str]) -> dict[str, bool]:
        """Whether each member's circuit is open (read at most every CIRCUIT_VIEW_S per process)."""
        now = time.monotonic()
        stale = [name for name in providers if now - self._circuits.get(name, (False, -1e9))[1] > CIRCUIT_VIEW_S]
        if stale:
            async with self.runtime.redis.pipeline(transaction=False) as pipe:
                for name in stale:
                    pipe.hget(keys.circuit(name), "state")
                states = await pipe.execute()
            for name, state in zip(stale, states):
                self._circuits[name] = (state == "open", now)
        return {name: self._circuits[name][0] for name in providers}

    async def _move(self, attempt: Attempt, index: int) -> None:
        """Run the job on the member at `index`: it takes the current place on the route."""
        route = list(attempt.route)
        route.insert(attempt.route_index, route.pop(index))
        previous, hop = attempt.hop, route[attempt.route_index]
        done = await self.runtime.jobs.transition(
            attempt.job_id, new_state=JobState.RUNNING, allowed=(JobState.RUNNING,), expected_dispatch=attempt.dispatch,
            fields={"route": dump_route(route), **attempt.hop_fields(hop)},
        )
        if not done.moved:  # cancelled meanwhile: the rest of the attempt finds out
            return
        attempt.route = route
        if attempt.waiting_for:  # it waited in the previous member's line: nothing is kept for it there now
            entry = self.runtime.config.provider(previous.provider)
            if any_configured(entry.rate_limits):
                await self.limiter.leave(previous.provider, previous.model, entry.rate_limits, lease_id(attempt),
                                         api_key_id=api_key_id(entry))

    async def after_success(self, attempt: Attempt, response: LLMResponse, usage_row: dict[str, Any]) -> None:
        pool, provider = attempt.hop.pool, attempt.hop.provider
        if pool is None or usage_row.get("cached"):
            return
        latency_s = float(usage_row.get("latency_ms") or 0.0) / 1000.0
        known = self._latency_s.get(provider)
        self._latency_s[provider] = latency_s if known is None else known + LATENCY_WEIGHT * (latency_s - known)
        async with self.runtime.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(keys.pool_split(pool), "since", f"{time.time():.3f}")
            pipe.hincrby(keys.pool_split(pool), provider, 1)
            await pipe.execute()

    async def after_attempt(self, attempt: Attempt) -> None:
        member = attempt.scratch.pop("pool_member", None)
        if member is not None:
            self._in_flight[member] -= 1
