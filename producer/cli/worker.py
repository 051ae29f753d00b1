"""`llmq worker`: a Celery worker on provider queues, with llmq's pool."""

from __future__ import annotations

import argparse
import sys

from llmq.cli.output import CommandRegistrar
from llmq.contract import keys
from llmq.contract.config import ConfigError, LLMConfig, load_config


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
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


#: `llmq worker --pool` names and the Celery pools they start.
POOLS = {"async": "llmq.worker.pool:AsyncioPool", "threads": "threads", "prefork": "prefork", "solo": "solo"}


def cmd_worker(args: argparse.Namespace) -> int:
    from llmq.worker.app import create_app
    from llmq.worker.settings import WorkerSettings

    config = load_config(args.config)
    names = worker_providers(config, args.queues)
    queues = [keys.queue_name(name) for name in names]
    app = create_app(WorkerSettings.from_environment(config, queues=tuple(queues), metrics_port=args.metrics_port))
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


def worker_providers(config: LLMConfig, queues_option: str | None) -> list[str]:
    """Provider names from `--queues` (names or llm.<name>), checked against the config.

    A misspelt name would make a worker wait forever on a queue nobody sends to, so
    it is refused; a known but unconfigured provider only gets a warning, because
    docker-compose runs one worker per queue whether or not its key is set.
    """

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


