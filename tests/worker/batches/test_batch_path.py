"""Jobs with a completion window through real workers and the providers' batch API fakes.

One cluster (a redis-server, SQLite, one `llmq worker`) for the module, with an entry of each
provider family; the fakes run the batches on a compressed clock. Each test looks at what a
caller sees (states, results, `status`), what the provider saw (its batches and calls) and what
the SQL ledger holds (usage rows at batch prices, the provider batches and their lines).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from llmq.client.errors import RequestError
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, JobState
from llmq.contract.schema import provider_batch_lines_table, provider_batches_table
from llmq.worker.pricing import tier_cost
from tests.reliability.support import assert_each_attempt_recorded_once, drain_ledger, wait_until
from tests.support.fakes.anthropic import API_KEY as ANTHROPIC_KEY
from tests.support.fakes.anthropic_batches import FakeAnthropicBatches
from tests.support.fakes.batch_clock import ERROR_MARKER, EXPIRE_MARKER, BatchTiming
from tests.support.fakes.gemini_batches import FakeGeminiBatches
from tests.support.fakes.openai_batches import FakeOpenAIBatches
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

#: Fast tending for tests: a provider batch is sent 0.3 s after its first line, polled every 0.2-0.5 s.
BATCH_API = {"gather_s": 0.3, "poll_min_s": 0.2, "poll_max_s": 0.5}
CLAUDE = "claude-3-5-haiku-20241022"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    servers = {"openai": FakeOpenAIBatches(max_requests=40), "anthropic": FakeAnthropicBatches(),
               "gemini": FakeGeminiBatches()}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, Any]) -> Iterator[Cluster]:
    providers = {
        "openai": openai_entry(fakes["openai"], models=["gpt-4o-mini", "text-embedding-3-small"],
                               batch_api={**BATCH_API, "max_requests": 40}),
        "claude": {"type": "anthropic", "api_key": ANTHROPIC_KEY, "base_url": fakes["anthropic"].url,
                   "models": [CLAUDE], "default_model": CLAUDE, "batch_api": BATCH_API},
        "gemini": {"api_key": "fake-gemini-key", "base_url": fakes["gemini"].base_url,
                   "models": ["gemini-2.0-flash"], "batch_api": BATCH_API},
        "azure": {"type": "azure_openai", "api_key": openai_entry(fakes["openai"])["api_key"],
                  "base_url": fakes["openai"].url, "models": ["gpt-4o"], "batch_api": BATCH_API},
    }
    config = service_config(providers, fallback_chain=["claude"], retry=fast_retry(1))
    started = start_cluster(tmp_path_factory.mktemp("batch-path"), config)
    started.start_workers(1)
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def fresh_fakes(fakes: dict[str, Any]) -> None:
    for server in fakes.values():
        server.reset()
        server.timing = BatchTiming(validating_s=0.1, in_progress_s=0.4, finalizing_s=0.1, window_s=2.0)


def ask(prompt: str, model: str = "gpt-4o-mini", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "model": model, "temperature": 0.2,
            "max_tokens": 64, **fields}


def ledger_usage(cluster: Cluster, job_ids: set[str], count: int) -> list[dict[str, Any]]:
    """The usage rows of these jobs once `count` of them reached SQL."""
    store = drain_ledger(cluster.redis_url, cluster.database_url)

    def found() -> list[dict[str, Any]] | None:
        rows = [row for row in store.usage_rows() if row["job_id"] in job_ids]
        return rows if len(rows) >= count else None

    try:
        return wait_until(found, 30, f"{count} usage rows in SQL")
    finally:
        store.close()


def test_a_batch_is_split_across_provider_batches_by_size_and_each_line_runs_once_at_batch_prices(
    cluster: Cluster, fakes: dict[str, Any],
) -> None:
    fake = fakes["openai"]
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"task {index}") for index in range(100)], completion_window="24h")
        waiting = service.results(batch_id)[0]
        assert waiting.state is JobState.IN_PROVIDER_BATCH and waiting.completion_window_s == 86400
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
        provider_batches = service.provider_batches(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == 100
    assert sorted(len(job.lines) for job in fake.batches.values()) == [20, 40, 40]  # max_requests: 40
    assert fake.sync_requests() == []  # nothing ran as a sync call
    assert_each_attempt_recorded_once(jobs)
    assert all(len(job.attempts) == 1 and job.attempts[0]["outcome"] == "succeeded" for job in jobs)
    assert all(job.result is not None and f"task {job.request.messages[0].content[5:]}" in job.result.content
               for job in jobs)
    assert {record.state.value for record in provider_batches} == {"ended"} and len(provider_batches) == 3
    assert {record.remote_id for record in provider_batches} == set(fake.batches)
    rows = ledger_usage(cluster, {job.job_id for job in jobs}, 100)
    assert len(rows) == 100 and {row["price_tier"] for row in rows} == {"batch"}
    for row in rows:
        expected = tier_cost("openai", row["model"], jobs[0].result.usage.model_copy(update={  # type: ignore[union-attr]
            "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
            "total_tokens": row["total_tokens"]}), overrides={}, local=False, tier="batch", discount=0.5)
        assert row["cost_usd"] == Decimal(expected.cost_usd).quantize(row["cost_usd"])
        assert row["standard_cost_usd"] == 2 * row["cost_usd"]
    store = drain_ledger(cluster.redis_url, cluster.database_url)
    try:
        with store.engine.connect() as connection:
            lines = connection.execute(select(func.count()).select_from(provider_batch_lines_table).where(
                provider_batch_lines_table.c.job_id.in_([job.job_id for job in jobs]))).scalar()
            states = connection.execute(select(provider_batches_table.c.state).where(
                provider_batches_table.c.provider_batch_id.in_([r.provider_batch_id for r in provider_batches]))).all()
        report = {row["price_tier"]: row for row in store.usage_report(by="price_tier")}
    finally:
        store.close()
    assert lines == 100 and [state for (state,) in states] == ["ended"] * 3
    assert report["batch"]["saved_usd"] == report["batch"]["standard_cost_usd"] - report["batch"]["cost_usd"] > 0


def test_failed_and_expired_lines_complete_through_the_fallback_route(cluster: Cluster, fakes: dict[str, Any]) -> None:
    prompts = ["plain 0", f"broken {ERROR_MARKER}", "plain 2", f"slow {EXPIRE_MARKER}", "plain 4"]
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(prompt) for prompt in prompts], completion_window="24h")
        batch = service.wait(batch_id, timeout_s=60)
        jobs = {job.request.messages[0].content.split()[0] + job.request.messages[0].content[-1]: job
                for job in service.results(batch_id)}
    assert batch.counts[JobState.SUCCEEDED] == 5
    trail = {name: [(a["provider"], a["outcome"], a.get("error_type")) for a in job.attempts] for name, job in jobs.items()}
    assert trail["broken]"] == [("openai", "error", "ServerError"), ("claude", "succeeded", None)]
    assert trail["slow]"] == [("openai", "error", "ProviderBatchExpiredError"), ("claude", "succeeded", None)]
    assert trail["plain0"] == trail["plain2"] == trail["plain4"] == [("openai", "succeeded", None)]
    assert jobs["broken]"].result.provider == "claude" and jobs["plain0"].result.provider == "openai"  # type: ignore[union-attr]
    rows = ledger_usage(cluster, {job.job_id for job in jobs.values()}, 5)
    tiers = {(row["provider"], row["attempt"], row["price_tier"]) for row in rows}
    assert tiers == {("openai", 1, "batch"), ("claude", 2, "standard")}


def test_batch_only_refuses_jobs_it_cannot_batch_and_fails_lines_the_batch_failed(
    cluster: Cluster, fakes: dict[str, Any],
) -> None:
    with cluster.service() as service:
        with pytest.raises(RequestError, match=r"item 2: batch_only: a streamed request") as refused:
            service.submit_batch([ask("fine"), ask("live", stream=True)], completion_window="24h", batch_only=True)
        assert "nothing enqueued" in str(refused.value)
        with pytest.raises(RequestError, match="deadline .* ends before the batch window"):
            service.submit(ask("hurry"), completion_window="24h", deadline_s=600, batch_only=True)
        hurried = service.poll(service.submit(ask("hurry"), completion_window="24h", deadline_s=600))
        assert hurried is not None and hurried.state is not JobState.IN_PROVIDER_BATCH  # the normal lane
        batch_id = service.submit_batch([ask("fine"), ask(f"broken {ERROR_MARKER}")], completion_window="24h",
                                        batch_only=True)
        service.wait(batch_id, timeout_s=60)
        fine, broken = service.results(batch_id)
    assert fine.state is JobState.SUCCEEDED and broken.state is JobState.FAILED
    assert broken.error is not None and broken.error["type"] == "ServerError"
    assert [attempt["provider"] for attempt in broken.attempts] == ["openai"]  # no fallback


def test_cancelling_a_batch_cancels_its_provider_batch_at_the_provider(cluster: Cluster, fakes: dict[str, Any]) -> None:
    fake = fakes["openai"]
    fake.timing = BatchTiming(validating_s=0.1, in_progress_s=60, window_s=120)
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"later {index}") for index in range(5)], completion_window="24h")
        wait_until(lambda: [r for r in service.provider_batches(batch_id) if r.remote_id], 30,
                   "the provider batch to be submitted")
        assert service.cancel(batch_id) == 5
        wait_until(lambda: any(r.path.endswith("/cancel") for r in fake.batch_requests()), 30, "a cancel at the provider")
        [record] = wait_until(lambda: [r for r in service.provider_batches(batch_id) if r.state.value == "ended"],
                              30, "the provider batch to end")
        jobs = service.results(batch_id)
    assert record.remote_state == "cancelled"
    assert {job.state for job in jobs} == {JobState.CANCELLED}
    [remote] = fake.batches.values()
    assert remote.phase() == "cancelled"


@pytest.mark.parametrize(("provider", "model", "fake_name"), [
    ("claude", CLAUDE, "anthropic"), ("gemini", "gemini-2.0-flash", "gemini"), ("azure", "gpt-4o", "openai"),
])
def test_each_provider_familys_batch_api_serves_jobs_end_to_end(
    cluster: Cluster, fakes: dict[str, Any], provider: str, model: str, fake_name: str,
) -> None:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"{provider} {index}", model, provider=provider) for index in range(3)],
                                        completion_window="2d")
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == 3 and {job.result.provider for job in jobs} == {provider}  # type: ignore[union-attr]
    assert len(fakes[fake_name].batches) == 1 and fakes[fake_name].sync_requests() == []
    rows = ledger_usage(cluster, {job.job_id for job in jobs}, 3)
    assert {row["price_tier"] for row in rows} == {"batch"} and all(row["priced"] for row in rows)


def test_embedding_jobs_wait_in_provider_batches_of_their_own_endpoint(cluster: Cluster, fakes: dict[str, Any]) -> None:
    embeddings = [EmbeddingRequest(input=[f"text {index}", "more"], model="text-embedding-3-small", dimensions=4)
                  for index in range(3)]
    with cluster.service() as service:
        batch_id = service.submit_batch([*embeddings, ask("a chat line")], completion_window="24h")
        batch = service.wait(batch_id, timeout_s=60)
        jobs = service.results(batch_id)
    assert batch.counts[JobState.SUCCEEDED] == 4
    vectors = [job.result for job in jobs if isinstance(job.result, EmbeddingResponse)]
    assert len(vectors) == 3 and all(len(result.embeddings) == 2 and len(result.embeddings[0]) == 4
                                     for result in vectors)
    endpoints = sorted(job.extra["endpoint"] for job in fakes["openai"].batches.values())
    assert endpoints == ["/v1/chat/completions", "/v1/embeddings"]  # one provider batch per endpoint
    rows = ledger_usage(cluster, {job.job_id for job in jobs}, 4)
    assert {row["price_tier"] for row in rows} == {"batch"}


def test_status_shows_the_provider_batches_a_batch_waits_in(cluster: Cluster, fakes: dict[str, Any]) -> None:
    import subprocess
    import sys

    fakes["openai"].timing = BatchTiming(validating_s=0.1, in_progress_s=60, window_s=120)
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"slow {index}") for index in range(3)], completion_window="24h")
        wait_until(lambda: [r for r in service.provider_batches(batch_id) if r.remote_id], 30, "a submit")
        env = {"LLMQ_REDIS_URL": cluster.redis_url, "PATH": "/usr/bin:/bin"}
        shown = subprocess.run([sys.executable, "-m", "llmq.cli", "--config", str(cluster.config_path), "status",
                                batch_id], capture_output=True, text=True, env=env, timeout=60)
        service.cancel(batch_id)
    assert f"batch {batch_id}: 3 jobs: in_provider_batch 3" in shown.stdout, shown.stderr
    assert "provider batch pbatch_" in shown.stdout and "openai/gpt-4o-mini, 3 lines" in shown.stdout
    time.sleep(0.5)  # let the worker cancel it before the next test resets the fake
