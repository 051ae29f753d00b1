"""The HTTP front's cost: added latency over the in-process `LLMService` path, and concurrent streams.

Every part is a real process: a redis-server, the fake OpenAI server in a process of its own
(`python -m tests.support.fakes.serve openai`), one `llmq worker`, one `llmq serve` (the front
under test), SQLite; this script is the client (aiohttp, keep-alive, one key without limits).

1. Added latency. The same request, one at a time, alternating between the two paths so drift
   hits both alike, against a zero-latency fake:
   - `wait`:   `LLMService.generate` in this process  vs  POST /v1/chat/completions;
   - `stream`: `LLMService.stream_generate` to its final chunk  vs  the same with `stream: true`
     to `data: [DONE]`.
   Both paths run the same job through the same worker; the difference is the front: HTTP both
   ways, the key, the per-key limiter's round trip, the mapping, SSE framing. `wait` paths both
   poll the job record (20 ms, growing), so their difference hides inside the polling step;
   `stream` paths wake on the job's Redis Stream, so theirs is the front's cost alone.

2. Concurrent streams. `--streams` clients each open a stream (`stream: true`) through the one
   front, and again as soon as it ends, for `--duration-s`; the fake sends the first byte after
   `--first-byte-s` and a chunk every `--chunk-delay-s`. Counted: streams completed, errors
   (a status other than 200, an error event, a stream without [DONE], a dropped connection),
   time to first chunk, and the front process's CPU per stream.

    .venv/bin/python -m bench.front.run [--runs 200] [--streams 1000] [--duration-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench.streaming.run import CONFIG, start_fake
from llmq.client.service import LLMService
from tests.http.support import FrontProcess, create_key
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.harness import start_cluster

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "propose the next task"}], "max_tokens": 64,
        "temperature": 0}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 1. added latency -----------------------------------------------------------------------


async def http_wait(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=BODY) as reply:
        body = await reply.json()
    assert reply.status == 200 and body["choices"][0]["message"]["content"], body
    return time.perf_counter() - began


async def http_stream(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as reply:
        assert reply.status == 200, await reply.text()
        last = b""
        async for line in reply.content:
            if line.strip():
                last = line.strip()
    assert last == b"data: [DONE]", last
    return time.perf_counter() - began


async def http_health(session: aiohttp.ClientSession, url: str) -> float:
    """A bare round trip to the same server (no key, no job): what HTTP alone costs here."""
    began = time.perf_counter()
    async with session.get(f"{url}/health") as reply:
        await reply.read()
    assert reply.status == 200
    return time.perf_counter() - began


async def inproc_wait(service: LLMService) -> float:
    began = time.perf_counter()
    response = await service.generate(BODY)
    assert response.content
    return time.perf_counter() - began


async def inproc_stream(service: LLMService) -> float:
    began = time.perf_counter()
    final = False
    async for chunk in service.stream_generate({**BODY, "stream": True}):
        final = bool(chunk.metadata.get("final"))
    assert final
    return time.perf_counter() - began


async def added_latency(url: str, key: str, service: LLMService, runs: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        "wait": {"llmq": [], "front": []}, "stream": {"llmq": [], "front": []}, "health": {"front": []},
    }
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}"}) as session:
        for _ in range(10):  # warm-up: connections, scripts, the key cache, the adapter's pool
            await http_wait(session, url), await inproc_wait(service), await http_stream(session, url), await inproc_stream(service)
        for run in range(runs):
            pairs = (("wait", inproc_wait(service), http_wait(session, url)),
                     ("stream", inproc_stream(service), http_stream(session, url)))
            for kind, in_process, over_http in pairs:
                first, second = (in_process, over_http) if run % 2 == 0 else (over_http, in_process)
                first_s, second_s = await first, await second
                results[kind]["llmq"].append(first_s if run % 2 == 0 else second_s)
                results[kind]["front"].append(second_s if run % 2 == 0 else first_s)
            results["health"]["front"].append(await http_health(session, url))
    return results


def print_latency(results: dict[str, dict[str, list[float]]], runs: int) -> None:
    print(f"\n1. added latency: {runs} sequential requests per path, alternating, zero-latency fake")
    print(f"{'path':<8} {'in-process p50':>15} {'p99':>8} {'via front p50':>14} {'p99':>8} {'added p50':>10} {'added p99':>10} {'ratio p50':>10}")
    for kind in ("wait", "stream"):
        llmq, front = results[kind]["llmq"], results[kind]["front"]
        p50s = statistics.median(llmq), statistics.median(front)
        p99s = percentile(llmq, 0.99), percentile(front, 0.99)
        print(f"{kind:<8} {p50s[0] * 1000:12.2f} ms {p99s[0] * 1000:5.1f} ms {p50s[1] * 1000:11.2f} ms {p99s[1] * 1000:5.1f} ms "
              f"{(p50s[1] - p50s[0]) * 1000:7.2f} ms {(p99s[1] - p99s[0]) * 1000:7.2f} ms {p50s[1] / p50s[0]:9.3f}x")
    paired = [front - llmq for llmq, front in zip(results["stream"]["llmq"], results["stream"]["front"])]
    print(f"stream, paired differences (each front request minus its in-process neighbour): "
          f"median {statistics.median(paired) * 1000:.2f} ms, p99 {percentile(paired, 0.99) * 1000:.2f} ms")
    health = results["health"]["front"]
    print(f"bare HTTP round trip to the same server (GET /health): p50 {statistics.median(health) * 1000:.2f} ms, "
          f"p99 {percentile(health, 0.99) * 1000:.2f} ms")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# --- 2. concurrent streams ------------------------------------------------------------------


@dataclass
class StreamStats:
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_chunk_s: list[float] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one_stream(session: aiohttp.ClientSession, url: str, stats: StreamStats) -> None:
    began = time.perf_counter()
    stats.in_flight += 1
    stats.peak = max(stats.peak, stats.in_flight)
    try:
        async with session.post(f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as reply:
            if reply.status != 200:
                stats.error(f"status {reply.status}")
                await reply.read()
                return
            first, last = True, b""
            async for line in reply.content:
                line = line.strip()
                if not line:
                    continue
                if first:
                    stats.first_chunk_s.append(time.perf_counter() - began)
                    first = False
                if line.startswith(b'data: {"error"'):
                    stats.error("error event")
                    return
                last = line
            if last != b"data: [DONE]":
                stats.error("no [DONE]")
                return
            stats.completed += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        stats.error(type(exc).__name__)
    finally:
        stats.in_flight -= 1


async def one_inproc_stream(service: LLMService, stats: StreamStats) -> None:
    """The same stream read in this process through `LLMService.stream_generate` (no front)."""
    began = time.perf_counter()
    stats.in_flight += 1
    stats.peak = max(stats.peak, stats.in_flight)
    try:
        first, final = True, False
        async for chunk in service.stream_generate({**BODY, "stream": True}):
            if first:
                stats.first_chunk_s.append(time.perf_counter() - began)
                first = False
            final = bool(chunk.metadata.get("final"))
        if final:
            stats.completed += 1
        else:
            stats.error("no final chunk")
    except Exception as exc:  # counted, not raised: the run goes on
        stats.error(type(exc).__name__)
    finally:
        stats.in_flight -= 1


async def run_clients(streams: int, duration_s: float, ramp_s: float, one: Callable[[StreamStats], Awaitable[None]]) -> tuple[StreamStats, float]:
    stats = StreamStats()
    stop_at = time.monotonic() + ramp_s + duration_s

    async def client(index: int) -> None:
        await asyncio.sleep(ramp_s * index / streams)  # ramp up, so the front is not met by one wall of connects
        while time.monotonic() < stop_at:
            await one(stats)

    began = time.monotonic()
    await asyncio.gather(*(client(index) for index in range(streams)))
    return stats, time.monotonic() - began


async def concurrent_streams(url: str, key: str, streams: int, duration_s: float, ramp_s: float) -> tuple[StreamStats, float]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"authorization": f"Bearer {key}"}) as session:
        return await run_clients(streams, duration_s, ramp_s, lambda stats: one_stream(session, url, stats))


async def concurrent_inproc_streams(config: object, redis_url: str, streams: int, duration_s: float, ramp_s: float) -> tuple[StreamStats, float]:
    service = LLMService(config, redis_url=redis_url, redis_max_connections=streams + 100)  # type: ignore[arg-type]
    try:
        return await run_clients(streams, duration_s, ramp_s, lambda stats: one_inproc_stream(service, stats))
    finally:
        await service.aclose()


def print_streams(
    stats: StreamStats, elapsed_s: float, streams: int, cpu: dict[str, float], args: argparse.Namespace, *, title: str,
) -> None:
    print(f"\n{title}: {streams} clients for {args.duration_s:.0f} s "
          f"(+{args.ramp_s:.0f} s ramp), fake first byte {args.first_byte_s * 1000:.0f} ms, a chunk every "
          f"{args.chunk_delay_s * 1000:.0f} ms")
    total = stats.completed + sum(stats.errors.values())
    print(f"streams completed {stats.completed} of {total}, errors {sum(stats.errors.values())} {stats.errors or ''}")
    print(f"peak concurrent streams {stats.peak}; {stats.completed / elapsed_s:.1f} streams/s over {elapsed_s:.1f} s")
    if stats.first_chunk_s:
        print(f"time to first chunk: p50 {statistics.median(stats.first_chunk_s) * 1000:.0f} ms, "
              f"p99 {percentile(stats.first_chunk_s, 0.99) * 1000:.0f} ms")
    if stats.completed:
        print("CPU per stream: " + ", ".join(
            f"{name} {seconds / stats.completed * 1000:.2f} ms" for name, seconds in cpu.items()
        ) + f" (the front: {cpu['front'] / elapsed_s * 100:.0f}% of a core)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="sequential requests per path (latency)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent stream clients (0: skip)")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--ramp-s", type=float, default=5.0)
    parser.add_argument("--first-byte-s", type=float, default=0.2, help="streams: the fake's delay before the first byte")
    parser.add_argument("--chunk-delay-s", type=float, default=0.05, help="streams: the fake's delay between chunks")
    parser.add_argument("--compare-in-process", action="store_true",
                        help="then run the same streams through LLMService in this process, without the front")
    args = parser.parse_args()
    fake, fake_url = start_fake(0.0, 0.0)
    root = Path(tempfile.mkdtemp(prefix="llmq-bench-front-"))
    cluster = start_cluster(root, CONFIG.format(key=DEFAULT_API_KEY, url=fake_url))
    front = None
    try:
        cluster.start_workers(1, concurrency=max(200, args.streams + 200))
        front = FrontProcess(cluster, root / "front.log").start()
        assert front.process is not None
        key = create_key(cluster.database_url, "bench")
        service = LLMService(cluster.config, redis_url=cluster.redis_url)
        if args.runs:
            results = asyncio.run(added_latency(front.url, key, service, args.runs))
            print_latency(results, args.runs)
        if args.streams:
            httpx.post(f"{fake_url}/_fake/latency", json={"latency_s": args.first_byte_s, "chunk_delay_s": args.chunk_delay_s})
            pids = {"front": front.process.pid, "worker": cluster.workers[0].pid, "fake": fake.pid, "client": os.getpid()}
            if cluster.redis.process is not None:
                pids["redis"] = cluster.redis.process.pid
            runs = [("2. concurrent streams through one front process",
                     lambda: concurrent_streams(front.url, key, args.streams, args.duration_s, args.ramp_s))]
            if args.compare_in_process:
                runs.append(("2b. the same streams read in this process (LLMService.stream_generate, no front)",
                             lambda: concurrent_inproc_streams(cluster.config, cluster.redis_url, args.streams,
                                                               args.duration_s, args.ramp_s)))
            for title, load in runs:
                before = {name: cpu_s(pid) for name, pid in pids.items()}
                stats, elapsed_s = asyncio.run(load())
                cpu = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
                print_streams(stats, elapsed_s, args.streams, cpu, args, title=title)
    finally:
        if front is not None:
            front.stop()
        cluster.stop()
        fake.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
