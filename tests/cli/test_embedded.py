"""The embedded redis-server (`llmq up`, the demo, the suite's clusters) listens on its own port:
never on one another process took between choosing it and binding it, as happens when many
servers start at once (the suite's parallel processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from llmq.cli import embedded
from llmq.cli.embedded import PortInUseError, RedisServer


def data_dir_of(server: RedisServer) -> Path:
    client = redis.Redis.from_url(server.url)
    try:
        return Path(client.config_get("dir")["dir"])
    finally:
        client.close()


def test_a_chosen_port_taken_before_the_bind_is_given_up_for_another(tmp_path: Path, monkeypatch) -> None:
    first = RedisServer(tmp_path / "first", persistence=False).start()
    try:
        choices = iter([first.port])  # the first free port chosen is the one `first` holds by now
        choose = embedded.free_port
        monkeypatch.setattr(embedded, "free_port", lambda: next(choices, None) or choose())
        second = RedisServer(tmp_path / "second", persistence=False).start()
        try:
            assert second.port != first.port
            assert data_dir_of(second) == (tmp_path / "second").resolve()
            assert data_dir_of(first) == (tmp_path / "first").resolve()
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_given_port_that_is_taken_is_refused_not_shared(tmp_path: Path) -> None:
    first = RedisServer(tmp_path / "first", persistence=False, password="first-password").start()
    try:
        second = RedisServer(tmp_path / "second", persistence=False, port=first.port)
        with pytest.raises(PortInUseError, match=f"port {first.port} is taken by another process"):
            second.start()
        assert second.process is not None and second.process.poll() is not None
        assert data_dir_of(first) == (tmp_path / "first").resolve()
    finally:
        first.stop()
