"""`python -m tests.support.fakes.serve`: a fake in its own process, driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.support.fakes.openai import DEFAULT_API_KEY


@pytest.fixture
def served_openai() -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fakes.serve", "openai", "--latency-s", "0.2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    ready = json.loads(process.stdout.readline())
    yield process, ready["url"]
    if process.poll() is None:
        process.kill()
        process.wait()


def test_serves_chat_completions_and_reports_max_in_flight(served_openai: tuple[subprocess.Popen[str], str]) -> None:
    process, url = served_openai
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    headers = {"authorization": f"Bearer {DEFAULT_API_KEY}"}

    async def three_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url) as client:
            calls = [client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(3)]
            return await asyncio.gather(*calls)

    replies = asyncio.run(three_at_once())
    assert [reply.status_code for reply in replies] == [200, 200, 200]
    assert replies[0].json()["choices"][0]["message"]["content"] == "Task: fake openai answer to 'hello'"
    stats = httpx.get(f"{url}/_fake/stats").json()
    assert stats["requests"] == 3
    assert stats["max_in_flight"] == 3  # the 0.2 s latency holds all three open together

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
