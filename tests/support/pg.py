"""A throwaway PostgreSQL server for tests: initdb into a temp dir, run, remove.

Use it through a session fixture:

    from tests.support.pg import PostgresServer, postgres_or_skip

    @pytest.fixture(scope="session")
    def postgres() -> Iterator[PostgresServer]:
        with postgres_or_skip() as server:
            yield server

    url = postgres.create_schema("some_test")     # postgresql+psycopg://... (fresh, fast)
    url = postgres.create_database("some_test")   # a whole new database (slower)

PostgreSQL refuses to run as root (CI runs as root), so under root the server
runs as an unprivileged account: `nobody`, or a `llmq-test` system user created
with useradd when there is no `nobody`. The data directory and the unix socket
live in one temp dir owned by that account; the server listens on 127.0.0.1 on
a free port with trust authentication, and durability is switched off (fsync)
because the data is thrown away.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmq.cli.embedded import start_on_own_port, wait_until_answering

SUPERUSER = "llmq"
FALLBACK_ACCOUNT = "llmq-test"
REQUIRED_BINARIES = ("initdb", "postgres")


def missing_requirements() -> str | None:
    """Why a PostgreSQL test cannot run here, or None when it can."""
    absent = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if absent:
        return f"PostgreSQL binaries not on PATH: {', '.join(absent)} (install postgresql to run these tests)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None


def _unprivileged_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", FALLBACK_ACCOUNT):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_ACCOUNT],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(FALLBACK_ACCOUNT)


@dataclass
class PostgresServer:
    root: Path
    port: int = 0
    account: pwd.struct_passwd | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, Any]:
        if self.account is None:
            return {}
        # Drop root entirely: uid, gid and supplementary groups.
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        self.socket_dir.mkdir(parents=True)
        if self.account is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        subprocess.run(
            ["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
             "--no-instructions", "-E", "UTF8", "--no-locale"],
            check=True, capture_output=True, env=self._env(), cwd=self.root, **self._run_as(),
        )
        self.port = start_on_own_port(self.port, lambda port: self._start_on(port, timeout_s))
        return self

    def _start_on(self, port: int, timeout_s: float) -> None:
        self.port = port
        self.start_again(timeout_s)

    def start_again(self, timeout_s: float = 30.0) -> None:
        """Once stopped: the same data directory and port, without a new initdb."""
        self._spawn()
        assert self.process is not None
        wait_until_answering(self.process, self.port, self._answers, timeout_s, "postgres", lambda: f"\n{self.log_tail()}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C", "TZ": "UTC"}

    def _spawn(self) -> None:
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the server owns it until stop()
        self.process = subprocess.Popen(
            ["postgres", "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.socket_dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off",
             # A server zone other than UTC, so tests prove times are converted, not assumed.
             "-c", "TimeZone=Asia/Kolkata"],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), cwd=self.root, **self._run_as(),
        )
        log.close()

    def _answers(self) -> bool:
        """Whether the server on this port runs on this data directory."""
        import psycopg

        try:
            with psycopg.connect(self.url().replace("+psycopg", ""), connect_timeout=2) as connection:
                row = connection.execute("SHOW data_directory").fetchone()
        except psycopg.Error:
            return False  # not up yet, or another server holds the port
        return row is not None and Path(row[0]).resolve() == self.data_dir.resolve()

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "postgres.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self, prefix: str = "test") -> str:
        """A new empty schema, first on the search path of the returned URL: a fresh
        database for one test in milliseconds (CREATE DATABASE takes a good part of a second)."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, then exit.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_or_skip() -> Iterator[PostgresServer]:
    """A running server for the duration of the block; skips the test when this machine has none."""
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    # Not pytest's tmp_path: its parents are private to the current user, and
    # the server may run as another one.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmq-pg-")), account=_unprivileged_account())
    try:
        server.start()
        yield server
    finally:
        server.stop()
