"""The `llmq` command. Errors are one clear line; `--verbose` adds the detail.

The CLI is where the two packages are composed: commands that run worker code
(`worker`, `up`, `demo`, `providers --check`) import it inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from producer.config import ConfigError, load_config
from producer.models import BatchRecord, JobRecord

EXIT_ERROR = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for people, the trace with --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"llmq: error: {one_line(exc)}{hint(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, ValueError)) else EXIT_ERROR


class NotFoundError(LookupError):
    """An id that names no job or batch in Redis."""


def one_line(exc: BaseException) -> str:
    # str(KeyError("x")) is "'x'": take the message itself.
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def hint(exc: BaseException) -> str:
    """What to do about an unreachable Redis (the URL shown without its password)."""
    import redis
    from kombu.exceptions import OperationalError

    if isinstance(exc, (redis.exceptions.ConnectionError, OperationalError)) and not isinstance(
        exc, redis.exceptions.AuthenticationError
    ):
        from producer.queueing import REDIS_URL_ENV, redis_url
        from producer.stack import redact_url

        return f" (is Redis running at {redact_url(redis_url())}? set {REDIS_URL_ENV}, or run `llmq up`)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmq", description="A centralized LLM service on a queue.")
    parser.add_argument("--config", help="config file (default: $LLMQ_CONFIG or config/llm_service.yaml)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show details and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        # Also after the command (`llmq submit FILE -v`); SUPPRESS keeps a flag given before it.
        sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show details and tracebacks")
        return sub

    from producer import reports

    reports.add_commands(command)  # providers, usage
    command("models", cmd_models, "list the models of configured providers")

    worker = command("worker", cmd_worker, "run a worker on provider queues")
    worker.add_argument("--queues", "-Q", help="comma-separated provider names or llm.<name> queues (default: all configured)")
    worker.add_argument("--concurrency", "-c", type=int, default=200, help="job slots in this process (default 200)")
    worker.add_argument("--pool", default="async", choices=sorted(POOLS),
                        help="async (default): every job a coroutine on one event loop, no thread per slot "
                             "(worker/pool.py); threads: Celery's thread pool, a thread per slot")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", "-n", help="Celery node name")
    worker.add_argument("--no-events", action="store_true",
                        help="send no task events until a monitor asks (Flower does, every few seconds): "
                             "~2 ms less CPU per job; Flower then misses the tasks of its first seconds")
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (default $LLMQ_METRICS_PORT, else 0: off)")

    submit = command("submit", cmd_submit, "enqueue a JSONL batch file; prints the batch id")
    submit.add_argument("file", help="JSONL: one {\"custom_id\": ..., \"body\": {LLMRequest}} per line")
    submit.add_argument("--wait", action="store_true", help="show progress and wait for every job")
    submit.add_argument("--output", "-o", help="with --wait: write one result line per job here")
    submit.add_argument("--batch-id", help="reuse a batch id (re-submitting never runs a custom_id twice)")
    submit.add_argument("--deadline", type=float, help="seconds each job may take before it fails")

    for name, handler, help_text in (
        ("status", cmd_status, "show a job or batch"),
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
    tail = command("tail", cmd_tail, "follow a streamed job's output (resumes from the start)")
    tail.add_argument("id", help="job id")

    from producer import stack

    up = command("up", stack.cmd_up, "run the whole stack on this machine until Ctrl-C")
    up.add_argument("--no-flower", action="store_true")
    up.add_argument("--flower-port", type=int, default=5555)
    up.add_argument("--metrics-port", type=int, help="Prometheus metrics: worker i serves on this port + i")
    demo = command("demo", stack.cmd_demo, "bring the stack up, run a batch like the agent's, show results and costs")
    demo.add_argument("--requests", type=int, default=60, help="how many requests to send (default 60)")
    return parser


def _service(args: argparse.Namespace) -> Any:
    from producer.service import LLMService

    return LLMService(load_config(args.config))


# --- commands ------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configured = config.configured_providers()
    if not configured:
        print(f"no provider is configured in {config.path}; see `llmq providers` for why", file=sys.stderr)
        return EXIT_ERROR
    for name in configured:
        for model in config.providers[name].models or ["(any model)"]:
            print(f"{model}\t{name}")
    return 0


#: `llmq worker --pool` names and the Celery pools they start.
POOLS = {"async": "worker.pool:AsyncioPool", "threads": "threads", "prefork": "prefork", "solo": "solo"}


def cmd_worker(args: argparse.Namespace) -> int:
    from producer import keys
    from worker.app import create_app

    config = load_config(args.config)
    names = worker_providers(config, args.queues)
    app = create_app(config)
    queues = [keys.queue_name(name) for name in names]
    app.llmq_queues = queues
    if args.metrics_port is not None:
        app.llmq_metrics_port = args.metrics_port  # read by worker/metrics.py when the runtime starts
    # Celery's CLI names only its own pools; a pool class by path goes through the config.
    app.conf.worker_pool = POOLS[args.pool]
    worker_args = ["worker", f"--concurrency={args.concurrency}", f"--queues={','.join(queues)}",
                   f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle"]
    if args.no_events:
        app.conf.worker_send_task_events = False
    else:
        worker_args.append("--events")  # Flower shows every task, from the first
    if args.hostname:
        worker_args.append(f"--hostname={args.hostname}")
    app.worker_main(worker_args)
    return 0


def worker_providers(config: Any, queues_option: str | None) -> list[str]:
    """Provider names from `--queues` (names or llm.<name>), checked against the config.

    A misspelt name would make a worker wait forever on a queue nobody sends to, so
    it is refused; a known but unconfigured provider only gets a warning, because
    docker-compose runs one worker per queue whether or not its key is set.
    """
    from producer import keys

    requested = [name.strip().removeprefix(keys.QUEUE_PREFIX) for name in (queues_option or "").split(",") if name.strip()]
    if not requested:
        requested = config.configured_providers()
        if not requested:
            raise ConfigError(f"{config.path}: no provider is configured, so a worker has no queue; see `llmq providers`")
    for name in requested:
        entry = config.provider(name)  # ConfigError naming the known providers
        if not entry.configured:
            print(f"llmq: warning: provider {name!r} is not configured ({entry.not_configured_reason}); "
                  f"this worker stays idle until it is", file=sys.stderr)
    return requested


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.batchfile import read_batch_file

    if args.output and not args.wait:
        raise ValueError("--output needs --wait (results are written when the jobs finish)")
    service = _service(args)
    items = read_batch_file(args.file, service)
    return asyncio.run(_submit(service, items, args))


async def _submit(service: Any, items: list[Any], args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        with tqdm(total=len(items), desc="enqueue", unit="job", disable=not sys.stderr.isatty()) as bar:
            batch_id = await service.submit_batch(items, batch_id=args.batch_id, deadline_s=args.deadline, on_progress=bar.update)
        print(batch_id)
        if not args.wait:
            return 0
        batch = await wait_with_bar(service, batch_id)
        lines = [result_line(job) for job in await service.results(batch_id)]
        write_lines(lines, args.output)
        failed = batch.counts.get("failed", 0) + batch.counts.get("cancelled", 0)
        print(summary_line(batch), file=sys.stderr)
        return EXIT_ERROR if failed else 0
    finally:
        await service.aclose()


async def wait_with_bar(
    service: Any, batch_id: str, *, timeout_s: float | None = None, on_poll: Any = None
) -> BatchRecord:
    """Wait for a batch with a progress bar; `on_poll()` runs on every poll (and may raise
    to stop waiting, e.g. when a process the caller started has died)."""
    from tqdm import tqdm

    with tqdm(desc="jobs", unit="job", file=sys.stderr) as bar:
        def progress(batch: BatchRecord) -> None:
            if on_poll is not None:
                on_poll()
            bar.total = batch.total
            bar.n = batch.finished
            bar.set_postfix_str(", ".join(f"{s.value} {n}" for s, n in batch.counts.items() if n), refresh=False)
            bar.refresh()

        record = await service.wait(batch_id, timeout_s=timeout_s, on_progress=progress)
    assert isinstance(record, BatchRecord)
    return record


def summary_line(batch: BatchRecord) -> str:
    counts = ", ".join(f"{state.value} {count}" for state, count in batch.counts.items() if count)
    return f"batch {batch.batch_id}: {batch.total} jobs: {counts}"


def result_line(job: JobRecord) -> str:
    return json.dumps({
        "custom_id": job.custom_id,
        "job_id": job.job_id,
        "status": job.state.value,
        "response": job.result.model_dump(mode="json") if job.result else None,
        "error": job.error if not job.result else None,
    })


def write_lines(lines: list[str], output: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def not_found(some_id: str) -> str:
    return f"no job or batch {some_id!r} in Redis (expired, or never submitted)"


def cmd_status(args: argparse.Namespace) -> int:
    service = _service(args)

    async def run() -> int:
        try:
            record = await service.status(args.id)
        finally:
            await service.aclose()
        if record is None:
            raise NotFoundError(not_found(args.id))
        if isinstance(record, BatchRecord):
            print(summary_line(record))
        else:
            print(json.dumps(record.model_dump(mode="json", exclude={"request"}), indent=2))
        return 0

    return asyncio.run(run())


def cmd_results(args: argparse.Namespace) -> int:
    service = _service(args)

    async def run() -> int:
        try:
            if await service.batch(args.id) is not None:
                jobs = await service.results(args.id)
            else:
                job = await service.poll(args.id)
                if job is None:
                    raise NotFoundError(not_found(args.id))
                jobs = [job]
        finally:
            await service.aclose()
        write_lines([result_line(job) for job in jobs], args.output)
        return 0

    return asyncio.run(run())


def cmd_cancel(args: argparse.Namespace) -> int:
    service = _service(args)

    async def run() -> int:
        try:
            if await service.status(args.id) is None:
                raise NotFoundError(not_found(args.id))
            cancelled = await service.cancel(args.id)
        finally:
            await service.aclose()
        print(f"cancelled {cancelled} job(s)" + ("" if cancelled else " (already finished)"))
        return 0

    return asyncio.run(run())


def cmd_chat(args: argparse.Namespace) -> int:
    service = _service(args)
    model = args.model or default_model(service.config)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    request = {"messages": messages, "model": model, "temperature": args.temperature, "max_tokens": args.max_tokens,
               "stream": True, "provider": args.provider, "metadata": {"caller": "llmq-chat"}}
    return asyncio.run(_print_stream(service, service.stream_generate(request)))


def cmd_tail(args: argparse.Namespace) -> int:
    service = _service(args)
    return asyncio.run(_print_stream(service, service.stream_job(args.id)))


async def _print_stream(service: Any, chunks: Any) -> int:
    try:
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
    finally:
        await service.aclose()
    return 0


def default_model(config: Any) -> str:
    names = [config.service.default_provider, *config.service.fallback_chain, *config.providers]
    for name in names:
        entry = config.providers.get(name) if name else None
        if entry is not None and entry.configured and entry.models:
            return entry.models[0]
    raise ValueError("no configured provider lists a model; pass --model")


if __name__ == "__main__":
    sys.exit(main())
