"""The shared limiter against a real redis-server, from several OS processes at once. Every check
counts grants (stamped with Redis's clock) against what the limits allow; none measures speed."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import pytest
import redis

from llmq.cli.embedded import RedisServer
from llmq.contract.config import ModelLimits, RateLimits
from llmq.contract.models import LLMRequest, Message
from llmq.worker.limiter.estimate import estimate_request_tokens
from llmq.worker.limiter.headers import (
    parse_duration_s,
    parse_rate_limit_headers,
    pause_from_headers,
)
from llmq.worker.limiter.limiter import Decision, RateLimiter
from llmq.worker.limiter.limits import burst_units
from tests.support.limiter import SIMULATED_EPOCH, on_simulated_clock, run_with_limiter

T = TypeVar("T")
Hammered = tuple[list[tuple[float, int]], tuple[float, float]]
PROCESSES = 4
HAMMER_S = 1.5
#: The Lua script refills this much slower than the limit.
RATE_MARGIN = 0.005
#: The Lua script's line: a newcomer's plan errs this much early; before any settle, reservations
#: are planned at this share of themselves.
PLAN_EARLY, RATIO_PRIOR = 0.15, 0.5


def _meet(redis_url: str, key: str) -> int:
    """Wait (at most 60 s) until every pool process has arrived, so each holds one of these calls."""
    client = redis.Redis.from_url(redis_url)
    client.incr(key)
    deadline = time.monotonic() + 60
    while int(client.get(key) or 0) < PROCESSES and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    return os.getpid()


def _hammer(url: str, provider: str, limits: RateLimits, tokens: int, start_at: float, burst_s: float = 1) -> Hammered:
    """Acquire as fast as allowed for HAMMER_S as the engine would (one lease per call, kept across
    refusals, with when it started waiting); returns grants as (Redis time, tokens) and the span."""

    async def body(limiter: RateLimiter) -> Hammered:
        grants: list[tuple[float, int]] = []
        stamps: list[float] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        lease, since_s = f"{os.getpid()}-0", None
        while time.time() < start_at + HAMMER_S:
            decision = await limiter.acquire(provider, "m", limits, tokens, lease_id=lease, waiting_since_s=since_s)
            stamps.append(decision.at_s)
            if decision.granted:
                grants.append((decision.at_s, tokens))
                await limiter.settle(provider, "m", limits, lease, tokens, tokens)
                lease, since_s = f"{os.getpid()}-{len(grants)}", None
            else:
                since_s = since_s or decision.at_s
                await asyncio.sleep(min(decision.wait_s, 0.02))
        return grants, (min(stamps), max(stamps))

    return run_with_limiter(url, body, token_burst_s=burst_s)


def _hold_slots(redis_url: str, limits: RateLimits, start_at: float) -> tuple[int, int]:
    """Take slots and hold each briefly, counting holders in Redis; returns (grants, most holders seen)."""

    async def body(limiter: RateLimiter) -> tuple[int, int]:
        grants, most = 0, 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < start_at + HAMMER_S / 2:
            lease = f"{os.getpid()}-{grants}-{time.monotonic()}"
            decision = await limiter.acquire("conc", "m", limits, 1, lease_id=lease)
            if not decision.granted:
                await asyncio.sleep(min(decision.wait_s, 0.02))
                continue
            grants += 1
            most = max(most, await limiter.redis.incr("test:holders"))
            await asyncio.sleep(0.05)
            await limiter.redis.decr("test:holders")
            await limiter.settle("conc", "m", limits, lease, 1, 1)
        return grants, most

    return run_with_limiter(redis_url, body)


def _acquire_once(url: str, provider: str, model: str, limits: RateLimits) -> Decision:
    return run_with_limiter(url, lambda limiter: limiter.acquire(provider, model, limits, 1, lease_id=str(os.getpid())))


def _acquire_then_die(redis_url: str, limits: RateLimits, lease_ttl_s: float) -> None:
    """Take the only slot, note when, and exit without settling: a worker killed mid-call."""

    async def body(limiter: RateLimiter) -> None:
        decision = await limiter.acquire("crash", "m", limits, 1, lease_id="doomed", lease_ttl_s=lease_ttl_s)
        await limiter.redis.set("test:doomed_at", repr(decision.at_s) if decision.granted else "")

    run_with_limiter(redis_url, body)
    os._exit(1)


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer) -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(PROCESSES, mp_context=multiprocessing.get_context("spawn")) as executor:
        key = f"test:meet:{time.time()}"
        assert len(set(in_every_process(executor, _meet, redis_server.url, key))) == PROCESSES
        yield executor


def in_every_process(pool: ProcessPoolExecutor, function: Callable[..., T], *args: Any) -> list[T]:
    futures = [pool.submit(function, *args) for _ in range(PROCESSES)]
    return [future.result(timeout=30) for future in futures]


def most_in_window(events: list[tuple[float, int]], window_s: float) -> int:
    """The most units granted in any closed window of `window_s` seconds."""
    events = sorted(events)
    most, total, end = 0, 0, 0
    for start in range(len(events)):
        while end < len(events) and events[end][0] <= events[start][0] + window_s:
            total += events[end][1]
            end += 1
        most = max(most, total)
        total -= events[start][1]
    return most


def allowed_in_window(per_minute: int, capacity: int, window_s: float) -> int:
    """What the design allows in any window: a full bucket plus the refill over the window."""
    rate_per_s = (per_minute - capacity + 1) * (1 - RATE_MARGIN) / 60
    return capacity + int(window_s * rate_per_s)


def span_s(results: list[Hammered]) -> float:  # seconds (Redis clock) during which every process was asking
    return min(end for _, (_, end) in results) - max(start for _, (start, _) in results)


def test_requests_per_minute_hold_across_processes(pool: ProcessPoolExecutor, redis_url: str) -> None:
    rpm = 6000  # 100 requests/s with a one-second burst of 100: a 1.7% excess shows within 0.5 s
    limits = RateLimits(requests_per_minute=rpm)
    burst = burst_units(rpm, 1.0)
    results = in_every_process(pool, _hammer, redis_url, "req", limits, 1, time.time() + 0.3)
    grants = [grant for result, _ in results for grant in result]

    for window_s in (0.25, 0.5, 1.0, HAMMER_S):
        assert most_in_window(grants, window_s) <= allowed_in_window(rpm, burst, window_s), window_s
    # The bound is tight enough to matter: one limiter per process would let ~4x through.
    assert allowed_in_window(rpm, burst, 1.0) <= rpm / 60 + burst
    # ...and the limiter is not simply refusing: every process took part, half the allowance was granted.
    assert all(result for result, _ in results)
    assert len(grants) >= 0.5 * span_s(results) * rpm / 60


def test_tokens_per_minute_hold_across_processes(pool: ProcessPoolExecutor, redis_url: str) -> None:
    tpm = 60_000  # 1,000 tokens/s; a half-second burst of 500 tokens
    limits = RateLimits(tokens_per_minute=tpm)
    sizes = (10, 30, 80, 600)  # 600 is larger than the burst: the bucket must grow to fit it
    start_at = time.time() + 0.3
    futures = [pool.submit(_hammer, redis_url, "tok", limits, size, start_at, 0.5) for size in sizes]
    results = [future.result(timeout=30) for future in futures]
    grants = [grant for result, _ in results for grant in result]

    capacity = max(burst_units(tpm, 0.5), max(size for _, size in grants))
    for window_s in (0.25, 0.5, 1.0, HAMMER_S):
        assert most_in_window(grants, window_s) <= allowed_in_window(tpm, capacity, window_s), window_s
    assert all(result for result, _ in results)  # the large request was not starved by the small ones
    assert sum(size for _, size in grants) >= 0.5 * span_s(results) * tpm / 60


def test_settle_returns_unused_tokens_keeps_them_or_charges_more(redis_url: str) -> None:
    # A 1,200-token bucket refilling at ~20 tokens/s: nothing refills noticeably during the test.
    limits = RateLimits(tokens_per_minute=2_400)

    async def body(limiter: RateLimiter) -> None:
        assert (await limiter.acquire("p", "m", limits, 1000, lease_id="a")).granted
        refused = await limiter.acquire("p", "m", limits, 900, lease_id="b")
        assert (refused.granted, refused.limit) == (False, "tokens_per_minute")
        assert refused.wait_s > 20  # 700 tokens short at ~20 tokens/s
        assert await limiter.settle("p", "m", limits, "a", reserved_tokens=1000, actual_tokens=100)
        assert (await limiter.acquire("p", "m", limits, 900, lease_id="b")).granted  # at once
        assert not (await limiter.acquire("p", "m", limits, 900, lease_id="c")).granted

        assert (await limiter.acquire("q", "m", limits, 1000, lease_id="a")).granted
        await limiter.settle("q", "m", limits, "a", 1000, 100, refund_unused=False)
        assert not (await limiter.acquire("q", "m", limits, 900, lease_id="b")).granted

        # Using more than reserved is charged: 200 left, then 150 more used than reserved.
        assert (await limiter.acquire("r", "m", limits, 1000, lease_id="a")).granted
        assert (await limiter.acquire("r", "m", limits, 100, lease_id="c")).granted
        await limiter.settle("r", "m", limits, "c", 100, 250)
        assert not (await limiter.acquire("r", "m", limits, 90, lease_id="d")).granted

    run_with_limiter(redis_url, body, token_burst_s=30)


def test_settle_to_what_a_provider_without_refunds_counted(redis_url: str) -> None:
    # OpenAI keeps max_tokens counted but counts the prompt its own way: settling to its count
    # (prompt tokens it reported + max_tokens) returns a high local estimate's excess, or charges more.
    limits = RateLimits(tokens_per_minute=2_400, refund_unused_tokens=False)

    async def body(limiter: RateLimiter) -> None:
        assert (await limiter.acquire("p", "m", limits, 1000, lease_id="a")).granted
        await limiter.settle("p", "m", limits, "a", 1000, 150, refund_unused=False, counted_tokens=600)
        assert (await limiter.acquire("p", "m", limits, 550, lease_id="b")).granted  # 200 + 400 returned
        assert not (await limiter.acquire("p", "m", limits, 100, lease_id="c")).granted

        assert (await limiter.acquire("q", "m", limits, 500, lease_id="a")).granted
        await limiter.settle("q", "m", limits, "a", 500, 150, refund_unused=False, counted_tokens=900)
        assert (await limiter.acquire("q", "m", limits, 290, lease_id="b")).granted  # 1200 - 900
        assert not (await limiter.acquire("q", "m", limits, 20, lease_id="c")).granted

    run_with_limiter(redis_url, body, token_burst_s=30)


def test_a_refused_large_request_is_not_starved_by_small_ones(redis_url: str) -> None:
    limits = RateLimits(tokens_per_minute=12_000)  # a 200-token bucket refilling at ~197 tokens/s

    async def body(limiter: RateLimiter) -> None:
        clock = on_simulated_clock(limiter)
        await clock(0.0)
        assert (await limiter.acquire("p", "m", limits, 150, lease_id="first")).granted
        large = await limiter.acquire("p", "m", limits, 200, lease_id="large")
        assert (large.granted, large.limit) == (False, "tokens_per_minute")
        small = await limiter.acquire("p", "m", limits, 40, lease_id="small")
        assert (small.granted, small.limit) == (False, "tokens_per_minute")  # 50 tokens are there, but it is behind
        await clock(small.wait_s)
        # Back when told, the tokens are there, but held for the large request that came first.
        assert not (await limiter.acquire("p", "m", limits, 40, lease_id="small")).granted
        await clock(large.wait_s)
        assert (await limiter.acquire("p", "m", limits, 200, lease_id="large")).granted

    run_with_limiter(redis_url, body)


def test_first_come_first_served_and_a_late_caller_gives_up_its_place(redis_url: str) -> None:
    limits = RateLimits(tokens_per_minute=12_000)  # a 200-token bucket refilling at ~197 tokens/s

    async def body(limiter: RateLimiter) -> None:
        clock = on_simulated_clock(limiter)

        async def ask(name: str, tokens: int = 40, **options: Any) -> Decision:
            return await limiter.acquire("p", "m", limits, tokens, lease_id=name, **options)

        await clock(0.0)
        assert (await ask("all", 200)).granted  # the bucket is empty
        first, second = await ask("first"), await ask("second", waiting_since_s=SIMULATED_EPOCH - 10)
        assert not first.granted and not second.granted and second.wait_s > first.wait_s
        await clock(0.3)  # ~59 tokens back: enough for one, but the first in line is not back yet
        assert not (await ask("second", waiting_since_s=SIMULATED_EPOCH - 10)).granted  # however long it waited
        await clock(0.45)
        assert (await ask("first")).granted and (await ask("second")).granted

        # A caller more than a burst's worth of seconds late gives up its place, and is served first when back.
        await clock(2.0)
        assert (await ask("all again", 200)).granted
        slow, behind = await ask("slow"), await ask("behind")
        await clock(2.0 + slow.wait_s + 1.1)
        assert (await ask("behind")).granted and (await ask("slow")).granted

    run_with_limiter(redis_url, body)


def test_refused_callers_come_back_in_turn_not_all_at_once(redis_url: str) -> None:
    """A batch arrives at once; each refused call is told its turn in line and comes back then, a
    little late as a re-dispatched job does. Told "when one call fits" instead, all would come
    back together and all but one be refused again, each time."""
    rng = random.Random(11)
    limits = RateLimits(tokens_per_minute=60_000)  # a 500-token bucket (0.5 s) refilling at ~987 tokens/s
    rate = (60_000 - 500 + 1) * (1 - RATE_MARGIN) / 60
    sizes = [rng.randint(20, 400) for _ in range(200)]

    async def body(limiter: RateLimiter) -> list[SimpleNamespace]:
        clock = on_simulated_clock(limiter)
        callers = [SimpleNamespace(index=i, size=size, at_s=i * 1e-4, asks=0, granted_s=None, since_s=None)
                   for i, size in enumerate(sizes)]
        waiting = list(callers)
        while waiting:
            caller = min(waiting, key=lambda c: c.at_s)
            await clock(caller.at_s)
            caller.asks += 1
            decision = await limiter.acquire("p", "m", limits, caller.size, lease_id=str(caller.index),
                                             waiting_since_s=caller.since_s)
            if decision.granted:
                caller.granted_s = caller.at_s
                waiting.remove(caller)
            else:  # set aside, then re-dispatched: the promoter's tick, the broker, the jitter
                caller.since_s = caller.since_s or SIMULATED_EPOCH + caller.at_s
                caller.at_s += decision.wait_s + 0.05 + rng.uniform(0.0, 0.02)
        return callers

    # A 0.5 s bucket exactly (no room kept for jitter on the way to the provider): the line alone.
    callers = run_with_limiter(redis_url, body, token_burst_s=0.5, jitter_s=0)
    refusals = sum(caller.asks - 1 for caller in callers)
    refused = sum(1 for caller in callers if caller.asks > 1)
    assert refused > 150  # the batch was over the limit...
    # ...and each refused call came back two or three times: early (no call has settled yet, so the
    # limiter plans low), told again from its place, then granted. Told "when one call fits" instead,
    # each would come back dozens of times.
    assert refusals <= 3 * refused and max(caller.asks for caller in callers) <= 6
    # No refill was wasted: the last grant came when the tokens allowed, plus a return's delay and
    # the little a caller told again aims past its turn.
    assert max(caller.granted_s for caller in callers) <= (sum(sizes) - 500) / rate + 0.2
    # Roughly first come, first served: granted in about the order they came (a few small calls back
    # early take tokens no one else was there for).
    by_grant = sorted(callers, key=lambda c: c.granted_s)
    places_moved = sorted(abs(rank - caller.index) for rank, caller in enumerate(by_grant))
    assert sum(places_moved) / len(places_moved) <= 5 and places_moved[int(0.9 * len(places_moved))] <= 5


def test_the_line_is_planned_at_what_reservations_end_up_costing(redis_url: str) -> None:
    """Settling returns a high estimate's excess: callers told turns for whole reservations would come
    back after those refunds had overflowed the bucket. So the line advances by what reservations
    have recently settled to (half, until twenty have settled), and a newcomer is told to come back
    early (back early, it is told again from its place)."""
    limits = RateLimits(tokens_per_minute=60_000, refund_unused_tokens=False)  # a 1,000-token bucket
    rate = (60_000 - 1000 + 1) * (1 - RATE_MARGIN) / 60

    async def body(limiter: RateLimiter) -> dict[str, list[float]]:
        clock = on_simulated_clock(limiter)
        steps: dict[str, list[float]] = {}
        for provider, settled in (("fresh", None), ("settled", 80)):
            for number in range(60 if settled else 0):  # each call settles to 80% of its reservation
                await clock(number * 0.1)
                lease = f"{provider}{number}"
                assert (await limiter.acquire(provider, "m", limits, 100, lease_id=lease)).granted
                await limiter.settle(provider, "m", limits, lease, 100, 10, refund_unused=False, counted_tokens=settled)
            await clock(10.0)  # the bucket is full again
            assert (await limiter.acquire(provider, "m", limits, 1000, lease_id="drain")).granted
            waits = [(await limiter.acquire(provider, "m", limits, 100, lease_id=f"w{n}")).wait_s for n in range(30)]
            # Far back in line, past the callers whose turn is near (their whole reservations are kept).
            steps[provider] = [later - earlier for earlier, later in zip(waits[20:], waits[21:])]
        return steps

    steps = run_with_limiter(redis_url, body)
    assert steps["fresh"] == pytest.approx([100 * RATIO_PRIOR * (1 - PLAN_EARLY) / rate] * 9, rel=1e-3)
    assert steps["settled"] == pytest.approx([100 * 0.8 * (1 - PLAN_EARLY) / rate] * 9, rel=1e-3)


def test_token_bound_holds_for_any_interleaving_on_a_simulated_clock(redis_url: str) -> None:
    """The script itself, on a clock the test moves, under random callers of mixed sizes: no window
    ever holds more than a full bucket plus its refill, whatever the order of calls."""
    rng, limits = random.Random(5), RateLimits(tokens_per_minute=60_000)
    clock: Callable[[float], Awaitable[None]]

    async def trial(limiter: RateLimiter, provider: str, sizes: tuple[int, ...]) -> list[tuple[float, int]]:
        callers = [SimpleNamespace(size=size, at_s=rng.random() / 100, lease=str(size), since_s=None) for size in sizes]
        grants: list[tuple[float, int]] = []
        while (caller := min(callers, key=lambda c: c.at_s)).at_s < 1.0:
            await clock(caller.at_s)
            lease, since_s = caller.lease, caller.since_s
            decision = await limiter.acquire(
                provider, "m", limits, caller.size, lease_id=lease, waiting_since_s=since_s
            )
            if decision.granted:
                grants.append((caller.at_s, caller.size))
                caller.lease, caller.since_s = caller.lease + "+", None
                caller.at_s += rng.choice((1e-4, 0.01))
            else:
                caller.since_s = caller.since_s or SIMULATED_EPOCH + caller.at_s
                caller.at_s += rng.choice((decision.wait_s, min(decision.wait_s, 0.005), decision.wait_s + 0.3))
        return grants

    async def body(limiter: RateLimiter) -> None:
        nonlocal clock
        clock = on_simulated_clock(limiter)
        for number in range(30):
            sizes = rng.choice([(10, 30, 80, 600), (1, 2, 3, 5000), (50, 200, 900, 900)])
            grants = await trial(limiter, f"sim{number}", sizes)
            for window_s in (0.1, 0.5, 1.0):
                allowed = max(500, *sizes) + window_s * (60_000 - 500 + 1) * (1 - RATE_MARGIN) / 60
                assert most_in_window(grants, window_s) <= allowed, (sizes, window_s)

    run_with_limiter(redis_url, body, token_burst_s=0.5)


def test_estimate_is_prompt_plus_max_tokens() -> None:
    request = LLMRequest(messages=[Message(role="user", content="x" * 400)], model="m", max_tokens=300)
    assert estimate_request_tokens(request) == 3 + 100 + 4 + 300


def test_max_concurrent_holds_across_processes(pool: ProcessPoolExecutor, redis_url: str) -> None:
    limits = RateLimits(max_concurrent=2)
    results = in_every_process(pool, _hold_slots, redis_url, limits, time.time() + 0.3)
    assert sum(grants for grants, _ in results) >= 4
    assert max(most for _, most in results) == 2


def test_a_crashed_holders_slot_frees_itself(redis_url: str) -> None:
    limits = RateLimits(max_concurrent=1)
    lease_ttl_s = 2.0
    spawn = multiprocessing.get_context("spawn")
    child = spawn.Process(target=_acquire_then_die, args=(redis_url, limits, lease_ttl_s))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 1

    async def body(limiter: RateLimiter) -> None:
        doomed_at = float(await limiter.redis.get("test:doomed_at") or "nan")
        blocked = await limiter.acquire("crash", "m", limits, 1, lease_id="next")
        assert (blocked.granted, blocked.limit) == (False, "max_concurrent")
        await asyncio.sleep(doomed_at + lease_ttl_s - blocked.at_s)  # on Redis's clock
        later = await limiter.acquire("crash", "m", limits, 1, lease_id="next")
        assert later.granted and later.at_s >= doomed_at + lease_ttl_s

    run_with_limiter(redis_url, body)


def test_release_frees_the_slot_but_keeps_the_request_counted(redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        slots = RateLimits(max_concurrent=1)
        assert (await limiter.acquire("p", "m", slots, 1, lease_id="a")).granted
        assert (await limiter.acquire("p", "m", slots, 1, lease_id="b")).limit == "max_concurrent"
        assert await limiter.release("p", "m", slots, "a")
        assert (await limiter.acquire("p", "m", slots, 1, lease_id="b")).granted

        counted = RateLimits(max_concurrent=1, requests_per_minute=60)
        assert (await limiter.acquire("q", "m", counted, 1, lease_id="a")).granted
        await limiter.release("q", "m", counted, "a")
        assert (await limiter.acquire("q", "m", counted, 1, lease_id="b")).limit == "requests_per_minute"

        assert await limiter.renew("p", "m", slots, "b")
        assert not await limiter.renew("p", "m", slots, "never-taken")

    run_with_limiter(redis_url, body)


def test_penalize_pauses_every_process_by_provider_model_or_key(pool: ProcessPoolExecutor, redis_url: str) -> None:
    limits = RateLimits(requests_per_minute=6000)

    async def body(limiter: RateLimiter) -> None:
        # Pauses far longer than the calls that check them take, even on a loaded machine.
        await limiter.penalize("pen", 30.0)
        for decision in in_every_process(pool, _acquire_once, redis_url, "pen", "m", limits):
            assert (decision.granted, decision.limit) == (False, "paused") and 0 < decision.wait_s <= 30.0
        await limiter.penalize("p", 30.0, model="big")
        await limiter.penalize("p", 30.0, api_key_id="k1")
        assert (await limiter.acquire("p", "big", limits, 1, lease_id="a")).limit == "paused"
        assert (await limiter.acquire("p", "small", limits, 1, lease_id="b")).granted
        assert (await limiter.acquire("p", "small", limits, 1, api_key_id="k1", lease_id="c")).limit == "paused"
        assert (await limiter.acquire("p", "small", limits, 1, api_key_id="k2", lease_id="d")).granted

        # A pause only lengthens, and ends when it says.
        end = await limiter.penalize("q", 2.0)
        assert await limiter.penalize("q", 0.5) == end
        waiting = await limiter.acquire("q", "m", limits, 1, lease_id="e")
        assert waiting.limit == "paused" and waiting.at_s + waiting.wait_s == pytest.approx(end, abs=1e-5)
        await asyncio.sleep(waiting.wait_s + 0.05)
        assert (await limiter.acquire("q", "m", limits, 1, lease_id="e")).granted

    run_with_limiter(redis_url, body)


def test_openai_reset_durations() -> None:
    durations = {"1s": 1.0, "6m0s": 360.0, "20ms": 0.02, "1h2m3.5s": 3723.5, "0.5": 0.5, "soon": None, "3s on": None}
    assert {text: parse_duration_s(text) for text in durations} == pytest.approx(durations)


def test_openai_and_anthropic_headers() -> None:
    spent = {
        "x-ratelimit-limit-requests": "5000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "12ms",
        "x-ratelimit-limit-tokens": "160000",
        "x-ratelimit-remaining-tokens": "1000",  # under 1% of the limit: as good as spent
        "x-ratelimit-reset-tokens": "6m0s",
    }
    limits = {limit.name: limit for limit in parse_rate_limit_headers(spent)}
    assert limits["requests"].exhausted and limits["requests"].reset_s == pytest.approx(0.012)
    assert limits["tokens"].exhausted and limits["tokens"].reset_s == 360.0
    # Both refill continuously and the reset is the time to a whole limit again: the pause lasts
    # until the spent limit has its headroom (1% of 160,000) back: 600 of the 159,000 missing.
    assert pause_from_headers(spent) == pytest.approx(360.0 * 600 / 159_000)
    assert limits["requests"].refill_s() == pytest.approx(0.012 / 5000)
    roomy = {**spent, "x-ratelimit-remaining-requests": "4999", "x-ratelimit-remaining-tokens": "159976"}
    assert pause_from_headers(roomy) is None
    # Azure answers -1 when it does not say; that is not "spent".
    assert pause_from_headers({"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-reset-tokens": "0"}) is None
    assert pause_from_headers({"Retry-After": "4"}) == 4.0

    now_s = datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "12",
        "anthropic-ratelimit-requests-reset": "2025-01-01T00:00:02Z",
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": "2025-01-01T00:00:07.5Z",
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "4000",
        "anthropic-ratelimit-output-tokens-reset": "2025-01-01T00:00:30+00:00",
    }
    limits = {limit.name: limit for limit in parse_rate_limit_headers(headers, now_s)}
    assert set(limits) == {"requests", "input-tokens", "output-tokens"}
    assert limits["input-tokens"].reset_s == 7.5
    assert pause_from_headers(headers, now_s) == pytest.approx(7.5 * 300 / 30_000)
    headers["anthropic-ratelimit-input-tokens-remaining"] = "15000"
    assert pause_from_headers(headers, now_s) is None


def test_header_observer_pauses_the_model_fleet_wide(redis_url: str) -> None:
    limits = RateLimits()

    async def body(limiter: RateLimiter) -> None:
        observe = limiter.observer_for("openai", asyncio.get_running_loop())
        # Pauses far longer than the calls that check them take, even on a loaded machine.
        observe("gpt", httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}))
        observe("gpt", httpx.Headers({"x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "10s"}))
        observe("gpt", {"x-ratelimit-remaining-requests": "not a number"})
        await limiter.flush()
        other = RateLimiter(limiter.redis)  # another worker sees the same pause
        paused = await other.acquire("openai", "gpt", limits, 1, lease_id="a")
        assert paused.limit == "paused" and 10.0 < paused.wait_s <= 20.0
        assert (await other.acquire("openai", "gpt-mini", limits, 1, lease_id="b")).granted
        observe(None, {"retry-after": "30"})  # no model: the whole provider pauses
        await limiter.flush()
        provider_paused = await other.acquire("openai", "gpt-mini", limits, 1, lease_id="c")
        assert provider_paused.limit == "paused" and 20.0 < provider_paused.wait_s <= 30.0

    run_with_limiter(redis_url, body)


def test_daily_token_and_cost_quotas_count_real_usage(redis_url: str) -> None:
    tokens_quota = RateLimits(daily_tokens=1000)
    cost_quota = RateLimits(daily_cost_usd=1.0, on_quota_exhausted="wait")

    async def body(limiter: RateLimiter) -> None:
        assert (await limiter.acquire("p", "m", tokens_quota, 600, lease_id="a")).granted
        await limiter.settle("p", "m", tokens_quota, "a", 600, 600)
        over = await limiter.acquire("p", "m", tokens_quota, 600, lease_id="b")
        assert (over.granted, over.limit, over.quota_exhausted) == (False, "daily_tokens", True)
        assert over.wait_s == pytest.approx(86400 - over.at_s % 86400, abs=1e-3)  # the next UTC day
        assert (await limiter.acquire("p", "m", tokens_quota, 300, lease_id="c")).granted
        await limiter.settle("p", "m", tokens_quota, "c", 300, 100)
        assert (await limiter.acquire("p", "m", tokens_quota, 300, lease_id="d")).granted  # 700 + 300 fits
        await limiter.settle("p", "m", tokens_quota, "d", 300, 300)
        assert (await limiter.acquire("p", "m", tokens_quota, 1, lease_id="e")).limit == "daily_tokens"
        assert (await limiter.snapshot("p", tokens_quota))["daily_tokens"] == {"used": 1000, "limit": 1000}

        for lease, cost_usd in (("a", 0.6), ("b", 0.5)):
            assert (await limiter.acquire("c", "m", cost_quota, 10, lease_id=lease)).granted
            await limiter.settle("c", "m", cost_quota, lease, 10, 10, cost_usd)
        spent = await limiter.acquire("c", "m", cost_quota, 10, lease_id="c")
        assert (spent.limit, spent.quota_exhausted) == ("daily_cost_usd", True)
        report = await limiter.snapshot("c", cost_quota)
        assert report["daily_cost_usd"] == {"used": pytest.approx(1.1), "limit": 1.0}
        assert report["on_quota_exhausted"] == "wait"

    run_with_limiter(redis_url, body)


def test_per_model_and_per_key_limits_are_separate(redis_url: str) -> None:
    by_model = RateLimits(
        requests_per_minute=6000,
        per_model={"small": ModelLimits(requests_per_minute=60), "big": ModelLimits(tokens_per_minute=600)},
    )
    per_key, shared = RateLimits(requests_per_minute=60, per_api_key=True), RateLimits(requests_per_minute=60)
    leases = itertools.count()

    async def body(limiter: RateLimiter) -> None:
        async def answer(provider: str, model: str, limits: RateLimits, tokens: int = 1, key: str = "") -> str | None:
            lease = str(next(leases))
            decision = await limiter.acquire(provider, model, limits, tokens, api_key_id=key or None, lease_id=lease)
            return "granted" if decision.granted else decision.limit

        assert [await answer("p", "small", by_model) for _ in range(2)] == ["granted", "per_model.requests_per_minute"]
        assert [await answer("p", "big", by_model, 10) for _ in range(2)] == ["granted", "per_model.tokens_per_minute"]
        assert await answer("p", "other", by_model, 10_000) == "granted"
        report = await limiter.snapshot("p", by_model, model="small")
        assert report["requests_per_minute"] == {"used": 3, "limit": 6000}
        assert report["per_model"]["requests_per_minute"] == {"used": 1, "limit": 60}

        expected = ["granted", "requests_per_minute", "granted"]
        assert [await answer("k", "m", per_key, key=key) for key in ("k1", "k1", "k2")] == expected
        assert [await answer("s", "m", shared, key=key) for key in ("k1", "k2")] == expected[:2]

    run_with_limiter(redis_url, body)


def test_snapshot_reports_usage_against_each_limit(redis_url: str) -> None:
    limits = RateLimits(requests_per_minute=600, tokens_per_minute=60_000, max_concurrent=5, daily_tokens=10**6)

    async def body(limiter: RateLimiter) -> dict[str, Any]:
        for lease in ("a", "b", "c"):
            assert (await limiter.acquire("p", "m", limits, 100, lease_id=lease)).granted
        await limiter.settle("p", "m", limits, "a", 100, 40, 0.25)
        await limiter.penalize("p", 10.0)
        return await limiter.snapshot("p", limits)

    report = run_with_limiter(redis_url, body, request_burst_s=5)
    used = {name: report[name]["used"] for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent")}
    assert used == {"requests_per_minute": 3, "tokens_per_minute": 240, "max_concurrent": 2}
    assert report["daily_tokens"] == {"used": 40, "limit": 10**6}
    assert report["daily_cost_usd"] == {"used": 0.25, "limit": None}
    assert report["max_concurrent"]["limit"] == 5 and 9 < report["paused_for_s"] <= 10
