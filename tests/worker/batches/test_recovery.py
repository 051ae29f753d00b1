"""Provider batches survive the processes that tend them: a worker SIGKILLed while its provider
batch is being created or polled, and Redis killed and restarted with persistence. Afterwards
every line has run once: one batch at the provider per provider batch, one attempt and one
usage row per job, nothing lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmq.contract.models import JobState
from tests.reliability.support import assert_each_attempt_recorded_once, drain_ledger, wait_until
from tests.support.fakes.batch_clock import BatchTiming
from tests.support.fakes.openai_batches import FakeOpenAIBatches
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

pytestmark = pytest.mark.slow
BATCH_API = {"gather_s": 0.3, "poll_min_s": 0.2, "poll_max_s": 0.5}


@pytest.fixture
def fake() -> Iterator[FakeOpenAIBatches]:
    server = FakeOpenAIBatches(timing=BatchTiming(validating_s=0.2, in_progress_s=1.0, window_s=30)).start()
    yield server
    server.stop()


def cluster_for(root: Path, fake: FakeOpenAIBatches, *, persistence: bool = False) -> Cluster:
    config = service_config({"openai": openai_entry(fake, batch_api=BATCH_API)}, retry=fast_retry(2))
    return start_cluster(root, config, persistence=persistence)


def ask(index: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"line {index}"}], "model": "gpt-4o-mini", "max_tokens": 32}


def submitted(cluster: Cluster, count: int) -> str:
    """A batch of `count` lines submitted with a window, once its provider batch is at the provider."""
    cluster.start_workers(1)
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(index) for index in range(count)], completion_window="24h")
        wait_until(lambda: [r for r in service.provider_batches(batch_id) if r.remote_id], 30, "a submit")
    return batch_id


def assert_each_line_ran_once(cluster: Cluster, fake: FakeOpenAIBatches, batch_id: str, count: int) -> None:
    with cluster.service() as service:
        batch = service.wait(batch_id, timeout_s=90)
        jobs = service.results(batch_id)
        [record] = service.provider_batches(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == count
    assert len(fake.batches) == 1 and record.remote_id in fake.batches  # created once, never twice
    assert fake.sync_requests() == []
    assert_each_attempt_recorded_once(jobs)
    assert all([a["outcome"] for a in job.attempts] == ["succeeded"] for job in jobs)
    store = drain_ledger(cluster.redis_url, cluster.database_url)
    try:
        rows = [row for row in store.usage_rows() if row["job_id"] in {job.job_id for job in jobs}]
    finally:
        store.close()
    assert len(rows) == count and len({row["job_id"] for row in rows}) == count


def test_a_worker_killed_while_its_provider_batch_is_created_loses_and_duplicates_nothing(
    tmp_path: Path, fake: FakeOpenAIBatches,
) -> None:
    # The batch exists at the provider before its creation is answered: the worker dies in between,
    # never having learned the batch's id. The next worker finds it by its metadata and adopts it.
    fake.create_reply_delay_s = 5.0
    cluster = cluster_for(tmp_path, fake)
    try:
        cluster.start_workers(1)
        with cluster.service() as service:
            batch_id = service.submit_batch([ask(index) for index in range(30)], completion_window="24h")
        wait_until(lambda: fake.batches, 30, "the provider batch to exist at the provider")
        cluster.workers[0].kill()
        fake.create_reply_delay_s = 0.0
        cluster.start_workers(1)
        assert_each_line_ran_once(cluster, fake, batch_id, 30)
    finally:
        cluster.stop()


def test_a_worker_killed_while_polling_leaves_the_next_one_to_finish(tmp_path: Path, fake: FakeOpenAIBatches) -> None:
    fake.timing = BatchTiming(validating_s=0.2, in_progress_s=4.0, window_s=30)
    cluster = cluster_for(tmp_path, fake)
    try:
        batch_id = submitted(cluster, 20)
        cluster.workers[0].kill()
        time.sleep(1.0)
        cluster.start_workers(1)
        assert_each_line_ran_once(cluster, fake, batch_id, 20)
    finally:
        cluster.stop()


def test_a_redis_restart_with_persistence_keeps_every_provider_batch(tmp_path: Path, fake: FakeOpenAIBatches) -> None:
    fake.timing = BatchTiming(validating_s=0.2, in_progress_s=3.0, window_s=30)
    cluster = cluster_for(tmp_path, fake, persistence=True)
    try:
        batch_id = submitted(cluster, 20)
        time.sleep(1.2)  # past the append-only file's once-a-second fsync
        cluster.redis.kill()
        time.sleep(1.0)
        cluster.redis.start()
        assert_each_line_ran_once(cluster, fake, batch_id, 20)
    finally:
        cluster.stop()
