"""Scenario 1: a worker killed mid-batch (SIGKILL), as a whole and as one prefork pool child.

The provider is a fake OpenAI server with latency, so jobs are in flight when the
kill lands. Every job must still succeed, no attempt or usage row may be written
twice, and recovery must come from the lease (jobs.lease_s, 3 s here), not from
the broker's visibility timeout (hours).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from llmq import LLMRequest
from llmq.contract.models import JobRecord, JobState
from llmq.contract.queueing import visibility_timeout_s
from tests.reliability.support import (
    Figures,
    alive,
    assert_each_attempt_recorded_once,
    assert_ledger_matches,
    client,
    drain_ledger,
    pool_children,
    redis_now_ms,
    running_on,
    wait_until,
)
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    service_config,
    start_cluster,
)

pytestmark = pytest.mark.slow

LEASE_S = 3.0
CALL_LATENCY_S = 0.8


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(latency_s=CALL_LATENCY_S).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[Cluster]:
    # One provider entry (and so one queue) for the threads worker, one for the prefork worker.
    providers = {"threads": openai_entry(fake), "pool": openai_entry(fake)}
    config = service_config(providers, retry=fast_retry(3), jobs={"deadline_s": 120, "lease_s": LEASE_S})
    started = start_cluster(tmp_path_factory.mktemp("crash"), config)
    yield started
    started.stop()


def ask(text: str, provider: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", provider=provider,
                      temperature=0, max_tokens=16)


def worker_id(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


def calls_for(fake: FakeOpenAI, prefix: str) -> int:
    calls = [request.body for request in list(fake.requests) if request.path.endswith("/chat/completions")]
    return sum(1 for body in calls if body["messages"][0]["content"].startswith(prefix))


def in_flight(fake: FakeOpenAI, redis: Redis, pid: int) -> list[str]:
    """Jobs a worker process is running whose call has reached the provider (job id = request id header)."""
    called = {request.header("x-client-request-id") for request in list(fake.requests)}
    return [job_id for job_id in running_on(redis, worker_id(pid)) if job_id in called]


def recovery_figures(records: list[JobRecord], victims: list[str], killed_at_ms: int) -> dict[str, float]:
    """Seconds from the kill to the reaper noticing each lost job, and to its success."""
    by_id = {record.job_id: record for record in records}
    noticed = [entry["finished_at"] for job_id in victims for entry in by_id[job_id].attempts
               if entry["outcome"] == "worker_lost"]
    finished = [by_id[job_id].finished_at for job_id in victims]
    # Attempt records are stamped in epoch seconds, the reaper's worker_lost records too.
    return {
        "jobs_in_flight_at_kill": len(victims),
        "worker_lost_records": len(noticed),
        "kill_to_requeue_max_s": round(max(noticed) - killed_at_ms / 1000, 2),
        "kill_to_success_max_s": round(max(finished) - killed_at_ms / 1000, 2),
    }


def test_sigkill_of_a_whole_worker_mid_batch_loses_nothing(cluster: Cluster, fake: FakeOpenAI) -> None:
    redis = client(cluster.redis_url)
    cluster.start_workers(2, concurrency=10, queues="threads")
    victim = cluster.workers[-2]
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"whole {index}", "threads") for index in range(80)])
        wait_until(lambda: len(in_flight(fake, redis, victim.pid)) >= 5, 30, "calls in flight on the victim")
        victim.kill()
        killed_at_ms = redis_now_ms(redis)
        time.sleep(0.5)  # the fake finishes reading what was sent before the kill
        victims = running_on(redis, worker_id(victim.pid))  # what the dead worker left behind
        mid_call = in_flight(fake, redis, victim.pid)
        batch = service.wait(batch_id, timeout_s=90)
        records = service.results(batch_id)
    figures = Figures.tally(
        "worker SIGKILL (whole process)", [record.job_id for record in records], records,
        **recovery_figures(records, victims, killed_at_ms),
        calls_cut_off=len(mid_call), provider_calls=calls_for(fake, "whole "), lease_s=LEASE_S,
        visibility_timeout_s=visibility_timeout_s(cluster.config),
    ).record()

    assert batch.total == 80 and batch.counts[JobState.SUCCEEDED] == 80
    assert figures.succeeded == 80 and figures.lost == 0
    assert victims and figures.measured["worker_lost_records"] == len(victims)
    # Re-run by the lease, long before the broker would redeliver (its timeout is hours).
    assert figures.measured["kill_to_requeue_max_s"] < LEASE_S + 10 < visibility_timeout_s(cluster.config)
    assert_each_attempt_recorded_once(records)
    assert_ledger_matches(drain_ledger(cluster.redis_url, cluster.database_url), records)
    # A call the dead worker had in flight is made once more: at-least-once, never lost.
    assert figures.measured["provider_calls"] == 80 + len(mid_call)


def test_sigkill_of_one_prefork_pool_child_loses_nothing(cluster: Cluster, fake: FakeOpenAI) -> None:
    redis = client(cluster.redis_url)
    cluster.start_workers(1, pool="prefork", concurrency=2, queues="pool")
    parent = cluster.workers[-1]
    children = wait_until(lambda: len(pool_children(parent.pid)) == 2 and pool_children(parent.pid), 30, "two pool children")
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"pool {index}", "pool") for index in range(12)])
        busy = wait_until(lambda: [pid for pid in children if in_flight(fake, redis, pid)], 30, "a child mid-call")
        os.kill(busy[0], signal.SIGKILL)
        killed_at_ms = redis_now_ms(redis)
        time.sleep(0.5)
        victims = running_on(redis, worker_id(busy[0]))
        mid_call = in_flight(fake, redis, busy[0])
        batch = service.wait(batch_id, timeout_s=90)
        records = service.results(batch_id)
    replacement = [pid for pid in pool_children(parent.pid) if pid not in children]
    figures = Figures.tally(
        "worker SIGKILL (one prefork pool child)", [record.job_id for record in records], records,
        **recovery_figures(records, victims, killed_at_ms),
        calls_cut_off=len(mid_call), provider_calls=calls_for(fake, "pool "), lease_s=LEASE_S,
        replacement_children=len(replacement),
    ).record()

    assert batch.counts[JobState.SUCCEEDED] == 12 and figures.lost == 0
    assert not alive(busy[0]) and parent.process is not None and parent.process.poll() is None
    assert victims and figures.measured["worker_lost_records"] == len(victims)
    assert figures.measured["kill_to_requeue_max_s"] < LEASE_S + 10
    assert_each_attempt_recorded_once(records)
    assert_ledger_matches(drain_ledger(cluster.redis_url, cluster.database_url), records)
    assert figures.measured["provider_calls"] == 12 + len(mid_call)
