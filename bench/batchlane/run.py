"""A batch through the providers' batch API (a completion window) vs the same batch in the normal lane.

    .venv/bin/python -m bench.batchlane.run             # 2,000 lines; ~1 min per run
    .venv/bin/python -m bench.batchlane.run --lines 200 # a quick look

The fake OpenAI server with its Batch API (`tests.support.fakes.serve openai-batches`) runs in its
own process, on a compressed clock: a batch validates for 2 s, runs its lines over 20 s, finalizes
for 2 s, within a 60 s window (seconds for the real API's minutes and hours). It enforces sync
rate limits on Chat Completions and none on its batch endpoints, as OpenAI gives batches a queue
of their own. One `llmq worker` serves the entry, with the same limits in llmq's limiter.

Two runs of the same 2,000 requests (bench/ratelimit/workload.py's batch): `--completion-window 24h`,
then the normal lane. Reported: the cost of each from the SQL ledger and their ratio (OpenAI's
batch price is half its standard one: target 0.50), the calls each made to the provider, the
turnaround against the fake's batch duration and window, and the sync limits while the batch
lane ran (the fake's admitted Chat Completions calls and llmq's limiter usage, sampled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.ratelimit.llmq_runner import QuietWorker
from bench.ratelimit.workload import build
from llmq.client.service import LLMService
from llmq.contract.config import load_config
from llmq.worker.limiter.limiter import RateLimiter
from llmq.worker.store.ledger import Store
from tests.reliability.support import drain_ledger
from tests.support.harness import openai_entry, service_config, start_cluster, wait_for_workers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out"
TIMING = {"validating_s": 2.0, "in_progress_s": 20.0, "finalizing_s": 2.0, "window_s": 60.0, "cancel_s": 1.0}
LIMITS = {"requests_per_minute": 3000, "tokens_per_minute": 2_000_000, "refund_unused_tokens": False}
LIMITER_FIELDS = ("requests_per_minute", "tokens_per_minute")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000, help="requests in the batch (default 2000)")
    parser.add_argument("--concurrency", type=int, default=200, help="slots of the llmq worker (default 200)")
    parser.add_argument("--json", metavar="PATH", default=str(OUT / "batchlane.json"), help="also write the figures here")
    return parser.parse_args(argv)


def start_fake() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "tests.support.fakes.serve", "openai-batches"],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    url = json.loads(process.stdout.readline())["url"]
    httpx.post(f"{url}/_fake/batches", json={"timing": TIMING})
    httpx.post(f"{url}/_fake/rate_limit", json=LIMITS)
    return process, url


def fake_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/_fake/stats").json()


async def run_batch(service: LLMService, bodies: list[dict[str, Any]], window: str | None,
                    sample: Any) -> tuple[str, float, list[dict[str, Any]]]:
    started = time.monotonic()
    batch_id = await service.submit_batch(bodies, completion_window=window, cache=False)
    samples = []
    while True:
        record = await service.batch(batch_id)
        assert record is not None
        samples.append(await sample())
        if record.done:
            return batch_id, time.monotonic() - started, samples
        await asyncio.sleep(1.0)


async def limiter_sample(service: LLMService, url: str) -> dict[str, Any]:
    config = service.config
    usage = await RateLimiter(service.jobs.redis).snapshot("openai", config.provider("openai").rate_limits)
    stats = await asyncio.to_thread(fake_stats, url)
    return {"limiter": {name: (usage or {}).get(name, {}).get("used") for name in LIMITER_FIELDS},
            "fake_sync_requests": stats["sync_requests"]}


def costs(database_url: str, batch_id: str) -> dict[str, Any]:
    store = Store(database_url)
    try:
        rows = [row for row in store.usage_rows() if row["batch_id"] == batch_id]
    finally:
        store.close()
    return {"rows": len(rows), "cost_usd": sum((row["cost_usd"] for row in rows), Decimal(0)),
            "standard_cost_usd": sum((row["standard_cost_usd"] or row["cost_usd"] for row in rows), Decimal(0)),
            "tiers": sorted({row["price_tier"] for row in rows})}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = build(args.lines).bodies
    fake, url = start_fake()
    root = Path(tempfile.mkdtemp(prefix="llmq-bench-batchlane-"))
    entry = openai_entry(url, timeout=120, rate_limits=LIMITS,
                         batch_api={"gather_s": 1.0, "poll_min_s": 1.0, "poll_max_s": 5.0})
    cluster = start_cluster(root, service_config({"openai": entry}, jobs={"deadline_s": 3600}))
    try:
        worker = QuietWorker(cluster.config_path, cluster.redis_url, cluster.database_url, root / "worker.log",
                             concurrency=args.concurrency)
        cluster.workers.append(worker.start())
        wait_for_workers(cluster.redis_url, 1, [worker], timeout_s=120)
        figures = asyncio.run(measure(cluster.config_path, cluster.redis_url, cluster.database_url, url, bodies))
    finally:
        cluster.stop()
        fake.terminate()
        shutil.rmtree(root, ignore_errors=True)
    report(figures, args.json)
    return 0


async def measure(config_path: Path, redis_url: str, database_url: str, url: str,
                  bodies: list[dict[str, Any]]) -> dict[str, Any]:
    service = LLMService(load_config(config_path), redis_url=redis_url)
    try:
        figures: dict[str, Any] = {"lines": len(bodies), "fake_timing": TIMING, "sync_limits": LIMITS}
        for name, window in (("batch_api", "24h"), ("normal_lane", None)):
            before = await asyncio.to_thread(fake_stats, url)
            batch_id, turnaround_s, samples = await run_batch(service, bodies, window,
                                                              lambda: limiter_sample(service, url))
            after = await asyncio.to_thread(fake_stats, url)
            await asyncio.to_thread(drain_ledger(redis_url, database_url).close)
            record = await service.batch(batch_id)
            assert record is not None
            provider_batches = await service.provider_batches(batch_id)
            figures[name] = {
                "turnaround_s": round(turnaround_s, 1),
                "succeeded": record.counts.get("succeeded", 0), "failed": record.counts.get("failed", 0),
                "provider_calls": {"sync": after["sync_requests"] - before["sync_requests"],
                                   **{kind: count - before["batch_calls"].get(kind, 0)
                                      for kind, count in after["batch_calls"].items()}},
                "provider_batches": after["batches"] - before["batches"],
                "most_sync_calls_seen": max(sample["fake_sync_requests"] for sample in samples)
                - before["sync_requests"],
                "limiter_peak": {key: max((sample["limiter"][key] or 0) for sample in samples) for key in LIMITER_FIELDS},
                **costs(database_url, batch_id),
                # Seconds after submit_batch began (record.created_at) that each provider batch was taken
                # in (its lines gathered), accepted by the provider, and ended (every line settled).
                "provider_batch_times_s": [
                    {step: round(at - record.created_at, 1) for step, at in (
                        ("gathered", pb.created_at), ("submitted", pb.submitted_at), ("ended", pb.ended_at)) if at}
                    for pb in provider_batches],
            }
        figures["cost_ratio"] = round(float(figures["batch_api"]["cost_usd"] / figures["normal_lane"]["cost_usd"]), 4)
        return figures
    finally:
        await service.aclose()


def report(figures: dict[str, Any], json_path: str) -> None:
    timing = figures["fake_timing"]
    duration_s = timing["validating_s"] + timing["in_progress_s"] + timing["finalizing_s"]
    lane, normal = figures["batch_api"], figures["normal_lane"]
    print(f"{figures['lines']} lines; fake batch: {duration_s:g} s to run, {timing['window_s']:g} s window")
    for name, row in (("batch API (--completion-window 24h)", lane), ("normal lane", normal)):
        calls = ", ".join(f"{count} {kind}" for kind, count in row["provider_calls"].items() if count)
        print(f"  {name}: {row['succeeded']} succeeded, {row['failed']} failed in {row['turnaround_s']} s; "
              f"${row['cost_usd']:.6f} (standard ${row['standard_cost_usd']:.6f}); tiers {row['tiers']}; "
              f"{row['provider_batches']} provider batches; calls: {calls}")
    print(f"  cost ratio (batch API / normal lane): {figures['cost_ratio']}")
    print(f"  turnaround / the fake's batch duration: {lane['turnaround_s'] / duration_s:.2f}; "
          f"/ its window: {lane['turnaround_s'] / timing['window_s']:.2f}; "
          f"provider batch steps (s after submit): {lane['provider_batch_times_s']}")
    print(f"  sync limits while the batch API ran: {lane['most_sync_calls_seen']} Chat Completions calls, "
          f"llmq limiter peak {lane['limiter_peak']}")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
