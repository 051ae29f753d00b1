"""Lanes end to end: a real `llmq worker`, a real redis-server, mock providers. An interactive call
is taken before a queue of batch messages in the broker, and goes before the batch line in a
provider's shared limits; two batches of different callers share a limited provider fairly.
Every check counts which jobs finished before which, never how long anything took."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from llmq import LLMRequest
from llmq.contract import keys
from llmq.contract.models import JobRecord, JobState, Lane
from tests.support.harness import Cluster, fast_retry, service_config, start_cluster

#: `slow` answers in 0.2 s and has no limits: a worker with two slots drains its queue at ten a second.
#: `limited` answers at once, 600 requests a minute (ten a second once its burst is spent).
PROVIDERS = {
    "slow": {"type": "mock", "models": ["slow-model"], "options": {"latency_s": 0.2}},
    "limited": {"type": "mock", "models": ["limited-model"], "rate_limits": {"requests_per_minute": 600}},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = service_config(PROVIDERS, retry=fast_retry(3), health={"minimum_calls": 1000},
                            lanes={"weights": {"small": 1, "huge": 1}})
    started = start_cluster(tmp_path_factory.mktemp("lanes"), config)
    started.start_workers(1, concurrency=2)
    yield started
    started.stop()


def ask(model: str, text: str, caller: str | None = None) -> LLMRequest:
    metadata = {"caller": caller} if caller else {}
    return LLMRequest(messages=[{"role": "user", "content": text}], model=model, max_tokens=8, metadata=metadata)


def finished_before(jobs: list[JobRecord], job: JobRecord) -> int:
    assert job.finished_at is not None
    return sum(1 for other in jobs if other.finished_at is not None and other.finished_at < job.finished_at)


def test_an_interactive_call_is_not_behind_a_queue_of_batch_messages(cluster: Cluster) -> None:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask("slow-model", f"bulk {n}") for n in range(120)])
        time.sleep(0.5)  # the worker is busy with the batch; most of it still waits in the broker
        interactive = service.submit(ask("slow-model", "now, please"))
        behind = service.submit(ask("slow-model", "after the batch"), lane=Lane.BATCH)
        service.wait(batch_id, timeout_s=120)
        done = service.wait(interactive, timeout_s=60)
        last = service.wait(behind, timeout_s=60)
        batch = service.results(batch_id)
    assert done.state is JobState.SUCCEEDED and service_lane(cluster, interactive) == "interactive"
    # Taken at the worker's next fetch: only the few batch jobs already taken finished before it...
    assert finished_before(batch, done) <= 20
    # ...while the same call in the batch lane waited for every batch message ahead of it.
    assert finished_before(batch, last) >= 115


def test_an_interactive_call_goes_before_the_batch_line_of_a_limited_provider(cluster: Cluster) -> None:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask("limited-model", f"bulk {n}") for n in range(100)])
        time.sleep(1.5)  # the provider's burst is spent and the batch waits in its line
        interactive = service.wait(service.submit(ask("limited-model", "now, please")), timeout_s=60)
        batch = service.results(batch_id)
        waiting = [job for job in batch if job.finished_at is None or job.finished_at > interactive.created_at]
        service.wait(batch_id, timeout_s=120)
        batch = service.results(batch_id)
    assert interactive.state is JobState.SUCCEEDED
    assert len(waiting) >= 50  # the batch line it came to
    served_meanwhile = [job for job in batch if interactive.created_at < job.finished_at < interactive.finished_at]
    assert len(served_meanwhile) <= 15, len(served_meanwhile)  # it went ahead of nearly all of it
    assert all(job.state is JobState.SUCCEEDED for job in batch)


def test_a_small_batch_is_served_beside_a_huge_one_not_after_it(cluster: Cluster) -> None:
    with cluster.service() as service:
        huge = service.submit_batch([ask("limited-model", f"huge {n}", caller="huge") for n in range(150)])
        time.sleep(2.0)
        small = service.submit_batch([ask("limited-model", f"small {n}", caller="small") for n in range(15)])
        service.wait(small, timeout_s=120)
        service.wait(huge, timeout_s=120)
        huge_jobs, small_jobs = service.results(huge), service.results(small)
    small_started = min(job.created_at for job in small_jobs)
    small_done = max(job.finished_at for job in small_jobs)
    huge_meanwhile = [job for job in huge_jobs if small_started < job.finished_at < small_done]
    huge_after = [job for job in huge_jobs if job.finished_at > small_done]
    # Equal weights: about one huge job per small one while both wait, and the huge batch was far
    # from done (first come, first served would have put all 15 after every huge job).
    assert len(huge_meanwhile) <= 2 * len(small_jobs) + 8, len(huge_meanwhile)
    assert len(huge_after) >= 50, len(huge_after)


def service_lane(cluster: Cluster, job_id: str) -> str:
    """The lane the job's record keeps."""
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        return client.hget(keys.job(job_id), "lane") or ""
    finally:
        client.close()
