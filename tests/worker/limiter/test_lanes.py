"""Lanes and fair shares inside the limiter (lua/acquire.lua) against a real redis-server: interactive
calls overtake the batch line, batch flows share what is left by weight, a probe changes nothing,
and a caller that goes elsewhere leaves the line. Most run on a clock the test sets; one runs from
several OS processes at once. Every check is about order and shares, none about speed."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pytest
import redis

from llmq.contract import keys
from llmq.contract.config import RateLimits
from llmq.worker.limiter.limiter import JITTER_S, Ask, RateLimiter
from llmq.worker.limiter.limits import burst_units
from tests.support.limiter import SIMULATED_EPOCH, on_simulated_clock, run_with_limiter

LIMITS = RateLimits(tokens_per_minute=60_000)
#: The limiter's bucket for it: one second of the limit less the room kept for jitter (750 tokens),
#: refilled at ~983 tokens/s (lua/prelude.lua's pacing).
CAPACITY = burst_units(60_000, 1.0 - JITTER_S)
RATE = (60_000 - CAPACITY + 1) * (1 - 0.005) / 60


@dataclass
class Caller:
    name: str
    tokens: int
    at_s: float
    lane: str = "batch"
    flow: str | None = None
    weight: float = 1.0
    since_s: float | None = None
    asks: int = 0
    granted_s: float | None = None

    @property
    def arrived_s(self) -> float:
        return self.since_s - SIMULATED_EPOCH if self.since_s else self.at_s


async def simulate(limiter: RateLimiter, clock: Callable[[float], Awaitable[None]], callers: list[Caller],
                   rng: random.Random) -> list[Caller]:
    """Every caller asks at its time; a refused one comes back when told, a little late as a job set
    aside and published again is. Returns the callers in the order they were granted."""
    waiting, granted = list(callers), []
    while waiting:
        caller = min(waiting, key=lambda c: c.at_s)
        await clock(caller.at_s)
        caller.asks += 1
        decision = await limiter.acquire("p", "m", LIMITS, caller.tokens, lease_id=caller.name, lane=caller.lane,
                                         flow=caller.flow, weight=caller.weight, waiting_since_s=caller.since_s)
        if decision.granted:
            caller.granted_s = caller.at_s
            waiting.remove(caller)
            granted.append(caller)
        else:
            caller.since_s = caller.since_s or SIMULATED_EPOCH + caller.at_s
            caller.at_s += decision.wait_s + 0.03 + rng.uniform(0.0, 0.02)
    return granted


def test_interactive_calls_overtake_the_batch_line_and_batch_uses_the_rest(redis_url: str) -> None:
    rng = random.Random(3)
    batch = [Caller(f"b{n}", rng.randint(50, 150), n * 1e-4) for n in range(80)]
    interactive = [Caller(f"i{n}", 100, 1.0 + n, lane="interactive") for n in range(4)]

    async def body(limiter: RateLimiter) -> list[Caller]:
        return await simulate(limiter, on_simulated_clock(limiter), batch + interactive, rng)

    order = run_with_limiter(redis_url, body)
    for caller in interactive:
        # Behind no batch call: each waited for its own 100 tokens to refill, and a return's delay.
        assert caller.granted_s - caller.arrived_s <= 100 / RATE + 0.1, caller
        overtaken = [other for other in batch if other.arrived_s < caller.arrived_s and other.granted_s > caller.granted_s]
        assert len(overtaken) >= 20, caller  # the batch line it went ahead of
    # The batch still used everything the interactive calls left: no refill went to waste.
    total = sum(caller.tokens for caller in batch + interactive)
    assert max(caller.granted_s for caller in order) <= (total - CAPACITY) / RATE + 0.3
    assert [c.name for c in order if c.lane == "interactive"] == [c.name for c in interactive]


def test_two_batches_share_the_lane_fairly_by_weight(redis_url: str) -> None:
    """A huge batch arrives first, a small one two seconds later: the small one is served alongside
    the huge one from then on, in proportion to the flows' weights, not after it."""

    def run(small_weight: float) -> tuple[int, int]:
        rng = random.Random(5)
        huge = [Caller(f"h{n}", 50, n * 1e-5, flow="huge") for n in range(300)]
        small = [Caller(f"s{n}", 50, 2.0 + n * 1e-5, flow="small", weight=small_weight) for n in range(20)]

        async def body(limiter: RateLimiter) -> list[Caller]:
            return await simulate(limiter, on_simulated_clock(limiter), huge + small, rng)

        order = run_with_limiter(redis_url, body)
        redis.Redis.from_url(redis_url).flushall()
        last_small = max(index for index, caller in enumerate(order) if caller.flow == "small")
        first_small = min(index for index, caller in enumerate(order) if caller.flow == "small")
        huge_meanwhile = sum(1 for caller in order[first_small : last_small + 1] if caller.flow == "huge")
        return huge_meanwhile, last_small

    huge_meanwhile, last_small = run(1.0)
    assert 15 <= huge_meanwhile <= 25  # one for one, give or take a caller back early or late
    assert last_small < 120  # first come, first served would put it after all 300
    huge_meanwhile, _ = run(3.0)
    assert 3 <= huge_meanwhile <= 10  # three for one


