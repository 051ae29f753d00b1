"""The `llmq` command as people run it: a subprocess against a real redis-server and real
`llmq worker` processes (mock providers), reading and writing real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from llmq import LLMRequest
from tests.conftest import AGENT_REQUESTS, REPO_ROOT
from tests.support.harness import Cluster, start_cluster, write_config

ADAPTER_TYPES = ("openai", "azure_openai", "anthropic", "gemini", "bedrock", "ollama", "lmstudio", "localai",
                 "vllm", "huggingface", "mock")

# `parked` has no worker on its queue: its jobs stay queued until cancelled.
CONFIG = """
llm_service:
  fallback_chain: [flaky, steady]
  retry: {max_attempts_per_provider: 2, backoff_base_s: 0.05, backoff_max_s: 0.2}
  jobs: {deadline_s: 120, lease_s: 5}
  providers:
    flaky:
      type: mock
      models: [gpt-4, gpt-3.5-turbo]
      options: {latency_s: 0.01, failure_rate: 0.3, fail_with: ServerError, seed: 3}
    steady:
      type: mock
      models: [gpt-4, gpt-3.5-turbo]
      options: {latency_s: 0.01}
    parked:
      type: mock
      models: [parked-model]
    openai:
      api_key: "${OPENAI_API_KEY}"
      models: [gpt-4o]
    ollama:
      enabled: false
      base_url: "http://127.0.0.1:9"
      models: [llama3]
"""

RESULT_KEYS = {"custom_id", "job_id", "kind", "status", "response", "error"}


def llmq_command() -> list[str]:
    """The installed `llmq` script of this venv (what the README runs)."""
    script = Path(sys.executable).parent / "llmq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmq.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not (key.startswith(("LLMQ_", "AWS_")) or key.endswith("_API_KEY"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Cli:
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*llmq_command(), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout_s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cli"), CONFIG)
    started.start_workers(1, queues="flaky,steady", concurrency=50)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cli(cluster: Cluster) -> Cli:
    env = clean_env(LLMQ_REDIS_URL=cluster.redis_url, LLMQ_CONFIG=str(cluster.config_path),
                    LLMQ_DATABASE_URL=cluster.database_url, LLMQ_HOME=str(cluster.root))
    return Cli(env, cluster.root)


@pytest.fixture
def bare_cli(tmp_path: Path, redis_url: str) -> Cli:
    """The CLI on an empty Redis database with no worker: to prove nothing gets enqueued."""
    config_path = write_config(tmp_path / "llm_service.yaml", CONFIG)
    return Cli(clean_env(LLMQ_REDIS_URL=redis_url, LLMQ_CONFIG=str(config_path), LLMQ_HOME=str(tmp_path)), tmp_path)


def agent_requests() -> Path:
    shared = AGENT_REQUESTS
    return shared if shared.exists() else REPO_ROOT / "producer" / "data" / "agent_requests.jsonl"


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def line(custom_id: str, model: str = "gpt-4", role: str = "user") -> dict[str, object]:
    return {"custom_id": custom_id, "body": {"model": model, "max_tokens": 16, "temperature": 0,
                                             "messages": [{"role": role, "content": f"hello {custom_id}"}]}}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llmq: error: ")
    return lines[0]


# --- providers and models -------------------------------------------------------------------


def test_providers_lists_every_adapter_and_each_entry_with_its_status(cli: Cli) -> None:
    result = cli("providers")
    assert result.returncode == 0, result.stderr
    adapters_part, entries_part = result.stdout.split("\nProviders in ")
    listed = {row.split()[0] for row in adapters_part.splitlines()[1:] if row.strip()}
    assert listed == set(ADAPTER_TYPES)
    entries = {row.split()[0]: row for row in entries_part.splitlines()[1:] if "type=" in row}
    assert set(entries) == {"flaky", "steady", "parked", "openai", "ollama"}
    for name in ("flaky", "steady", "parked"):
        assert entries[name].rstrip().endswith(" configured"), entries[name]
    assert "not configured: environment variable not set: OPENAI_API_KEY" in entries["openai"]
    assert "not configured: disabled in config (enabled: false)" in entries["ollama"]


def test_models_lists_the_models_of_configured_providers_only_with_their_capabilities(cli: Cli) -> None:
    result = cli("models")
    assert result.returncode == 0, result.stderr
    rows = [row.split("\t") for row in result.stdout.splitlines()]
    pairs = {(model, entry) for model, entry, _ in rows}
    assert pairs == {("gpt-4", "flaky"), ("gpt-3.5-turbo", "flaky"), ("gpt-4", "steady"), ("gpt-3.5-turbo", "steady"),
                     ("parked-model", "parked")}
    # The mock simulates every feature but prompt caching (producer/data/capabilities.yaml).
    assert {capabilities for _, _, capabilities in rows} == {
        "chat, tools, json_object, json_schema, vision, embeddings"
    }


# --- submit, status, results --------------------------------------------------------------------


@pytest.fixture(scope="module")
def submitted(cli: Cli, cluster: Cluster) -> tuple[str, Path, Path]:
    """The agent's sample batch file, submitted with --wait --output; (batch id, input, output)."""
    requests = cluster.root / "agent_requests.jsonl"
    shutil.copyfile(agent_requests(), requests)
    output = cluster.root / "results.jsonl"
    result = cli("submit", str(requests), "--wait", "--output", str(output))
    assert result.returncode == 0, result.stderr
    batch_id = result.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id
    assert f"batch {batch_id}:" in result.stderr  # the summary after the progress bar
    return batch_id, requests, output


