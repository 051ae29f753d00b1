"""The circuit breaker's script against a real redis-server: a failure rate over a sliding
window (a job counted once), the cool-down, health-check probes, closing on a probe's success."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.config import HealthSettings
from llmq.worker import errors
from llmq.worker.middleware.circuit import CircuitBreaker, counts_as_failure

SETTINGS = HealthSettings(window_s=30, minimum_calls=10, failure_rate=0.5, cooldown_s=0.4, half_open_probes=2)


def run(redis_url: str, body: Callable[[CircuitBreaker, aioredis.Redis], Awaitable[None]]) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            await body(CircuitBreaker(client, SETTINGS), client)
        finally:
            await client.aclose()

    asyncio.run(main())


async def cool_down() -> None:
    await asyncio.sleep(SETTINGS.cooldown_s + 0.1)


async def open_circuit(breaker: CircuitBreaker) -> None:
    for index in range(SETTINGS.minimum_calls):
        await breaker.record_failure("p", f"job_{index}", "ServerError HTTP 500", "job")
    assert (await breaker.allow("p", "x:1", 5)).verdict == "deny"


def test_poison_jobs_retried_many_times_count_once_and_never_open_the_circuit(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        await breaker.record_success("p", "job", count=40)
        for attempt in range(3):  # 10 poison jobs, each failing on every one of its attempts
            for index in range(10):
                outcome = await breaker.record_failure("p", f"poison_{index}", "ServerError HTTP 500", "job")
                assert outcome.state == "closed"
        assert (outcome.calls, outcome.failures) == (50, 10)
        assert (await breaker.allow("p", "job_x:1", 5)).verdict == "allow"

    run(redis_url, body)


def test_a_real_outage_opens_it_once_enough_calls_fail(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        await breaker.record_success("p", "job", count=4)
        for index in range(5):
            assert (await breaker.record_failure("p", f"job_{index}", "OverloadedError HTTP 503", "job")).state == "closed"
        assert (await breaker.allow("p", "a:1", 5)).verdict == "allow"  # 5 of 9 calls: under the minimum of 10
        outcome = await breaker.record_failure("p", "job_5", "OverloadedError HTTP 503: busy", "job")
        assert (outcome.state, outcome.changed, outcome.calls, outcome.failures) == ("open", True, 10, 6)
        denied = await breaker.allow("p", "b:1", 5)
        assert (denied.verdict, denied.state) == ("deny", "open") and 0 < denied.wait_s <= SETTINGS.cooldown_s
        fields = await client.hgetall(keys.circuit("p"))
        assert fields["last_error"] == "OverloadedError HTTP 503: busy" and fields["last_error_source"] == "job"
        assert (fields["times_opened"], fields["window_calls"], fields["window_failures"]) == ("1", "10", "6")

    run(redis_url, body)


def test_too_few_calls_are_never_judged(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        for index in range(SETTINGS.minimum_calls - 1):
            assert (await breaker.record_failure("p", f"job_{index}", "ServerError", "job")).state == "closed"

    run(redis_url, body)


def test_failures_leave_the_window(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        short = CircuitBreaker(client, SETTINGS.model_copy(update={"window_s": 0.3}))
        for index in range(SETTINGS.minimum_calls - 1):
            await short.record_failure("p", f"old_{index}", "ServerError", "job")
        await asyncio.sleep(0.45)
        outcome = await short.record_failure("p", "new", "ServerError", "job")
        assert (outcome.state, outcome.calls, outcome.failures) == ("closed", 1, 1)

    run(redis_url, body)


def test_after_the_cool_down_a_few_probes_go_through_and_a_success_closes_with_a_fresh_window(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        await open_circuit(breaker)
        await breaker.record_success("p", "job", count=100)  # late successes during the cool-down change nothing
        assert await client.hget(keys.circuit("p"), "state") == "open"
        await cool_down()
        probes = [await breaker.allow("p", f"probe:{n}", 5) for n in range(3)]
        assert [(p.verdict, p.state) for p in probes[:2]] == [("probe", "half_open")] * SETTINGS.half_open_probes
        assert (probes[2].verdict, probes[2].state) == ("deny", "half_open") and probes[2].wait_s > 0
        assert (await breaker.allow("p", "probe:0", 5)).verdict == "probe"  # asking again keeps its place
        assert (await breaker.record_success("p", "probe", call_id="probe:1")).changed is True
        assert (await breaker.allow("p", "after:1", 5)).verdict == "allow"
        # The outage's failures are gone: one new failure is judged on a fresh window.
        outcome = await breaker.record_failure("p", "job_new", "ServerError", "job")
        assert (outcome.state, outcome.calls, outcome.failures) == ("closed", 1, 1)

    run(redis_url, body)


def test_a_failed_probe_reopens_and_a_released_probe_frees_its_place(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        await open_circuit(breaker)
        await cool_down()
        assert (await breaker.allow("p", "probe:1", 5)).verdict == "probe"
        assert (await breaker.allow("p", "probe:2", 5)).verdict == "probe"
        assert (await breaker.allow("p", "probe:3", 5)).verdict == "deny"
        await breaker.release("p", "probe:1")  # e.g. deferred by the rate limiter: no verdict on the provider
        assert (await breaker.allow("p", "probe:3", 5)).verdict == "probe"
        opened_before = float(await client.hget(keys.circuit("p"), "opened_at"))
        outcome = await breaker.record_failure("p", "probe:2", "probe: ProviderTimeoutError", "probe")
        assert (outcome.state, outcome.changed) == ("open", True)
        assert float(await client.hget(keys.circuit("p"), "opened_at")) > opened_before
        assert (await breaker.allow("p", "x:1", 5)).verdict == "deny"
        assert await client.hget(keys.circuit("p"), "times_opened") == "2"
        # A probe from before the reopening reports late: it changes nothing.
        assert (await breaker.record_success("p", "probe", call_id="probe:3")).state == "open"

    run(redis_url, body)


def test_a_probe_whose_worker_died_expires(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        await open_circuit(breaker)
        await cool_down()
        assert (await breaker.allow("p", "lost:1", 0.2)).verdict == "probe"
        assert (await breaker.allow("p", "lost:2", 0.2)).verdict == "probe"
        assert (await breaker.allow("p", "x:1", 0.2)).verdict == "deny"
        time.sleep(0.3)
        assert (await breaker.allow("p", "next:1", 0.2)).verdict == "probe"

    run(redis_url, body)


def test_which_errors_count_against_a_provider() -> None:
    counted = [errors.ServerError("x"), errors.OverloadedError("x"), errors.ProviderTimeoutError("x"),
               errors.ProviderConnectionError("x"), errors.MalformedResponseError("x")]
    neutral = [errors.RateLimitedError("x"), errors.AuthenticationError("x"), errors.BadRequestError("x"),
               errors.ModelNotFoundError("x"), errors.QuotaExceededError("x"), errors.ProviderUnavailableError("x"),
               errors.DeadlineExceededError("x")]
    assert all(counts_as_failure(error) for error in counted)
    assert not any(counts_as_failure(error) for error in neutral)
