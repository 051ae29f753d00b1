"""llmq's overhead: jobs/s through llmq vs a bare Celery task vs direct httpx, and in-flight calls.

    .venv/bin/python bench/overhead/run.py                  # the short default run
    .venv/bin/python bench/overhead/run.py --jobs 10000 --rounds 3 --inflight-jobs 2000 --inflight-concurrency 2000

See bench/overhead/README.md for what exactly is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis

from bench.overhead import modes, procs
from bench.overhead.bare import make_bare_app
from llmq.cli.embedded import RedisServer
from llmq.client.service import LLMService
from llmq.contract.config import load_config
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.harness import openai_entry, service_config


def config_text(fake_url: str) -> str:
    return service_config({"openai": openai_entry(fake_url, timeout=120)}, jobs={"deadline_s": 600})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs per timed throughput run (default 500)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed jobs before each timed run (default 100)")
    parser.add_argument("--concurrency", type=int, default=100, help="slots: pool threads / semaphore (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three throughput runs (median reported)")
    parser.add_argument("--inflight-jobs", type=int, default=1000, help="jobs for the in-flight run (default 1000)")
    parser.add_argument("--inflight-concurrency", type=int, default=1000, help="worker slots for it (default 1000)")
    parser.add_argument("--latency-s", type=float, default=2.0, help="the slow fake's latency (default 2 s)")
    parser.add_argument("--worker-events", choices=["on", "off"], default="on",
                        help="Celery task events in both queued modes' workers (on: `llmq worker`'s default, "
                             "what Flower shows; off: `llmq worker --no-events`)")
    parser.add_argument("--pool", choices=["async", "threads"], default="async",
                        help="llmq worker's pool (`llmq worker --pool`; default async, threads: Celery's thread pool)")
    parser.add_argument("--inflight-bare", action="store_true", help="also measure a bare Celery worker in flight")
    parser.add_argument("--loglevel", default="WARNING", help="both workers' log level (default WARNING)")
    parser.add_argument("--only", choices=["throughput", "inflight"], help="run one part only")
    parser.add_argument("--modes", default="llmq,bare,direct", help="throughput modes (default llmq,bare,direct)")
    parser.add_argument("--profile", metavar="DIR", help="record py-spy profiles of the llmq and bare workers here")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (worker logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    redis_server = RedisServer(root / "redis", persistence=False).start()
    figures: dict[str, object] = {"args": vars(args), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    print(f"{os.cpu_count()} CPUs, load average {_load()} (other work here skews jobs/s more than CPU ms/job)")
    started = time.monotonic()
    try:
        if args.only != "inflight":
            figures["throughput"] = throughput_part(args, root, redis_server)
        if args.only != "throughput":
            figures["inflight"] = inflight_part(args, root, redis_server)
    finally:
        redis_server.stop()
        figures["load_after"] = os.getloadavg()
        print(f"done in {time.monotonic() - started:.0f} s, load average {_load()}")
        if args.keep:
            print(f"\nlogs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


# --- (a) (b) (c) throughput --------------------------------------------------------------


def throughput_part(args: argparse.Namespace, root: Path, redis_server: RedisServer) -> dict[str, object]:
    fake = procs.start_fake(root, "fake-zero-latency", 0.0)
    config_path = root / "llm_service.yaml"
    config_path.write_text(config_text(fake.url))
    available = {"llmq": llmq_run, "bare": bare_run, "direct": direct_run}
    order = [available[name.strip()] for name in args.modes.split(",")]
    runs: dict[str, list[modes.Throughput]] = {}
    print(f"throughput: {args.jobs} jobs per run after {args.warmup} warm-up jobs, concurrency {args.concurrency}, "
          f"{args.rounds} round(s), zero-latency fake in its own process")
    try:
        first = 0
        for round_index in range(args.rounds):
            # Alternate the order between rounds so drift on a shared machine hits every mode alike.
            for run in order if round_index % 2 == 0 else list(reversed(order)):
                result = run(args, root, redis_server, fake, config_path, first)
                first += args.warmup + args.jobs
                runs.setdefault(result.mode, []).append(result)
                print(f"  round {round_index + 1} {describe(result)}")
    finally:
        fake.stop()
    return report_throughput(runs)


def llmq_run(args: argparse.Namespace, root: Path, redis_server: RedisServer, fake: procs.FakeProcess,
             config_path: Path, first: int) -> modes.Throughput:
    worker = procs.start_llmq_worker(root, "llmq-worker", config_path, redis_server.url,
                                     concurrency=args.concurrency, loglevel=args.loglevel, queue="openai",
                                     events=args.worker_events == "on", pool=args.pool)
    try:
        async def batches() -> modes.Throughput:
            service = LLMService(load_config(config_path), redis_url=redis_server.url)
            try:
                await modes.llmq_batch(service, first, args.warmup)
                with profiled(args, "llmq", worker.pid), cpu_meter(worker.pid, redis_server, fake) as cpu:
                    result = await modes.llmq_batch(service, first + args.warmup, args.jobs)
                result.costs = cpu
                return result
            finally:
                await service.aclose()

        return asyncio.run(batches())
    finally:
        worker.stop()


def bare_run(args: argparse.Namespace, root: Path, redis_server: RedisServer, fake: procs.FakeProcess,
             config_path: Path, first: int) -> modes.Throughput:
    worker = procs.start_bare_worker(root, "bare-worker", config_path, redis_server.url, fake.url, DEFAULT_API_KEY,
                                     concurrency=args.concurrency, loglevel=args.loglevel,
                                     events=args.worker_events == "on")
    app = make_bare_app(load_config(config_path), redis_server.url)
    try:
        modes.bare_batch(app, redis_server.url, first, args.warmup)
        with profiled(args, "bare", worker.pid), cpu_meter(worker.pid, redis_server, fake) as cpu:
            result = modes.bare_batch(app, redis_server.url, first + args.warmup, args.jobs)
        result.costs = cpu
        return result
    finally:
        worker.stop()


def direct_run(args: argparse.Namespace, root: Path, redis_server: RedisServer, fake: procs.FakeProcess,
               config_path: Path, first: int) -> modes.Throughput:
    async def batches() -> modes.Throughput:
        client = modes.DirectClient(fake.url, DEFAULT_API_KEY, args.concurrency)
        try:
            await client.batch(first, args.warmup)
            with cpu_meter(None, redis_server, fake) as cpu:
                result = await client.batch(first + args.warmup, args.jobs)
            result.costs = cpu
            return result
        finally:
            await client.aclose()

    return asyncio.run(batches())


@contextmanager
def cpu_meter(worker_pid: int | None, redis_server: RedisServer, fake: procs.FakeProcess) -> Iterator[modes.Costs]:
    """CPU seconds per process (and per worker thread group) and Redis commands during the block."""
    assert redis_server.process is not None
    meters: dict[str, Callable[[], float]] = {
        "bench (client)": lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "redis-server": procs.CpuSample(redis_server.process.pid).seconds,
        "fake": procs.CpuSample(fake.process.pid).seconds,
    }
    if worker_pid is not None:
        meters["worker"] = procs.CpuSample(worker_pid).seconds
        for child in procs.children(worker_pid):  # llmq's SQL outbox flusher: counted, not hidden
            meters["outbox (worker's child)"] = procs.CpuSample(child).seconds
    before = {name: read() for name, read in meters.items()}
    threads_before = procs.thread_cpu_s(worker_pid) if worker_pid is not None else {}
    calls_before = _command_counts(redis_server, {})
    costs = modes.Costs()
    yield costs
    costs.cpu_s = {name: read() - before[name] for name, read in meters.items()}
    costs.redis_calls = _command_counts(redis_server, calls_before)
    if worker_pid is not None:
        costs.worker_threads_cpu_s = procs.cpu_by_thread_group(worker_pid, threads_before)


def _command_counts(redis_server: RedisServer, before: dict[str, int]) -> dict[str, int]:
    """Redis commands served since `before` (INFO commandstats; commands run inside Lua scripts count too)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    counts = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    counts["info"] = counts.get("info", 0) + 1  # this call
    return {name: count - before.get(name, 0) for name, count in counts.items() if count - before.get(name, 0) > 0}


