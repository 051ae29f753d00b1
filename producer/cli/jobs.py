"""`llmq submit | status | results | cancel | chat | tail | models`: the client's commands.

Each one first checks that Redis answers (`LLMService.ping`), so a missing Redis is
said within `CONNECT_TIMEOUT_S` (2 s), not after a long retry; a wait already
under way rides out an outage and says so (client/waiting.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

from llmq.cli.output import (
    EXIT_ERROR,
    CommandRegistrar,
    NotFoundError,
    NoticeLines,
    not_found,
    result_line,
    summary_line,
    wait_with_bar,
    write_lines,
)
from llmq.client.batchfile import read_batch_file
from llmq.client.service import LLMService
from llmq.client.status import ledger_backlog
from llmq.client.waiting import read_heartbeats
from llmq.contract import keys
from llmq.contract.capabilities import capabilities_for
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.models import BatchRecord, JobRecord, Lane, LLMResponse
from llmq.contract.provider_batches import ProviderBatchRecord, ProviderBatchStore
from llmq.contract.queueing import redact_url, redis_url_source

LANES = [lane.value for lane in Lane]


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
    command("models", cmd_models, "list the models of configured providers and what each can do")
    submit = command("submit", cmd_submit, "enqueue a JSONL batch file; prints the batch id")
    submit.add_argument(
        "file", help='JSONL, OpenAI Batch API lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" '
        'or "/v1/embeddings", "body"} (url and method may be left out for chat)',
    )
    submit.add_argument("--wait", action="store_true", help="show progress and wait for every job")
    submit.add_argument("--output", "-o", help="with --wait: write one result line per job here")
    submit.add_argument("--batch-id", help="reuse a batch id (re-submitting never runs a custom_id twice)")
    submit.add_argument("--deadline", type=float, help="seconds each job may take before it fails")
    submit.add_argument("--lane", choices=LANES, default="batch",
                        help="batch (default): share what interactive calls leave, fairly by caller; interactive: go first")
    submit.add_argument("--completion-window", metavar="DURATION",
                        help="the answers can wait this long (24h, 2d): jobs go to the providers' batch APIs at "
                             "batch prices where their provider entry has one (docs/batch-lane.md)")
    submit.add_argument("--batch-only", action="store_true",
                        help="with --completion-window: refuse jobs that cannot wait in a provider batch, and fail "
                             "lines the provider batch fails, instead of running them in the normal lane")

    status = command("status", cmd_status, "show a job or batch; without an id, the stack: Redis, workers, ledger")
    status.add_argument("id", nargs="?", help="job id or batch id")
    status.add_argument("--wait", action="store_true", help="wait until the job or batch is done, showing progress")
    for name, handler, help_text in (
        ("results", cmd_results, "print results of a job or batch as JSONL"),
        ("cancel", cmd_cancel, "cancel a job or every unfinished job of a batch"),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("id", help="job id or batch id")
        if name == "results":
            sub.add_argument("--output", "-o", help="write to this file instead of stdout")

    chat = command("chat", cmd_chat, "send one prompt through the queue and stream the answer to the terminal")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--model", help="model (default: the first model of the default provider)")
    chat.add_argument("--provider", help="pin a provider entry")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=2000)
    chat.add_argument("--lane", choices=LANES, default="interactive",
                      help="interactive (default): before any waiting batch job; batch: wait with the batches")
    tail = command("tail", cmd_tail, "follow a streamed job's output (resumes from the start)")
    tail.add_argument("id", help="job id")


def _service(args: argparse.Namespace) -> LLMService:
    return LLMService(load_config(args.config))


def _run(args: argparse.Namespace, body: Callable[[LLMService], Awaitable[int]]) -> int:
    """Run `body` with a service whose Redis answers (else one clear error at once), then close it."""
    service = _service(args)

    async def run() -> int:
        try:
            await service.ping()
            return await body(service)
        finally:
            await service.aclose()

    return asyncio.run(run())


def _notices(service: LLMService) -> NoticeLines:
    return NoticeLines(service.config.service.client.redis_unreachable_s)


def cmd_models(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configured = config.configured_providers()
    if not configured:
        print(f"no provider is configured in {config.path}; see `llmq providers` for why", file=sys.stderr)
        return EXIT_ERROR
    for name in configured:
        entry = config.providers[name]
        for model in entry.models or ["(any model)"]:
            print(f"{model}\t{name}\t{capabilities_for(entry, model).summary()}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    if args.output and not args.wait:
        raise ValueError("--output needs --wait (results are written when the jobs finish)")
    return _run(args, lambda service: _submit(service, args))


async def _submit(service: LLMService, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    await service.workers_configured()  # lines may route to providers only the workers hold keys for
    items = read_batch_file(args.file, service)
    with tqdm(total=len(items), desc="enqueue", unit="job", disable=not sys.stderr.isatty()) as bar:
        batch_id = await service.submit_batch(
            items, batch_id=args.batch_id, deadline_s=args.deadline, on_progress=bar.update,
            completion_window=args.completion_window, batch_only=args.batch_only, lane=args.lane,
        )
    print(batch_id, flush=True)
    if not args.wait:
        return 0
    batch = await wait_with_bar(service, batch_id)
    return await _print_batch_results(service, batch, args.output)


async def _print_batch_results(service: LLMService, batch: BatchRecord, output: str | None) -> int:
    write_lines([result_line(job) for job in await service.results(batch.batch_id)], output)
    failed = batch.counts.get("failed", 0) + batch.counts.get("cancelled", 0)
    print(summary_line(batch), file=sys.stderr)
    return EXIT_ERROR if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    async def run(service: LLMService) -> int:
        if args.id is None:
            return await _print_stack_status(service)
        record = await service.status(args.id)
        if record is None:
            raise NotFoundError(not_found(args.id))
        if args.wait and not record.done:
            record = await (wait_with_bar(service, args.id) if isinstance(record, BatchRecord)
                            else service.wait(args.id, on_notice=_notices(service)))
        provider_batches = await provider_batches_of(service, record)
        if isinstance(record, BatchRecord):
            print(summary_line(record))
            for provider_batch in provider_batches:
                print(f"  provider batch {provider_batch.describe()}")
        else:
            shown = record.model_dump(mode="json", exclude={"request"})
            if provider_batches:
                shown["provider_batch_status"] = provider_batches[0].model_dump(mode="json")
            print(json.dumps(shown, indent=2))
        attention = (await ledger_backlog(service.jobs.redis))["needs_attention"]
        if attention:
            print(f"llmq: warning: {attention} ledger row(s) need attention: the SQL ledger refused them; "
                  "see `llmq status`", file=sys.stderr)
        return 0

    return _run(args, run)


async def provider_batches_of(service: LLMService, record: JobRecord | BatchRecord) -> list[ProviderBatchRecord]:
    """The provider batches a batch's jobs wait in, or the one a job waits in."""
    if isinstance(record, BatchRecord):
        return await service.provider_batches(record.batch_id)
    found = await ProviderBatchStore(service.jobs.redis).get(record.provider_batch) if record.provider_batch else None
    return [found] if found is not None else []