def test_a_probe_answers_like_acquire_and_changes_nothing(redis_url: str) -> None:
    limits = RateLimits(tokens_per_minute=60_000, max_concurrent=5)

    async def body(limiter: RateLimiter) -> None:
        clock = on_simulated_clock(limiter)
        await clock(0.0)
        assert (await limiter.acquire("p", "m", limits, 450, lease_id="first")).granted  # 300 of 750 left
        waiting = await limiter.acquire("p", "m", limits, 500, lease_id="waiting")
        assert not waiting.granted
        state = await _state(limiter.redis)
        small, large, placed = await limiter.probe([
            Ask("p", "m", limits, 100, "small"), Ask("p", "m", limits, 400, "large"),
            Ask("p", "m", limits, 500, "waiting"),
        ])
        assert await _state(limiter.redis) == state  # nothing joined a line, took a slot or moved the bucket
        assert not small.fits and not large.fits  # the 300 left are kept for the caller in line
        assert small.in_flight == large.in_flight == 1 and small.room < 0
        assert placed.wait_s > 0 and not placed.fits
        (fresh,) = await limiter.probe([Ask("q", "m", limits, 100, "fresh")])
        assert fresh.room == pytest.approx(1 - 100 / CAPACITY, abs=1e-5)  # a full bucket, less its own need
        # What a probe says is what acquire then answers.
        await clock(waiting.wait_s + 0.01)
        (ready,) = await limiter.probe([Ask("p", "m", limits, 500, "waiting")])
        assert ready.fits and (await limiter.acquire("p", "m", limits, 500, lease_id="waiting")).granted

    run_with_limiter(redis_url, body)


