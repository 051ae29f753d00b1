"""Prometheus metrics and structured logs from a real `llmq worker`: the counters match the
jobs run, every record logged during a job carries its id, and no API key reaches the log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmq import LLMRequest
from llmq.cli.embedded import free_port
from llmq.contract.models import JobState
from llmq.worker import logs
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    service_config,
    start_cluster,
)

BACKUP_KEY = "sk-backup-0123456789SECRETabcdef"
PRICING = {"gpt-4o-mini": {"input_per_mtok": 1000, "output_per_mtok": 2000}}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    primary, backup = FakeOpenAI().start(), FakeOpenAI(api_key=BACKUP_KEY).start()
    yield primary, backup
    primary.stop()
    backup.stop()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes, metrics_port: int) -> Iterator[Cluster]:
    primary, backup = fakes
    providers = {
        "primary": openai_entry(primary, pricing=PRICING),
        "backup": openai_entry(backup, api_key=BACKUP_KEY),
        "limited": openai_entry(primary, models=["gpt-4o"], rate_limits={"requests_per_minute": 1}),
    }
    config = service_config(providers, fallback_chain=["primary", "backup"], retry=fast_retry(2))
    started = start_cluster(tmp_path_factory.mktemp("metrics"), config)
    started.start_workers(1, concurrency=20, extra_env={"LLMQ_METRICS_PORT": str(metrics_port), "LLMQ_LOG_FORMAT": "json"})
    yield started
    started.stop()


def ask(text: str, model: str = "gpt-4o-mini") -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model=model, temperature=0, max_tokens=16)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_the_jobs_run_and_logs_carry_job_ids_without_keys(cluster: Cluster, fakes, metrics_port: int) -> None:
    primary, _ = fakes
    # Another provider's error echoing a key: the adapter only scrubs its own, the log must scrub every one.
    primary.fail_next(500, times=2, body={"error": {"message": f"upstream refused key {BACKUP_KEY}", "type": "server_error"}})
    with cluster.service() as service:
        fallen = service.wait(service.submit(ask("fall back")), timeout_s=60)
        batch = service.wait(service.submit_batch([ask(f"task {n}") for n in range(5)]), timeout_s=60)
        cached = [service.wait(service.submit(ask("same question"), cache=True), timeout_s=60) for _ in range(2)]
        first_limited = service.wait(service.submit(ask("limited one", "gpt-4o")), timeout_s=60)
        second_limited = service.submit(ask("limited two", "gpt-4o"))
        deadline = time.monotonic() + 30
        while service.poll(second_limited).state is not JobState.RATE_LIMITED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        service.cancel(second_limited)
        jobs = service.results(batch.batch_id)
    assert fallen.result.provider == "backup" and first_limited.state is JobState.SUCCEEDED
    assert cached[1].result.metadata.get("cached") is True

    samples = scrape(metrics_port)
    hop = {"provider": "primary", "model": "gpt-4o-mini"}
    assert value(samples, "llmq_requests_total", **hop, outcome="succeeded") == 5 + 1
    assert value(samples, "llmq_requests_total", **hop, outcome="failed") == 2
    assert value(samples, "llmq_requests_total", **hop, outcome="cached") == 1
    assert value(samples, "llmq_requests_total", provider="backup", model="gpt-4o-mini", outcome="succeeded") == 1
    assert value(samples, "llmq_errors_total", **hop, error_type="ServerError") == 2
    assert value(samples, "llmq_cache_hits_total", **hop) == 1
    assert value(samples, "llmq_request_duration_seconds_count", **hop) == 5 + 1 + 2
    answered = [*(job.result for job in jobs), cached[0].result]
    assert value(samples, "llmq_tokens_total", **hop, kind="prompt") == sum(r.usage.prompt_tokens for r in answered)
    assert value(samples, "llmq_tokens_total", **hop, kind="completion") == sum(r.usage.completion_tokens for r in answered)
    expected_cost = sum(r.usage.prompt_tokens * 1000 + r.usage.completion_tokens * 2000 for r in answered) / 1e6
    assert value(samples, "llmq_cost_usd_total", **hop) == pytest.approx(expected_cost)
    assert value(samples, "llmq_requests_total", provider="limited", model="gpt-4o", outcome="deferred") >= 1
    waits = [v for (name, labels), v in samples.items() if name == "llmq_limit_wait_seconds_total" and ("provider", "limited") in labels]
    assert waits and sum(waits) > 0
    assert ("llmq_queue_depth", (("queue", "llm.primary"),)) in samples
    assert value(samples, "llmq_circuit_state", provider="primary") == 0

    records = [json.loads(line) for line in cluster.workers[0].log_path.read_text().splitlines() if line.startswith("{")]
    mine = [record for record in records if record["job_id"] == fallen.job_id]
    assert {"llmq.worker", "httpx"} <= {record["logger"] for record in mine}
    assert any("attempt 1 on primary failed" in record["message"] and "[redacted]" in record["message"] for record in mine)
    text = cluster.workers[0].log_path.read_text()
    assert BACKUP_KEY not in text and DEFAULT_API_KEY not in text


def test_redaction_covers_arguments_and_tracebacks_and_json_lines_carry_the_job_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = logging.getLogRecordFactory()
    monkeypatch.setattr(logs, "_installed", False)
    monkeypatch.setenv(logs.FORMAT_ENV, "json")
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter())
    logger = logging.getLogger("llmq.test.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logs.install(["sk-very-secret-key", "abc"])
        import asyncio

        async def job() -> None:
            logger.info("calling with %s", "Bearer sk-very-secret-key")
            try:
                raise RuntimeError("refused sk-very-secret-key")
            except RuntimeError:
                logger.exception("failed")

        asyncio.run(logs.with_job_id("job_42", job()))
        logger.info("outside any job")
    finally:
        logging.setLogRecordFactory(original)
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["job_id"] for line in lines] == ["job_42", "job_42", None]
    assert lines[0]["message"] == "calling with Bearer [redacted]"
    assert "refused [redacted]" in lines[1]["exc"] and "sk-very-secret-key" not in json.dumps(lines)
    assert logs.redact("abc is short", ["abc"]) == "abc is short"  # too short to be a secret worth scrubbing


def test_without_prometheus_client_the_worker_runs_on_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    from types import SimpleNamespace

    from llmq.cli.main import build_parser
    from llmq.worker.middleware import metrics

    assert build_parser().parse_args(["worker", "--metrics-port", "9100"]).metrics_port == 9100
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if the extra were not installed
    monkeypatch.setattr(metrics, "_instruments", None)
    middleware = metrics.MetricsMiddleware()
    with caplog.at_level(logging.WARNING, logger="llmq.worker.metrics"):
        middleware.start(SimpleNamespace(settings=SimpleNamespace(metrics_port=9100)))  # type: ignore[arg-type]
    assert middleware.instruments is None
    assert "prometheus-client is not installed" in caplog.text
