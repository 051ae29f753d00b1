"""Scenario 7: every job has a deadline (from the request, else jobs.deadline_s in the
config) and fails with DeadlineExceededError once it passes, wherever the job is:
queued on a queue no worker reads, waiting out a long retry-after, or running a
call that never answers. Nothing is left queued or running for ever.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmq import LLMRequest
from llmq.contract.models import JobState
from tests.reliability.support import Figures, drain_ledger
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster

pytestmark = pytest.mark.slow

REQUEST_DEADLINE_S = 4.0
CONFIG_DEADLINE_S = 5.0
#: The reaper sweeps deadlines about once a second (worker/runtime.py); more on a busy machine.
SLACK_S = 6.0


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeOpenAI]]:
    servers = {"backoff": FakeOpenAI().start(), "hang": FakeOpenAI().start()}
    servers["backoff"].fail_next(429, 10**6, headers={"retry-after": "60"})
    servers["hang"].inject("hang", 10**6)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeOpenAI]) -> Iterator[Cluster]:
    providers = {
        "served": {"type": "mock", "models": ["gpt-4o-mini"]},
        "orphan": {"type": "mock", "models": ["gpt-4o-mini"]},
        "backoff": openai_entry(fakes["backoff"]),
        "hang": openai_entry(fakes["hang"], timeout=120),
    }
    config = service_config(providers, retry={"max_attempts_per_provider": 3, "retry_after_cap_s": 60},
                            jobs={"deadline_s": CONFIG_DEADLINE_S, "lease_s": 5})
    started = start_cluster(tmp_path_factory.mktemp("deadlines"), config)
    started.start_workers(1, concurrency=20, queues="served,backoff,hang")  # nobody reads llm.orphan
    with started.service() as service:  # a cold worker's first claim is slow; the deadlines here are short
        assert service.wait(service.submit(ask("served", "warm up")), timeout_s=60).state is JobState.SUCCEEDED
    yield started
    started.stop()


def ask(provider: str, text: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", provider=provider, max_tokens=16)


CASES = [
    # (where the job is when its deadline passes, provider, deadline from the request or None for the config's)
    ("queued, no worker on its queue", "orphan", REQUEST_DEADLINE_S),
    ("waiting out a 60 s retry-after", "backoff", REQUEST_DEADLINE_S),
    ("running a call that never answers", "hang", None),
]


def test_a_job_past_its_deadline_fails_wherever_it_is(cluster: Cluster) -> None:
    with cluster.service() as service:
        submitted = {name: [service.submit(ask(provider, f"{name} {n}"), deadline_s=deadline_s) for n in range(4)]
                     for name, provider, deadline_s in CASES}
        records = {name: [service.wait(job_id, timeout_s=60) for job_id in job_ids] for name, job_ids in submitted.items()}
    store = drain_ledger(cluster.redis_url, cluster.database_url)
    for name, provider, deadline_s in CASES:
        mine = records[name]
        Figures.tally(f"deadline: {name}", submitted[name], mine, deadline_s=deadline_s or CONFIG_DEADLINE_S,
                      late_s_max=round(max(r.finished_at - r.deadline_at for r in mine), 2)).record()
        for record in mine:
            assert record.state is JobState.FAILED and record.error["type"] == "DeadlineExceededError", record.error
            assert "deadline" in record.error["message"]
            assert record.deadline_at - record.created_at == pytest.approx(deadline_s or CONFIG_DEADLINE_S, abs=0.01)
            assert record.finished_at <= record.deadline_at + SLACK_S
            assert store.job(record.job_id)["state"] == "failed"
            assert store.job(record.job_id)["error_type"] == "DeadlineExceededError"
            errors_seen = [attempt.get("error_type") for attempt in record.attempts]
            if provider == "orphan":
                assert errors_seen == []  # never reached a worker
            elif provider == "backoff":
                assert errors_seen == ["RateLimitedError"]  # failed while waiting, not after a retry
            else:
                assert errors_seen in ([], ["DeadlineExceededError"])  # cut mid-call (or reaped first)
