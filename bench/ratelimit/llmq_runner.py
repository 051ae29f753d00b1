"""llmq's side of the benchmark: a fresh redis-server and N real `llmq worker` processes per run,
the batch submitted with `LLMService.submit_batch`, the makespan read from the job records."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.client.service import LLMService
from llmq.contract import keys
from llmq.contract.models import JobState
from tests.support.harness import (
    Cluster,
    WorkerProcess,
    openai_entry,
    service_config,
    start_cluster,
    wait_for_workers,
)


def config_text(url: str, api_key: str, *, rpm: int, tpm: int, **limit_settings: Any) -> str:
    # OpenAI keeps counting max_tokens: llmq settles to its prompt count plus max_tokens.
    limits = {"requests_per_minute": rpm, "tokens_per_minute": tpm, "refund_unused_tokens": False, **limit_settings}
    entry = openai_entry(url, api_key=api_key, timeout=120, rate_limits=limits)
    return service_config({"openai": entry}, retry={"max_attempts_per_provider": 8}, jobs={"deadline_s": 3600})


@dataclass
class QuietWorker(WorkerProcess):
    """`llmq worker` at WARNING: per-task INFO lines would measure the log file, not the limiter.

    `checkout` and `python`: run the worker of another checkout of llmq (an older commit, say)."""

    loglevel: str = "WARNING"
    checkout: Path | None = None
    python: str = sys.executable

    def start(self) -> QuietWorker:
        import subprocess

        command = [self.python, "-m", "llmq.cli", "--config", str(self.config_path), "worker",
                   "--concurrency", str(self.concurrency), "--pool", self.pool, "--loglevel", self.loglevel]
        self.process = subprocess.Popen(
            command, env=self.env(), stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.checkout,
        )
        return self


@dataclass
class LlmqResult:
    makespan_s: float
    succeeded: int
    failed: int
    lost: int
    notes: dict[str, Any] = field(default_factory=dict)


def run_llmq(url: str, api_key: str, bodies: list[dict[str, Any]], *, rpm: int, tpm: int, workers: int,
             concurrency: int, timeout_s: float, checkout: Path | None = None, python: str = sys.executable,
             limit_settings: dict[str, Any] | None = None) -> LlmqResult:
    """`limit_settings`: more `rate_limits` settings for the provider entry (e.g. enforced_as)."""
    config = config_text(url, api_key, rpm=rpm, tpm=tpm, **(limit_settings or {}))
    return run_config(config, bodies, workers=workers, concurrency=concurrency, timeout_s=timeout_s,
                      checkout=checkout, python=python)


def run_config(config: str, bodies: list[dict[str, Any]], *, workers: int, concurrency: int, timeout_s: float,
               checkout: Path | None = None, python: str = sys.executable) -> LlmqResult:
    """The batch through `workers` llmq workers on `config` (YAML text), submitted once they idle."""
    with idle_workers(config, workers=workers, concurrency=concurrency, checkout=checkout, python=python) as (
            cluster, started):
        cpu_before = workers_cpu_s(started)
        result = asyncio.run(_submit_and_wait(cluster, bodies, timeout_s))
        result.notes["worker CPU s"] = round(workers_cpu_s(started) - cpu_before, 1)
        return result


@contextmanager
def idle_workers(config: str, *, workers: int, concurrency: int, checkout: Path | None = None,
                 python: str = sys.executable) -> Iterator[tuple[Cluster, list[QuietWorker]]]:
    """A fresh redis-server and `workers` llmq worker processes on `config`, idle and ready; stopped after."""
    root = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    cluster = start_cluster(root, config)
    try:
        started = [QuietWorker(cluster.config_path, cluster.redis_url, cluster.database_url, root / f"worker-{index}.log",
                               concurrency=concurrency, checkout=checkout, python=python) for index in range(workers)]
        cluster.workers.extend(worker.start() for worker in started)
        wait_for_workers(cluster.redis_url, workers, started, timeout_s=120)
        _wait_until_idle([worker.pid for worker in started])
        yield cluster, started
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _submit_and_wait(cluster: Cluster, bodies: list[dict[str, Any]], timeout_s: float) -> LlmqResult:
    service = LLMService(cluster.config, redis_url=cluster.redis_url)
    try:
        submitted = await submit_bench_batch(service, bodies)
        return await batch_outcome(service, submitted, timeout_s)
    finally:
        await service.aclose()


@dataclass(frozen=True)
class SubmittedBatch:
    batch_id: str
    requests: int
    #: Epoch s before `submit_batch` was called (the makespan counts from here), and how long it took.
    began: float
    submit_s: float


async def submit_bench_batch(service: LLMService, bodies: list[dict[str, Any]]) -> SubmittedBatch:
    """The batch through `submit_batch` (its default lane), every request of one caller, "bench"."""
    began = time.time()
    batch_id = await service.submit_batch([{**body, "metadata": {"caller": "bench"}} for body in bodies])
    return SubmittedBatch(batch_id, len(bodies), began, time.time() - began)


async def batch_outcome(service: LLMService, batch: SubmittedBatch, timeout_s: float) -> LlmqResult:
    """Wait for the batch (up to `timeout_s`), then its makespan, what succeeded, failed or was lost, and notes."""
    try:
        await service.wait(batch.batch_id, timeout_s=timeout_s)
    except TimeoutError:
        pass  # what did not finish is counted as lost below
    jobs = await service.results(batch.batch_id)
    dispatches = await _dispatches(service, [job.job_id for job in jobs])
    began = batch.began
    succeeded = [job for job in jobs if job.state == JobState.SUCCEEDED]
    failed = sum(1 for job in jobs if job.state == JobState.FAILED)
    finished = [job.finished_at for job in jobs if job.finished_at]
    makespan_s = (max(finished) - began) if finished else float("inf")
    calls = [attempt for job in jobs for attempt in job.attempts]
    served = Counter(job.result.provider for job in succeeded if job.result is not None)
    return LlmqResult(
        makespan_s, len(succeeded), failed, batch.requests - len(succeeded) - failed,
        {"submit s": round(batch.submit_s, 2), "dispatches per job": round(dispatches / max(1, len(jobs)), 2),
         "calls per job": round(len(calls) / max(1, len(jobs)), 3),
         # From the start of submit_batch: the first call, and the last call's end.
         "first call s": round(min((call["started_at"] for call in calls), default=0.0) - began, 2),
         "last call ended s": round(max((call["finished_at"] for call in calls), default=0.0) - began, 2),
         "served by": dict(sorted(served.items()))},
    )


async def _dispatches(service: LLMService, job_ids: list[str]) -> int:
    """Times the jobs were sent to a worker: one each, plus one per wait set aside (rate_limited)."""
    total = 0
    async with service.jobs.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "dispatch")
        for value in await pipe.execute():
            total += int(value or 0)
    return total


def _wait_until_idle(pids: list[int], busy_share: float = 0.1, timeout_s: float = 20.0) -> None:
    """Workers report in before they are done starting (threads, connections): the batch goes in
    once they idle, using less than `busy_share` of a core together, as a running fleet would."""
    deadline = time.monotonic() + timeout_s
    before = sum(_cpu_s(pid) for pid in pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        after = sum(_cpu_s(pid) for pid in pids)
        if after - before < busy_share * 0.5:
            return
        before = after


def workers_cpu_s(workers: list[QuietWorker]) -> float:
    """CPU seconds the worker processes (and their waited-for children) have used."""
    return sum(_cpu_s(worker.pid) for worker in workers)


def _cpu_s(pid: int) -> float:
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # utime, stime, cutime, cstime: the worker and its (waited-for) children.
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