@contextmanager
def profiled(args: argparse.Namespace, name: str, pid: int) -> Iterator[None]:
    """With --profile: py-spy records the worker's on-CPU stacks (folded, per thread) during the block.

Summarise with `python -m bench.overhead.folded DIR/llmq-worker.folded`."""
    if not args.profile:
        yield
        return
    import subprocess

    out = Path(args.profile) / f"{name}-worker.folded"
    out.parent.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out), "--threads",
                            "--rate", "250", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the timed run starts
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(30)


def describe(result: modes.Throughput) -> str:
    costs = result.costs

    def per_job(seconds: dict[str, float]) -> str:
        return ", ".join(f"{name} {1000 * spent / result.jobs:.2f}" for name, spent in seconds.items() if spent >= 0.01)

    calls = sorted(costs.redis_calls.items(), key=lambda item: -item[1])
    top_calls = ", ".join(f"{name} {count / result.jobs:.1f}" for name, count in calls[:8])
    text = (f"{result.mode:<13} {result.jobs_per_s:6.0f} jobs/s  ({result.correct}/{result.jobs} correct, "
            f"{result.elapsed_s:.2f} s to last completion, enqueued in {result.enqueue_s:.2f} s)\n"
            f"      CPU ms/job by process: {per_job(costs.cpu_s)}")
    if costs.worker_threads_cpu_s:
        text += f"\n      worker CPU ms/job by thread: {per_job(costs.worker_threads_cpu_s)}"
    for failure, count in result.failures.items():
        text += f"\n      NOT CORRECT: {count} x {failure}"
    return text + f"\n      Redis commands/job: {sum(costs.redis_calls.values()) / result.jobs:.1f} ({top_calls})"


