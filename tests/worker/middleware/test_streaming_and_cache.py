"""Streaming through the queue and the response cache, end to end with real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from llmq import LLMRequest
from llmq.client.service import JobFailedError, LLMService
from llmq.contract.models import JobState
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    service_config,
    start_cluster,
)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    primary, backup = FakeOpenAI(chunk_delay_s=0.02).start(), FakeOpenAI(chunk_delay_s=0.02).start()
    yield primary, backup
    primary.stop()
    backup.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes) -> Iterator[Cluster]:
    primary, backup = fakes
    providers = {"primary": openai_entry(primary, cache={"enabled": True, "ttl_s": 60}), "backup": openai_entry(backup)}
    config = service_config(providers, fallback_chain=["primary", "backup"], retry=fast_retry(1, backoff_max_s=0.1))
    started = start_cluster(tmp_path_factory.mktemp("stream"), config)
    started.start_workers(1)
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _reset(fakes) -> None:
    for fake in fakes:
        fake.reset()


def ask(text: str, temperature: float = 0.0) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=temperature, max_tokens=64)


async def collect(service: LLMService, request: LLMRequest) -> list:
    try:
        return [chunk async for chunk in service.stream_generate(request)]
    finally:
        await service.aclose()


def test_a_stream_is_read_end_to_end_with_usage_on_the_final_chunk(cluster: Cluster) -> None:
    chunks = asyncio.run(collect(LLMService(cluster.config, redis_url=cluster.redis_url), ask("stream me a task please")))
    text_chunks, final = chunks[:-1], chunks[-1]
    assert len(text_chunks) >= 2 and all(chunk.content for chunk in text_chunks)
    assert final.metadata["final"] is True and final.usage.total_tokens > 0
    assert "".join(chunk.content for chunk in text_chunks) == "Task: fake openai answer to 'stream me a task please'"
    ids = [chunk.metadata["stream_id"] for chunk in chunks]
    assert ids == sorted(ids, key=lambda value: tuple(int(part) for part in value.split("-")))


def test_an_interrupted_stream_resumes_with_nothing_lost_or_repeated(cluster: Cluster) -> None:
    async def run() -> tuple[list, list, str]:
        service = LLMService(cluster.config, redis_url=cluster.redis_url)
        try:
            first: list = []
            stream = service.stream_generate(ask("a long answer to interrupt"))
            async for chunk in stream:
                first.append(chunk)
                if len(first) == 2:
                    break
            await stream.aclose()  # the caller drops its connection part-way
            job_id, last_id = first[-1].metadata["job_id"], first[-1].metadata["stream_id"]
            rest = [chunk async for chunk in service.stream_job(job_id, after_id=last_id)]
            job = await service.wait(job_id, timeout_s=30)
            return first, rest, job.result.content
        finally:
            await service.aclose()

    first, rest, whole = asyncio.run(run())
    texts = [chunk.content for chunk in first + rest if not chunk.metadata.get("final")]
    assert "".join(texts) == whole
    ids = [chunk.metadata["stream_id"] for chunk in first + rest]
    assert len(ids) == len(set(ids))
    assert rest[-1].metadata["final"]


def test_a_stream_that_fails_part_way_falls_back_behind_a_reset_marker(cluster: Cluster, fakes) -> None:
    primary, backup = fakes
    primary.inject("truncate")
    chunks = asyncio.run(collect(LLMService(cluster.config, redis_url=cluster.redis_url), ask("break then recover")))
    resets = [index for index, chunk in enumerate(chunks) if chunk.metadata.get("reset")]
    assert len(resets) == 1 and resets[0] > 0, "primary streamed something, then the reset marker"
    assert chunks[resets[0]].metadata["error"]["type"] == "ProviderConnectionError"
    after = [chunk for chunk in chunks[resets[0] + 1 :] if not chunk.metadata.get("final")]
    assert {chunk.provider for chunk in after} == {"backup"}
    assert chunks[-1].metadata["final"] and chunks[-1].provider == "backup"
    assert "".join(chunk.content for chunk in after) == "Task: fake openai answer to 'break then recover'"
    assert len(backup.requests) == 1


def test_a_stream_whose_route_is_spent_raises_the_typed_error(cluster: Cluster, fakes) -> None:
    primary, backup = fakes
    primary.fail_next(400)
    with pytest.raises(JobFailedError) as caught:
        asyncio.run(collect(LLMService(cluster.config, redis_url=cluster.redis_url), ask("bad request")))
    assert caught.value.error["type"] == "BadRequestError"


def test_cache_hit_miss_and_opt_out(cluster: Cluster, fakes) -> None:
    primary, _ = fakes
    with cluster.service() as service:
        first = service.wait(service.submit(ask("cache me")), timeout_s=30)
        second = service.wait(service.submit(ask("cache me")), timeout_s=30)
        opted_out = service.wait(service.submit(ask("cache me"), cache=False), timeout_s=30)
        sampled = [service.wait(service.submit(ask("sampled", temperature=0.7)), timeout_s=30) for _ in range(2)]
    assert [job.state for job in (first, second, opted_out, *sampled)] == [JobState.SUCCEEDED] * 5
    assert second.result.metadata.get("cached") is True and not first.result.metadata.get("cached")
    assert second.result.content == first.result.content
    prompts = [request.body["messages"][0]["content"] for request in primary.requests]
    assert prompts.count("cache me") == 2, "miss, hit (no call), opt-out (call)"
    assert prompts.count("sampled") == 2, "temperature > 0 is not cached by default"
    OutboxFlusher(cluster.redis_url, cluster.database_url).drain()
    rows = {row["job_id"]: row for row in Store(cluster.database_url).usage_rows()}
    assert rows[second.job_id]["cached"] is True and rows[second.job_id]["cost_usd"] == 0
    assert rows[first.job_id]["cached"] is False
    with cluster.service() as service:
        stats = service.cache_stats()
    assert stats["primary"]["hits"] >= 1 and stats["primary"]["misses"] >= 1
