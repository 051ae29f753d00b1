"""The provider batch scripts (provider_batch_claim.lua, provider_batch_update.lua) and the job
scripts' handling of jobs that wait in a provider batch, against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llmq.contract import keys
from llmq.contract.jobs import ACTIVE_STATES, JobStore, NewJob
from llmq.contract.models import Hop, JobState, LLMRequest
from llmq.contract.provider_batches import ProviderBatchState, ProviderBatchStore
from tests.support.jobs import with_job_store

TTL_S = 600
FIELDS = {"model": "gpt-4o-mini", "endpoint": "/v1/chat/completions", "window_s": 86400, "bytes": 300}


def windowed(job_id: str, batch_id: str | None = "batch-1", **fields: Any) -> NewJob:
    request = LLMRequest(messages=[{"role": "user", "content": job_id}], model="gpt-4o-mini")
    return NewJob(job_id=job_id, request=request, route=[Hop(provider="openai", model="gpt-4o-mini")],
                  batch_id=batch_id, custom_id=job_id, completion_window_s=86400.0, via_provider_batch=True, **fields)


async def outbox_kinds(store: JobStore) -> list[str]:
    return [json.loads(row)["kind"] for row in await store.redis.lrange(keys.OUTBOX, 0, -1)]


def test_a_windowed_job_waits_in_its_entrys_intake_with_no_watchdog_entry(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await store.create_many([windowed("job-1")], TTL_S)
        record = await store.get("job-1")
        assert record is not None and record.state is JobState.IN_PROVIDER_BATCH
        assert record.completion_window_s == 86400.0 and record.provider_batch is None
        assert await store.redis.zscore(keys.provider_batch_intake("openai"), "job-1") is not None
        assert await store.redis.zscore(keys.DELAYED, "job-1") is None  # nothing to publish
        assert await store.redis.zscore(keys.DEADLINES, "job-1") is not None
        assert (await store.batch("batch-1")).counts[JobState.IN_PROVIDER_BATCH] == 1  # type: ignore[union-attr]
        # Promote never publishes such a job, whatever puts it in the delayed set.
        await store.redis.zadd(keys.DELAYED, {"job-1": 0})
        assert (await store.promote_due()).messages == []

    with_job_store(redis_url, scenario)


def test_claim_takes_only_jobs_still_waiting_to_be_grouped_and_records_the_intent(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        batches = ProviderBatchStore(store.redis)
        await store.create_many([windowed(f"job-{index}") for index in range(4)], TTL_S)
        assert await store.cancel("job-1", TTL_S)
        assert await batches.claim("pb-a", "openai", ["job-3"], FIELDS, first_poll_ms=0) == ["job-3"]
        taken = await batches.claim("pb-b", "openai", ["job-0", "job-1", "job-2", "job-3"], FIELDS, first_poll_ms=0)
        assert taken == ["job-0", "job-2"]  # job-1 cancelled, job-3 already in pb-a
        assert await batches.job_ids("pb-b") == ["job-0", "job-2"]
        assert await store.redis.zcard(keys.provider_batch_intake("openai")) == 0
        job = await store.redis.hgetall(keys.job("job-0"))
        assert (job["provider_batch"], job["attempt"], job["hop_attempt"], job["state"]) == (
            "pb-b", "1", "1", "in_provider_batch")
        record = await batches.get("pb-b")
        assert record is not None and record.state is ProviderBatchState.SUBMITTING
        assert (record.lines, record.model, record.batch_ids) == (2, "gpt-4o-mini", ["batch-1"])
        assert await store.redis.smembers(keys.batch_provider_batches("batch-1")) == {"pb-a", "pb-b"}
        assert await batches.due("openai", await store.now_ms()) == ["pb-a", "pb-b"]
        kinds = await outbox_kinds(store)
        assert kinds.count("provider_batch_line") == 3 and kinds.count("provider_batch") == 2
        # A claim of nothing makes no provider batch; a second claim of one id changes nothing.
        assert await batches.claim("pb-c", "openai", ["job-1"], FIELDS, first_poll_ms=0) == []
        assert await batches.get("pb-c") is None
        assert await batches.claim("pb-b", "openai", ["job-0"], FIELDS, first_poll_ms=0) == []

    with_job_store(redis_url, scenario)


def test_update_steps_a_provider_batch_until_it_ends_and_never_after(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        batches = ProviderBatchStore(store.redis)
        await store.create_many([windowed("job-0")], TTL_S)
        await batches.claim("pb-a", "openai", ["job-0"], FIELDS, first_poll_ms=60_000)
        assert await batches.due("openai", await store.now_ms()) == []
        assert await batches.update("pb-a", "openai", {"state": "submitted", "remote_id": "batch_x"}, next_poll_ms=0)
        assert await batches.due("openai", await store.now_ms()) == ["pb-a"]
        assert await batches.update("pb-a", "openai", {"state": "ended"}, next_poll_ms=None)
        assert await batches.open_ids("openai") == []
        assert not await batches.update("pb-a", "openai", {"state": "submitted"}, next_poll_ms=0)
        record = await batches.get("pb-a")
        assert record is not None and (record.state, record.remote_id) == (ProviderBatchState.ENDED, "batch_x")
        rows = [json.loads(row) for row in await store.redis.lrange(keys.OUTBOX, 0, -1)]
        last = [row for row in rows if row["kind"] == "provider_batch"][-1]
        assert (last["state"], last["remote_id"], last["provider_batch_id"]) == ("ended", "batch_x", "pb-a")

    with_job_store(redis_url, scenario)


def test_a_job_in_a_provider_batch_can_be_cancelled_and_fails_past_its_deadline(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        assert JobState.IN_PROVIDER_BATCH in ACTIVE_STATES
        await store.create_many([windowed("job-0"), windowed("job-1", deadline_s=0.001)], TTL_S)
        await ProviderBatchStore(store.redis).claim("pb-a", "openai", ["job-0", "job-1"], FIELDS, first_poll_ms=0)
        assert await store.cancel("job-0", TTL_S)
        await asyncio.sleep(0.01)  # past job-1's deadline on Redis's clock, however quick the calls above
        _, failed = await store.reap(100, TTL_S)
        assert failed == ["job-1"]
        counts = (await store.batch("batch-1")).counts  # type: ignore[union-attr]
        assert (counts[JobState.CANCELLED], counts[JobState.FAILED], counts[JobState.IN_PROVIDER_BATCH]) == (1, 1, 0)
        # Both still name their provider batch: its answers for them are put on record when they come.
        assert (await store.get("job-0")).provider_batch == "pb-a"  # type: ignore[union-attr]

    with_job_store(redis_url, scenario)
