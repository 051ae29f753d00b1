"""Pools: one batch over two to four provider entries with limits of their own, against the
theoretical minimum at their summed limits.

Each member is a fake OpenAI server in its own process enforcing its own requests/min and
tokens/min (strict token buckets with one second of burst by default, `--mode window` for a
sliding 60 s window). The entries form one pool (`pools: {gpt: {members: [...]}}`, headroom
strategy unless `--strategy`) and the batch goes through `llmq worker` processes (4 by default,
100 slots each). Printed: makespan against the minimum at the summed limits, each member's
429s, and each member's share of the batch against its share of the limits.

    .venv/bin/python -m bench.scheduling.pools
    .venv/bin/python -m bench.scheduling.pools --members 2 --requests 600
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.ratelimit.llmq_runner import run_config
from bench.ratelimit.run import OUT, load
from bench.ratelimit.workload import build
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.fakes.serve import ServedFake, serve_fake
from tests.support.harness import openai_entry

#: Each member's limits as multiples of the smallest: 1 : 2 : 3 : 4 (requests/min, tokens/min).
BASE_LIMITS = (600, 120_000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--strategy", choices=("headroom", "weighted", "latency"), default="headroom")
    parser.add_argument("--mode", choices=("bucket", "window"), default="bucket",
                        help="how the fakes enforce their limits (default bucket: strict, one second of burst)")
    parser.add_argument("--base-rpm", type=int, default=BASE_LIMITS[0], help="the smallest member's requests/min")
    parser.add_argument("--base-tpm", type=int, default=BASE_LIMITS[1], help="the smallest member's tokens/min")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-s", type=float, default=0.3)
    parser.add_argument("--latency-jitter-s", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", default=str(OUT / "pools.json"))
    return parser.parse_args(argv)


def member_limits(count: int, rpm: int, tpm: int) -> dict[str, tuple[int, int]]:
    return {f"member_{index + 1}": (rpm * (index + 1), tpm * (index + 1)) for index in range(count)}


def pool_config(fakes: dict[str, ServedFake], limits: dict[str, tuple[int, int]], args: argparse.Namespace) -> str:
    enforced_as = "token_bucket" if args.mode == "bucket" else "minute_window"
    providers = {
        name: openai_entry(fakes[name].url, api_key=DEFAULT_API_KEY, timeout=120, rate_limits={
            "requests_per_minute": rpm, "tokens_per_minute": tpm, "refund_unused_tokens": False,
            "enforced_as": enforced_as})
        for name, (rpm, tpm) in limits.items()
    }
    service = {"pools": {"gpt": {"members": list(limits), "strategy": args.strategy}}, "default_provider": "gpt",
               "retry": {"max_attempts_per_provider": 8}, "jobs": {"deadline_s": 3600}, "providers": providers}
    return yaml.safe_dump({"llm_service": service}, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = member_limits(args.members, args.base_rpm, args.base_tpm)
    workload = build(args.requests)
    rpm, tpm = sum(r for r, _ in limits.values()), sum(t for _, t in limits.values())
    minimum_s = workload.minimum_s(rpm, tpm)
    print(f"{args.requests} requests, {workload.total_tokens} tokens; pool of {args.members} ({args.strategy}): "
          + ", ".join(f"{name} {r} req/min {t} tok/min" for name, (r, t) in limits.items())
          + f"; summed {rpm} req/min {tpm} tok/min; minimum {minimum_s:.1f} s; fakes enforce as {args.mode}", flush=True)
    fakes = {name: serve_fake(latency_s=args.latency_s, latency_jitter_s=args.latency_jitter_s) for name in limits}
    rows: list[dict[str, Any]] = []
    try:
        for number in range(args.rounds):
            for name, (member_rpm, member_tpm) in limits.items():
                fakes[name].control("reset")
                fakes[name].control("rate_limit", {"requests_per_minute": member_rpm, "tokens_per_minute": member_tpm,
                                                   "mode": args.mode})
            load_before = load()
            result = run_config(pool_config(fakes, limits, args), workload.bodies, workers=args.workers,
                                concurrency=args.concurrency, timeout_s=minimum_s * 4 + 120)
            stats = {name: fake.stats() for name, fake in fakes.items()}
            served = result.notes.pop("served by")
            shares = {name: {"served": served.get(name, 0), "share": round(served.get(name, 0) / args.requests, 4),
                             "tokens": stats[name].get("accepted_tokens", 0),
                             "token_share": round(stats[name].get("accepted_tokens", 0) / workload.total_tokens, 4),
                             "limit_share": round(limits[name][1] / tpm, 4), "429s": stats[name]["rate_limited"],
                             "busy_s": stats[name].get("admitted_span_s"),
                             "per_second": stats[name].get("admitted_per_second")}
                      for name in limits}
            row = {"round": number + 1, "makespan_s": round(result.makespan_s, 2), "minimum_s": round(minimum_s, 2),
                   "ratio": round(result.makespan_s / minimum_s, 4), "succeeded": result.succeeded,
                   "failed": result.failed, "lost": result.lost, "members": shares,
                   "load_before": load_before, "load_after": load(), "notes": result.notes}
            rows.append(row)
            print(f"  round {number + 1}: makespan {row['makespan_s']} s = {row['ratio']:.3f} x minimum; succeeded "
                  f"{result.succeeded}, failed {result.failed}, lost {result.lost}; load {load_before} -> "
                  f"{row['load_after']}", flush=True)
            for name, share in shares.items():
                print(f"    {name}: served {share['served']} calls, {share['token_share']:.1%} of the tokens (its share "
                      f"of the limits {share['limit_share']:.1%}); 429s {share['429s']}; admitting for "
                      f"{share['busy_s']:.1f} s", flush=True)
    finally:
        for fake in fakes.values():
            fake.stop()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
