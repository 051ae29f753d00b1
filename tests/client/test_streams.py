"""The caller's stream reader (llmq.client.streams.read_stream) against a real redis-server.

The job record is written with JobStore and the entries with the worker's own
StreamWriter, as a worker streaming a job writes them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llmq.client import streams
from llmq.client.errors import JobFailedError
from llmq.client.streams import read_stream
from llmq.contract.jobs import JobStore
from llmq.contract.models import JobState, LLMResponse, Usage
from llmq.worker.streaming import StreamWriter
from tests.support.jobs import new_job, with_job_store

#: A reader that never ends fails its test within this, not after pytest's global timeout.
pytestmark = pytest.mark.timeout(30)

JOB_ID = "job-s"
TTL_S = 600
WHOLE = LLMResponse(
    content="Hello, world", model="gpt-4o-mini", provider="openai",
    usage=Usage.of(prompt_tokens=5, completion_tokens=3),
)
RATE_LIMITED = {"type": "RateLimitedError", "message": "429 from openai", "retryable": True}
SPENT = {"type": "AllProvidersFailedError", "message": "every provider on the route failed", "retryable": False}


@pytest.fixture(autouse=True)
def _short_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that finds nothing new looks at the job record after one block: keep it short."""
    monkeypatch.setattr(streams, "BLOCK_MS", 50)


async def running_job(store: JobStore) -> StreamWriter:
    await store.create_many([new_job(JOB_ID)], TTL_S)
    assert (await store.claim(JOB_ID, 1, "worker-a", 30_000)).outcome == "ok"
    return StreamWriter(store.redis, JOB_ID, TTL_S)


async def end_job(store: JobStore, state: JobState, **fields: Any) -> None:
    flat = {name: json.dumps(value) for name, value in fields.items()}
    assert (await store.transition(JOB_ID, new_state=state, allowed=(JobState.RUNNING,), fields=flat)).moved


async def write_answer(writer: StreamWriter, pieces: list[str], attempt: int = 1) -> None:
    for piece in pieces:
        await writer.chunk(WHOLE.model_copy(update={"content": piece}), attempt)
    await writer.final(WHOLE, attempt)


async def read_all(store: JobStore, after_id: str = "0-0") -> list[LLMResponse]:
    return [response async for response in read_stream(store, JOB_ID, after_id)]


def test_chunks_come_in_order_and_the_final_one_carries_the_usage(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        await write_answer(writer, ["Hel", "lo, ", "world"])
        read = await read_all(store)
        assert [response.content for response in read] == ["Hel", "lo, ", "world", ""]
        assert all(response.metadata["attempt"] == 1 and response.metadata["job_id"] == JOB_ID for response in read[:3])
        final = read[-1]
        assert final.metadata["final"] is True and final.usage == WHOLE.usage
        assert [response.metadata["stream_id"] for response in read] == sorted(
            response.metadata["stream_id"] for response in read
        )

    with_job_store(redis_url, scenario)


def test_a_reader_waits_for_chunks_still_being_written(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        reader = asyncio.create_task(read_all(store))
        for piece in ("a", "b", "c"):
            await asyncio.sleep(0.07)  # longer than a block: the reader looks at the (running) job between
            await writer.chunk(WHOLE.model_copy(update={"content": piece}), 1)
        await writer.final(WHOLE, 1)
        read = await asyncio.wait_for(reader, timeout=10)
        assert [response.content for response in read] == ["a", "b", "c", ""]

    with_job_store(redis_url, scenario)


def test_resuming_after_an_id_loses_and_repeats_nothing(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        pieces = [f"piece {index} " for index in range(7)]
        await write_answer(writer, pieces)
        everything = await read_all(store)
        for cut in range(len(everything) - 1):  # resumed after the final entry, a read would wait for more
            resumed = await read_all(store, after_id=everything[cut].metadata["stream_id"])
            assert [response.metadata["stream_id"] for response in resumed] == [
                response.metadata["stream_id"] for response in everything[cut + 1 :]
            ]
        first_two = everything[1].metadata["stream_id"]
        rest = await read_all(store, after_id=first_two)
        assert "".join(response.content for response in everything[:2] + rest) == "".join(pieces)

    with_job_store(redis_url, scenario)


def test_a_reset_marks_where_a_failed_attempts_text_is_to_be_dropped(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        await writer.chunk(WHOLE.model_copy(update={"content": "Hel"}), 1)
        await writer.reset(1, "openai", "gpt-4o-mini", RATE_LIMITED)
        await write_answer(writer, ["Hello, ", "world"], attempt=2)
        read = await read_all(store)
        assert [(response.content, response.metadata.get("reset", False)) for response in read] == [
            ("Hel", False), ("", True), ("Hello, ", False), ("world", False), ("", False),
        ]
        reset = read[1]
        assert reset.metadata["error"] == RATE_LIMITED and reset.metadata["attempt"] == 1
        assert [response.metadata["attempt"] for response in read[2:4]] == [2, 2]

    with_job_store(redis_url, scenario)


def test_an_answer_not_streamed_comes_as_one_chunk_and_the_final(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        await writer.final(WHOLE, 1)  # served whole, e.g. from the cache
        read = await read_all(store)
        assert [response.content for response in read] == ["Hello, world", ""]
        assert read[-1].metadata["final"] is True

    with_job_store(redis_url, scenario)


def test_an_error_entry_raises_job_failed_with_the_jobs_error(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        writer = await running_job(store)
        await writer.chunk(WHOLE.model_copy(update={"content": "Hel"}), 1)
        await end_job(store, JobState.FAILED, error=SPENT)
        await writer.error(SPENT)
        read: list[LLMResponse] = []
        with pytest.raises(JobFailedError) as raised:
            async for response in read_stream(store, JOB_ID):
                read.append(response)
        assert [response.content for response in read] == ["Hel"]
        assert raised.value.error == SPENT and raised.value.job.state is JobState.FAILED
        assert str(raised.value) == f"job {JOB_ID} failed: AllProvidersFailedError: every provider on the route failed"

    with_job_store(redis_url, scenario)


def test_a_finished_job_with_nothing_more_in_its_stream_ends_the_read(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await running_job(store)
        await end_job(store, JobState.SUCCEEDED, result=WHOLE.model_dump(mode="json"))
        [only] = await read_all(store)
        assert only.content == WHOLE.content and only.usage == WHOLE.usage
        assert only.metadata == {"final": True, "job_id": JOB_ID}

    with_job_store(redis_url, scenario)


def test_a_job_that_ended_without_an_answer_raises(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await running_job(store)
        await end_job(store, JobState.CANCELLED, error={"type": "JobCancelledError", "message": "cancelled"})
        with pytest.raises(JobFailedError, match=f"job {JOB_ID} cancelled: JobCancelledError"):
            await read_all(store)

    with_job_store(redis_url, scenario)


def test_a_job_that_does_not_exist_raises_key_error(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        with pytest.raises(KeyError, match="no job 'job-s'"):
            await read_all(store)

    with_job_store(redis_url, scenario)
