"""`LLMService.wait` never hangs silently: it says when Redis is away and when no live worker
consumes the queue its jobs wait in, gives up on a lost Redis after a bound with how to resume,
and interactive calls learn of a missing Redis or worker at once. Real redis-servers and a real
`llmq worker`; no mock."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmq.cli.embedded import RedisServer
from llmq.client.errors import NoLiveWorkerError, RedisUnreachableError
from llmq.client.service import LLMService
from llmq.client.sync import SyncLLMService
from llmq.client.waiting import WaitNotice
from llmq.contract.config import parse_config
from llmq.contract.models import JobState, LLMRequest
from tests.support.harness import Cluster, start_cluster

# `parked` has no worker: its jobs wait on llm.parked. A worker serves llm.steady.
CONFIG = """
llm_service:
  jobs: {deadline_s: 60, lease_s: 5}
  client: {redis_unreachable_s: %s}
  providers:
    steady:
      type: mock
      models: [gpt-4]
      options: {latency_s: 0.01}
    parked:
      type: mock
      models: [parked-model]
"""


def ask(model: str = "parked-model") -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": "hello"}], model=model)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("wait"), CONFIG % 120)
    started.start_workers(1, queues="steady")
    yield started
    started.stop()


def test_a_wait_says_which_queue_has_no_live_worker(cluster: Cluster) -> None:
    notices: list[WaitNotice | None] = []
    with cluster.service() as service:
        job_id = service.submit(ask())
        with pytest.raises(TimeoutError, match="not finished"):
            service.wait(job_id, timeout_s=1.0, on_notice=notices.append)
        served = service.wait(service.submit(ask("gpt-4")), timeout_s=30, on_notice=notices.append)
        service.cancel(job_id)
    # A single request waits in the interactive lane's queue; a worker takes both lanes of `parked`.
    assert notices[0] == WaitNotice("no_live_worker", "no live worker on llm.parked.interactive; start one with "
                                    "`llmq worker --queues parked`, or the whole stack with `llmq up`")
    assert served.state is JobState.SUCCEEDED
    assert notices[1:] == []  # the served job's wait had nothing to say


def test_a_batch_wait_names_the_queues_its_waiting_jobs_are_in(cluster: Cluster) -> None:
    notices: list[WaitNotice | None] = []
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(), ask("gpt-4"), ask()])
        with pytest.raises(TimeoutError):
            service.wait(batch_id, timeout_s=3.0, on_notice=notices.append)
        service.cancel(batch_id)
    assert [notice.text for notice in notices if notice] == [
        "no live worker on llm.parked; start one with `llmq worker --queues parked`, or the whole stack with `llmq up`"
    ]


def test_an_interactive_call_learns_at_once_that_no_worker_serves_its_route(cluster: Cluster) -> None:
    with cluster.service() as service:
        with pytest.raises(NoLiveWorkerError) as refused:
            service.require_live_worker(ask())
        service.require_live_worker(ask("gpt-4"))  # served: no error
    assert refused.value.queues == ["llm.parked.interactive"]
    assert "`llmq worker --queues parked`" in str(refused.value) and "`llmq up`" in str(refused.value)


def test_ping_says_at_once_that_redis_is_not_there(closed_port: int) -> None:
    config = parse_config(CONFIG % 120)
    with SyncLLMService(config, redis_url=f"redis://127.0.0.1:{closed_port}/0") as service:
        with pytest.raises(RedisUnreachableError, match=r"cannot reach Redis at redis://127\.0\.0\.1:\d+/0 \(given\) "
                                                        r"within 2 s .*start the stack with `llmq up`"):
            service.ping()


def test_a_wait_reports_a_lost_redis_and_carries_on_once_it_is_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistence=True).start()
    notices: list[WaitNotice | None] = []
    try:
        with SyncLLMService(parse_config(CONFIG % 120), redis_url=server.url) as service:
            job_id = service.submit(ask())  # no worker anywhere: it stays queued
            outage = threading.Thread(target=lambda: (time.sleep(0.5), server.kill(), time.sleep(2.5), server.start(),
                                                      time.sleep(1.0), service.cancel(job_id)))
            outage.start()
            record = service.wait(job_id, timeout_s=60, on_notice=notices.append)
            outage.join()
    finally:
        server.stop()
    assert record.state is JobState.CANCELLED  # the wait rode through and saw the end
    kinds = [notice.kind if notice else None for notice in notices]
    lost = kinds.index("redis_unreachable")
    assert "no_live_worker" in kinds[:lost]
    assert kinds[lost + 1 :].count("redis_unreachable") >= 1  # the seconds count up on the bar
    assert "Redis unreachable for 2 s, retrying" in [notice.text for notice in notices if notice]
    assert kinds[lost:].index("redis_restarted") > 0  # back, with a new run id
    assert kinds[-1] not in ("redis_unreachable", "redis_restarted")  # and the notice went once Redis answered


def test_a_wait_gives_up_on_a_lost_redis_after_its_bound_saying_how_to_resume(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistence=False).start()
    try:
        with SyncLLMService(parse_config(CONFIG % 1.5), redis_url=server.url) as service:
            batch_id = service.submit_batch([ask()])
            server.kill()
            with pytest.raises(RedisUnreachableError) as gave_up:
                service.wait(batch_id)
    finally:
        server.stop()
    message = str(gave_up.value)
    assert re.match(rf"Redis unreachable for \d+ s while waiting for {batch_id} ", message), message
    assert message.endswith(f"once Redis is back, run `llmq results {batch_id}`") and "\n" not in message


def test_a_stream_read_says_which_queue_has_no_live_worker(cluster: Cluster) -> None:
    notices: list[WaitNotice | None] = []

    async def read() -> None:
        service = LLMService(cluster.config, redis_url=cluster.redis_url)
        try:
            job_id = await service.submit(ask().model_copy(update={"stream": True}))
            chunks = service.stream_job(job_id, on_notice=notices.append)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(chunks), timeout=2.5)  # nothing comes: no worker on llm.parked
            await service.cancel(job_id)
        finally:
            await service.aclose()

    asyncio.run(read())
    assert [notice.kind for notice in notices if notice] == ["no_live_worker"]
    assert "llm.parked" in notices[0].text  # type: ignore[union-attr]
