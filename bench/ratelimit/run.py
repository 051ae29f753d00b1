"""Rate limits against a provider that enforces them: llmq (1, 4, 8 workers) vs LiteLLM's Router vs a plain client.

    .venv/bin/python -m bench.ratelimit.run            # default: 2,000 requests, ~75 s minimum each, ~10 min
    .venv/bin/python -m bench.ratelimit.run --quick    # 600 requests, ~30 s minimum each

The fake OpenAI server runs in its own process (`tests.support.fakes.serve`) with 0.3-1.0 s latency and
enforces requests/min and tokens/min over a sliding 60 s window, answering 429 + retry-after once
over, counting a request's prompt tokens plus max_tokens at admission, as OpenAI does. Every
client gets the same batch and the same limits; see bench/ratelimit/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.ratelimit.llmq_runner import run_llmq
from bench.ratelimit.plain import run_plain
from bench.ratelimit.workload import Workload, build
from tests.support.fakes.openai import DEFAULT_API_KEY

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out"
LITELLM_VENV = OUT / "litellm-venv"
#: Pinned: the benchmark installs exactly this into its own venv, never into the project.
LITELLM_VERSION = "1.80.0"


@dataclass
class Row:
    client: str
    workers: int | None
    makespan_s: float
    minimum_s: float
    received_429: int
    failed: int
    lost: int | None
    busiest_requests_60s: int
    busiest_tokens_60s: int
    load_before: str
    load_after: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.minimum_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 requests and ~30 s minimum per configuration")
    parser.add_argument("--requests", type=int, help="batch size (default 2000; --quick 600)")
    parser.add_argument("--rpm", type=int, help="requests/min, the same for the fake and every client (default: the batch in 45 s; --quick 18 s)")
    parser.add_argument("--tpm", type=int, help="tokens/min (default: the batch's counted tokens in 75 s; --quick 30 s)")
    parser.add_argument("--workers", default="1,4,8", help="llmq worker process counts (default 1,4,8)")
    parser.add_argument("--concurrency", type=int, default=100, help="slots per llmq worker process (default 100)")
    parser.add_argument("--latency-s", type=float, default=0.3, help="fake's least latency (s)")
    parser.add_argument("--latency-jitter-s", type=float, default=0.7, help="fake's extra latency, uniform (s)")
    parser.add_argument("--clients", default="llmq,litellm,plain", help="which clients to run (default all)")
    parser.add_argument("--json", metavar="PATH", default=str(OUT / "ratelimit.json"), help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count = args.requests or (600 if args.quick else 2000)
    workload = build(count)
    # Tokens bind (the minimum is tokens/tpm: 75 s, --quick 30 s); requests alone would take 60% of that.
    token_minutes = 0.5 if args.quick else 1.25
    tpm = args.tpm or int(round(workload.total_tokens / token_minutes, -3))
    rpm = args.rpm or max(1, round(count / (0.6 * token_minutes)))
    minimum_s = workload.minimum_s(rpm, tpm)
    print(f"{count} requests, {workload.total_tokens} tokens as the provider counts them; limits {rpm} req/min, "
          f"{tpm} tok/min; minimum {minimum_s:.1f} s; fake latency {args.latency_s}-{args.latency_s + args.latency_jitter_s} s",
          flush=True)
    fake, url = start_fake(args.latency_s, args.latency_jitter_s)
    rows: list[Row] = []
    clients = args.clients.split(",")
    try:
        if "llmq" in clients:
            for workers in (int(item) for item in args.workers.split(",")):
                rows.append(measure("llmq", workers, url, rpm, tpm, workload, args))
        if "litellm" in clients:
            rows.append(measure("litellm", None, url, rpm, tpm, workload, args))
        if "plain" in clients:
            rows.append(measure("plain", None, url, rpm, tpm, workload, args))
    finally:
        fake.terminate()
        fake.wait(10)
    print()
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    figures = {"requests": count, "tokens": workload.total_tokens, "rpm": rpm, "tpm": tpm, "minimum_s": minimum_s,
               "args": vars(args), "rows": [{**asdict(row), "ratio": row.ratio} for row in rows]}
    Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def start_fake(latency_s: float, jitter_s: float) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "tests.support.fakes.serve", "openai", "--latency-s", str(latency_s),
               "--latency-jitter-s", str(jitter_s)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())["url"]


def control(url: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = httpx.post(f"{url}/_fake/{action}", json=body or {}, timeout=30)
    reply.raise_for_status()
    result: dict[str, Any] = reply.json()
    return result


def measure(client: str, workers: int | None, url: str, rpm: int, tpm: int, workload: Workload,
            args: argparse.Namespace) -> Row:
    control(url, "reset")
    control(url, "rate_limit", {"requests_per_minute": rpm, "tokens_per_minute": tpm})
    load_before = load()
    label = f"{client} ({workers} workers)" if workers else client
    print(f"\n== {label}: load {load_before}", flush=True)
    lost: int | None = None
    notes: dict[str, Any] = {}
    if client == "llmq":
        assert workers is not None
        result = run_llmq(url, DEFAULT_API_KEY, workload.bodies, rpm=rpm, tpm=tpm, workers=workers,
                          concurrency=args.concurrency, timeout_s=workload.minimum_s(rpm, tpm) * 4 + 120)
        makespan_s, failed, lost = result.makespan_s, result.failed, result.lost
        notes = result.notes
    elif client == "litellm":
        makespan_s, failed, notes = run_litellm(url, rpm, tpm, workload)
    else:
        plain = asyncio.run(run_plain(url, DEFAULT_API_KEY, workload.bodies))
        makespan_s, failed = plain.makespan_s, plain.failed
        notes = {"429s seen by the client": plain.received_429}
    stats = control(url, "stats")
    row = Row(client, workers, makespan_s, workload.minimum_s(rpm, tpm), stats["rate_limited"], failed, lost,
              stats.get("busiest_window_requests", 0), stats.get("busiest_window_tokens", 0), load_before, load(),
              {**notes, "fake accepted": stats["accepted"], "fake max in flight": stats["max_in_flight"]})
    print(f"   makespan {row.makespan_s:.1f} s = {row.ratio:.3f} x minimum; 429s {row.received_429}; failed {row.failed}; "
          f"lost {row.lost}; busiest 60 s: {row.busiest_requests_60s} req, {row.busiest_tokens_60s} tok; {row.notes}",
          flush=True)
    return row


def run_litellm(url: str, rpm: int, tpm: int, workload: Workload) -> tuple[float, int, dict[str, Any]]:
    python = litellm_python()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(workload.bodies, handle)
    try:
        reply = subprocess.run(
            [str(python), str(Path(__file__).with_name("litellm_router.py")), "--url", url, "--api-key", DEFAULT_API_KEY,
             "--rpm", str(rpm), "--tpm", str(tpm), "--bodies", handle.name],
            capture_output=True, text=True, timeout=workload.minimum_s(rpm, tpm) * 6 + 300, cwd=OUT,
        )
    finally:
        os.unlink(handle.name)
    if reply.returncode != 0:
        raise RuntimeError(f"litellm run failed: {reply.stderr[-3000:]}")
    result = json.loads(reply.stdout.strip().splitlines()[-1])
    return result["makespan_s"], result["failed"], {"litellm": result["litellm_version"], "errors": result["errors"][:2]}


def litellm_python() -> Path:
    """The benchmark's own venv with LiteLLM (made on first use; bench/out/ is gitignored)."""
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        print(f"   installing litellm=={LITELLM_VERSION} into {LITELLM_VENV} (benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm=={LITELLM_VERSION}"], check=True)
    return python


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(rows: list[Row]) -> str:
    lines = [
        "| client | worker processes | makespan (s) | minimum (s) | makespan / minimum | 429s | failed | lost "
        "| busiest 60 s window (req / tok) | submit (s) | dispatches / job | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.client} | {row.workers or '-'} | {row.makespan_s:.1f} | {row.minimum_s:.1f} | {row.ratio:.3f} "
            f"| {row.received_429} | {row.failed} | {'-' if row.lost is None else row.lost} "
            f"| {row.busiest_requests_60s} / {row.busiest_tokens_60s} | {row.notes.get('submit s', '-')} "
            f"| {row.notes.get('dispatches per job', '-')} | {row.load_before} -> {row.load_after} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