def test_a_caller_that_goes_elsewhere_leaves_the_line(redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        clock = on_simulated_clock(limiter)
        await clock(0.0)
        assert (await limiter.acquire("p", "m", LIMITS, CAPACITY, lease_id="all")).granted
        gone = await limiter.acquire("p", "m", LIMITS, 400, lease_id="gone")
        behind = await limiter.acquire("p", "m", LIMITS, 100, lease_id="behind")
        assert not gone.granted and not behind.granted and behind.wait_s > gone.wait_s
        assert await limiter.leave("p", "m", LIMITS, "gone") == 1  # the one line it waited in (tokens)
        await clock(0.15)  # ~147 tokens back: the 400 kept for "gone" are not kept any more
        assert (await limiter.acquire("p", "m", LIMITS, 100, lease_id="behind")).granted

    run_with_limiter(redis_url, body)


async def _state(client: object) -> tuple[object, ...]:
    """Everything the limiter keeps in Redis, for comparing before and after."""
    found = sorted([key async for key in client.scan_iter(f"{keys.RATE_LIMIT_PREFIX}:*")])  # type: ignore[attr-defined]
    values = []
    for key in found:
        kind = await client.type(key)  # type: ignore[attr-defined]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            values.append(await client.hgetall(key))  # type: ignore[attr-defined]
        elif kind == "zset":
            values.append(await client.zrange(key, 0, -1, withscores=True))  # type: ignore[attr-defined]
        else:
            values.append(await client.get(key))  # type: ignore[attr-defined]
    return tuple(found), tuple(map(str, values))


# --- several processes --------------------------------------------------------------------

CALLERS_PER_PROCESS = 15
PROCESSES = 3
RUN_S = 2.0


def _warm() -> int:
    time.sleep(0.5)
    return os.getpid()


def _ask_in_lane(redis_url: str, lane: str, start_at: float, tokens: int, every_s: float) -> list[tuple[str, float, float]]:
    """Callers in one lane ask as the engine does (one lease per call, kept across refusals) until
    RUN_S passes: `every_s` apart (0: CALLERS_PER_PROCESS of them at once, each starting another
    call when served). Returns each grant as (lease, first ask, grant), on Redis's clock."""
    done: list[tuple[str, float, float]] = []

    async def one(limiter: RateLimiter, number: int) -> None:
        while time.time() < start_at + RUN_S:
            lease, first_s = f"{lane}-{os.getpid()}-{number}-{len(done)}", None
            while time.time() < start_at + RUN_S + 1:
                decision = await limiter.acquire("lanes", "m", LIMITS, tokens, lease_id=lease, lane=lane,
                                                 waiting_since_s=first_s)
                first_s = first_s or decision.at_s
                if decision.granted:
                    done.append((lease, first_s, decision.at_s))
                    break
                await asyncio.sleep(min(decision.wait_s, 0.02))
            if every_s:
                await asyncio.sleep(every_s)

    async def body(limiter: RateLimiter) -> list[tuple[str, float, float]]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        count = 1 if every_s else CALLERS_PER_PROCESS
        await asyncio.gather(*(one(limiter, number) for number in range(count)))
        return done

    return run_with_limiter(redis_url, body)


def test_lanes_hold_across_processes(redis_url: str) -> None:
    """Three processes keep the batch line deep; a fourth asks in the interactive lane now and then.
    Batch calls that were waiting before an interactive call are served after it, while the batch
    lane takes everything else."""
    with ProcessPoolExecutor(PROCESSES + 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Every process up and its imports done (each holds one of these at once) before the run starts.
        assert len({future.result(timeout=60) for future in [pool.submit(_warm) for _ in range(PROCESSES + 1)]}) > 1
        start_at = time.time() + 0.5
        batch_futures = [pool.submit(_ask_in_lane, redis_url, "batch", start_at, 100, 0.0) for _ in range(PROCESSES)]
        interactive_future = pool.submit(_ask_in_lane, redis_url, "interactive", start_at, 100, 0.15)
        batch = [grant for future in batch_futures for grant in future.result(timeout=60)]
        interactive = interactive_future.result(timeout=60)
    assert len(interactive) >= 5 and len(batch) >= 20
    for lease, first_s, granted_s in interactive:
        waiting_before = [b for b in batch if b[1] < first_s and b[2] > first_s]
        served_first = [b for b in waiting_before if b[2] < granted_s]
        # Every batch call already waiting when it came was there before it; almost all went after it.
        assert len(served_first) <= max(2, len(waiting_before) // 5), (lease, len(served_first), len(waiting_before))
    # And the batch lane used the bucket: over the run, at least three quarters of the refill.
    span_s = max(b[2] for b in batch) - min(b[2] for b in batch)
    granted_tokens = 100 * (len(batch) + len(interactive))
    assert granted_tokens >= 0.75 * span_s * 60_000 / 60
