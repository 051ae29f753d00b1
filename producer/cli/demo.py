"""`llmq demo`: the life of a batch, end to end, on the embedded default.

Brings the stack up, submits curriculum and skill-description requests like
those an agent that learns skills sends, shows progress, shows jobs retried and
falling back when a provider fails, prints results and the usage/cost summary
from the SQL ledger, and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from llmq.cli.embedded import free_port
from llmq.cli.output import CommandRegistrar, redact_url, summary_line, wait_with_bar
from llmq.cli.stack import Stack, llmq_home, running_stack
from llmq.client.batchfile import read_batch_file
from llmq.client.service import LLMService
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.models import JobRecord
from llmq.contract.routing import plan_route

#: The demo's batch is small; past this something is broken, and waiting longer will not help.
WAIT_TIMEOUT_S = 600.0


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
    demo = command("demo", cmd_demo, "bring the stack up, run a batch like the agent's, show results and costs")
    demo.add_argument("--requests", type=int, default=60, help="how many requests to send (default 60)")


def demo_requests(limit: int) -> Path:
    """`limit` lines of the agent's sample file, callers taken in turn (curriculum, skill
    library, ...), so even a short demo shows every kind of request and every route."""
    source = Path(__file__).parents[1] / "data" / "agent_requests.jsonl"
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    by_caller: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_caller.setdefault(str(line["body"].get("metadata", {}).get("caller", "")), []).append(line)
    interleaved = [group[index] for index in range(len(lines)) for group in by_caller.values() if index < len(group)]
    chosen = [dict(interleaved[index % len(interleaved)]) for index in range(limit)]
    if limit > len(interleaved):  # custom ids must stay unique
        chosen = [{**line, "custom_id": f"{line['custom_id']}-{index}"} for index, line in enumerate(chosen)]
    target = llmq_home() / "demo_requests.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(line) + "\n" for line in chosen))
    return target


def cmd_demo(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return run_demo(config, demo_requests(args.requests), flower_port=free_port())


def run_demo(config: LLMConfig, requests_path: Path, *, flower_port: int | None) -> int:
    started = datetime.now(timezone.utc)
    print(f"llmq demo: config {config.path}, data in {llmq_home()}")
    _print_providers(config)
    with running_stack(config, flower_port=flower_port) as stack:
        print(f"\nStack up: redis {redact_url(stack.redis_url)}, {len(stack.processes)} processes"
              + (f", Flower at http://127.0.0.1:{flower_port}" if flower_port else ""))
        if stack.flower_credentials is not None:
            login = stack.flower_credentials
            print(f"  Flower login: user {login.user}, password in {login.source}")
        service = LLMService(config, redis_url=stack.redis_url)
        items = read_batch_file(requests_path, service)
        for model in sorted({item.request.model for item in items}):
            sample = next(item.request for item in items if item.request.model == model)
            route = " -> ".join(f"{hop.provider}({hop.model})" for hop in plan_route(sample, config))
            print(f"  route for {model}: {route}")
        jobs = asyncio.run(_run_batch(service, items, stack))
        _print_fallbacks(jobs)
        _print_samples(jobs)
        _print_usage(stack.redis_url, started)
        print("\nStopping the stack...")
    failed = [job for job in jobs if job.state.value != "succeeded"]
    print(f"Done: {len(jobs) - len(failed)} of {len(jobs)} jobs succeeded.")
    return 1 if failed else 0


def _print_providers(config: LLMConfig) -> None:
    for name, entry in config.providers.items():
        status = "configured" if entry.configured else f"skipped ({entry.not_configured_reason})"
        print(f"  provider {name:<13} {status}")


async def _run_batch(service: LLMService, items: list, stack: Stack) -> list[JobRecord]:
    try:
        began = time.monotonic()
        batch_id = await service.submit_batch(items)
        print(f"\nSubmitted batch {batch_id} ({len(items)} jobs)")
        # A worker that died at start would leave the batch queued forever: stop waiting then.
        batch = await wait_with_bar(service, batch_id, timeout_s=WAIT_TIMEOUT_S, on_poll=stack.check_alive)
        print(f"{summary_line(batch)} in {time.monotonic() - began:.1f}s")
        return await service.results(batch_id)
    finally:
        await service.aclose()


def _print_fallbacks(jobs: list[JobRecord]) -> None:
    retried = [job for job in jobs if len(job.attempts) > 1]
    moved = [job for job in jobs if job.result and job.route and job.result.provider != job.route[0].provider]
    print(f"\nRetries and fallback: {len(retried)} jobs needed more than one attempt; "
          f"{len(moved)} fell back to another provider.")
    for job in moved[:3]:
        trail = " -> ".join(
            f"{attempt['provider']}:{attempt.get('error_type') or attempt['outcome']}" for attempt in job.attempts
        )
        print(f"  {job.custom_id}: {trail}")


def _print_samples(jobs: list[JobRecord]) -> None:
    print("\nSample results:")
    for job in [job for job in jobs if job.result][:3]:
        assert job.result is not None
        label = " (simulated)" if job.result.metadata.get("simulated") else ""
        text = job.result.content.replace("\n", " | ")
        print(f"  {job.custom_id} [{job.result.provider}/{job.result.model}{label}]: {text[:110]}")


def _print_usage(redis_url: str, since: datetime) -> None:
    from llmq.worker.store.outbox import OutboxFlusher

    flusher = OutboxFlusher(redis_url)
    flusher.drain(timeout_s=30)
    rows = flusher.store.usage_report(since=since, by="provider")
    print(f"\nUsage and cost from the SQL ledger ({flusher.store.url.split('://')[0]}):")
    print(f"  {'provider':<14}{'requests':>9}{'prompt tok':>12}{'output tok':>12}{'cost USD':>14}")
    for row in rows:
        print(f"  {row['provider']:<14}{row['requests']:>9}{row['prompt_tokens']:>12}{row['completion_tokens']:>12}"
              f"{row['cost_usd']:>14.6f}")
    flusher.stop()
