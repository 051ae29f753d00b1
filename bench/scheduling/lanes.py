"""Lanes: interactive calls issued while a batch saturates the provider, against the same calls on
an idle provider, and what they cost the batch.

The fake OpenAI server (its own process) enforces 600 requests/min and 120,000 tokens/min as
strict token buckets (one second of burst, `/_fake/rate_limit` with `mode: bucket`) and answers
in 0.3 s plus up to 0.7 s at random; the provider entry has the same limits. Each phase gets a
fresh redis-server, fresh `llmq worker` processes (4 by default, 100 slots each) and a reset
fake:

- A, idle: the interactive calls alone. `--calls` requests (40) built like the batch's (another
  seed), one sent every `--every-s` (0.5 s) whatever came back (so a few are out at once), each
  with `LLMService.submit(..., lane="interactive")` and waited for;
- B, batch alone: `--requests` (1,200) requests of the ratelimit benchmark's batch through
  `submit_batch` (the batch lane, one caller);
- C, both: the same batch, and `--after-s` (10 s) after it was submitted, when the provider's
  burst is long spent and the batch waits in line, the same interactive calls at the same pace.

    .venv/bin/python -m bench.scheduling.lanes
    .venv/bin/python -m bench.scheduling.lanes --checkout ../main --python ../main/.venv/bin/python

`--checkout` runs the workers of another checkout of llmq (the client, `LLMService`, is always
this one's). A checkout whose `LLMService.submit` takes no `lane` has no lanes: its workers
consume `llm.<provider>` alone, so the interactive calls go there (`lane="batch"` here), which is
where that checkout's own `submit` puts a single request; it reads no lane or flow. Figures:

- interactive latency: from just before `submit` to the job's `finished_at` (the record's; the
  caller's `wait` polls on top of it, up to 0.5 s apart, so "seen" is reported beside it),
  p50 / p95 / max, idle (A) and under load (C); the target is p95 under load within 1 s of p95
  idle (which holds the provider's own latency);
- the batch's makespan alone (B) and with the interactive calls (C), from the start of
  `submit_batch` to the last job's end; its growth against the interactive calls' share of the
  provider: their tokens (requests) over what the provider admits during the batch alone, in
  the measure that binds the batch (the target: growth no more than that share; the allowance in
  seconds is what the interactive calls need of the binding limit);
- 429s from the fake, and jobs failed or lost (not finished within the timeout), per phase;
- pacing loss (B, C), as jitter.py counts it: the share of the time from the fake's first
  admission to its last that strict buckets would not have needed for what it admitted. Growth
  past the allowance with a higher loss in C than in B is time the lanes' pacing lost, not the
  interactive calls' own need. Printed beside the makespan's growth: how much longer the fake
  admitted in C than in B (the provider's side, without the start and the last call's latency,
  which vary by a second between runs) against the allowance at B's own pacing loss.

`--rounds` repeats the three phases. The machine's load average is printed before and after each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.front.run import percentile
from bench.ratelimit.llmq_runner import (
    batch_outcome,
    config_text,
    idle_workers,
    submit_bench_batch,
    workers_cpu_s,
)
from bench.ratelimit.run import OUT, load
from bench.ratelimit.workload import Workload, build
from bench.scheduling.jitter import add_fleet_arguments, strict_minimum_span_s
from llmq.client.service import LLMService
from llmq.contract.models import JobState
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.fakes.serve import ServedFake, serve_fake
from tests.support.harness import Cluster

#: The interactive calls' own seed: requests like the batch's, not the same ones.
CALLS_SEED = 11


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200, help="the batch's requests")
    parser.add_argument("--calls", type=int, default=40, help="interactive calls per phase")
    parser.add_argument("--every-s", type=float, default=0.5, help="one interactive call sent every this many s")
    parser.add_argument("--after-s", type=float, default=10.0,
                        help="the first interactive call this long after the batch's submit began (phase C)")
    add_fleet_arguments(parser, rpm=600, tpm=120_000)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="default bench/out/lanes.json (lanes-baseline.json with --checkout)")
    return parser.parse_args(argv)


def has_lanes(checkout: Path | None, python: str) -> bool:
    """Whether the checkout's `LLMService.submit` takes a `lane` (its workers then consume the interactive queues)."""
    if checkout is None:
        return True
    probe = ("import inspect; from llmq.client.service import LLMService; "
             "print('lane' in inspect.signature(LLMService.submit).parameters)")
    answer = subprocess.run([python, "-c", probe], cwd=checkout, capture_output=True, text=True, check=True)
    return answer.stdout.strip() == "True"


