"""Health checks from Celery beat and the circuit breaker, end to end: a real redis-server,
a real `llmq worker`, a real `celery beat`, and fake OpenAI servers that go down and come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmq import LLMRequest
from llmq.cli.main import main as llmq
from llmq.contract.models import JobState
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI
from tests.support.harness import Cluster, start_cluster

CONFIG = """
llm_service:
  fallback_chain: [primary, backup]
  retry: {{max_attempts_per_provider: 2, backoff_base_s: 0.05, backoff_max_s: 0.2}}
  jobs: {{deadline_s: 60, lease_s: 5}}
  health: {{interval_s: 0.5, minimum_calls: 3, cooldown_s: {cooldown_s}}}
  providers:
    primary:
      type: openai
      api_key: "{key}"
      base_url: "http://127.0.0.1:{primary_port}/v1"
      models: [gpt-4o-mini]
      timeout: 2
    backup:
      type: openai
      api_key: "{key}"
      base_url: "{backup}/v1"
      models: [gpt-4o-mini]
"""
COOLDOWN_S = 3.0
#: Long enough left on an open circuit for a batch to pass before anything may probe.
FRESH_OPEN_S = 1.8


class Fakes:
    """The fake servers; `primary` is replaced when it is brought back on the same port."""

    def __init__(self) -> None:
        self.primary = FakeOpenAI().start()
        self.backup = FakeOpenAI().start()
        self.primary_port = self.primary.port

    def restart_primary(self) -> None:
        self.primary = FakeOpenAI(port=self.primary_port).start()

    def stop(self) -> None:
        for fake in (self.primary, self.backup):
            try:
                fake.stop()
            except OSError:
                pass


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    started = Fakes()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes) -> Iterator[Cluster]:
    config = CONFIG.format(key=DEFAULT_API_KEY, primary_port=fakes.primary_port, backup=fakes.backup.url, cooldown_s=COOLDOWN_S)
    started = start_cluster(tmp_path_factory.mktemp("health"), config)
    started.start_workers(1, concurrency=20)
    beat = start_beat(started)
    yield started
    stop_process(beat)
    started.stop()


def start_beat(cluster: Cluster) -> subprocess.Popen[bytes]:
    """`celery beat` as `llmq up` starts it, sending the health checks of the config."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
    env.update(LLMQ_REDIS_URL=cluster.redis_url, LLMQ_CONFIG=str(cluster.config_path), LLMQ_DATABASE_URL=cluster.database_url)
    log = (cluster.root / "beat.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "llmq.worker.app", "beat", "--schedule", str(cluster.root / "beat-schedule"),
         "--loglevel", "INFO"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ask(text: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=0, max_tokens=16)


def chat_calls(fake: FakeOpenAI) -> int:
    return sum(1 for request in fake.requests if request.path.endswith("/chat/completions"))


def status_of(cluster: Cluster, provider: str) -> dict[str, Any]:
    with cluster.service() as service:
        return service.provider_status()[provider]


def wait_for(cluster: Cluster, provider: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_of(cluster, provider)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{provider} never reached the expected status; last: {json.dumps(status, indent=1)}")
        time.sleep(0.1)


def freshly_open(status: dict[str, Any]) -> bool:
    circuit = status["circuit"]
    return circuit["state"] == "open" and circuit["probe_at"] - status["checked_at"] > FRESH_OPEN_S


def test_health_checks_run_from_beat_and_are_visible_in_provider_status(cluster: Cluster) -> None:
    status = wait_for(cluster, "backup", lambda s: len(s["recent_checks"]) >= 2)
    assert status["last_check"]["ok"] is True and status["last_check"]["error"] is None
    assert status["circuit"]["state"] == "closed" and status["available"] is True
    assert status["recent_checks"][0]["at"] >= status["recent_checks"][1]["at"]


def test_a_failing_provider_opens_its_circuit_is_skipped_without_calls_and_closes_when_back(cluster: Cluster, fakes: Fakes) -> None:
    fakes.primary.fail_next(503, times=100_000)  # chat and model listing alike: the provider is down
    with cluster.service() as service:
        first = service.wait(service.submit(ask("while it breaks")), timeout_s=60)
        assert first.state is JobState.SUCCEEDED and first.result.provider == "backup"
        assert first.attempts[0]["error_type"] in {"OverloadedError", "ProviderUnavailableError"}

        status = wait_for(cluster, "primary", freshly_open)
        assert status["available"] is False
        assert "503" in status["last_error"] and status["last_error_at"] > time.time() - 60
        calls_before = chat_calls(fakes.primary)
        batch_id = service.submit_batch([ask(f"skip me {n}") for n in range(10)])
        service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert chat_calls(fakes.primary) == calls_before, "an open circuit must not let calls through"
    assert all(job.state is JobState.SUCCEEDED and job.result.provider == "backup" for job in jobs)
    assert all(job.attempts[0]["provider"] == "primary" and job.attempts[0]["error_type"] == "ProviderUnavailableError"
               for job in jobs)

    fakes.primary.reset()  # the provider comes back; after the cool-down one probe closes the circuit
    status = wait_for(cluster, "primary", lambda s: s["circuit"]["state"] == "closed")
    assert status["available"] is True and status["circuit"]["times_opened"] >= 1
    with cluster.service() as service:
        job = service.wait(service.submit(ask("back again")), timeout_s=60)
    assert job.result.provider == "primary" and len(job.attempts) == 1


def test_an_unreachable_idle_provider_is_opened_by_health_checks_and_shown_by_llmq_providers(
    cluster: Cluster, fakes: Fakes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Connection refused from now on; a connection still open from before is dropped unanswered.
    fakes.primary.inject("reset", times=100_000)
    fakes.primary.stop()
    status = wait_for(cluster, "primary", lambda s: s["circuit"]["state"] == "open")
    assert status["last_error_source"] == "health" and status["last_check"]["ok"] is False
    assert not status["recent_checks"][0]["ok"]

    monkeypatch.setenv("LLMQ_REDIS_URL", cluster.redis_url)
    assert llmq(["--config", str(cluster.config_path), "providers"]) == 0
    shown = capsys.readouterr().out
    primary_block = shown.split("  primary ")[1].split("  backup ")[0]
    assert "circuit: OPEN (opened" in primary_block and "last check: FAILED" in primary_block
    assert "last error: health check:" in primary_block
    assert DEFAULT_API_KEY not in shown

    with cluster.service() as service:  # jobs meanwhile go to the backup at once
        job = service.wait(service.submit(ask("primary is gone")), timeout_s=60)
    assert job.result.provider == "backup"
    assert job.attempts[0]["error_type"] in {"ProviderUnavailableError", "ProviderConnectionError"}

    fakes.restart_primary()
    wait_for(cluster, "primary", lambda s: s["circuit"]["state"] == "closed" and s["last_check"]["ok"])
    assert llmq(["--config", str(cluster.config_path), "providers", "--json"]) == 0
    live = json.loads(capsys.readouterr().out)
    assert live["primary"]["circuit"]["state"] == "closed" and live["primary"]["available"] is True
    assert live["backup"]["last_check"]["ok"] is True


def test_beat_sends_health_checks_to_the_interactive_queue_polled_first() -> None:
    """A check (and so a half-open circuit's probe) never waits behind a backlog of batch messages."""
    from llmq.contract import keys
    from llmq.contract.config import parse_config
    from llmq.worker.health import beat_schedule

    config = parse_config("llm_service:\n  providers:\n    openai: {api_key: sk-test}\n    anthropic: {enabled: false}\n")
    schedule = beat_schedule(config)
    assert [entry["options"]["queue"] for entry in schedule.values()] == [keys.queue_name("openai", "interactive")]
    assert keys.queue_name("openai", "interactive") == "llm.openai.interactive"
