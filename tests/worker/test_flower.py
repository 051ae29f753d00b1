"""Flower on a real cluster: it shows the workers, queues and tasks, behind basic auth,
tells how each job ended, names each job by its label, and nothing it serves carries
the provider's API key, the Redis password or a prompt.

A real redis-server with a password, a real `llmq worker` (which sends task events),
fake OpenAI servers that know only a canary key and, when they fail, echo that key
back in their error body (the worst case), and Flower started as `llmq up` starts it.
Beside Flower's own API, the test keeps Celery's event state the way Flower builds it
(celery.events.state.State fed by an event receiver), to see every state a task went
through, not only the last.
"""

from __future__ import annotations

import ast
import os
import secrets
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from celery.events.state import State

from llmq import BatchItem, LLMRequest
from llmq.cli.embedded import free_port
from llmq.cli.flower import flower_command
from llmq.contract import keys
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
#: In every prompt: Flower must never show it.
PROMPT_MARK = f"prompt-text-{secrets.token_hex(8)}"
REDIS_PASSWORD = f"redis-pw-{secrets.token_hex(8)}"
FLOWER_USER, FLOWER_PASSWORD = "admin", f"flower-pw-{secrets.token_hex(8)}"
JOBS = 8
PROVIDERS = ("primary", "backup", "refusing", "rescue", "strict", "slow", "limited")

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
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LLMQ_", "FLOWER_"))}
    env.update(LLMQ_REDIS_URL=cluster.redis_url, LLMQ_CONFIG=str(cluster.config_path), PYTHONUNBUFFERED="1",
               FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}")
    process = subprocess.Popen(
        flower_command(port), env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
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


class EventState:
    """Celery's event state as Flower builds it, plus every state each task went through."""

    def __init__(self, redis_url: str) -> None:
        self.app = Celery("flower-test", broker=redis_url, set_as_current=False)
        self.state = State()
        self.history: dict[str, list[str]] = defaultdict(list)
        self.hosts: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self._ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._capture, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.state.event(event)
        if event["type"].startswith("task-"):
            self.history[event["uuid"]].append(self.state.tasks[event["uuid"]].state)
            self.hosts[event["uuid"]].append((event["type"], event["hostname"]))

    def _capture(self) -> None:
        with self.app.connection() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


@dataclass
class Scenario:
    """One job of each kind, by custom id, in one batch, and one job that ran out of time."""

    batch_id: str
    job_ids: dict[str, str]
    late_job_id: str


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=CANARY_KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refusing() -> Iterator[FakeOpenAI]:
    """Knows another key: every call is a 401, and the job falls back to the next provider."""
    server = FakeOpenAI(api_key="sk-proj-the-key-this-server-expects-0123456789").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict() -> Iterator[FakeOpenAI]:
    """Refuses every request with a 400 (no retry, no fallback) and echoes the key in its error body."""
    server = FakeOpenAI(api_key=CANARY_KEY).start()
    echo = {"error": {"message": f"bad request for key {CANARY_KEY}", "type": "invalid_request_error"}}
    server.fail_next(400, 10**6, body=echo)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited() -> Iterator[FakeOpenAI]:
    """Answers every call with a 429 and a long retry-after: its jobs wait in the delayed set, no message out."""
    server = FakeOpenAI(api_key=CANARY_KEY).start()
    server.fail_next(429, 10**6, headers={"retry-after": "30"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI, refusing: FakeOpenAI, strict: FakeOpenAI,
    limited: FakeOpenAI,
) -> Iterator[Cluster]:
    providers = {
        "primary": openai_entry(fake, api_key=CANARY_KEY),
        "backup": {"type": "mock", "models": ["gpt-4o-mini"], "options": {"latency_s": 0.01}},
        "refusing": openai_entry(refusing, api_key=CANARY_KEY, models=["fallback-model"]),
        "rescue": {"type": "mock", "models": ["fallback-model"], "options": {"latency_s": 0.01}},
        "strict": openai_entry(strict, api_key=CANARY_KEY, models=["strict-model"]),
        "slow": {"type": "mock", "models": ["slow-model"], "options": {"latency_s": 3.0}},
        "limited": openai_entry(limited, api_key=CANARY_KEY, models=["limited-model"]),
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
def events(cluster: Cluster) -> Iterator[EventState]:
    listening = EventState(cluster.redis_url)
    yield listening
    listening.stop()


@pytest.fixture(scope="module")
def finished_jobs(cluster: Cluster, flower: Flower, events: EventState, fake: FakeOpenAI) -> list[Any]:
    cluster.start_workers(1, concurrency=20)
    echo = {"error": {"message": f"upstream trouble for key {CANARY_KEY}", "type": "server_error"}}
    fake.fail_next(500, times=2, body=echo)
    fake.fail_next(401, times=1, body=echo)
    requests = [LLMRequest(messages=[{"role": "user", "content": f"{PROMPT_MARK} {index}"}], model="gpt-4o-mini",
                           temperature=0, max_tokens=16) for index in range(JOBS)]
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == JOBS
    assert any(len(job.attempts) > 1 for job in jobs)  # the failures really happened
    return jobs


def ask(model: str, custom_id: str) -> BatchItem:
    request = LLMRequest(messages=[{"role": "user", "content": f"{PROMPT_MARK} {custom_id}"}], model=model,
                         temperature=0, max_tokens=16, metadata={"caller": "flower-test"})
    return BatchItem(request, custom_id)


@pytest.fixture(scope="module")
def scenario(cluster: Cluster, flower: Flower, finished_jobs: list[Any]) -> Scenario:
    """A success, a fallback (401, then another provider), a refused request (400), a cancel while
    the provider call runs, a cancel while the job waits out a 429 (no message anywhere), and a job
    whose deadline passes while it waits (failed by the reaper)."""
    items = [ask("gpt-4o-mini", "ok-1"), ask("fallback-model", "fallback-1"), ask("strict-model", "refused-1"),
             ask("slow-model", "cancelled-1"), ask("limited-model", "waiting-1")]
    with cluster.service() as service:
        late_job_id = service.submit(ask("limited-model", "late").request, deadline_s=3)
        batch_id = service.submit_batch(items)
        job_ids = {job.custom_id: job.job_id for job in service.results(batch_id)}
        assert wait_for(lambda: service.poll(job_ids["cancelled-1"]).state is JobState.RUNNING)
        assert service.cancel(job_ids["cancelled-1"]) == 1
        assert wait_for(lambda: service.poll(job_ids["waiting-1"]).state is JobState.RATE_LIMITED)
        # Its task has ended too (its RETRY reached Flower): no message anywhere when it is cancelled. (Cancelled
        # sooner, the worker that found it ended could say REVOKED before that task's RETRY, which replaces it.)
        flower_task(flower, job_ids["waiting-1"], "RETRY")
        assert service.cancel(job_ids["waiting-1"]) == 1
        batch = service.wait(batch_id, timeout_s=60)
        late = service.wait(late_job_id, timeout_s=30)
    assert batch.counts[JobState.SUCCEEDED] == 2 and batch.counts[JobState.FAILED] == 1, batch
    assert batch.counts[JobState.CANCELLED] == 2, batch
    assert late.state is JobState.FAILED and late.error["type"] == "DeadlineExceededError", late
    return Scenario(batch_id, job_ids, late_job_id)


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
    for job in finished_jobs:
        task = tasks[job.job_id]  # the job id is the Celery task id on every hop
        assert task["name"] == "llmq.generate"
        assert task["routing_key"] in {"llm.primary", "llm.backup"}
        # The row names the job (contract/labels.py), and the result sums it up.
        label = ast.literal_eval(task["kwargs"])
        assert label["batch_id"] == job.batch_id and label["model"] == "gpt-4o-mini"
        assert label["provider"] == job.result.provider and label["attempt"] == len(job.attempts)
        assert task["retries"] == len(job.attempts) - 1
        assert f"via={job.result.provider}/" in task["args"] and f"attempt={len(job.attempts)}" in task["args"]
        result = ast.literal_eval(task["result"])
        assert result["state"] == "succeeded" and result["provider"] == job.result.provider
        assert result["completion_tokens"] == job.result.usage.completion_tokens
    info = flower.get(f"/api/task/info/{next(iter(job_ids))}")
    assert info.status_code == 200 and info.json()["name"] == "llmq.generate"


def flower_task(flower: Flower, job_id: str, state: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        task = flower.get("/api/tasks").json().get(job_id)
        return task if task and task["state"] == state else None

    task = wait_for(reached)
    assert task, (job_id, state, flower.get("/api/tasks").json().get(job_id))
    return task


def test_each_job_ends_in_flower_as_it_ended(
    cluster: Cluster, flower: Flower, events: EventState, scenario: Scenario
) -> None:
    ids = scenario.job_ids
    ok = flower_task(flower, ids["ok-1"], "SUCCESS")
    assert ast.literal_eval(ok["result"])["provider"] == "primary" and ok["retries"] == 0

    # The fallback: RETRY on the first provider, with the typed error as the reason, then SUCCESS on the next.
    fallback = flower_task(flower, ids["fallback-1"], "SUCCESS")
    assert ast.literal_eval(fallback["result"])["provider"] == "rescue"
    assert fallback["retries"] == 1 and fallback["retried"] is not None
    assert fallback["exception"].startswith("AuthenticationError(")
    assert "via=rescue/fallback-model attempt=2" in fallback["args"]
    assert "next: rescue/fallback-model, attempt 2" in fallback["traceback"]

    # The refused request: FAILURE, with the typed error as the job's record stores it.
    refused = flower_task(flower, ids["refused-1"], "FAILURE")
    with cluster.service() as service:
        record = service.poll(ids["refused-1"])
    assert record.error["type"] == "BadRequestError" and "[redacted]" in record.error["message"]
    assert refused["exception"] == f"BadRequestError({record.error['message']!r})"

    cancelled = flower_task(flower, ids["cancelled-1"], "REVOKED")
    assert "custom_id=cancelled-1" in cancelled["args"]
    # Cancelled while it waited out a 429, with no message anywhere: a worker says so all the same.
    waiting = flower_task(flower, ids["waiting-1"], "REVOKED")
    assert "custom_id=waiting-1" in waiting["args"]
    # Failed by the reaper when its deadline passed while it waited: FAILURE with its typed error.
    late = flower_task(flower, scenario.late_job_id, "FAILURE")
    assert late["exception"].startswith("DeadlineExceededError('job did not finish before its deadline")

    # Every state each task went through, as Flower's event state saw them.
    history = {custom_id: events.history[job_id] for custom_id, job_id in ids.items()}
    assert history["ok-1"][-1] == "SUCCESS" and "RETRY" not in history["ok-1"], history
    assert history["fallback-1"][-1] == "SUCCESS", history
    assert history["fallback-1"].index("RETRY") < history["fallback-1"].index("SUCCESS"), history
    assert history["refused-1"][-1] == "FAILURE" and "RETRY" not in history["refused-1"], history
    assert history["cancelled-1"][-1] == "REVOKED", history
    assert history["waiting-1"][-2:] == ["RETRY", "REVOKED"], history
    late_history = events.history[scenario.late_job_id]
    assert late_history[-2:] == ["RETRY", "FAILURE"], late_history
    # Every task event but the producers' task-sent came from the worker: Flower lists no phantom worker.
    senders = {host for hosts in events.hosts.values() for kind, host in hosts if kind != "task-sent"}
    assert len(senders) == 1 and next(iter(senders)).startswith("celery@"), senders
    # The worker that held the cancelled job said so when its call came back.
    assert any(kind == "task-revoked" and host.startswith("celery@") for kind, host in events.hosts[ids["cancelled-1"]])


def test_every_message_was_acked_whatever_its_end(cluster: Cluster, scenario: Scenario) -> None:
    # FAILURE, RETRY and REVOKED ack like SUCCESS does (task_acks_on_failure_or_timeout): nothing stays behind.
    broker = redis.Redis.from_url(cluster.redis_url)
    assert wait_for(lambda: broker.hlen("unacked") == 0), broker.hkeys("unacked")
    queues = [queue for name in PROVIDERS for queue in keys.lane_queues(name)]
    assert all(broker.llen(queue) == 0 for queue in queues)


def test_a_job_is_found_in_flower_by_its_custom_id(flower: Flower, scenario: Scenario) -> None:
    flower_task(flower, scenario.job_ids["fallback-1"], "SUCCESS")
    found = flower.get("/api/tasks?search=kwargs:custom_id=fallback-1").json()
    assert list(found) == [scenario.job_ids["fallback-1"]]
    by_batch = flower.get(f"/api/tasks?search=kwargs:batch_id={scenario.batch_id}").json()
    assert set(by_batch) == set(scenario.job_ids.values())
    failed = flower.get(f"/api/tasks?state=FAILURE&search=kwargs:batch_id={scenario.batch_id}").json()
    assert list(failed) == [scenario.job_ids["refused-1"]]


def test_flower_shows_the_worker_and_its_queues(flower: Flower, finished_jobs: list[Any]) -> None:
    workers = wait_for(lambda: flower.get("/api/workers?refresh=1").json())
    assert len(workers) == 1, workers
    (name, details), = workers.items()
    assert name.startswith("celery@")
    # Each provider's two queues: llm.<name> (batch) and llm.<name>.interactive.
    assert {queue["name"] for queue in details["active_queues"]} == {
        queue for name in PROVIDERS for queue in (f"llm.{name}", f"llm.{name}.interactive")}
    lengths = flower.get("/api/queues/length")
    assert lengths.status_code == 200
    assert {"llm.primary", "llm.backup"} <= {queue["name"] for queue in lengths.json()["active_queues"]}


def test_nothing_flower_serves_carries_a_secret_or_a_prompt(
    flower: Flower, finished_jobs: list[Any], scenario: Scenario
) -> None:
    flower_task(flower, scenario.job_ids["refused-1"], "FAILURE")  # the failures are in Flower by now
    job_ids = [finished_jobs[0].job_id, *scenario.job_ids.values()]
    workers = wait_for(lambda: flower.get("/api/workers?refresh=1").json())
    worker_name = next(iter(workers))
    datatable = "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0&columns[0][data]=name&order[0][dir]=asc"
    paths = ["/", "/workers", "/tasks", datatable, "/broker", "/api/workers", "/api/tasks", "/api/queues/length",
             "/api/task/types", f"/worker/{worker_name}", "/metrics"]
    paths += [page for job_id in job_ids for page in (f"/api/task/info/{job_id}", f"/task/{job_id}")]
    for path in paths:
        response = flower.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert CANARY_KEY not in response.text, path
        assert CANARY_KEY[len("sk-canary-"):] not in response.text, path
        assert REDIS_PASSWORD not in response.text, path
        assert PROMPT_MARK not in response.text, path
        if path == datatable:  # what the /tasks page renders: every row, named by its label
            assert all(job_id in response.text for job_id in job_ids)
            assert "custom_id=refused-1" in response.text
    assert CANARY_KEY not in flower.log_path.read_text()
