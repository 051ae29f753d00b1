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
from llmq.worker.limiter.limiter import Ask, Headroom, RateLimiter
from llmq.worker.limiter.limits import any_configured
from llmq.worker.middleware.base import Middleware, Verdict
from llmq.worker.middleware.ratelimit import PLACED_AT, api_key_id, lease_id

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

#: How long a process trusts what it read of a member's circuit.
CIRCUIT_VIEW_S = 0.5
#: Weight of the newest call in a member's moving average of latency.
LATENCY_WEIGHT = 0.2
#: A job whose turn in its member's line is nearer than this stays there, even when another
#: member could take it now.
MOVE_AFTER_S = 2.0
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
    #: What the call would reserve there (its estimate for that member's model).
    tokens: int


class PoolMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.redis)
        #: provider -> (circuit open, monotonic time it was read).
        self._circuits: dict[str, tuple[bool, float]] = {}
        #: provider -> moving average of its calls' latency (s), and calls in flight in this process.
        self._latency_s: dict[str, float] = {}
        self._in_flight: Counter[str] = Counter()
        #: provider -> tokens of the new jobs this process sent to it (estimates).
        self._assigned: Counter[str] = Counter()

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        group = pool_group(attempt.route, attempt.route_index)
        config = self.runtime.config
        candidates = [index for index in group if config.provider(attempt.route[index].provider).configured]
        if len(candidates) > 1:
            ranked = await self.rank(attempt, candidates)
            best = ranked[0]
            if not any(member.headroom.placed for member in ranked):
                self._assigned[best.provider] += best.tokens  # a newcomer's work, wherever it goes
            placed = next((member for member in ranked if member.headroom.placed), None)
            if placed is not None and placed.index != best.index:
                # It keeps that place until the member it tries grants the call: then it leaves it.
                attempt.scratch[PLACED_AT] = attempt.route[placed.index]
            if best.index != attempt.route_index:
                await self._move(attempt, best.index)
        if attempt.hop.pool is not None:
            self._in_flight[attempt.hop.provider] += 1
            attempt.scratch["pool_member"] = attempt.hop.provider
        return None

    async def rank(self, attempt: Attempt, candidates: list[int]) -> list[Member]:
        """The candidates (route indexes), best first, by the pool's strategy."""
        hops = [attempt.route[index] for index in candidates]
        tokens = [attempt.estimated_tokens(hop.model) for hop in hops]
        headrooms = await self._probe(attempt, hops, tokens)
        circuits = await self._circuits_open([hop.provider for hop in hops])
        pool = self.runtime.config.pools.get(attempt.hop.pool or "")
        weights = self.runtime.config.pool_weights(attempt.hop.pool) if pool else {}
        members = [
            Member(index, hop.provider, headroom, circuits[hop.provider], max(headroom.in_flight, self._in_flight[hop.provider]),
                   self._latency_s.get(hop.provider, 0.0), weights.get(hop.provider, 1.0), count)
            for index, hop, headroom, count in zip(candidates, hops, headrooms, tokens)
        ]
        strategy = pool.strategy if pool else "headroom"
        draws = {member.index: -math.log(1.0 - random.random()) / member.weight for member in members}
        newcomer = not any(member.headroom.placed for member in members)

        def order(member: Member) -> tuple[Any, ...]:
            # A place in line whose turn is near counts as room now: a job leaves it only for a
            # member that can take it now when the turn is far (moving shifts every later turn).
            near = member.headroom.placed and member.headroom.wait_s < MOVE_AFTER_S
            waits = not member.headroom.fits and not near
            if strategy == "weighted":
                chosen: tuple[Any, ...] = (draws[member.index],)
            elif strategy == "latency":
                chosen = (member.headroom.wait_s, member.latency_s) if waits else (member.latency_s,)
            elif waits and newcomer:
                # Where every member would set it aside, a new job joins the line that this process
                # has given the least work for its share of the pool: the lines' work then keeps the
                # members' proportions, and they finish together (waits planned from each line
                # differ by how each has settled so far).
                chosen = (self._assigned[member.provider] / member.weight, member.headroom.wait_s)
            else:
                chosen = (member.headroom.wait_s, -member.headroom.room, member.in_flight, member.latency_s)
            # Where no member can take it now, a job keeps the place in line it holds: moving to the
            # end of another line, with waits planned another way, would only put it back. On a tie
            # it stays where it is: a move costs a round trip.
            stays = not (waits and member.headroom.placed)
            return (member.circuit_open, waits, stays, *chosen, member.index != attempt.route_index)

        return sorted(members, key=order)

    async def _probe(self, attempt: Attempt, hops: list[Any], tokens: list[int]) -> list[Headroom]:
        """What each member's limiter would answer this call (`tokens` at each) now, in one round trip."""
        config = self.runtime.config
        asks, limited = [], []
        for position, hop in enumerate(hops):
            limits = config.provider(hop.provider).rate_limits
            if any_configured(limits):
                asks.append(Ask(hop.provider, hop.model, limits, tokens[position], lease_id(attempt),
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
        hop = route[attempt.route_index]
        done = await self.runtime.jobs.transition(
            attempt.job_id, new_state=JobState.RUNNING, allowed=(JobState.RUNNING,), expected_dispatch=attempt.dispatch,
            fields={"route": dump_route(route), **attempt.hop_fields(hop)},
        )
        if not done.moved:  # cancelled meanwhile: the rest of the attempt finds out
            return
        attempt.route = route

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
