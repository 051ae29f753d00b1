"""The claim watchdog (producer/contract/lua/promote.lua) against a real redis-server.

A published job keeps an entry in the delayed set until a worker claims it. When the
entry comes due: a lost message (its queue is empty) is handed out again; a job whose
queue still holds messages is looked at again soon (after 5 s, or 1 ms per queued
message), not after another whole grace period; finished and running jobs drop out.
After Redis restarts, every published job not yet claimed comes due within a second
(producer/contract/lua/recheck.lua, run by the worker that notices the new run id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from llmq.contract import keys
from llmq.contract.jobs import (
    PROMOTE_IN_FLIGHT_MS,
    PROMOTE_RECHECK_MS,
    RESTART_RECHECK_MS,
    EndedJob,
    JobStore,
    NewJob,
    Promoted,
)
from llmq.contract.models import Hop, JobState, LLMRequest
from llmq.contract.queueing import async_redis

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
    messages = handed_out.messages
    assert [(message.job_id, message.dispatch, message.queue) for message in messages] == [("job_w", 1, QUEUE)]
    # Labelled for Flower: the names of the job, and the attempt the message starts.
    label = handed_out.messages[0].label
    assert label is not None and (label.model, label.provider, label.attempt) == ("gpt-4o-mini", "openai", 1)
    assert now_ms + PROMOTE_IN_FLIGHT_MS - 100 <= score <= now_ms + PROMOTE_IN_FLIGHT_MS + 1000


def test_a_job_waiting_behind_messages_is_looked_at_again_soon(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    handed_out, now_ms, score = loop.run_until_complete(scenario(redis_url, 3))
    assert handed_out.messages == []
    assert now_ms + PROMOTE_RECHECK_MS - 100 <= score <= now_ms + PROMOTE_RECHECK_MS + 1000


def test_a_long_backlog_is_looked_at_less_often(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    handed_out, now_ms, score = loop.run_until_complete(scenario(redis_url, 8000))
    assert handed_out.messages == []
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

    assert loop.run_until_complete(run()) == (Promoted([], []), None, None)


def test_a_job_cancelled_while_waiting_is_handed_out_once_for_flower(
    loop: asyncio.AbstractEventLoop, redis_url: str
) -> None:
    # No message will ever run it again, so a worker's promoter tells Celery's events it was revoked
    # (worker/outcome.py); a process that cannot send events (a prefork child) leaves it for one that can.
    async def run() -> tuple[Promoted, Promoted, Promoted]:
        client = async_redis(redis_url)
        try:
            await client.flushdb()
            jobs = JobStore(client)
            await jobs.create_many([make_job("job_c")], ttl_s=600)
            assert await jobs.cancel("job_c", ttl_s=600)
            left = await jobs.promote_due(hand_out_ended=False)
            taken = await jobs.promote_due()
            return left, taken, await jobs.promote_due()
        finally:
            await client.aclose()

    left, taken, again = loop.run_until_complete(run())
    assert left == Promoted([], [])
    error = {"type": "JobCancelledError", "message": "cancelled by the caller", "retryable": False}
    assert taken == Promoted([], [EndedJob("job_c", JobState.CANCELLED, error)])
    assert again == Promoted([], [])


def test_after_a_redis_restart_published_jobs_are_looked_at_within_a_second(
    loop: asyncio.AbstractEventLoop, redis_url: str
) -> None:
    # recheck.lua: a message popped when Redis died is gone; its job must not wait out the whole grace.
    async def run() -> tuple[int, float, dict[str, float]]:
        client = async_redis(redis_url)
        try:
            await client.flushdb()
            jobs = JobStore(client)
            names = ["job_a", "job_b", "job_c", "job_d", "job_retry", "job_running"]
            await jobs.create_many([make_job(name) for name in names], ttl_s=600)
            far = await jobs.now_ms() + 60_000
            await client.zadd(keys.DELAYED, {name: far for name in names})
            await client.hset(keys.job("job_retry"), mapping={"dispatch": 2})  # a retry not yet published
            await client.hset(keys.job("job_running"), "state", "running")
            now_ms = await jobs.now_ms()
            moved = await jobs.recheck_published(page=2)  # pages past entries it leaves alone
            scores = {name: await client.zscore(keys.DELAYED, name) for name in names}
            return moved, now_ms, scores
        finally:
            await client.aclose()

    moved, now_ms, scores = loop.run_until_complete(run())
    assert moved == 4
    for name in ("job_a", "job_b", "job_c", "job_d"):
        assert now_ms + RESTART_RECHECK_MS - 100 <= scores[name] <= now_ms + RESTART_RECHECK_MS + 1000, name
    assert scores["job_retry"] > now_ms + 50_000 and scores["job_running"] > now_ms + 50_000
