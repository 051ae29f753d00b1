"""Poison requests against the circuit breaker: 100 jobs on one provider, 10 % always failing.

One `llmq worker` (no beat), one provider entry, no fallback, the default retry and
health settings. The fake OpenAI server answers every request that carries the
poison marker with HTTP 500, forever. A breaker that judges one request instead of
the provider opens on the poison jobs' retries and keeps the healthy ones waiting;
one that judges the provider lets the poison jobs use up their attempts and fail.

    .venv/bin/python -m bench.scheduling.poison
    .venv/bin/python -m bench.scheduling.poison --checkout ../base --python ../base/.venv/bin/python

`--checkout` runs the worker of another checkout of llmq (an older commit, say) against the
same client, fake and Redis: job records, task and queues have not changed shape, so the
breakers compare side by side. Only the worker command differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

from bench.overhead import procs
from llmq import LLMRequest, SyncLLMService
from llmq.cli.embedded import RedisServer
from llmq.contract import keys
from llmq.contract.config import parse_config
from llmq.contract.models import JobState
from tests.support.fakes.openai import DEFAULT_API_KEY

MARKER = "POISON-REQUEST"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--poison-every", type=int, default=10, help="every Nth job is poison (default 10: 10 %%)")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="give up waiting after this long")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's job slots (default 8)")
    parser.add_argument("--checkout", type=Path, default=procs.REPO_ROOT, help="llmq checkout whose worker runs")
    parser.add_argument("--python", default=sys.executable, help="that checkout's Python")
    return parser.parse_args(argv)


def worker_module(checkout: Path) -> str:
    """The CLI module of a checkout: `llmq.cli` since the layout of issue 11, `producer.cli` before."""
    return "llmq.cli" if (checkout / "producer" / "cli" / "__main__.py").exists() else "producer.cli"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="llmq-poison-"))
    redis_server = RedisServer(root / "redis", persistence=False).start()
    fake = procs.start_fake(root, "fake", latency_s=0.05)
    worker = None
    try:
        procs.httpx.post(f"{fake.url}/_fake/poison", json={"marker": MARKER, "status": 500}, timeout=10)
        config_text = yaml.safe_dump({"llm_service": {"providers": {"solo": {
            "type": "openai", "api_key": DEFAULT_API_KEY, "base_url": f"{fake.url}/v1", "models": ["gpt-4o-mini"],
        }}}})
        config_path = root / "llm_service.yaml"
        config_path.write_text(config_text)
        env = procs.clean_env(LLMQ_REDIS_URL=redis_server.url, LLMQ_CONFIG=str(config_path), LLMQ_HOME=str(root),
                              LLMQ_DATABASE_URL=f"sqlite:///{root / 'ledger.sqlite3'}")
        command = [args.python, "-m", worker_module(args.checkout), "--config", str(config_path), "worker",
                   "--queues", "solo", "--concurrency", str(args.concurrency), "--loglevel", "WARNING"]
        popen = procs.subprocess.Popen(command, cwd=args.checkout, env=env, stdout=(root / "worker.log").open("ab"),
                                       stderr=procs.subprocess.STDOUT, start_new_session=True)
        worker = procs.Process("worker", popen, root / "worker.log")
        procs.wait_for_key(redis_server.url, f"{keys.WORKER_PREFIX}*", worker)
        print(f"worker of {args.checkout} ({worker_module(args.checkout)}, {args.concurrency} slots), {args.jobs} jobs, "
              f"every {args.poison_every}th poison (HTTP 500 forever), no beat, default retry and health settings")
        report(run(args, parse_config(config_text), redis_server.url, fake), redis_server.url)
    finally:
        if worker is not None:
            worker.stop()
        fake.stop()
        redis_server.stop()
    return 0


def run(args: argparse.Namespace, config: object, redis_url: str, fake: procs.FakeProcess) -> dict[str, object]:
    requests = [
        LLMRequest(messages=[{"role": "user", "content": f"{MARKER} {n}" if n % args.poison_every == 0 else f"task {n}"}],
                   model="gpt-4o-mini", temperature=0, max_tokens=16)
        for n in range(args.jobs)
    ]
    with SyncLLMService(config, redis_url=redis_url) as service:  # type: ignore[arg-type]
        started = time.monotonic()
        batch_id = service.submit_batch(requests)
        try:
            batch = service.wait(batch_id, timeout_s=args.timeout_s)
            finished_s: float | None = time.monotonic() - started
        except TimeoutError:
            batch, finished_s = service.batch(batch_id), None
        jobs = service.results(batch_id)
    healthy = [job for job in jobs if MARKER not in job.request.messages[0].content]
    poison = [job for job in jobs if MARKER in job.request.messages[0].content]
    return {
        "finished_s": finished_s,
        "counts": {state.value: count for state, count in batch.counts.items() if count},
        "healthy_succeeded": sum(job.state is JobState.SUCCEEDED for job in healthy),
        "healthy": len(healthy),
        "poison_failed_server_error": sum(job.state is JobState.FAILED and (job.error or {}).get("type") == "ServerError"
                                          for job in poison),
        "poison": len(poison),
        "provider_calls": fake.stats()["requests"],
    }


def report(result: dict[str, object], redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    circuit = client.hgetall(keys.circuit("solo"))
    client.close()
    finished = f"{result['finished_s']:.1f} s" if result["finished_s"] is not None else "NOT FINISHED"
    print(f"  batch done in {finished}; states {result['counts']}")
    print(f"  healthy jobs succeeded: {result['healthy_succeeded']}/{result['healthy']}; "
          f"poison jobs failed with ServerError: {result['poison_failed_server_error']}/{result['poison']}")
    print(f"  circuit opened {circuit.get('times_opened', '0')} times; provider calls {result['provider_calls']}")


if __name__ == "__main__":
    sys.exit(main())
