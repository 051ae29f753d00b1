"""The real parts tests drive: worker processes started the way the README starts them
(`llmq worker`), clusters of them, the service configs they read, and provider adapters
run against a fake in an event loop of their own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
import yaml

from llmq.cli.embedded import RedisServer
from llmq.client.sync import SyncLLMService
from llmq.contract import keys
from llmq.contract.config import LLMConfig, ProviderConfig, load_config
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.registry import create_provider
from tests.support.fakes.base import FakeProviderServer
from tests.support.fakes.openai import DEFAULT_API_KEY

T = TypeVar("T")
AdapterT = TypeVar("AdapterT", bound=LLMProvider)
#: A job's deadline and lease in test clusters: a lease short enough that a lost worker's jobs
#: come back within a test, a deadline long enough for a slow, shared machine.
TEST_JOBS = {"deadline_s": 60, "lease_s": 5}


def run_adapter(entry: ProviderConfig, adapter: type[AdapterT], action: Callable[[AdapterT], Awaitable[T]]) -> T:
    """Build the adapter the registry builds for `entry` (checked to be an `adapter`), run
    `action` on it and close it, all in one event loop of its own: a connection pool belongs
    to the loop that opened it."""

    async def main() -> T:
        provider = create_provider(entry)
        assert isinstance(provider, adapter), type(provider)
        try:
            return await action(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def openai_entry(fake: FakeProviderServer | str, *, api_key: str = DEFAULT_API_KEY, **fields: Any) -> dict[str, Any]:
    """A config entry for an OpenAI provider served by `fake` (or a fake at that URL, e.g. in its
    own process), for gpt-4o-mini unless `fields` say otherwise."""
    url = fake if isinstance(fake, str) else fake.url
    return {"type": "openai", "api_key": api_key, "base_url": f"{url}/v1", "models": ["gpt-4o-mini"], **fields}


def fast_retry(max_attempts_per_provider: int, **fields: Any) -> dict[str, Any]:
    """A retry section whose backoffs (50-200 ms) let a test see every attempt in test time."""
    return {"max_attempts_per_provider": max_attempts_per_provider, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
            **fields}


def service_config(providers: dict[str, dict[str, Any]], *, jobs: dict[str, Any] | None = None, **sections: Any) -> str:
    """The YAML a cluster reads: `providers` (name -> entry), `jobs` (TEST_JOBS unless given)
    and any other `llm_service` section (`fallback_chain`, `retry`, `health`, ...) as given."""
    service = {**sections, "jobs": TEST_JOBS if jobs is None else jobs, "providers": providers}
    return yaml.safe_dump({"llm_service": service}, sort_keys=False)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@dataclass
class WorkerProcess:
    config_path: Path
    redis_url: str
    database_url: str
    log_path: Path
    queues: str | None = None
    concurrency: int = 50
    pool: str = os.environ.get("LLMQ_TEST_POOL", "async")
    extra_env: dict[str, str] = field(default_factory=dict)
    #: More `llmq worker` options, e.g. ("--no-events",).
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
        env.update(
            LLMQ_REDIS_URL=self.redis_url, LLMQ_DATABASE_URL=self.database_url, LLMQ_CONFIG=str(self.config_path),
            LLMQ_HOME=str(self.log_path.parent), PYTHONUNBUFFERED="1", **self.extra_env,
        )
        return env

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "llmq.cli", "--config", str(self.config_path), "worker",
                   "--concurrency", str(self.concurrency), "--pool", self.pool, "--loglevel", "INFO"]
        if self.queues:
            command += ["--queues", self.queues]
        command += self.extra_args
        self.process = subprocess.Popen(
            command, env=self.env(), stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and any pool children."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def live_workers(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [key for key in client.scan_iter(keys.WORKER_PREFIX + "*")]
    finally:
        client.close()


def wait_for_workers(redis_url: str, count: int, workers: list[WorkerProcess], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(live_workers(redis_url)) < count:
        for worker in workers:
            if worker.process is not None and worker.process.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.process.returncode}: {worker.log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(worker.log_path.read_text()[-2000:] for worker in workers)
            raise TimeoutError(f"workers not ready after {timeout_s}s:\n{logs}")
        time.sleep(0.1)


@dataclass
class Cluster:
    """A redis-server, a SQL database and real worker processes for one config."""

    root: Path
    config_path: Path
    database_url: str
    redis: RedisServer
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def config(self) -> LLMConfig:
        return load_config(self.config_path)

    def add_worker(self, **options: object) -> WorkerProcess:
        index = len(self.workers)
        worker = WorkerProcess(self.config_path, self.redis_url, self.database_url, self.root / f"worker-{index}.log", **options)  # type: ignore[arg-type]
        self.workers.append(worker.start())
        return worker

    def start_workers(self, count: int = 1, **options: object) -> None:
        before = len(live_workers(self.redis_url))
        started = [self.add_worker(**options) for _ in range(count)]
        wait_for_workers(self.redis_url, before + count, started)

    def service(self) -> SyncLLMService:
        return SyncLLMService(self.config, redis_url=self.redis_url)

    def run_cli(self, *args: str) -> str:
        """Run `llmq <args>` against this cluster (its config, Redis and ledger); its stdout."""
        worker = self.workers[0]
        reply = subprocess.run([sys.executable, "-m", "llmq.cli", "--config", str(self.config_path), *args],
                               env=worker.env(), capture_output=True, text=True, timeout=60, check=True)
        return reply.stdout

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.redis.stop()


def providers_json(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """`llmq providers --json`: each entry's live status (limits in use, circuit, pool split)."""
    return json.loads(cluster.run_cli("providers", "--json"))


def start_cluster(
    root: Path, config_text: str, *, database_url: str | None = None, persistence: bool = False,
    redis_password: str | None = None,
) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    config_path = write_config(root / "llm_service.yaml", config_text)
    server = RedisServer(root / "redis", persistence=persistence, password=redis_password).start()
    return Cluster(root, config_path, database_url or f"sqlite:///{root / 'ledger.sqlite3'}", server)
