"""The queue engine end to end: real redis-server, real `llmq worker` processes, fake
OpenAI servers over real HTTP, and the SQL ledger (SQLite here; PostgreSQL in test_engine_postgres)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmq import LLMRequest
from llmq.client.service import RequestError
from llmq.contract.models import JobState
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI
from tests.support.harness import Cluster, start_cluster

CONFIG = """
llm_service:
  fallback_chain: [primary, backup]
  context_fallbacks: {{gpt-4o-mini: gpt-4o-mini-128k}}
  retry: {{max_attempts_per_provider: 2, backoff_base_s: 0.05, backoff_max_s: 0.2, retry_after_cap_s: 1.5}}
  jobs: {{deadline_s: 60, lease_s: 5}}
  # Each test here injects its own failures into one shared cluster: the circuit breaker
  # (tested in test_health.py) must not carry one test's failures into the next.
  health: {{minimum_calls: 1000}}
  providers:
    primary:
      type: openai
      api_key: "{key}"
      base_url: "{primary}/v1"
      models: [gpt-4o-mini, gpt-4o-mini-128k]
      timeout: 1.5
    backup:
      type: openai
      api_key: "{key}"
      base_url: "{backup}/v1"
      models: [gpt-4o-mini]
    slow:
      type: mock
      models: [slow-model]
      options: {{latency_s: 2.0}}
"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    primary, backup = FakeOpenAI().start(), FakeOpenAI().start()
    yield primary, backup
    primary.stop()
    backup.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: tuple[FakeOpenAI, FakeOpenAI]) -> Iterator[Cluster]:
    primary, backup = fakes
    config = CONFIG.format(key=DEFAULT_API_KEY, primary=primary.url, backup=backup.url)
    started = start_cluster(tmp_path_factory.mktemp("engine"), config)
    started.start_workers(2, concurrency=100)
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _reset_fakes(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    for fake in fakes:
        fake.reset()


def ask(text: str, model: str = "gpt-4o-mini", **extra: object) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model=model, temperature=0, max_tokens=32, **extra)


def ledger(cluster: Cluster) -> Store:
    OutboxFlusher(cluster.redis_url, cluster.database_url).drain(timeout_s=30)
    return Store(cluster.database_url)


def test_a_batch_of_hundreds_completes_with_results_and_usage_in_redis_and_sql(cluster: Cluster, fakes) -> None:
    primary, _ = fakes
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"task {index}") for index in range(300)])
        batch = service.wait(batch_id, timeout_s=120)
        jobs = service.results(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == 300 and batch.total == 300
    assert [job.request.messages[0].content for job in jobs] == [f"task {index}" for index in range(300)]
    assert all(job.result.provider == "primary" and "fake" in job.result.content for job in jobs)
    assert all(job.result.usage.total_tokens > 0 for job in jobs)
    # At least one call per job; never a call without an attempt on record (a busy machine
    # may time a call out, or fail to connect, and retry it).
    assert len(jobs) <= len(primary.requests) <= sum(len(job.attempts) for job in jobs)
    store = ledger(cluster)
    usage = [row for row in store.usage_rows() if row["batch_id"] == batch_id]
    assert len(usage) == 300
    assert sum(row["total_tokens"] for row in usage) == sum(job.result.usage.total_tokens for job in jobs)
    assert {store.job(job.job_id)["state"] for job in jobs} == {"succeeded"}


@pytest.mark.parametrize(
    ("fault", "expected_error"),
    [
        (("status", 500), "ServerError"),
        (("status", 401), "AuthenticationError"),
        (("inject", "hang"), "ProviderTimeoutError"),
        (("inject", "reset"), "ProviderConnectionError"),
    ],
)
def test_falls_back_when_the_first_provider_fails(cluster: Cluster, fakes, fault, expected_error) -> None:
    primary, backup = fakes
    kind, value = fault
    if kind == "status":
        primary.fail_next(value, times=10)
    else:
        primary.inject(value, times=10)
    with cluster.service() as service:
        job = service.wait(service.submit(ask("fall back please")), timeout_s=60)
    assert job.state is JobState.SUCCEEDED
    assert job.result.provider == "backup"
    assert job.attempts[0]["provider"] == "primary" and job.attempts[0]["error_type"] == expected_error
    assert job.attempts[-1]["provider"] == "backup" and job.attempts[-1]["outcome"] == "succeeded"
    retryable = expected_error != "AuthenticationError"
    assert len([a for a in job.attempts if a["provider"] == "primary"]) == (2 if retryable else 1)
    assert len(backup.requests) == 1


def test_falls_back_when_the_first_provider_is_down(tmp_path: Path, fakes) -> None:
    _, backup = fakes
    config = CONFIG.format(key=DEFAULT_API_KEY, primary="http://127.0.0.1:9", backup=backup.url)
    down = start_cluster(tmp_path, config)
    try:
        down.start_workers(1)
        with down.service() as service:
            job = service.wait(service.submit(ask("is anyone there")), timeout_s=60)
    finally:
        down.stop()
    assert job.state is JobState.SUCCEEDED and job.result.provider == "backup"
    assert {attempt["error_type"] for attempt in job.attempts[:-1]} == {"ProviderConnectionError"}


def test_retry_after_is_honoured_on_the_same_provider(cluster: Cluster, fakes) -> None:
    primary, backup = fakes
    primary.fail_next(429, headers={"retry-after": "1"})
    with cluster.service() as service:
        job = service.wait(service.submit(ask("slow down")), timeout_s=60)
    assert job.state is JobState.SUCCEEDED and job.result.provider == "primary"
    assert [a["error_type"] for a in job.attempts[:-1]] == ["RateLimitedError"]
    first, second = (request.received_at for request in primary.requests)
    assert second - first >= 1.0
    assert backup.requests == []


def test_a_spent_route_fails_with_the_typed_error_and_every_attempt(cluster: Cluster, fakes) -> None:
    primary, backup = fakes
    primary.fail_next(503, times=10)
    backup.fail_next(503, times=10)
    with cluster.service() as service:
        job = service.wait(service.submit(ask("nobody can")), timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.error["type"] == "OverloadedError" and job.error["provider"] == "backup"
    assert [a["provider"] for a in job.attempts] == ["primary", "primary", "backup", "backup"]


def test_a_malformed_request_fails_at_once_without_fallback(cluster: Cluster, fakes) -> None:
    primary, backup = fakes
    primary.fail_next(400)
    with cluster.service() as service:
        job = service.wait(service.submit(ask("bad")), timeout_s=60)
    assert job.state is JobState.FAILED and job.error["type"] == "BadRequestError"
    assert len(job.attempts) == 1 and backup.requests == []


def test_cancelling_a_running_batch_stops_queued_jobs(cluster: Cluster) -> None:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"slow {index}", model="slow-model") for index in range(400)])
        time.sleep(0.5)
        cancelled = service.cancel(batch_id)
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert cancelled > 0
    assert batch.counts[JobState.CANCELLED] == cancelled
    assert batch.counts[JobState.SUCCEEDED] + cancelled == 400
    never_started = {job.job_id for job in jobs if job.state is JobState.CANCELLED and job.attempt == 0}
    assert never_started
    time.sleep(2.5)  # longer than one call: whatever was running has finished by now
    with cluster.service() as service:
        again = service.results(batch_id)
    assert [job.state for job in again] == [job.state for job in jobs]
    assert all(job.attempt == 0 and not job.attempts for job in again if job.job_id in never_started)


