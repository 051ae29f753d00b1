"""Budgets per caller and per provider (hold and reroute) and `llmq usage`, end to end:
a real redis-server, a real `llmq worker`, fake OpenAI servers and the SQL ledger."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis

from llmq import LLMRequest
from llmq.cli.main import main as llmq
from llmq.cli.reports import parse_since
from llmq.contract import keys
from llmq.contract.models import JobRecord, JobState
from llmq.worker.middleware.budget import micro_usd
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI
from tests.support.harness import Cluster, start_cluster

# $10,000 per million tokens = one cent a token: each answer below costs about $0.08.
PROVIDER = """
    {name}:
      type: {type}
      api_key: "{key}"
      base_url: "{url}/v1"
      models: [gpt-4o-mini]
"""
PRICED = "      pricing: {gpt-4o-mini: {input_per_mtok: 10000, output_per_mtok: 10000}}\n"
CONFIG = """
llm_service:
  fallback_chain: {chain}
  retry: {{max_attempts_per_provider: 2, backoff_base_s: 0.05, backoff_max_s: 0.2}}
  jobs: {{deadline_s: 120, lease_s: 5}}
  budgets: {budgets}
  providers:{providers}
"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeOpenAI]]:
    started = {name: FakeOpenAI().start() for name in ("primary", "backup", "onprem")}
    yield started
    for fake in started.values():
        fake.stop()


def make_cluster(root: object, fakes: dict[str, FakeOpenAI], budgets: str, *, onprem: bool) -> Cluster:
    providers = "".join(PROVIDER.format(name=name, type="openai", key=DEFAULT_API_KEY, url=fakes[name].url) + PRICED
                        for name in ("primary", "backup"))
    if onprem:  # vLLM on the team's own machines: costs nothing, so no budget holds it back
        providers += PROVIDER.format(name="onprem", type="vllm", key=DEFAULT_API_KEY, url=fakes["onprem"].url)
    chain = "[primary, backup, onprem]" if onprem else "[primary, backup]"
    cluster = start_cluster(root, CONFIG.format(chain=chain, budgets=budgets, providers=providers))  # type: ignore[arg-type]
    cluster.start_workers(1, concurrency=20)
    return cluster


@pytest.fixture(autouse=True)
def _reset_fakes(fakes: dict[str, FakeOpenAI]) -> None:
    for fake in fakes.values():
        fake.reset()


def ask(text: str, caller: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=0, max_tokens=16,
                      metadata={"caller": caller})


def run(cluster: Cluster, request: LLMRequest) -> JobRecord:
    with cluster.service() as service:
        job = service.wait(service.submit(request), timeout_s=60)
    assert isinstance(job, JobRecord)
    return job


def chat_calls(fake: FakeOpenAI) -> int:
    return sum(1 for request in fake.requests if request.path.endswith("/chat/completions"))


def ledger(cluster: Cluster) -> Store:
    OutboxFlusher(cluster.redis_url, cluster.database_url).drain(timeout_s=30)
    return Store(cluster.database_url)


def test_a_spent_caller_budget_holds_that_callers_jobs_until_the_next_utc_day(tmp_path, fakes) -> None:
    cluster = make_cluster(tmp_path, fakes, "{per_caller_daily_usd: {alice: 0.05}, on_exhausted: hold}", onprem=False)
    try:
        first = run(cluster, ask("hello there", "alice"))
        assert first.state is JobState.SUCCEEDED and first.result.provider == "primary"
        client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        with cluster.service() as service:
            held_id = service.submit(ask("one more please", "alice"))
            deadline = time.monotonic() + 30
            while client.hget(keys.job(held_id), "waiting_for") != "budget":
                assert time.monotonic() < deadline, client.hgetall(keys.job(held_id))
                time.sleep(0.05)
            held = service.poll(held_id)
            assert held.state is JobState.RATE_LIMITED and held.attempts == []
            now_s, _ = client.time()
            next_day_ms = (now_s // 86400 + 1) * 86400 * 1000
            due_ms = client.zscore(keys.DELAYED, held_id)
            assert next_day_ms <= due_ms <= next_day_ms + 61_000
            other = run(cluster, ask("hello there", "bob"))  # bob has no budget
            assert other.state is JobState.SUCCEEDED and other.result.provider == "primary"
            assert chat_calls(fakes["primary"]) == 2
            assert service.cancel(held_id) == 1
        spent = int(client.get(f"{keys.budget_spend('caller', 'alice')}:{now_s // 86400}"))
        assert spent == micro_usd(ledger(cluster).usage_rows(first.job_id)[0]["cost_usd"]) > 50_000
    finally:
        cluster.stop()


def test_reroute_skips_spent_budgets_to_the_next_provider_and_usage_totals_match_the_rows(
    tmp_path, fakes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    budgets = "{per_caller_daily_usd: {alice: 0.05}, per_provider_daily_usd: {primary: 0.15}, on_exhausted: reroute}"
    cluster = make_cluster(tmp_path, fakes, budgets, onprem=True)
    try:
        assert run(cluster, ask("hello there", "alice")).result.provider == "primary"
        rerouted = run(cluster, ask("hello again", "alice"))  # alice is spent: only the free provider is left
        assert rerouted.result.provider == "onprem"
        assert [(a["provider"], a.get("error_type")) for a in rerouted.attempts] == [
            ("primary", "QuotaExceededError"), ("backup", "QuotaExceededError"), ("onprem", None)]
        assert "caller 'alice'" in rerouted.attempts[0]["error_message"]
        assert run(cluster, ask("hello there", "bob")).result.provider == "primary"  # primary passes $0.15
        moved = run(cluster, ask("hello there", "bob"))
        assert moved.result.provider == "backup" and "provider 'primary'" in moved.attempts[0]["error_message"]
        assert (chat_calls(fakes["primary"]), chat_calls(fakes["backup"]), chat_calls(fakes["onprem"])) == (2, 1, 1)

        rows = ledger(cluster).usage_rows()
        monkeypatch.setenv("LLMQ_REDIS_URL", cluster.redis_url)
        usage = ["--config", str(cluster.config_path), "usage", "--database-url", cluster.database_url]
        assert llmq([*usage, "--json", "--by", "caller"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["totals"]["requests"] == len(rows) == 4
        assert report["totals"]["total_tokens"] == sum(row["total_tokens"] for row in rows)
        assert Decimal(report["totals"]["cost_usd"]) == sum(row["cost_usd"] for row in rows) > 0
        by_caller = {row["caller"]: row for row in report["rows"]}
        alice_rows = [row for row in rows if row["caller"] == "alice"]
        assert Decimal(by_caller["alice"]["cost_usd"]) == sum(row["cost_usd"] for row in alice_rows)
        assert {line["name"]: line["spent"] for line in report["budgets"]["callers"]} == {"alice": True}
        assert llmq([*usage, "--by", "provider", "--since", "1h"]) == 0
        table = capsys.readouterr().out
        assert "onprem" in table and "TOTAL" in table and f"{sum(row['cost_usd'] for row in rows):.6f}" in table
        assert "caller alice" in table and "SPENT" in table
    finally:
        cluster.stop()


def test_since_accepts_dates_and_ages() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T06:30", now) == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday", now)
