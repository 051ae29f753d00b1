"""The measured runs: llmq end to end, the bare Celery task, direct httpx, and in-flight calls.

Every throughput run times from just before the first message is enqueued (or
the first call is made) to the last job's completion as its own record says:
llmq's `finished_at` (Redis clock), Celery's result `date_done`, the last
httpx reply. Polling for completion therefore adds no error to the figure.
Every reply's content is checked against what the fake answers for its prompt.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import redis
from celery import Celery

from bench.overhead.bare import QUEUE, TASK, chat_body
from llmq.client.service import LLMService
from llmq.contract.models import JobRecord, JobState, LLMRequest

MODEL = "gpt-4o-mini"
MAX_TOKENS = 32


def prompt(index: int) -> str:
    return f"bench request {index}"


def expected_content(index: int) -> str:
    """What FakeOpenAI answers (tests/support/fakes/base.py fake_reply_text)."""
    return f"Task: fake openai answer to '{prompt(index)}'"


@dataclass
class Costs:
    """What a run cost: CPU seconds per process and per worker thread group, Redis commands by name."""

    cpu_s: dict[str, float] = field(default_factory=dict)
    worker_threads_cpu_s: dict[str, float] = field(default_factory=dict)
    redis_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class Throughput:
    mode: str
    jobs: int
    correct: int
    elapsed_s: float  # first enqueue -> last completion
    enqueue_s: float  # first enqueue -> last message published (the whole run for direct calls)
    returned_s: float  # first enqueue -> the waiting call returned
    costs: Costs = field(default_factory=Costs)
    failures: dict[str, int] = field(default_factory=dict)  # "state: error" -> jobs (llmq only)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s


# --- llmq ------------------------------------------------------------------------------


async def llmq_batch(service: LLMService, first: int, count: int) -> Throughput:
    """submit_batch + wait through real workers; timed to the last job's finished_at."""
    requests = [_llmq_request(index) for index in range(first, first + count)]
    started = time.time()
    batch_id = await service.submit_batch(requests)
    enqueued = time.time()
    await service.wait(batch_id, timeout_s=600)
    returned = time.time()
    records = await service.results(batch_id)
    correct = sum(1 for offset, record in enumerate(records) if answered(record, first + offset))
    last = max(record.finished_at or returned for record in records)
    return Throughput("llmq", count, correct, last - started, enqueued - started, returned - started,
                      failures=failures(records, first))


def _llmq_request(index: int) -> LLMRequest:
    return LLMRequest(
        messages=[{"role": "user", "content": prompt(index)}], model=MODEL, temperature=0, max_tokens=MAX_TOKENS
    )


def answered(record: JobRecord, index: int) -> bool:
    """The job succeeded with exactly the fake's answer to its prompt."""
    return (
        record.state is JobState.SUCCEEDED and record.result is not None
        and record.result.content == expected_content(index)
    )


def failures(records: list[JobRecord], first: int) -> dict[str, int]:
    """What went wrong with the jobs that did not answer correctly: "state: error" -> count."""
    seen: Counter[str] = Counter()
    for offset, record in enumerate(records):
        if answered(record, first + offset):
            continue
        error = record.error or {}
        seen[f"{record.state.value}: {error.get('type', '')} {str(error.get('message', ''))[:120]}".strip()] += 1
    return dict(seen)


# --- bare Celery ---------------------------------------------------------------------


def bare_batch(app: Celery, redis_url: str, first: int, count: int) -> Throughput:
    """send_task for each prompt on one producer connection (as llmq publishes), then wait for results."""
    started = time.time()
    task_ids = bare_publish(app, first, count)
    enqueued = time.time()
    client = redis.Redis.from_url(redis_url)
    try:
        _wait_for_results(client, task_ids)
        returned = time.time()
        correct, last = _bare_outcome(client, task_ids, first)
    finally:
        client.close()
    return Throughput("bare celery", count, correct, last - started, enqueued - started, returned - started)


def bare_publish(app: Celery, first: int, count: int) -> list[str]:
    task_ids = [f"bare_{uuid.uuid4().hex}" for _ in range(count)]
    with app.producer_or_acquire() as producer:
        for offset, task_id in enumerate(task_ids):
            app.send_task(TASK, args=[MODEL, prompt(first + offset), MAX_TOKENS], task_id=task_id, queue=QUEUE,
                          routing_key=QUEUE, producer=producer)
    return task_ids


def _bare_outcome(client: redis.Redis, task_ids: list[str], first: int) -> tuple[int, float]:
    """(correct answers, time of the last completion) from the tasks' stored results."""
    metas = _result_metas(client, task_ids)
    correct = sum(
        1 for offset, meta in enumerate(metas)
        if meta["status"] == "SUCCESS" and meta["result"] == expected_content(first + offset)
    )
    return correct, max(datetime.fromisoformat(meta["date_done"]).timestamp() for meta in metas)


