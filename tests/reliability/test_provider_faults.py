"""Scenario 4: provider faults from the fake servers, through the whole queue.

One provider entry per fault, each on its own fake OpenAI server that misbehaves
on every call: 429 storms (endless, and a rate limit that clears), 5xx, a server
that never answers, connection resets, malformed JSON, and for streamed jobs
truncated streams, error events mid-stream and a slow trickle. Every job must end
in a terminal state within its deadline, failing with the typed error the fault
maps to (or succeeding when the fault clears). No job may hang.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from llmq import LLMRequest
from llmq.contract.config import ServiceConfig
from llmq.contract.models import JobRecord, JobState
from tests.reliability.support import Figures
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    service_config,
    start_cluster,
)

pytestmark = pytest.mark.slow

JOBS_PER_FAULT = 8
MAX_ATTEMPTS = 2
TRICKLE_DEADLINE_S = 6.0
#: Reaper period (worker/runtime.py) plus the time a transition takes on a busy machine.
DEADLINE_SLACK_S = 6.0
FOREVER = 10**6
#: The circuit breaker would make single-provider jobs wait for the provider to heal, ending
#: them with DeadlineExceededError; here each fault's own typed error is under test.
CIRCUIT_NEVER_OPENS = {"health": {"minimum_calls": 1000000}} if "health" in ServiceConfig.model_fields else {}


@dataclass(frozen=True)
class Fault:
    name: str
    arm: Callable[[FakeOpenAI], object]
    #: Error types a job may fail with; "succeeded" when the fault clears and the job may succeed.
    outcomes: frozenset[str]
    stream: bool = False
    deadline_s: float | None = None


FAULTS = [
    Fault("429 storm (endless)", lambda f: f.fail_next(429, FOREVER, headers={"retry-after": "1"}),
          frozenset({"RateLimitedError"})),
    Fault("429 rate limit that clears", lambda f: f.rate_limit(4, None, window_s=2.0),
          frozenset({"succeeded", "RateLimitedError"})),
    Fault("HTTP 500", lambda f: f.fail_next(500, FOREVER), frozenset({"ServerError"})),
    Fault("HTTP 503", lambda f: f.fail_next(503, FOREVER), frozenset({"OverloadedError"})),
    Fault("no answer (hang)", lambda f: f.inject("hang", FOREVER), frozenset({"ProviderTimeoutError"})),
    Fault("connection reset", lambda f: f.inject("reset", FOREVER), frozenset({"ProviderConnectionError"})),
    Fault("malformed JSON", lambda f: f.inject("malformed", FOREVER), frozenset({"MalformedResponseError"})),
    Fault("truncated stream", lambda f: f.inject("truncate", FOREVER),
          frozenset({"ProviderConnectionError", "MalformedResponseError"}), stream=True),
    Fault("error event mid-stream", lambda f: f.inject("stream_error", FOREVER), frozenset({"ServerError"}), stream=True),
    # Each chunk comes well within the read timeout (2 s: a chunk every 2 s raced it), so only
    # the job's deadline can stop the call.
    Fault("slow trickle (stream, 1.5 s a chunk)", lambda f: setattr(f, "chunk_delay_s", 1.5),
          frozenset({"DeadlineExceededError"}), stream=True, deadline_s=TRICKLE_DEADLINE_S),
]


def entry_name(index: int) -> str:
    return f"fault{index}"


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeOpenAI]]:
    servers = [FakeOpenAI().start() for _ in FAULTS]
    for server, fault in zip(servers, FAULTS):
        fault.arm(server)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: list[FakeOpenAI]) -> Iterator[Cluster]:
    providers = {entry_name(index): openai_entry(server, timeout=2) for index, server in enumerate(fakes)}
    providers["warm"] = {"type": "mock", "models": ["gpt-4o-mini"]}
    config = service_config(providers, retry=fast_retry(MAX_ATTEMPTS, retry_after_cap_s=3),
                            jobs={"deadline_s": 30, "lease_s": 5}, **CIRCUIT_NEVER_OPENS)
    started = start_cluster(tmp_path_factory.mktemp("faults"), config)
    started.start_workers(1, concurrency=100)
    with started.service() as service:  # a cold worker's first claim is slow; the deadlines below are short
        warm_up = LLMRequest(messages=[{"role": "user", "content": "warm up"}], model="gpt-4o-mini", provider="warm")
        assert service.wait(service.submit(warm_up), timeout_s=60).state is JobState.SUCCEEDED
    yield started
    started.stop()


def ask(index: int, number: int, fault: Fault) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": f"{fault.name} {number}"}], model="gpt-4o-mini",
                      provider=entry_name(index), temperature=0, max_tokens=16, stream=fault.stream)


def outcome(record: JobRecord) -> str:
    if record.state is JobState.SUCCEEDED:
        return "succeeded"
    return (record.error or {}).get("type", f"untyped {record.state.value}")


def test_every_provider_fault_ends_each_job_with_its_typed_error_within_its_deadline(
    cluster: Cluster, fakes: list[FakeOpenAI]
) -> None:
    with cluster.service() as service:
        # The deadline-bound jobs first, so they are running (not queued) when their deadline comes.
        order = sorted(range(len(FAULTS)), key=lambda index: FAULTS[index].deadline_s is None)
        submitted = {
            index: [service.submit(ask(index, number, FAULTS[index]), deadline_s=FAULTS[index].deadline_s)
                    for number in range(JOBS_PER_FAULT)]
            for index in order
        }
        every = [job_id for job_ids in submitted.values() for job_id in job_ids]
        for job_id in every:
            service.wait(job_id, timeout_s=60)  # a hanging job fails the test here
        records = {job_id: service.poll(job_id) for job_id in every}
    problems = []
    for index, fault in enumerate(FAULTS):
        mine = [records[job_id] for job_id in submitted[index]]
        cut_mid_call = [r for r in mine if [a.get("error_type") for a in r.attempts] == ["DeadlineExceededError"]]
        if fault.deadline_s is not None:  # the deadline stopped a call in progress (not only queued jobs)
            assert cut_mid_call, [record.attempts for record in mine]
        Figures.tally(f"provider fault: {fault.name}", submitted[index], mine, cut_by_deadline_mid_call=len(cut_mid_call),
                      attempts=sum(len(record.attempts) for record in mine), provider_calls=len(fakes[index].requests),
                      late_s_max=round(max(record.finished_at - record.deadline_at for record in mine), 2)).record()
        for record in mine:
            if outcome(record) not in fault.outcomes:
                problems.append(f"{fault.name}: {record.job_id} ended {outcome(record)}, expected {sorted(fault.outcomes)}")
            assert record.finished_at is not None and record.deadline_at is not None
            if record.finished_at > record.deadline_at + DEADLINE_SLACK_S:
                problems.append(f"{fault.name}: {record.job_id} finished {record.finished_at - record.deadline_at:.1f}s "
                                "after its deadline")
            retried_out = record.state is JobState.FAILED and record.error and record.error.get("retryable")
            if retried_out and fault.deadline_s is None:
                assert len(record.attempts) == MAX_ATTEMPTS, (fault.name, record.attempts)
    assert not problems, "\n".join(problems)