async def interactive_call(service: LLMService, body: dict[str, Any], lane: str, timeout_s: float) -> dict[str, Any]:
    sent = time.time()
    job_id = await service.submit(body, lane=lane)
    try:
        job = await service.wait(job_id, timeout_s=timeout_s)
    except TimeoutError:
        return {"job_id": job_id, "state": "lost", "sent": sent}
    return {"job_id": job_id, "state": job.state.value, "sent": sent,
            "latency_s": job.finished_at - sent if job.finished_at else None, "seen_s": time.time() - sent,
            "calls": len(job.attempts)}


async def interactive_calls(service: LLMService, bodies: list[dict[str, Any]], every_s: float, lane: str,
                            timeout_s: float) -> list[dict[str, Any]]:
    """One call sent every `every_s` whatever came back (an open loop), each waited for."""
    start, sent = time.monotonic(), []
    for index, body in enumerate(bodies):
        await asyncio.sleep(max(0.0, start + index * every_s - time.monotonic()))
        sent.append(asyncio.create_task(interactive_call(service, body, lane, timeout_s)))
    return list(await asyncio.gather(*sent))


async def run_phase(cluster: Cluster, batch: Workload | None, calls: Workload | None, args: argparse.Namespace,
                    lane: str, timeout_s: float) -> dict[str, Any]:
    service = LLMService(cluster.config, redis_url=cluster.redis_url)
    figures: dict[str, Any] = {}
    try:
        waiting = None
        if batch is not None:
            submitted = await submit_bench_batch(service, batch.bodies)
            waiting = asyncio.create_task(batch_outcome(service, submitted, timeout_s))
            await asyncio.sleep(max(0.0, submitted.began + args.after_s - time.time()))
            figures["calls_after_s"] = round(time.time() - submitted.began, 2)
        if calls is not None:
            figures["calls"] = await interactive_calls(service, calls.bodies, args.every_s, lane, timeout_s)
        if waiting is not None:
            figures["batch"] = await waiting
    finally:
        await service.aclose()
    return figures


def latency_figures(calls: list[dict[str, Any]]) -> dict[str, Any]:
    done = [call for call in calls if call["state"] == JobState.SUCCEEDED.value]
    latencies = [call["latency_s"] for call in done]
    seen = [call["seen_s"] for call in done]
    figures: dict[str, Any] = {"succeeded": len(done),
                               "failed": sum(1 for call in calls if call["state"] == JobState.FAILED.value),
                               "lost": sum(1 for call in calls if call["state"] == "lost"),
                               "provider_calls": sum(call.get("calls", 0) for call in calls)}
    if latencies:
        figures.update({"p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
                        "max_s": round(max(latencies), 3), "seen_p95_s": round(percentile(seen, 0.95), 3)})
    return figures


def binding_share(batch: Workload, calls: Workload, args: argparse.Namespace, makespan_s: float) -> dict[str, Any]:
    """The interactive calls' share of what the provider admits during the batch's makespan, in the
    measure that binds the batch, and the seconds of that limit they need."""
    requests_s, tokens_s = batch.requests / (args.rpm / 60), batch.total_tokens / (args.tpm / 60)
    measure = "tokens" if tokens_s >= requests_s else "requests"
    need_s = calls.total_tokens / (args.tpm / 60) if measure == "tokens" else calls.requests / (args.rpm / 60)
    return {"measure": measure, "allowance_s": round(need_s, 2), "share": round(need_s / makespan_s, 4),
            "request_share": round(calls.requests / (args.rpm / 60) / makespan_s, 4),
            "token_share": round(calls.total_tokens / (args.tpm / 60) / makespan_s, 4)}