def report_throughput(runs: dict[str, list[modes.Throughput]]) -> dict[str, object]:
    medians = {mode: statistics.median(run.jobs_per_s for run in results) for mode, results in runs.items()}
    print("\n  jobs/s (median of rounds):")
    for mode, rate in medians.items():
        print(f"    {mode:<13} {rate:8.0f}")
    ratio = medians["llmq"] / medians["bare celery"] if {"llmq", "bare celery"} <= set(medians) else None
    if ratio is not None:
        print(f"  llmq / bare Celery = {ratio:.2f}  (target >= 0.8: {'met' if ratio >= 0.8 else 'MISSED'})")
    if {"llmq", "direct httpx"} <= set(medians):
        print(f"  llmq / direct httpx = {medians['llmq'] / medians['direct httpx']:.2f}")
    print()
    return {"runs": {mode: [asdict(run) for run in results] for mode, results in runs.items()},
            "median_jobs_per_s": medians, "llmq_over_bare": ratio}


# --- (d) in flight -----------------------------------------------------------------------


def inflight_part(args: argparse.Namespace, root: Path, redis_server: RedisServer) -> dict[str, object]:
    print(f"in flight: {args.inflight_jobs} jobs at once to one worker process with {args.inflight_concurrency} slots, "
          f"fake latency {args.latency_s} s")
    fake_ceiling = fake_capacity_check(root, args)
    print(f"  fake check (direct httpx over pools of 50 connections): max in flight {fake_ceiling['max_in_flight']}, "
          f"{fake_ceiling['elapsed_s']:.2f} s for {args.inflight_jobs} calls")
    figures: dict[str, object] = {"fake_check": fake_ceiling}
    runs = [("llmq", _llmq_inflight)] + ([("bare", _bare_inflight)] if args.inflight_bare else [])
    for name, run in runs:
        fake = procs.start_fake(root, f"fake-slow-{name}", args.latency_s)
        config_path = root / f"llm_service_slow_{name}.yaml"
        config_path.write_text(config_text(fake.url))
        try:
            result = run(args, root, redis_server, fake, config_path)
        finally:
            fake.stop()
        print(describe_inflight(result))
        figures[name] = {**asdict(result), "mean_in_flight": result.mean_in_flight}
    return figures


