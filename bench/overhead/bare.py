"""The baseline: a bare Celery task that makes the same HTTP call and returns the content.

It runs on llmq's own Celery settings (llmq.contract.queueing.celery_settings plus the
worker's reliability settings: acks_late, reject_on_worker_lost, prefetch 1,
JSON, task events on), the same thread pool and the same concurrency, so the
difference to llmq is llmq's own work: job records and Lua transitions, the
async runtime, the adapter, the outbox to SQL. The one setting that differs:
the bare task keeps its return value in Celery's Redis result backend, which is
how a bare Celery task hands its answer back (llmq stores it in the job record).

    python -m bench.overhead.bare --concurrency 100   # a worker; BENCH_* env says where
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx
from celery import Celery, signals

from llmq.contract.config import LLMConfig, load_config
from llmq.contract.queueing import celery_settings
from llmq.worker.app import WORKER_SETTINGS

QUEUE = "bench.bare"
TASK = "bench.bare_call"
#: + worker pid: set when the worker is ready to consume (the benchmark waits for it).
READY_PREFIX = "bench:bare:ready:"


def make_bare_app(config: LLMConfig, broker_url: str) -> Celery:
    """Celery settings of llmq's app for `config`, plus a result backend for the return value."""
    app = Celery("bench-bare", set_as_current=False)
    app.conf.update(celery_settings(config, broker_url))
    app.conf.update(WORKER_SETTINGS, result_backend=broker_url, task_ignore_result=False, task_default_queue=QUEUE)
    return app


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The body llmq's OpenAI adapter sends for the same request (see worker/providers/openai.py)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": False, "temperature": 0}


def register_task(app: Celery, fake_url: str, api_key: str, concurrency: int) -> None:
    # One client per process, shared by every pool thread: httpx.Client is thread-safe.
    client = httpx.Client(
        base_url=fake_url, timeout=60.0, headers={"authorization": f"Bearer {api_key}"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )

    @app.task(name=TASK)
    def bare_call(model: str, prompt: str, max_tokens: int) -> str:
        response = client.post("/v1/chat/completions", json=chat_body(model, prompt, max_tokens))
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead.bare")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--loglevel", default="WARNING")
    parser.add_argument("--no-events", action="store_true", help="as `llmq worker --no-events`")
    args = parser.parse_args(argv)
    broker_url = os.environ["BENCH_BROKER_URL"]
    app = make_bare_app(load_config(os.environ["BENCH_CONFIG"]), broker_url)
    register_task(app, os.environ["BENCH_FAKE_URL"], os.environ["BENCH_API_KEY"], args.concurrency)

    @signals.worker_ready.connect(weak=False)
    def _announce(**_: object) -> None:
        import redis

        with redis.Redis.from_url(broker_url) as client:
            client.set(f"{READY_PREFIX}{os.getpid()}", "1", ex=600)

    # The same worker arguments `llmq worker` passes (producer/cli/worker.py cmd_worker).
    worker_args = ["worker", "--pool=threads", f"--concurrency={args.concurrency}", f"--queues={QUEUE}",
                   f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle"]
    if args.no_events:
        app.conf.worker_send_task_events = False
    else:
        worker_args.append("--events")
    app.worker_main(worker_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
