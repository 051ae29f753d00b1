"""Flower on a real cluster: it shows the workers, queues and tasks, behind basic auth,
and nothing it serves carries the provider's API key or the Redis password.

A real redis-server with a password, a real `llmq worker` (which sends task events),
a fake OpenAI server that knows only a canary key and, when it fails, echoes that key
back in its error body (the worst case), and Flower started as the README starts it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmq import LLMRequest
from llmq.cli.embedded import free_port
from llmq.contract.models import JobState
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    service_config,
    start_cluster,
)

CANARY_KEY = f"sk-canary-{secrets.token_hex(16)}"
REDIS_PASSWORD = f"redis-pw-{secrets.token_hex(8)}"
FLOWER_USER, FLOWER_PASSWORD = "admin", f"flower-pw-{secrets.token_hex(8)}"
JOBS = 8

# Flower, a worker and a password-protected redis-server start once for the module.
pytestmark = pytest.mark.slow


@dataclass
class Flower:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, *, auth: bool = True) -> httpx.Response:
        credentials = (FLOWER_USER, FLOWER_PASSWORD) if auth else None
        return httpx.get(self.url + path, auth=credentials, timeout=10.0, follow_redirects=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_flower(cluster: Cluster) -> Flower:
    port = free_port()
    log_path = cluster.root / "flower.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
    env.update(LLMQ_REDIS_URL=cluster.redis_url, LLMQ_CONFIG=str(cluster.config_path), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "llmq.worker.app", "flower", f"--port={port}", "--address=127.0.0.1",
         f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}"],
        env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    flower = Flower(port, process, log_path)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"flower exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if flower.get("/").status_code == 200:
                return flower
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            flower.stop()
            raise TimeoutError(f"flower did not answer:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=CANARY_KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[Cluster]:
    providers = {
        "primary": openai_entry(fake, api_key=CANARY_KEY),
        "backup": {"type": "mock", "models": ["gpt-4o-mini"], "options": {"latency_s": 0.01}},
    }
    config = service_config(providers, fallback_chain=["primary", "backup"], retry=fast_retry(2))
    started = start_cluster(tmp_path_factory.mktemp("flower"), config, redis_password=REDIS_PASSWORD)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def flower(cluster: Cluster) -> Iterator[Flower]:
    # Flower first: it only knows the tasks whose events it receives.
    running = start_flower(cluster)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def finished_jobs(cluster: Cluster, flower: Flower, fake: FakeOpenAI) -> list[Any]:
    cluster.start_workers(1, concurrency=20)
    echo = {"error": {"message": f"upstream trouble for key {CANARY_KEY}", "type": "server_error"}}
    fake.fail_next(500, times=2, body=echo)
    fake.fail_next(401, times=1, body=echo)
    requests = [LLMRequest(messages=[{"role": "user", "content": f"flower {index}"}], model="gpt-4o-mini",
                           temperature=0, max_tokens=16) for index in range(JOBS)]
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == JOBS
    assert any(len(job.attempts) > 1 for job in jobs)  # the failures really happened
    return jobs


def wait_for(check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_flower_refuses_requests_without_credentials(flower: Flower) -> None:
    for path in ("/", "/tasks", "/api/workers", "/api/tasks", "/api/queues/length"):
        assert flower.get(path, auth=False).status_code == 401, path
    wrong = httpx.get(flower.url + "/", auth=(FLOWER_USER, "wrong"), timeout=10.0)
    assert wrong.status_code == 401


def test_flower_shows_the_tasks_of_every_job(flower: Flower, finished_jobs: list[Any]) -> None:
    job_ids = {job.job_id for job in finished_jobs}

    def succeeded_tasks() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks").json()
        done = {task_id: task for task_id, task in tasks.items() if task_id in job_ids and task["state"] == "SUCCESS"}
        return tasks if len(done) == len(job_ids) else None

    tasks = wait_for(succeeded_tasks)
    assert tasks, flower.get("/api/tasks").text
    for job_id in job_ids:
        task = tasks[job_id]  # the job id is the Celery task id on every hop
        assert task["name"] == "llmq.generate"
        assert task["args"].startswith(f"['{job_id}', ")  # (job_id, dispatch): nothing else travels
        assert task["routing_key"] in {"llm.primary", "llm.backup"}
    info = flower.get(f"/api/task/info/{next(iter(job_ids))}")
    assert info.status_code == 200 and info.json()["name"] == "llmq.generate"


def test_flower_shows_the_worker_and_its_queues(flower: Flower, finished_jobs: list[Any]) -> None:
    workers = wait_for(lambda: flower.get("/api/workers?refresh=1").json())
    assert len(workers) == 1, workers
    (name, details), = workers.items()
    assert name.startswith("celery@")
    assert {queue["name"] for queue in details["active_queues"]} == {"llm.primary", "llm.backup"}
    lengths = flower.get("/api/queues/length")
    assert lengths.status_code == 200
    assert {"llm.primary", "llm.backup"} <= {queue["name"] for queue in lengths.json()["active_queues"]}


def test_nothing_flower_serves_carries_a_secret(flower: Flower, finished_jobs: list[Any]) -> None:
    job_id = finished_jobs[0].job_id
    workers = wait_for(lambda: flower.get("/api/workers?refresh=1").json())
    worker_name = next(iter(workers))
    paths = ["/", "/workers", "/tasks", "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0&columns[0][data]=name&order[0][dir]=asc", "/broker",
             "/api/workers", "/api/tasks", "/api/queues/length", "/api/task/types", f"/api/task/info/{job_id}",
             f"/task/{job_id}", f"/worker/{worker_name}", "/metrics"]
    for path in paths:
        response = flower.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert CANARY_KEY not in response.text, path
        assert CANARY_KEY[len("sk-canary-"):] not in response.text, path
        assert REDIS_PASSWORD not in response.text, path
        if path.startswith("/tasks/datatable"):  # what the /tasks page renders
            assert job_id in response.text
    assert CANARY_KEY not in flower.log_path.read_text()
