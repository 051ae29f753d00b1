"""The circuit breaker's script against a real redis-server: open, cool down, one probe, close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from llmq.contract import keys
from llmq.contract.config import HealthSettings
from llmq.worker import errors
from llmq.worker.middleware.circuit import CircuitBreaker, counts_as_failure

SETTINGS = HealthSettings(failure_threshold=3, cooldown_s=0.4)


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


def test_opens_after_consecutive_failures_and_a_success_resets_the_count(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        for _ in range(2):
            assert await breaker.record_failure("p", "ServerError HTTP 500", "job") == "closed"
        await breaker.record_success("p", "job")  # consecutive: the count starts again
        assert await client.hget(keys.circuit("p"), "failures") == "0"
        for _ in range(2):
            await breaker.record_failure("p", "ServerError HTTP 500", "job")
        assert (await breaker.allow("p", "job-a:1", 5)).verdict == "allow"
        assert await breaker.record_failure("p", "OverloadedError HTTP 503: busy", "job") == "open"
        denied = await breaker.allow("p", "job-b:1", 5)
        assert (denied.verdict, denied.state) == ("deny", "open") and 0 < denied.wait_s <= SETTINGS.cooldown_s
        fields = await client.hgetall(keys.circuit("p"))
        assert fields["last_error"] == "OverloadedError HTTP 503: busy" and fields["last_error_source"] == "job"
        assert fields["times_opened"] == "1"

    run(redis_url, body)


def test_after_the_cooldown_exactly_one_probe_goes_through_and_its_success_closes(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        for _ in range(3):
            await breaker.record_failure("p", "ProviderConnectionError", "job")
        await breaker.record_success("p", "job")  # a late success during the cool-down changes nothing
        assert (await breaker.allow("p", "x:1", 5)).verdict == "deny"
        await cool_down()
        probe = await breaker.allow("p", "probe:1", 5)
        assert (probe.verdict, probe.state) == ("probe", "half_open")
        others = [await breaker.allow("p", f"other:{n}", 5) for n in range(5)]
        assert {(p.verdict, p.state) for p in others} == {("deny", "half_open")}
        assert await breaker.record_success("p", "job") is True
        assert (await breaker.allow("p", "after:1", 5)).verdict == "allow"
        assert await client.hget(keys.circuit("p"), "state") == "closed"

    run(redis_url, body)


def test_a_failed_probe_reopens_and_a_released_probe_lets_the_next_caller_probe(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        for _ in range(3):
            await breaker.record_failure("p", "ProviderTimeoutError", "health")
        await cool_down()
        assert (await breaker.allow("p", "probe:1", 5)).verdict == "probe"
        await breaker.release("p", "probe:1")  # e.g. deferred by the rate limiter: no verdict on the provider
        assert (await breaker.allow("p", "probe:2", 5)).verdict == "probe"
        opened_before = float(await client.hget(keys.circuit("p"), "opened_at"))
        assert await breaker.record_failure("p", "ProviderTimeoutError", "job") == "open"
        assert float(await client.hget(keys.circuit("p"), "opened_at")) > opened_before
        assert (await breaker.allow("p", "x:1", 5)).verdict == "deny"
        assert await client.hget(keys.circuit("p"), "times_opened") == "2"

    run(redis_url, body)


def test_a_probe_whose_worker_died_expires(redis_url: str) -> None:
    async def body(breaker: CircuitBreaker, client: aioredis.Redis) -> None:
        for _ in range(3):
            await breaker.record_failure("p", "ServerError", "job")
        await cool_down()
        assert (await breaker.allow("p", "lost:1", 0.2)).verdict == "probe"
        assert (await breaker.allow("p", "x:1", 0.2)).verdict == "deny"
        time.sleep(0.3)
        assert (await breaker.allow("p", "next:1", 0.2)).verdict == "probe"

    run(redis_url, body)


def test_which_errors_count_against_a_provider() -> None:
    counted = [errors.ServerError("x"), errors.OverloadedError("x"), errors.ProviderTimeoutError("x"), errors.ProviderConnectionError("x"),
               errors.MalformedResponseError("x")]
    neutral = [errors.RateLimitedError("x"), errors.AuthenticationError("x"), errors.BadRequestError("x"),
               errors.ModelNotFoundError("x"), errors.QuotaExceededError("x"), errors.ProviderUnavailableError("x"),
               errors.DeadlineExceededError("x")]
    assert all(counts_as_failure(error) for error in counted)
    assert not any(counts_as_failure(error) for error in neutral)