def fake_figures(fake: ServedFake, args: argparse.Namespace) -> dict[str, Any]:
    """The fake's 429s and admissions; the pacing loss as jitter.py counts it (the share of the time
    from the first admission to the last that strict buckets did not need)."""
    stats = fake.stats()
    admitted = {"requests": stats["accepted"], "tokens": stats["accepted_tokens"]}
    least_s = strict_minimum_span_s(admitted, {"requests": args.rpm, "tokens": args.tpm}, args.burst_s)
    span_s = stats["admitted_span_s"]
    return {"429s": stats["rate_limited"], "admitted": stats["accepted"], "admitted_tokens": stats["accepted_tokens"],
            "admitted_span_s": span_s, "pacing_loss": round(1 - least_s / span_s, 4) if span_s else None,
            "lowest_share": stats["lowest_share"], "admitted_per_second": stats["admitted_per_second"]}


def one_round(fake: ServedFake, batch: Workload, calls: Workload, args: argparse.Namespace, lane: str) -> dict[str, Any]:
    config = config_text(fake.url, DEFAULT_API_KEY, rpm=args.rpm, tpm=args.tpm)
    timeout_s = batch.minimum_s(args.rpm, args.tpm) * 4 + 120
    phases = {"A": (None, calls), "B": (batch, None), "C": (batch, calls)}
    row: dict[str, Any] = {}
    for name, (phase_batch, phase_calls) in phases.items():
        fake.control("reset")
        fake.control("rate_limit", {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
                                    "mode": "bucket", "burst_s": args.burst_s})
        with idle_workers(config, workers=args.workers, concurrency=args.concurrency, checkout=args.checkout,
                          python=args.python) as (cluster, started):
            load_before, cpu_before = load(), workers_cpu_s(started)
            figures = asyncio.run(run_phase(cluster, phase_batch, phase_calls, args, lane, timeout_s))
            phase: dict[str, Any] = {"load_before": load_before, "load_after": load(),
                                     "worker_cpu_s": round(workers_cpu_s(started) - cpu_before, 1),
                                     "fake": fake_figures(fake, args)}
        if "calls" in figures:
            phase["interactive"] = {**latency_figures(figures["calls"]), "calls": figures["calls"]}
        if "batch" in figures:
            result = figures["batch"]
            phase["batch"] = {"makespan_s": round(result.makespan_s, 2), "succeeded": result.succeeded,
                              "failed": result.failed, "lost": result.lost, "notes": result.notes}
        if "calls_after_s" in figures:
            phase["calls_after_s"] = figures["calls_after_s"]
        row[name] = phase
        print(f"    phase {name}: " + phase_line(phase), flush=True)
    idle, loaded = row["A"]["interactive"], row["C"]["interactive"]
    alone, both = row["B"]["batch"]["makespan_s"], row["C"]["batch"]["makespan_s"]
    share = binding_share(batch, calls, args, alone)
    fake_alone, fake_both = row["B"]["fake"], row["C"]["fake"]
    row["summary"] = {
        "p95_idle_s": idle.get("p95_s"), "p95_loaded_s": loaded.get("p95_s"),
        "p95_added_s": round(loaded["p95_s"] - idle["p95_s"], 3) if "p95_s" in idle and "p95_s" in loaded else None,
        "makespan_alone_s": alone, "makespan_with_calls_s": both, "growth_s": round(both - alone, 2),
        "growth": round(both / alone - 1, 4), **share,
        # The provider's side alone, without the start (submit, first grant) and the last call's
        # latency: how much longer the fake admitted, against the calls' need at B's own pacing.
        "span_growth_s": round(fake_both["admitted_span_s"] - fake_alone["admitted_span_s"], 2),
        "allowance_at_pacing_s": round(share["allowance_s"] / (1 - (fake_alone["pacing_loss"] or 0.0)), 2),
    }
    return row


