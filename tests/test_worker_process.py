"""`llmq worker` processes: Celery task events (what Flower shows) unless --no-events, and slots ready before the first job.

A real redis-server, real `llmq worker` processes and the fake OpenAI server; the test
listens on Celery's event channel the way Flower does and counts what each worker sends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import LLMRequest
from tests.fakes.openai import FakeOpenAI
from tests.harness import Cluster, openai_entry, service_config, start_cluster


@pytest.fixture()
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture()
def cluster(tmp_path: Path, fake: FakeOpenAI) -> Iterator[Cluster]:
    started = start_cluster(tmp_path, service_config({"openai": openai_entry(fake)}))
    yield started
    started.stop()


class EventListener:
    """Celery's task events on Redis pub/sub (kombu's fanout exchange `celeryev`), by type."""

    def __init__(self, redis_url: str) -> None:
        self.types: list[str] = []
        self._pubsub = redis.Redis.from_url(redis_url).pubsub()
        self._pubsub.psubscribe("*celeryev*")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                self.types += _event_types(message["data"])

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        return self.types


def _event_types(data: bytes) -> list[str]:
    import base64

    envelope = json.loads(data)
    body = json.loads(base64.b64decode(envelope["body"]))
    return [event["type"] for event in (body if isinstance(body, list) else [body])]


def run_jobs(cluster: Cluster, count: int) -> list[str]:
    listener = EventListener(cluster.redis_url)
    time.sleep(0.2)  # subscribed before the first message
    requests = [LLMRequest(messages=[{"role": "user", "content": f"event {index}"}], model="gpt-4o-mini", max_tokens=8)
                for index in range(count)]
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        assert service.wait(batch_id, timeout_s=60).done
    time.sleep(1.5)  # Celery flushes its buffered events about once a second
    return listener.stop()


def test_a_worker_sends_task_events_by_default(cluster: Cluster) -> None:
    cluster.start_workers(1)
    types = run_jobs(cluster, 3)
    assert types.count("task-received") == 3 and types.count("task-succeeded") == 3, types


def test_no_events_leaves_only_what_the_producer_sends(cluster: Cluster) -> None:
    cluster.start_workers(1, extra_args=("--no-events",))
    types = run_jobs(cluster, 3)
    assert types.count("task-sent") == 3, types  # the producer's, so the test really listened
    assert not {"task-received", "task-started", "task-succeeded"} & set(types), types


def test_every_slot_has_its_thread_before_the_first_job(cluster: Cluster) -> None:
    # A burst then never waits for threads to start (worker/app.py prestart_threads).
    from worker.app import create_app

    cluster.start_workers(1, concurrency=24)
    app = create_app(cluster.config, broker_url=cluster.redis_url)
    stats: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while not stats and time.monotonic() < deadline:
        stats = app.control.inspect(timeout=2.0).stats() or {}
    (worker_stats,) = stats.values()
    assert worker_stats["pool"]["max-concurrency"] == 24
    assert worker_stats["pool"]["threads"] == 24
