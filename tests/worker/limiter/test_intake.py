"""Intake: `submit_batch` publishes a batch's messages pipelined (kombu's `Producer.batch`: each
message's LPUSH and its task-sent event's PUBLISH, ~500 messages per Redis round trip), and on
real workers every job arrives and runs once. When a pipeline fails, delivery is uncertain: the
messages go out again one by one, and a job delivered twice still runs once.

One round trip per message made a batch of 2,000 take 26-76 s while workers kept Redis busy
(llmq.contract.queueing.publish_messages); these tests count round trips and runs, never time.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.exceptions import BatchPublishError
from kombu.transport.redis import PublishBatch

from llmq import LLMRequest
from llmq.contract.models import JobRecord, JobState
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[Cluster]:
    config = service_config({"openai": openai_entry(fake)}, jobs={"deadline_s": 120, "lease_s": 10})
    started = start_cluster(tmp_path_factory.mktemp("intake"), config)
    started.start_workers(2, concurrency=20)
    yield started
    started.stop()


class SentEvents:
    """Collects the job ids of the task-sent events Celery publishes (what Flower shows as sent)."""

    def __init__(self, redis_url: str) -> None:
        self.job_ids: list[str] = []
        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(**{"*celeryev*": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        envelope = json.loads(message["data"])
        body = json.loads(base64.b64decode(envelope["body"]))
        for event in body if isinstance(body, list) else [body]:  # workers send theirs in groups
            if event.get("type") == "task-sent":
                self.job_ids.append(event["uuid"])

    def stop(self) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()


def requests(count: int, tag: str) -> list[LLMRequest]:
    return [LLMRequest(messages=[{"role": "user", "content": f"{tag} {index}"}], model="gpt-4o-mini", max_tokens=8)
            for index in range(count)]


def run_batch(cluster: Cluster, count: int, tag: str) -> tuple[list[JobRecord], list[str]]:
    events = SentEvents(cluster.redis_url)
    try:
        with cluster.service() as service:
            batch_id = service.submit_batch(requests(count, tag))
            service.wait(batch_id, timeout_s=120)
            jobs = service.results(batch_id)
        # Every event published before the batch finished; give the subscriber a moment to read them.
        time.sleep(0.5)
    finally:
        events.stop()
    return jobs, events.job_ids


def assert_each_ran_once(jobs: list[JobRecord], count: int) -> None:
    assert len(jobs) == count
    assert {job.state for job in jobs} == {JobState.SUCCEEDED}
    assert all(len(job.attempts) == 1 for job in jobs), "a job delivered twice must run once"


def test_a_batch_is_published_in_few_round_trips_and_every_job_runs_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []
    flush = PublishBatch.flush

    def counting_flush(self: PublishBatch) -> None:
        flushed.append(self._buffered)
        flush(self)

    monkeypatch.setattr(PublishBatch, "flush", counting_flush)
    jobs, sent = run_batch(cluster, 600, "pipelined")

    assert_each_ran_once(jobs, 600)
    assert sum(flushed) == 2 * 600  # an LPUSH and a task-sent PUBLISH per message...
    assert len([size for size in flushed if size]) <= 4  # ...in a handful of round trips, not 1,200
    assert sorted(sent) == sorted(job.job_id for job in jobs)  # the task id is the job id, as Flower shows it


def test_when_a_pipeline_fails_its_messages_go_out_again_and_no_job_runs_twice(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush = PublishBatch.flush

    def delivered_then_failed(self: PublishBatch) -> None:
        flush(self)  # the worst case: Redis ran the commands but the reply was lost
        raise BatchPublishError("Redis publish batch failed; delivery is uncertain")

    monkeypatch.setattr(PublishBatch, "flush", delivered_then_failed)
    jobs, sent = run_batch(cluster, 100, "failed-pipeline")

    assert_each_ran_once(jobs, 100)
    assert sorted(sent) == sorted(2 * [job.job_id for job in jobs])  # each message went out twice