def phase_line(phase: dict[str, Any]) -> str:
    parts = []
    if "interactive" in phase:
        calls = phase["interactive"]
        parts.append(f"interactive p50 {calls.get('p50_s')} s, p95 {calls.get('p95_s')} s, max {calls.get('max_s')} s "
                     f"(seen by wait: p95 {calls.get('seen_p95_s')} s); succeeded {calls['succeeded']}, failed "
                     f"{calls['failed']}, lost {calls['lost']}")
    if "batch" in phase:
        batch = phase["batch"]
        parts.append(f"batch makespan {batch['makespan_s']} s; succeeded {batch['succeeded']}, failed "
                     f"{batch['failed']}, lost {batch['lost']}")
    if "batch" in phase and phase["fake"]["pacing_loss"] is not None:
        parts.append(f"pacing loss {phase['fake']['pacing_loss']:.2%}")
    parts.append(f"429s {phase['fake']['429s']}; load {phase['load_before']} -> {phase['load_after']}")
    return "; ".join(parts)


def print_summary(summary: dict[str, Any]) -> None:
    added = summary["p95_added_s"]
    print(f"  interactive p95: idle {summary['p95_idle_s']} s, under the batch {summary['p95_loaded_s']} s: "
          f"+{added} s (target <= 1 s: {'met' if added is not None and added <= 1 else 'NOT met'})")
    growth_met = summary["growth_s"] <= summary["allowance_s"]
    print(f"  batch makespan: alone {summary['makespan_alone_s']} s, with the interactive calls "
          f"{summary['makespan_with_calls_s']} s: {summary['growth_s']:+} s = {summary['growth']:+.2%}; the calls' "
          f"share of the provider during the batch ({summary['measure']} bind) {summary['share']:.2%} = "
          f"{summary['allowance_s']} s (requests {summary['request_share']:.2%}, tokens {summary['token_share']:.2%}); "
          f"target growth <= share: {'met' if growth_met else 'NOT met'}")
    print(f"  the fake admitted for {summary['span_growth_s']:+} s longer; the calls need "
          f"{summary['allowance_at_pacing_s']} s of it at the pacing the batch alone had", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batch, calls = build(args.requests), build(args.calls, seed=CALLS_SEED)
    lanes = has_lanes(args.checkout, args.python)
    lane = "interactive" if lanes else "batch"
    who = str(args.checkout) if args.checkout else "this checkout"
    print(f"batch: {batch.requests} requests, {batch.total_tokens} tokens as the provider counts them, minimum "
          f"{batch.minimum_s(args.rpm, args.tpm):.1f} s; interactive: {calls.requests} calls ({calls.total_tokens} "
          f"tokens), one every {args.every_s} s, lane {lane}{'' if lanes else ' (the checkout has no lanes)'}; strict "
          f"buckets {args.rpm} req/min, {args.tpm} tok/min, {args.burst_s} s of burst; fake latency "
          f"{args.latency_s} + up to {args.latency_jitter_s} s; {args.workers} workers of {who}", flush=True)
    fake = serve_fake(latency_s=args.latency_s, latency_jitter_s=args.latency_jitter_s)
    rows: list[dict[str, Any]] = []
    try:
        for number in range(args.rounds):
            print(f"  round {number + 1}:", flush=True)
            rows.append({"round": number + 1, **one_round(fake, batch, calls, args, lane)})
            print_summary(rows[-1]["summary"])
    finally:
        fake.stop()
    path = Path(args.json or OUT / ("lanes-baseline.json" if args.checkout else "lanes.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {**vars(args), "checkout": who, "lane": lane}, "rows": rows}, indent=2,
                               default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