def test_duplicate_submission_never_runs_a_job_twice(cluster: Cluster, fakes) -> None:
    primary, _ = fakes
    with cluster.service() as service:
        first = service.submit(ask("once"), job_id="job_fixed_id_1")
        second = service.submit(ask("once"), job_id="job_fixed_id_1")
        items = [{"messages": [{"role": "user", "content": f"c{i}"}], "model": "gpt-4o-mini"} for i in range(3)]
        from llmq.client.service import BatchItem

        batch_items = [BatchItem(LLMRequest.model_validate(item), f"c{i}") for i, item in enumerate(items)]
        batch_id = service.submit_batch(batch_items)
        service.submit_batch(batch_items, batch_id=batch_id)  # the same file again
        service.wait(first, timeout_s=60)
        batch = service.wait(batch_id, timeout_s=60)
    assert first == second
    assert batch.total == 3 and batch.counts[JobState.SUCCEEDED] == 3
    contents = [json.loads(request.raw_body)["messages"][0]["content"] for request in primary.requests]
    assert sorted(contents) == ["c0", "c1", "c2", "once"]


def test_bad_requests_are_refused_before_anything_is_enqueued(cluster: Cluster) -> None:
    with cluster.service() as service:
        with pytest.raises(RequestError, match="no configured provider serves it"):
            service.submit(ask("x", model="no-such-model"))
        with pytest.raises(RequestError, match=r"item 2: .*no configured provider"):
            service.submit_batch([ask("fine"), ask("x", model="nope")], batch_id="batch_refused")
        assert service.batch("batch_refused") is None


def test_a_caller_without_keys_routes_to_providers_the_workers_hold_keys_for(tmp_path: Path, fakes) -> None:
    primary, _ = fakes
    config = """
llm_service:
  providers:
    keyed:
      type: openai
      api_key: "${LLMQ_TEST_WORKER_ONLY_KEY}"
      base_url: "%s/v1"
      models: [gpt-4o-mini]
""" % primary.url
    cluster = start_cluster(tmp_path, config)
    try:
        worker = cluster.add_worker(extra_env={"LLMQ_TEST_WORKER_ONLY_KEY": DEFAULT_API_KEY})
        from tests.support.harness import wait_for_workers

        wait_for_workers(cluster.redis_url, 1, [worker])
        assert not cluster.config.providers["keyed"].configured  # not in this (the caller's) environment
        with cluster.service() as service:
            job = service.wait(service.submit(ask("keys live in the worker")), timeout_s=60)
    finally:
        cluster.stop()
    assert job.state is JobState.SUCCEEDED and job.result.provider == "keyed"


def test_a_context_window_error_hops_to_the_larger_model_named_in_config(cluster: Cluster, fakes) -> None:
    from tests.support.fakes.openai import context_length_body

    primary, backup = fakes
    primary.fail_next(400, body=context_length_body())
    with cluster.service() as service:
        job = service.wait(service.submit(ask("a very long prompt")), timeout_s=60)
    assert job.state is JobState.SUCCEEDED
    assert [(a["provider"], a["model"]) for a in job.attempts] == [("primary", "gpt-4o-mini"), ("primary", "gpt-4o-mini-128k")]
    assert job.attempts[0]["error_type"] == "ContextWindowExceededError"
    assert [request.body["model"] for request in primary.requests] == ["gpt-4o-mini", "gpt-4o-mini-128k"]
    assert backup.requests == []
