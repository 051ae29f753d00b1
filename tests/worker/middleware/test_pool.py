"""Pools end to end (worker/middleware/pool.py): real `llmq worker` processes, a real redis-server and
fake OpenAI servers, one per member, each enforcing its own limits. Members share a batch in
proportion to their limits without a 429; a job that one member would set aside runs on a member
with room; a job waiting in one member's line moves when another can take it, and leaves the line."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from llmq import LLMRequest
from llmq.contract import keys
from llmq.contract.config import RateLimits
from llmq.contract.labels import TaskLabel
from llmq.contract.models import JobState
from llmq.worker.limiter.limiter import RateLimiter
from llmq.worker.limiter.limits import pause_key
from tests.support.fakes.openai import FakeOpenAI
from tests.support.fakes.serve import serve_fake
from tests.support.harness import Cluster, fast_retry, openai_entry, providers_json, service_config, start_cluster
from tests.support.limiter import run_with_limiter

#: Jobs in the shared batch: six seconds' worth at the members' limits together.
JOBS = 180


def ask(text: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=0, max_tokens=16)


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeOpenAI]]:
    servers = {name: FakeOpenAI().start() for name in ("small", "spare")}
    yield servers
    for server in servers.values():
        server.stop()


def start(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeOpenAI] | dict[str, str], rpm: dict[str, int],
          pool: dict[str, object]) -> Cluster:
    """Two workers on members (name -> a fake, or a fake's URL) with these requests/min, in one pool."""
    providers = {name: openai_entry(fakes[name], rate_limits={"requests_per_minute": limit, "enforced_as": "token_bucket"})
                 for name, limit in rpm.items()}
    config = service_config(providers, pools={"gpt": pool}, default_provider="gpt", retry=fast_retry(3),
                            health={"minimum_calls": 1000})
    cluster = start_cluster(tmp_path_factory.mktemp("pool"), config)
    cluster.start_workers(2, concurrency=50)
    return cluster


def test_members_share_a_batch_in_proportion_to_their_limits(tmp_path_factory: pytest.TempPathFactory) -> None:
    rpm = {"small": 600, "large": 1200}
    # Each fake in a process of its own, holding its entry's limit as a bucket refilled at that rate.
    # Its burst is two seconds of it where the limiter plans for one: the limits themselves are
    # checked here, and bench/scheduling/jitter.py measures the margin for calls bunched on their
    # way (this suite's parallel processes bunch them more than any network).
    served = {name: serve_fake() for name in rpm}
    try:
        for name, limit in rpm.items():
            served[name].control("rate_limit", {"requests_per_minute": limit, "mode": "bucket", "burst_s": 2.0})
        cluster = start(tmp_path_factory, {name: fake.url for name, fake in served.items()}, rpm,
                        {"members": ["small", "large"]})
        try:
            with cluster.service() as service:
                batch = service.wait(service.submit_batch([ask(f"task {n}") for n in range(JOBS)]), timeout_s=120)
                jobs = service.results(batch.batch_id)
            status = providers_json(cluster)
        finally:
            cluster.stop()
        stats = {name: fake.stats() for name, fake in served.items()}
    finally:
        for fake in served.values():
            fake.stop()
    assert batch.counts.get(JobState.SUCCEEDED) == JOBS, batch.counts
    assert [stats[name]["rate_limited"] for name in rpm] == [0, 0]  # no 429 from either
    split = {name: sum(1 for job in jobs if job.result.provider == name) for name in rpm}
    assert 0.55 <= split["large"] / JOBS <= 0.8, split  # two thirds, give or take the bursts
    # `llmq providers` shows the split, counted as the members served.
    assert {name: status[name]["pool"]["calls"] for name in rpm} == split
    assert status["large"]["pool"]["name"] == "gpt" and status["large"]["pool"]["strategy"] == "headroom"
    # Each job's record says where it ran, and its attempts were made there alone.
    for job in jobs:
        assert job.route[job.route_index].provider == job.result.provider
        assert [attempt["provider"] for attempt in job.attempts] == [job.result.provider]


def test_a_job_another_member_can_take_now_does_not_wait(tmp_path_factory: pytest.TempPathFactory,
                                                         fakes: dict[str, FakeOpenAI]) -> None:
    """`small` is where every job is first sent (its weight) and takes one call now and then; `spare`
    is paused at first. A job that `small` would set aside waits where the wait is shortest, then
    runs on `spare`; once `spare` is free, jobs go there at once. A job already waiting in `small`'s
    line moves to `spare` when `small` cannot take it, and leaves that line."""
    cluster = start(tmp_path_factory, fakes, {"small": 20, "spare": 600},
                    {"members": ["small", "spare"], "weights": {"small": 1000, "spare": 0.001}})
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        with cluster.service() as service:
            _pause(cluster, "spare", 2.0)
            first = service.wait(service.submit(ask("first")), timeout_s=30)
            second = service.wait(service.submit(ask("second")), timeout_s=30)  # small: ~3 s; spare: 2 s
            assert (first.result.provider, second.result.provider) == ("small", "spare")
            third = service.wait(service.submit(ask("third")), timeout_s=30)
            assert third.result.provider == "spare"

            # A job set aside in small's line; then small's circuit opens and spare is free.
            _pause(cluster, "spare", 30.0)
            # small's bucket emptied and a caller first in its interactive line: whenever a worker
            # takes the job, small's turn for it is seconds away (longer than a worker waits in place).
            small_limits = RateLimits(requests_per_minute=20, enforced_as="token_bucket")
            _in_line(cluster, "small", small_limits, join=True)
            waiting_id = service.submit(ask("waiting"))
            _wait_for_state(service, waiting_id, JobState.RATE_LIMITED)
            _in_line(cluster, "small", small_limits, join=False)  # that caller leaves the line
            record = client.hgetall(keys.job(waiting_id))
            assert record["queue"] == keys.queue_name("small", "interactive") and record["waiting_for"]
            client.hset(keys.circuit("small"), mapping={"state": "open", "opened_at": int(time.time() * 1000)})
            client.delete(pause_key("spare"))
            moved = service.wait(waiting_id, timeout_s=30)
            record = client.hgetall(keys.job(waiting_id))
        status = providers_json(cluster)
        lines = [key for key in client.scan_iter(f"{keys.rate_limit_scope('small')}:*:line:*") if client.zcard(key)]
    finally:
        client.close()
        cluster.stop()
    assert moved.state is JobState.SUCCEEDED and moved.result.provider == "spare"
    assert [attempt["provider"] for attempt in moved.attempts] == ["spare"]  # the wait was not an attempt
    assert [hop.provider for hop in moved.route] == ["spare", "small"]  # small still follows if spare fails
    # Same job id; its record names the member it ran on: the queue it would be sent to again, Flower's label.
    label = TaskLabel.from_stored(record["label"], attempt=1)
    assert record["queue"] == keys.queue_name("spare", "interactive") and label is not None and label.provider == "spare"
    assert not lines  # nothing is kept for it in small's line
    assert {name: status[name]["pool"]["calls"] for name in ("small", "spare")} == {"small": 1, "spare": 3}


def _pause(cluster: Cluster, provider: str, seconds: float) -> None:
    run_with_limiter(cluster.redis_url, lambda limiter: limiter.penalize(provider, seconds))


def _in_line(cluster: Cluster, provider: str, limits: RateLimits, *, join: bool) -> None:
    """join: take what `provider`'s bucket holds, then stand first in its interactive line as `holder`;
    else: `holder` leaves the line."""

    async def act(limiter: RateLimiter) -> None:
        if not join:
            await limiter.leave(provider, "gpt-4o-mini", limits, "holder")
            return
        for number in range(100):
            decision = await limiter.acquire(provider, "gpt-4o-mini", limits, 16, lease_id=f"holder:{number}",
                                             lane="interactive", join=False)
            if not decision.granted:
                break
        refused = await limiter.acquire(provider, "gpt-4o-mini", limits, 16, lease_id="holder", lane="interactive")
        assert not refused.granted

    run_with_limiter(cluster.redis_url, act)


def _wait_for_state(service: object, job_id: str, state: JobState, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll(job_id).state is state:  # type: ignore[attr-defined]
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {state}")

