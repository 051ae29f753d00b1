"""Fixtures that start the real parts every test needs: redis-server, fakes, configs."""

from __future__ import annotations

import os
import socket
from collections import Counter
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


def xdist_scope(nodeid: str) -> str:
    """What xdist hands to one process whole: a test's module, or its package in WHOLE_PACKAGES, so
    that a module's (package's) servers start once, in one process."""
    module = nodeid.split("::", 1)[0]
    return next((package for package in WHOLE_PACKAGES if module.startswith(package)), module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile` (pyproject's addopts), by xdist_scope rather than by module alone."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ScopeScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ScopeScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scopes with a `slow` test first, then the others with the most tests first: xdist hands them out
    in this order (`--no-loadscope-reorder`), so the long scenarios start early and the short modules
    fill the processes' ends."""
    slow = {xdist_scope(item.nodeid) for item in items if item.get_closest_marker("slow")}
    sizes = Counter(xdist_scope(item.nodeid) for item in items)
    items.sort(key=lambda item: (xdist_scope(item.nodeid) not in slow, -sizes[xdist_scope(item.nodeid)]))
