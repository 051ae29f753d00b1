"""The fleet-wide limiter end to end: three real `llmq worker` processes share one provider's
requests/min and tokens/min, and the fake OpenAI server, which enforces both itself (sliding 60 s
window, 429 + retry-after) and counts what it admitted, never sees more than the limits allow.

A per-minute limit only binds over a minute, and this test runs for about half of one; what it
checks beyond the 60 s window is the pacing: over any few seconds the fake admits no more than the
limiter's one-second burst plus the per-minute rate, where a limiter that let a minute's allowance
through at once would send every job in the first second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmq import LLMRequest
from llmq.contract.models import JobState
from llmq.worker.limiter.estimate import estimate_request_tokens
from tests.support.fakes.base import RecordedRequest
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import (
    Cluster,
    fast_retry,
    openai_entry,
    providers_json,
    service_config,
    start_cluster,
)

REQUESTS_PER_MINUTE = 120
TOKENS_PER_MINUTE = 30_000
JOBS = 40
WORKERS = 3
TRIP_S = 2.0  # the most a request takes from the limiter's admission to the fake's
DATA = Path(__file__).resolve().parents[3] / "producer" / "data" / "agent_requests.jsonl"

LIMITS = {"requests_per_minute": REQUESTS_PER_MINUTE, "tokens_per_minute": TOKENS_PER_MINUTE, "refund_unused_tokens": False}


def agent_requests(count: int) -> list[LLMRequest]:
    """Requests of varied sizes: the shipped agent prompts, cycled, with max_tokens from 50 to 400."""
    bodies = [json.loads(line)["body"] for line in DATA.read_text().splitlines() if line.strip()]
    requests = []
    for index in range(count):
        body = bodies[index % len(bodies)]
        requests.append(LLMRequest(
            messages=body["messages"], model="gpt-4o-mini", temperature=0, max_tokens=50 + (index * 97) % 351,
            metadata={"caller": "ratelimit-e2e"},
        ))
    return requests


def admitted_tokens(fake: FakeOpenAI, request: LLMRequest) -> int:
    """What the fake counts for this request at admission, from the body the adapter sends."""
    body = {"model": request.model, "messages": [m.model_dump() for m in request.messages], "max_tokens": request.max_tokens}
    return fake.tokens_for(RecordedRequest("POST", "/v1/chat/completions", {}, {}, json.dumps(body).encode()))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(latency_s=0.3, latency_jitter_s=0.4).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[Cluster]:
    config = service_config(
        {"openai": openai_entry(fake, timeout=30, rate_limits=LIMITS)}, retry=fast_retry(3, backoff_max_s=0.5),
        jobs={"deadline_s": 300, "lease_s": 10}, health={"minimum_calls": 1000},
    )
    started = start_cluster(tmp_path_factory.mktemp("ratelimit-e2e"), config)
    started.start_workers(WORKERS, concurrency=20)
    yield started
    started.stop()


def test_the_estimate_is_never_below_what_the_fake_counts() -> None:
    fake = FakeOpenAI()  # never started: only its counting is used
    odd_texts = ["a b c d e f g h i j k l m n o p", "x" * 1001, "ünïcödé " * 50, "日本語のテキスト" * 20,
                 "1 2 3 4 5 6 7 8 9 0 " * 30, "", " "]
    requests = agent_requests(60) + [
        LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", max_tokens=7) for text in odd_texts
    ]
    for request in requests:
        assert estimate_request_tokens(request) >= admitted_tokens(fake, request), request.messages[-1].content[:40]


@pytest.mark.slow
def test_workers_together_stay_within_the_providers_limits(cluster: Cluster, fake: FakeOpenAI) -> None:
    policy = fake.rate_limit(REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE)
    requests = agent_requests(JOBS)
    with cluster.service() as service:
        batch_id = service.submit_batch(requests)
        batch = service.wait(batch_id, timeout_s=240)
        jobs = service.results(batch_id)
    assert batch.counts.get(JobState.SUCCEEDED) == JOBS, batch.counts
    assert all(job.result is not None and job.result.provider == "openai" for job in jobs)
    assert policy.rejected == 0, f"the fake answered {policy.rejected} requests with 429"
    assert policy.accepted == JOBS == len(fake.requests)

    # Never more than the limits in any 60 s window (the fake's own view, at admission).
    most_requests, most_tokens = policy.busiest(60.0)
    assert most_requests <= REQUESTS_PER_MINUTE and most_tokens <= TOKENS_PER_MINUTE
    # Paced, not bursty: any short window holds at most the one-second burst plus the rate over
    # the window and one second more for the trip from the limiter to the fake.
    largest = max(estimate_request_tokens(request) for request in requests)
    for window_s in (2.0, 5.0, 10.0):
        requests_in_window, tokens_in_window = policy.busiest(window_s)
        assert requests_in_window <= REQUESTS_PER_MINUTE / 60 * (window_s + 2), (window_s, requests_in_window)
        token_bound = max(TOKENS_PER_MINUTE / 60, largest) + TOKENS_PER_MINUTE / 60 * (window_s + 1)
        assert tokens_in_window <= token_bound, (window_s, tokens_in_window)

    # The work was shared: more than one worker process ran jobs under the one limit.
    served = [worker.log_path.read_text().count("succeeded in") for worker in cluster.workers]
    assert sum(1 for count in served if count) >= 2, served

    # `llmq providers` shows the usage against each limit (requests and tokens of the last 60 s).
    # On a slow machine the first admissions may have left that window by the time it is read, so
    # the expected figure is what the fake admitted in it: between the admissions surely inside it
    # (newer than 60 s before the read ended, less the trip from limiter to fake) and those that
    # may be (newer than 60 s before the read began). On a quick run both are every job.
    counted = sum(admitted_tokens(fake, request) for request in requests)
    assert counted == policy.accepted_tokens
    read_from = time.monotonic()
    status = providers_json(cluster)["openai"]["rate_limits"]
    read_until = time.monotonic()
    surely = [tokens for at, tokens in policy.admitted if at > read_until - 60.0 + TRIP_S]
    maybe = [tokens for at, tokens in policy.admitted if at > read_from - 60.0]
    assert status["requests_per_minute"]["limit"] == REQUESTS_PER_MINUTE
    assert len(surely) <= status["requests_per_minute"]["used"] <= len(maybe), (len(surely), len(maybe))
    assert status["tokens_per_minute"]["limit"] == TOKENS_PER_MINUTE
    # Settled to what the provider counted (its prompt tokens plus max_tokens), the same sum the fake admitted.
    assert sum(surely) <= status["tokens_per_minute"]["used"] <= sum(maybe), (sum(surely), sum(maybe))

