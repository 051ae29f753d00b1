"""Fixtures that start the real parts every test needs: redis-server, fakes, configs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from llmq.cli.embedded import RedisServer
from tests.support.pg import PostgresServer, postgres_or_skip

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_REQUESTS = REPO_ROOT.parent / "shared" / "data" / "agent_requests.jsonl"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistence=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests skip where initdb/postgres are not on PATH);
    each test takes a schema or a database of its own."""
    with postgres_or_skip() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the session's redis-server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (connections are refused), held by a socket that is bound but
    never listens, so that no other process (the suite runs in several) starts a server on it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_ambient_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a real provider, even on a machine with keys in its environment."""
    for name in list(os.environ):
        if name.endswith("_API_KEY") or name.startswith(("AWS_", "LLMQ_")):
            monkeypatch.delenv(name, raising=False)


#: Packages whose modules share a package-scoped stack (tests/http: a worker and `llmq serve`).
WHOLE_PACKAGES = ("tests/http/",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile` (pyproject's addopts) hands xdist's processes a module at a time, so that a
    module's servers start once, in one process; here a package of WHOLE_PACKAGES goes whole."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleOrPackageScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return next((package for package in WHOLE_PACKAGES if module.startswith(package)), module)

    return ModuleOrPackageScheduling(config, log)
