"""The circuit breaker end to end with a bare `llmq worker` (no beat): poison requests do not
open it; a real outage does, and the worker's own health-check probes close it again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from llmq import LLMRequest
from llmq.contract import keys
from llmq.contract.models import JobState
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

POISON = "POISON-REQUEST"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[Cluster]:
    config = service_config(
        {"solo": openai_entry(fake, models=["gpt-4o-mini"])},
        retry=fast_retry(3),
        health={"cooldown_s": 1.0, "minimum_calls": 10, "failure_rate": 0.5},
    )
    started = start_cluster(tmp_path_factory.mktemp("circuit"), config)
    started.start_workers(1, concurrency=20)
    yield started
    started.stop()


def ask(text: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=0, max_tokens=16)


def circuit(cluster: Cluster) -> dict[str, str]:
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        return client.hgetall(keys.circuit("solo"))
    finally:
        client.close()


def test_poison_requests_fail_alone_and_never_open_the_circuit(cluster: Cluster, fake: FakeOpenAI) -> None:
    fake.poison(POISON, 500)
    requests = [ask(f"{POISON} {n}" if n % 10 == 0 else f"healthy {n}") for n in range(100)]
    with cluster.service() as service:
        batch = service.wait(service.submit_batch(requests), timeout_s=120)
        jobs = service.results(batch.batch_id)
    poisoned = [job for job in jobs if POISON in job.request.messages[0].content]
    healthy = [job for job in jobs if POISON not in job.request.messages[0].content]
    assert all(job.state is JobState.SUCCEEDED for job in healthy), [job.error for job in healthy if job.error]
    assert all(job.state is JobState.FAILED and job.error["type"] == "ServerError" for job in poisoned)
    assert all(len(job.attempts) == 3 for job in poisoned)  # every attempt used, on the one provider
    fields = circuit(cluster)
    assert fields.get("state", "closed") == "closed" and fields.get("times_opened", "0") == "0"


def test_an_outage_opens_it_and_the_workers_own_probe_closes_it_without_beat(cluster: Cluster, fake: FakeOpenAI) -> None:
    fake.fail_next(503, times=100_000)  # chat and the model list alike: the provider is down
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"during the outage {n}") for n in range(12)])
        deadline = time.monotonic() + 60
        while circuit(cluster).get("state") != "open":
            assert time.monotonic() < deadline, circuit(cluster)
            time.sleep(0.05)
        chat_calls = sum(1 for request in fake.requests if request.path.endswith("/chat/completions"))
        time.sleep(0.5)  # open, cooling down: nothing reaches the provider
        assert sum(1 for request in fake.requests if request.path.endswith("/chat/completions")) == chat_calls
        fake.reset()  # the provider is back: no beat runs, the waiting jobs' worker probes
        batch = service.wait(batch_id, timeout_s=120)
    fields = circuit(cluster)
    assert fields["state"] == "closed" and int(fields["times_opened"]) >= 1
    probes = [request for request in fake.requests if request.path == "/v1/models"]
    assert probes, "the half-open probe is a health check (the model list), not a job"
    assert batch.counts[JobState.SUCCEEDED] + batch.counts[JobState.FAILED] == 12
    assert batch.counts[JobState.SUCCEEDED] >= 1
