"""The HTTP front's real parts for tests and the benchmark: a `llmq serve` process on a free
port in front of a real cluster, and keys made with `llmq keys create`."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmq.cli.embedded import free_port
from llmq.cli.main import main as llmq
from tests.support.harness import Cluster

#: What the tests' stack is priced at: $10,000 per million tokens, a cent a token (budgets show quickly).
PRICING = {"gpt-4o-mini": {"input_per_mtok": 10000, "output_per_mtok": 10000}}


@dataclass
class FrontProcess:
    """`llmq serve` in its own process, as an operator starts it."""

    cluster: Cluster
    log_path: Path
    extra_args: tuple[str, ...] = ()
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> FrontProcess:
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
        env.update(LLMQ_REDIS_URL=self.cluster.redis_url, LLMQ_DATABASE_URL=self.cluster.database_url,
                   LLMQ_HOME=str(self.log_path.parent), PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "llmq.cli", "--config", str(self.cluster.config_path), "serve",
                   "--port", str(self.port), *self.extra_args]
        self.process = subprocess.Popen(command, env=env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llmq serve exited with {self.process.returncode}: {self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"llmq serve not up after {timeout_s}s: {self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def create_key(database_url: str, name: str, *options: str) -> str:
    """`llmq keys create --name NAME [options]`: the key it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = llmq(["keys", "create", "--name", name, "--database-url", database_url, *options])
    assert code == 0, out.getvalue()
    return out.getvalue().strip().splitlines()[0]
