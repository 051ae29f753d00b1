"""Pacing against a strict provider bucket: no 429 from jitter, and what it costs in throughput.

The fake OpenAI server (its own process) enforces 1,200 requests/min and 240,000 tokens/min as
strict token buckets: each refilled continuously at the per-minute rate and holding one second
of it, nothing evened out over the minute (`/_fake/rate_limit` with `mode: bucket`). 600
requests of the ratelimit benchmark's batch go through `llmq worker` processes (4 by default,
100 slots each) whose provider entry has the same limits. Calls the limiter admits reach the
provider bunched by network and scheduling jitter; a pacing that leaves no room for it draws
429s.

    .venv/bin/python -m bench.scheduling.jitter
    .venv/bin/python -m bench.scheduling.jitter --checkout ../base --python ../base/.venv/bin/python

`--checkout` runs the workers of another checkout of llmq (today's pacing, say) against the same
fake and batch; `--rounds` repeats the run. Figures:

- makespan / minimum: the batch's makespan against its theoretical minimum at the per-minute
  limits (the larger of requests / rpm and tokens / tpm);
- pacing loss: 1 - (the least time a strict bucket needs to admit what the fake admitted: the
  total less one burst, at the refill rate) / (the time from the fake's first admission to its
  last). Startup and the last call's latency are outside that span, so this is the pacing's cost
  alone;
- steady share: what the fake admitted a second, away from the run's first and last five seconds,
  as a share of the refill of each of its buckets (the binding one is the pacing's throughput);
- lowest share: the least either of the fake's buckets held after an admission (0: a 429 was near).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.ratelimit.llmq_runner import run_llmq
from bench.ratelimit.run import OUT, control, load, start_fake
from bench.ratelimit.workload import build
from tests.support.fakes.openai import DEFAULT_API_KEY


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    add_fleet_arguments(parser, rpm=1200, tpm=240_000)
    parser.add_argument("--enforced-as", choices=("minute_window", "token_bucket"), default=None,
                        help="the entry's rate_limits.enforced_as (default: not set, the entry's default)")
    parser.add_argument("--busy", type=int, default=0,
                        help="run this many CPU-bound processes beside the workers (a loaded machine: more jitter)")
    parser.add_argument("--json", metavar="PATH", default=str(OUT / "jitter.json"))
    return parser.parse_args(argv)


def add_fleet_arguments(parser: argparse.ArgumentParser, *, rpm: int, tpm: int) -> None:
    """The options of a run against the strict-bucket fake: its limits (the entry's too), latency, the
    workers (of this checkout or `--checkout`), rounds."""
    parser.add_argument("--rpm", type=int, default=rpm)
    parser.add_argument("--tpm", type=int, default=tpm)
    parser.add_argument("--burst-s", type=float, default=1.0, help="seconds of each limit the fake's buckets hold")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=100, help="slots per worker process")
    parser.add_argument("--latency-s", type=float, default=0.3, help="fake's least latency (s)")
    parser.add_argument("--latency-jitter-s", type=float, default=0.7, help="fake's extra latency, uniform (s)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--checkout", type=Path, default=None, help="llmq checkout whose workers run (default this one)")
    parser.add_argument("--python", default=sys.executable, help="that checkout's Python")


def strict_minimum_span_s(admitted: dict[str, float], limits: dict[str, int], burst_s: float) -> float:
    """The least time strict buckets need to admit `admitted` (units by measure): all but one burst, at the refill."""
    spans = [max(0.0, (admitted[name] - per_minute * burst_s / 60.0) / (per_minute / 60.0))
             for name, per_minute in limits.items()]
    return max(spans)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = build(args.requests)
    minimum_s = workload.minimum_s(args.rpm, args.tpm)
    who = str(args.checkout) if args.checkout else "this checkout"
    print(f"{args.requests} requests, {workload.total_tokens} tokens as the provider counts them; strict buckets "
          f"{args.rpm} req/min, {args.tpm} tok/min, {args.burst_s} s of burst; minimum {minimum_s:.1f} s; "
          f"{args.workers} workers of {who}" + (f", enforced_as {args.enforced_as}" if args.enforced_as else "")
          + (f", {args.busy} CPU-bound processes beside them" if args.busy else ""),
          flush=True)
    fake, url = start_fake(args.latency_s, args.latency_jitter_s)
    rows: list[dict[str, Any]] = []
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for number in range(args.rounds):
            control(url, "reset")
            control(url, "rate_limit", {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
                                        "mode": "bucket", "burst_s": args.burst_s})
            load_before = load()
            result = run_llmq(url, DEFAULT_API_KEY, workload.bodies, rpm=args.rpm, tpm=args.tpm, workers=args.workers,
                              concurrency=args.concurrency, timeout_s=minimum_s * 4 + 120, checkout=args.checkout,
                              python=args.python,
                              limit_settings={"enforced_as": args.enforced_as} if args.enforced_as else None)
            stats = control(url, "stats")
            admitted = {"requests": stats["accepted"], "tokens": stats["accepted_tokens"]}
            least_s = strict_minimum_span_s(admitted, {"requests": args.rpm, "tokens": args.tpm}, args.burst_s)
            span_s = stats["admitted_span_s"]
            # The pacing alone, away from the start and the end: what the fake admitted a second in
            # the middle of the run, against the provider's refill (the binding measure).
            middle = stats["admitted_per_second"][5:-5]
            steady = {"requests": sum(r for r, _ in middle) / max(1, len(middle)) / (args.rpm / 60),
                      "tokens": sum(t for _, t in middle) / max(1, len(middle)) / (args.tpm / 60)}
            row = {
                "round": number + 1, "makespan_s": round(result.makespan_s, 2), "minimum_s": round(minimum_s, 2),
                "ratio": round(result.makespan_s / minimum_s, 4), "provider_429s": stats["rate_limited"],
                "succeeded": result.succeeded, "failed": result.failed, "lost": result.lost,
                "admitted_span_s": span_s, "strict_minimum_span_s": round(least_s, 2),
                "pacing_loss": round(1 - least_s / span_s, 4) if span_s else None,
                "steady_share": {name: round(share, 4) for name, share in steady.items()},
                "lowest_share": stats["lowest_share"], "busiest_second": [stats["busiest_burst_requests"],
                                                                          stats["busiest_burst_tokens"]],
                "load_before": load_before, "load_after": load(), "notes": result.notes,
                "admitted_per_second": stats["admitted_per_second"],
            }
            rows.append(row)
            print(f"  round {number + 1}: makespan {row['makespan_s']} s = {row['ratio']:.3f} x minimum; "
                  f"429s {row['provider_429s']}; pacing loss {row['pacing_loss']:.2%} (admitted over {span_s:.2f} s, "
                  f"a strict bucket needs {least_s:.2f} s); steady share of the refill {row['steady_share']}; "
                  f"lowest share {row['lowest_share']}; "
                  f"load {load_before} -> {row['load_after']}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        fake.terminate()
        fake.wait(10)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {**vars(args), "checkout": who}, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
