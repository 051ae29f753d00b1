"""The claim watchdog (producer/lua/promote.lua) against a real redis-server.

A published job keeps an entry in the delayed set until a worker claims it. When the
entry comes due: a lost message (its queue is empty) is handed out again; a job whose
queue still holds messages is looked at again soon (after 5 s, or 1 ms per queued
message), not after another whole grace period; finished and running jobs drop out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from producer import keys
from producer.jobs import PROMOTE_IN_FLIGHT_MS, PROMOTE_RECHECK_MS, JobStore, NewJob
from producer.models import Hop, LLMRequest
from producer.queueing import async_redis

QUEUE = keys.queue_name("openai")


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    yield running
    running.close()


def make_job(job_id: str) -> NewJob:
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-4o-mini")
    return NewJob(job_id=job_id, request=request, route=[Hop(provider="openai", model="gpt-4o-mini")])


async def scenario(redis_url: str, queued_messages: int) -> tuple[list, float, float]:
    """Create a job, make its watchdog entry due, with `queued_messages` in its queue; promote once."""
    client = async_redis(redis_url)
    try:
        await client.flushdb()
        jobs = JobStore(client)
        await jobs.create_many([make_job("job_w")], ttl_s=600)
        if queued_messages:
            await client.rpush(QUEUE, *[f"message {index}" for index in range(queued_messages)])
        await client.zadd(keys.DELAYED, {"job_w": 0})  # due now
        now_ms = await jobs.now_ms()
        handed_out = await jobs.promote_due()
        score = await client.zscore(keys.DELAYED, "job_w")
        return handed_out, now_ms, score
    finally:
        await client.aclose()


def test_a_lost_message_is_handed_out_again_when_its_queue_is_empty(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    handed_out, now_ms, score = loop.run_until_complete(scenario(redis_url, 0))
    assert [(job_id, dispatch, queue) for job_id, dispatch, queue, _ in handed_out] == [("job_w", 1, QUEUE)]
    assert now_ms + PROMOTE_IN_FLIGHT_MS - 100 <= score <= now_ms + PROMOTE_IN_FLIGHT_MS + 1000


def test_a_job_waiting_behind_messages_is_looked_at_again_soon(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    handed_out, now_ms, score = loop.run_until_complete(scenario(redis_url, 3))
    assert handed_out == []
    assert now_ms + PROMOTE_RECHECK_MS - 100 <= score <= now_ms + PROMOTE_RECHECK_MS + 1000


def test_a_long_backlog_is_looked_at_less_often(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    handed_out, now_ms, score = loop.run_until_complete(scenario(redis_url, 8000))
    assert handed_out == []
    assert now_ms + 8000 - 100 <= score <= now_ms + 8000 + 1000  # 1 ms per queued message


def test_finished_and_missing_jobs_leave_the_watchdog(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    async def run() -> tuple[list, float | None, float | None]:
        client = async_redis(redis_url)
        try:
            await client.flushdb()
            jobs = JobStore(client)
            await jobs.create_many([make_job("job_done")], ttl_s=600)
            await client.hset(keys.job("job_done"), "state", "succeeded")
            await client.zadd(keys.DELAYED, {"job_done": 0, "job_gone": 0})
            handed_out = await jobs.promote_due()
            return handed_out, await client.zscore(keys.DELAYED, "job_done"), await client.zscore(keys.DELAYED, "job_gone")
        finally:
            await client.aclose()

    assert loop.run_until_complete(run()) == ([], None, None)