def describe_inflight(result: modes.InFlight) -> str:
    target = "met" if result.fake_max_in_flight >= 500 else "MISSED"
    running = f", peak jobs running {result.peak_running_jobs}" if result.peak_running_jobs is not None else ""
    text = (f"  {result.worker}: max in flight at the fake {result.fake_max_in_flight} (target >= 500: {target}), "
            f"mean over the run {result.mean_in_flight:.0f}{running}; {result.correct}/{result.jobs} correct in "
            f"{result.elapsed_s:.1f} s ({result.jobs / result.elapsed_s:.0f} jobs/s)\n"
            f"      RSS {result.rss_idle_kib / 1024:.0f} MiB idle -> {result.rss_peak_kib / 1024:.0f} MiB peak "
            f"({result.rss_per_call_kib:.0f} KiB per call at the peak), {result.threads_peak} threads")
    for failure, count in result.failures.items():
        text += f"\n      NOT CORRECT: {count} x {failure}"
    return text


def _probe(args: argparse.Namespace, pid: int, fake: procs.FakeProcess) -> modes.Probe:
    return modes.Probe(lambda: procs.rss_kib(pid), lambda: procs.thread_count(pid), fake.stats, args.latency_s)


def _llmq_inflight(args: argparse.Namespace, root: Path, redis_server: RedisServer, fake: procs.FakeProcess,
                   config_path: Path) -> modes.InFlight:
    worker = procs.start_llmq_worker(root, "llmq-worker-inflight", config_path, redis_server.url,
                                     concurrency=args.inflight_concurrency, loglevel=args.loglevel, queue="openai",
                                     events=args.worker_events == "on", pool=args.pool)

    async def batches() -> modes.InFlight:
        service = LLMService(load_config(config_path), redis_url=redis_server.url)
        try:
            # A few jobs first, so the idle figure includes the provider client and imported modules.
            await modes.llmq_batch(service, 0, 10)
            with profiled(args, "llmq-inflight", worker.pid):
                return await modes.llmq_in_flight(service, 10, args.inflight_jobs, _probe(args, worker.pid, fake))
        finally:
            await service.aclose()

    try:
        return asyncio.run(batches())
    finally:
        worker.stop()


def _bare_inflight(args: argparse.Namespace, root: Path, redis_server: RedisServer, fake: procs.FakeProcess,
                   config_path: Path) -> modes.InFlight:
    worker = procs.start_bare_worker(root, "bare-worker-inflight", config_path, redis_server.url, fake.url,
                                     DEFAULT_API_KEY, concurrency=args.inflight_concurrency, loglevel=args.loglevel,
                                     events=args.worker_events == "on")
    app = make_bare_app(load_config(config_path), redis_server.url)
    try:
        modes.bare_batch(app, redis_server.url, 0, 10)
        with profiled(args, "bare-inflight", worker.pid):
            return modes.bare_in_flight(app, redis_server.url, 10, args.inflight_jobs, _probe(args, worker.pid, fake))
    finally:
        worker.stop()


def fake_capacity_check(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Direct httpx at the same concurrency: shows what the slow fake itself sustains."""
    fake = procs.start_fake(root, "fake-slow-check", args.latency_s)
    try:
        async def calls() -> modes.Throughput:
            client = modes.DirectClient(fake.url, DEFAULT_API_KEY, args.inflight_concurrency, pool_size=50)
            try:
                return await client.batch(0, args.inflight_jobs)
            finally:
                await client.aclose()

        result = asyncio.run(calls())
        max_in_flight = fake.stats()["max_in_flight"]
        return {"max_in_flight": max_in_flight, "elapsed_s": result.elapsed_s, "correct": result.correct}
    finally:
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
