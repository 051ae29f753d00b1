"""`llmq up` starts the HTTP front with the rest of the stack: the OpenAI SDK gets an answer
from the shipped config's mock providers through it, with a key from `llmq keys create`."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from llmq.cli.embedded import free_port
from tests.cli.test_cli import clean_env, llmq_command
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_llmq_up_serves_the_openai_api_on_loopback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    port = free_port()
    env = clean_env(LLMQ_HOME=str(tmp_path))
    up = subprocess.Popen([*llmq_command(), "up", "--no-flower", "--serve-port", str(port)], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llmq up: no HTTP front"
            time.sleep(0.3)
        made = subprocess.run([*llmq_command(), "keys", "create", "--name", "up-test"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=made.stdout.strip(), max_retries=0)
        answer = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "up"}], max_tokens=16)
        assert answer.choices[0].message.content
    finally:
        up.send_signal(signal.SIGINT)
        try:
            output, _ = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            output, _ = up.communicate()
    assert "OpenAI API: http://127.0.0.1:" in output