def test_submit_wait_writes_one_result_line_per_job_and_prints_the_batch_id(submitted) -> None:
    batch_id, requests, output = submitted
    sent = [json.loads(text) for text in requests.read_text().splitlines()]
    written = [json.loads(text) for text in output.read_text().splitlines()]
    assert [row["custom_id"] for row in written] == [row["custom_id"] for row in sent]
    assert all(set(row) == RESULT_KEYS for row in written)
    assert all(row["status"] == "succeeded" and row["error"] is None for row in written)
    assert all(row["response"]["content"] and row["response"]["provider"] in {"flaky", "steady"} for row in written)
    assert len({row["job_id"] for row in written}) == len(sent)


def test_status_and_results_of_a_batch_and_of_a_job(cli: Cli, submitted) -> None:
    batch_id, requests, output = submitted
    total = len(requests.read_text().splitlines())
    status = cli("status", batch_id)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == f"batch {batch_id}: {total} jobs: succeeded {total}"

    results = cli("results", batch_id)
    assert results.returncode == 0, results.stderr
    assert results.stdout == output.read_text()

    first = json.loads(output.read_text().splitlines()[0])
    job_status = cli("status", first["job_id"])
    assert job_status.returncode == 0, job_status.stderr
    record = json.loads(job_status.stdout)
    assert record["job_id"] == first["job_id"] and record["state"] == "succeeded"
    assert record["custom_id"] == first["custom_id"] and "request" not in record
    job_results = cli("results", first["job_id"])
    assert job_results.returncode == 0
    assert [json.loads(text) for text in job_results.stdout.splitlines()] == [first]


def test_an_unknown_id_is_one_clear_line(cli: Cli) -> None:
    for command in ("status", "results", "cancel"):
        result = cli(command, "job_nope")
        assert result.returncode == 1
        assert one_line_error(result) == "llmq: error: no job or batch 'job_nope' in Redis (expired, or never submitted)"


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_a_batch_and_a_job(cli: Cli, cluster: Cluster, tmp_path: Path) -> None:
    parked = write_jsonl(tmp_path / "parked.jsonl", [line(f"p{index}", model="parked-model") for index in range(3)])
    submit = cli("submit", str(parked))
    assert submit.returncode == 0, submit.stderr
    batch_id = submit.stdout.strip()
    assert cli("status", batch_id).stdout.strip() == f"batch {batch_id}: 3 jobs: queued 3"
    cancel = cli("cancel", batch_id)
    assert (cancel.returncode, cancel.stdout.strip()) == (0, "cancelled 3 job(s)")
    assert cli("status", batch_id).stdout.strip() == f"batch {batch_id}: 3 jobs: cancelled 3"
    assert {json.loads(text)["status"] for text in cli("results", batch_id).stdout.splitlines()} == {"cancelled"}

    with cluster.service() as service:
        job_id = service.submit(LLMRequest(messages=[{"role": "user", "content": "x"}], model="parked-model"))
    cancel = cli("cancel", job_id)
    assert (cancel.returncode, cancel.stdout.strip()) == (0, "cancelled 1 job(s)")
    assert json.loads(cli("status", job_id).stdout)["state"] == "cancelled"
    again = cli("cancel", job_id)
    assert (again.returncode, again.stdout.strip()) == (0, "cancelled 0 job(s) (already finished)")


# --- refused input --------------------------------------------------------------------------


BAD_FILES = {
    "bad JSON": ([line("a"), '{"custom_id": "b", "body": {'], 2, "not valid JSON"),
    "unknown role": ([line("a"), line("b"), line("c", role="wizard")], 3, "role"),
    "missing body": ([line("a"), {"custom_id": "b"}], 2, "body must be a JSON object"),
    "duplicate custom_id": ([line("a"), line("b"), line("a")], 3, "custom_id 'a' repeats line 1"),
    "unknown model": ([line("a"), line("b", model="no-such-model")], 2, "model 'no-such-model': no configured provider serves it"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_file_is_refused_with_its_line_and_reason_and_nothing_is_enqueued(
    bare_cli: Cli, redis_url: str, tmp_path: Path, case: str
) -> None:
    lines, number, reason = BAD_FILES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    result = bare_cli("submit", str(path), "--wait")
    assert result.returncode == 2
    error = one_line_error(result)
    assert f"line {number}: " in error and reason in error, error
    assert result.stdout == ""
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys("*") == []  # no job record, no batch, no Celery message, no queue
    finally:
        client.close()


def test_verbose_adds_the_traceback_before_or_after_the_command(bare_cli: Cli, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [line("a", model="no-such-model")])
    for args in (("--verbose", "submit", str(path)), ("submit", str(path), "-v")):
        result = bare_cli(*args)
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert "RequestError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("llmq: error: ")


def test_output_without_wait_is_refused_before_reading_the_file(bare_cli: Cli, tmp_path: Path) -> None:
    result = bare_cli("submit", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "--output needs --wait" in one_line_error(result)


# --- configuration problems -----------------------------------------------------------------


def test_a_missing_config_gives_one_clear_line(tmp_path: Path) -> None:
    cli = Cli(clean_env(), tmp_path)  # no LLMQ_CONFIG, no ./config/llm_service.yaml: the packaged copy
    result = cli("providers")
    assert result.returncode == 0 and "mock_primary" in result.stdout
    absent = cli("--config", str(tmp_path / "absent.yaml"), "models")
    assert absent.returncode == 2
    assert "cannot read config file" in one_line_error(absent)


def test_a_worker_on_a_misspelt_queue_is_refused(bare_cli: Cli) -> None:
    result = bare_cli("worker", "--queues", "steady,stedy")
    assert result.returncode == 2
    assert "unknown provider 'stedy'" in one_line_error(result)
