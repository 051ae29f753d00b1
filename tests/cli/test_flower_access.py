"""Flower as `llmq up` starts it (producer/cli/flower.py): its UI and its HTTP API behind one
login, a password made once per LLMQ_HOME and never printed, and the tasks page's columns.

The stack test starts the real thing: redis-server, a worker, beat and Flower (cli/stack.py).
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import httpx
import pytest

from llmq.cli.embedded import free_port
from llmq.cli.flower import TASK_COLUMNS, FlowerCredentials, flower_command, how_to_reach, local_credentials
from llmq.cli.stack import Stack
from llmq.contract.config import load_config
from tests.support.harness import service_config, write_config


def test_the_local_password_is_made_once_readable_only_by_its_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWER_USER", raising=False)
    monkeypatch.delenv("FLOWER_PASSWORD", raising=False)
    first = local_credentials(tmp_path)
    assert first.user == "llmq" and len(first.password) >= 20
    assert stat.S_IMODE((tmp_path / "flower-password").stat().st_mode) == 0o600
    assert local_credentials(tmp_path) == first
    assert first.env() == {"FLOWER_BASIC_AUTH": f"llmq:{first.password}"}  # Flower's environment, not its argv
    printed = "\n".join(how_to_reach(5555, first))
    assert first.password not in printed and str(tmp_path / "flower-password") in printed
    assert "http://127.0.0.1:5555/api/tasks" in printed


def test_flower_user_and_password_from_the_environment_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWER_USER", "ops")
    monkeypatch.setenv("FLOWER_PASSWORD", "s3cret-pass")
    credentials = local_credentials(tmp_path)
    assert (credentials.user, credentials.password) == ("ops", "s3cret-pass")
    assert not (tmp_path / "flower-password").exists()
    assert "s3cret-pass" not in "\n".join(how_to_reach(5555, credentials))
    with pytest.raises(ValueError, match="comma"):
        FlowerCredentials("ops", "a,b", "FLOWER_PASSWORD").env()


def test_the_tasks_page_shows_what_names_a_job_and_how_it_ended() -> None:
    command = flower_command(5555)
    assert f"--tasks_columns={TASK_COLUMNS}" in command and "--address=127.0.0.1" in command
    assert not any("basic" in part for part in command)  # the login travels in the environment
    assert TASK_COLUMNS.split(",")[:6] == ["name", "uuid", "state", "args", "result", "exception"]


@pytest.mark.slow
def test_llmq_up_serves_flowers_api_behind_the_login_it_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LLMQ_REDIS_URL", "FLOWER_USER", "FLOWER_PASSWORD", "FLOWER_BASIC_AUTH"):
        monkeypatch.delenv(name, raising=False)
    config_path = write_config(tmp_path / "llm_service.yaml",
                               service_config({"mock": {"type": "mock", "models": ["gpt-4o-mini"]}}))
    port = free_port()
    stack = Stack(load_config(config_path), tmp_path / "home", flower_port=port)
    try:
        stack.start()
        assert stack.flower_credentials is not None
        login = (stack.flower_credentials.user, stack.flower_credentials.password)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            stack.check_alive()
            try:
                answer = httpx.get(url + "/api/tasks", auth=login, timeout=5.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "Flower did not answer"
                time.sleep(0.3)
        assert answer.status_code == 200 and answer.json() == {}
        assert httpx.get(url + "/api/workers", auth=login, timeout=10.0).status_code == 200
        assert httpx.get(url + "/api/tasks", timeout=10.0).status_code == 401
        assert httpx.get(url + "/", auth=("llmq", "guess"), timeout=10.0).status_code == 401
        page = httpx.get(url + "/tasks", auth=login, timeout=10.0).text
        assert all(label in page for label in ("args", "Result", "Exception", "Retries"))
        flower_log = (tmp_path / "home" / "logs" / "flower.log").read_text()
        assert login[1] not in flower_log
    finally:
        stack.stop()