def _result_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def _wait_for_results(
    client: redis.Redis, task_ids: list[str], timeout_s: float = 600, *, max_interval_s: float = 0.5,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Poll with LLMService.wait's schedule (20 ms growing to 0.5 s) until every result exists.

    Tasks finish roughly in order, so each poll checks the oldest 100 unfinished ones
    and looks further only when all of those are done: a few Redis commands per poll.
    """
    pending = list(task_ids)
    deadline = time.monotonic() + timeout_s
    interval_s = 0.02
    while pending:
        head = pending[:100]
        pipe = client.pipeline(transaction=False)
        for task_id in head:
            pipe.exists(_result_key(task_id))
        still = [task_id for task_id, found in zip(head, pipe.execute(), strict=True) if not found]
        if on_poll is not None:
            on_poll()
        pending = still + pending[100:]
        if not pending:
            return
        if still:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} bare Celery tasks unfinished after {timeout_s}s")
            time.sleep(interval_s)
            interval_s = min(max_interval_s, interval_s * 1.5)


def _result_metas(client: redis.Redis, task_ids: list[str]) -> list[dict[str, Any]]:
    metas: list[dict[str, Any]] = []
    for start in range(0, len(task_ids), 1000):
        raw = client.mget([_result_key(task_id) for task_id in task_ids[start : start + 1000]])
        metas += [json.loads(value) for value in raw]
    return metas


# --- direct httpx --------------------------------------------------------------------


class DirectClient:
    """asyncio + httpx.AsyncClient, at most `concurrency` calls at once (a semaphore).

    `pool_size` > 0 spreads the calls over several clients of that many connections
    each (least busy first): httpcore's pool does O(connections^2) work per request,
    so one client of a thousand connections is slower than the server it measures.
    """

    def __init__(self, fake_url: str, api_key: str, concurrency: int, *, pool_size: int = 0) -> None:
        size = pool_size or concurrency
        self.clients = [
            httpx.AsyncClient(
                base_url=fake_url, timeout=600.0, headers={"authorization": f"Bearer {api_key}"},
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
            for _ in range(-(-concurrency // size))
        ]
        self.busy = [0] * len(self.clients)
        self.slots = asyncio.Semaphore(concurrency)

    async def call(self, index: int) -> str:
        async with self.slots:
            which = min(range(len(self.clients)), key=self.busy.__getitem__)
            self.busy[which] += 1
            try:
                response = await self.clients[which].post(
                    "/v1/chat/completions", json=chat_body(MODEL, prompt(index), MAX_TOKENS)
                )
            finally:
                self.busy[which] -= 1
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])

    async def batch(self, first: int, count: int) -> Throughput:
        started = time.time()
        contents = await asyncio.gather(*(self.call(index) for index in range(first, first + count)))
        finished = time.time()
        correct = sum(1 for offset, content in enumerate(contents) if content == expected_content(first + offset))
        elapsed_s = finished - started
        return Throughput("direct httpx", count, correct, elapsed_s, elapsed_s, elapsed_s)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


# --- in flight -----------------------------------------------------------------------


@dataclass
class InFlight:
    worker: str
    jobs: int
    correct: int
    latency_s: float
    elapsed_s: float  # first enqueue -> last completion
    fake_max_in_flight: int
    peak_running_jobs: int | None  # llmq: the batch's `running` count at its highest
    rss_idle_kib: int
    rss_peak_kib: int
    threads_peak: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s since start, running jobs, RSS KiB)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def mean_in_flight(self) -> float:
        """Calls in flight on average over the run: every call holds the fake latency_s."""
        return self.jobs * self.latency_s / self.elapsed_s

    @property
    def rss_per_call_kib(self) -> float:
        return (self.rss_peak_kib - self.rss_idle_kib) / max(1, self.fake_max_in_flight)


@dataclass
class Probe:
    """What the in-flight runs sample: the worker's memory and threads, the fake's counters."""

    rss: Callable[[], int]
    threads: Callable[[], int]
    fake_stats: Callable[[], dict[str, int]]
    latency_s: float


async def llmq_in_flight(
    service: LLMService, first: int, count: int, probe: Probe, sample_every_s: float = 0.1
) -> InFlight:
    """One batch against the slow fake; samples running jobs and the worker's RSS while it runs."""
    rss_idle = probe.rss()
    requests = [_llmq_request(index) for index in range(first, first + count)]
    started = time.time()
    batch_id = await service.submit_batch(requests)
    samples: list[tuple[float, int, int]] = []
    threads_peak = 0
    while True:
        record = await service.batch(batch_id)
        assert record is not None
        samples.append((time.time() - started, record.counts.get(JobState.RUNNING, 0), probe.rss()))
        threads_peak = max(threads_peak, probe.threads())
        if record.done:
            break
        await asyncio.sleep(sample_every_s)
    records = await service.results(batch_id)
    correct = sum(1 for offset, job in enumerate(records) if answered(job, first + offset))
    last = max(job.finished_at or time.time() for job in records)
    stats = await asyncio.to_thread(probe.fake_stats)
    return InFlight(
        "llmq", count, correct, probe.latency_s, last - started, stats["max_in_flight"],
        max(running for _, running, _ in samples), rss_idle, max(kib for _, _, kib in samples), threads_peak,
        samples, failures(records, first),
    )


def bare_in_flight(app: Celery, redis_url: str, first: int, count: int, probe: Probe) -> InFlight:
    """The same against a bare Celery worker with as many pool threads."""
    rss_idle = probe.rss()
    samples: list[tuple[float, int, int]] = []
    threads_peak = 0
    started = time.time()

    def sample() -> None:
        nonlocal threads_peak
        samples.append((time.time() - started, 0, probe.rss()))
        threads_peak = max(threads_peak, probe.threads())

    task_ids = bare_publish(app, first, count)
    client = redis.Redis.from_url(redis_url)
    try:
        _wait_for_results(client, task_ids, max_interval_s=0.1, on_poll=sample)
        correct, last = _bare_outcome(client, task_ids, first)
    finally:
        client.close()
    return InFlight(
        "bare celery", count, correct, probe.latency_s, last - started, probe.fake_stats()["max_in_flight"], None,
        rss_idle, max(kib for _, _, kib in samples), threads_peak, samples,
    )
