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

from llmq import LLMRequest
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster


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


def pool_stats(cluster: Cluster) -> dict:
    from llmq.worker.app import create_app
    from llmq.worker.settings import WorkerSettings

    app = create_app(WorkerSettings(cluster.config, cluster.redis_url))
    stats: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while not stats and time.monotonic() < deadline:
        stats = app.control.inspect(timeout=2.0).stats() or {}
    (worker_stats,) = stats.values()
    return worker_stats["pool"]


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_with_the_thread_pool_every_slot_has_its_thread_before_the_first_job(cluster: Cluster) -> None:
    # `--pool threads`: a burst then never waits for threads to start (worker/app.py prestart_threads).
    cluster.start_workers(1, concurrency=24, pool="threads")
    stats = pool_stats(cluster)
    assert stats["max-concurrency"] == 24
    assert stats["threads"] == 24


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads thread counts from /proc")
def test_the_default_pool_holds_many_calls_in_one_process_without_a_thread_each(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    # worker/pool.py: every job a coroutine on the process's loop; Celery's slots are not threads.
    fake.latency_s = 3.0
    cluster.start_workers(1, concurrency=120)
    (worker,) = cluster.workers
    idle_threads = thread_count(worker.pid)
    stats = pool_stats(cluster)
    assert stats["max-concurrency"] == 120
    assert stats["consumer-silent-s"] < 10  # the watchdog pokes the consumer's hub every 5 s; it answered
    requests = [LLMRequest(messages=[{"role": "user", "content": f"held {index}"}], model="gpt-4o-mini", max_tokens=8)
                for index in range(120)]
    busy_threads = 0
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        deadline = time.monotonic() + 60
        while not service.batch(batch_id).done and time.monotonic() < deadline:
            if fake.in_flight >= 60:
                busy_threads = max(busy_threads, thread_count(worker.pid))
            time.sleep(0.05)
        status = service.wait(batch_id, timeout_s=30)
    assert status.counts.get("succeeded") == 120, status
    assert fake.max_in_flight >= 60, fake.max_in_flight  # one process held them at once
    assert 0 < busy_threads <= idle_threads + 4, (idle_threads, busy_threads)  # and started no thread per call


def test_warm_shutdown_lets_running_jobs_finish_and_acks_them(cluster: Cluster, fake: FakeOpenAI) -> None:
    # SIGTERM is Celery's warm shutdown: running jobs end, their messages are acked, nothing runs twice.
    fake.latency_s = 2.0
    cluster.start_workers(1, concurrency=50)
    (worker,) = cluster.workers
    requests = [LLMRequest(messages=[{"role": "user", "content": f"stop {index}"}], model="gpt-4o-mini", max_tokens=8)
                for index in range(20)]
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        deadline = time.monotonic() + 30
        while fake.in_flight < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.in_flight == 20
        worker.stop(timeout_s=30)
        assert worker.process is not None and worker.process.returncode == 0
        status = service.batch(batch_id)
    assert status.counts.get("succeeded") == 20, status
    assert len(fake.requests) == 20  # none ran twice
    broker = redis.Redis.from_url(cluster.redis_url)
    assert broker.hlen("unacked") == 0 and broker.llen("llm.openai") == 0