async def _print_stack_status(service: LLMService) -> int:
    """Without an id: does Redis answer, which workers are live, is the ledger keeping up."""
    print(f"redis:   {redact_url(service.redis_url)} ({redis_url_source()}): answers")
    beats = await read_heartbeats(service.jobs.redis)
    queues = sorted({queue for beat in beats for queue in beat.get("queues", [])})
    if beats:
        print(f"workers: {len(beats)} live, on {', '.join(queues)}")
    else:
        print("workers: none live; start one with `llmq worker`, or the whole stack with `llmq up`")
    backlog = await ledger_backlog(service.jobs.redis)
    print(f"ledger:  {backlog['outbox']} row(s) waiting for SQL; {backlog['quarantined_total']} row(s) set aside so far")
    if backlog["needs_attention"]:
        print(f"attention: {backlog['needs_attention']} ledger row(s) the SQL ledger refused: they are in its "
              f"llmq_quarantine table and Redis list {keys.OUTBOX_DEAD}, each with its error (`llmq usage` counts them)")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    async def run(service: LLMService) -> int:
        if await service.batch(args.id) is not None:
            jobs = await service.results(args.id)
        else:
            job = await service.poll(args.id)
            if job is None:
                raise NotFoundError(not_found(args.id))
            jobs = [job]
        write_lines([result_line(job) for job in jobs], args.output)
        return 0

    return _run(args, run)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def run(service: LLMService) -> int:
        if await service.status(args.id) is None:
            raise NotFoundError(not_found(args.id))
        cancelled = await service.cancel(args.id)
        print(f"cancelled {cancelled} job(s)" + ("" if cancelled else " (already finished)"))
        return 0

    return _run(args, run)


def cmd_chat(args: argparse.Namespace) -> int:
    async def run(service: LLMService) -> int:
        model = args.model or default_model(service.config)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        request = {"messages": messages, "model": model, "temperature": args.temperature, "max_tokens": args.max_tokens,
                   "stream": True, "provider": args.provider, "metadata": {"caller": "llmq-chat"}}
        await service.require_live_worker(request, args.lane)  # else the answer would never come: say so now
        return await _print_stream(service.stream_generate(request, lane=args.lane, on_notice=_notices(service)))

    return _run(args, run)


def cmd_tail(args: argparse.Namespace) -> int:
    return _run(args, lambda service: _print_stream(service.stream_job(args.id, on_notice=_notices(service))))


async def _print_stream(chunks: AsyncIterator[LLMResponse]) -> int:
    async for chunk in chunks:
        if chunk.metadata.get("reset"):
            error = chunk.metadata.get("error", {})
            print(f"\n[{error.get('provider') or chunk.provider} failed part-way ({error.get('type')}); "
                  "falling back, the answer starts again]", file=sys.stderr)
        elif chunk.metadata.get("final"):
            usage = chunk.usage
            print(f"\n[{chunk.provider}/{chunk.model}: {usage.prompt_tokens} prompt + "
                  f"{usage.completion_tokens} completion tokens]", file=sys.stderr)
        else:
            print(chunk.content, end="", flush=True)
    return 0


def default_model(config: LLMConfig) -> str:
    names = [member for name in config.chain() for member in config.members(name)]
    for name in [*names, *config.providers]:
        entry = config.providers.get(name)
        if entry is not None and entry.configured and entry.models:
            return entry.models[0]
    raise ValueError("no configured provider lists a model; pass --model")


