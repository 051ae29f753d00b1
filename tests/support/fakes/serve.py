"""Run one fake provider server in a process of its own (benchmarks, manual checks).

    python -m tests.support.fakes.serve openai --port 8401 --latency-s 2

A fake in its own process does not share the GIL with the client under test, so
a benchmark measures the client, not the fake. The first line on stdout is JSON
(`{"url": ..., "port": ..., "pid": ...}`) once the server accepts connections;
the control API (`/_fake/stats`, `/_fake/latency`, ...) sets knobs from outside.
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.fakes.base import FakeProviderServer

#: provider name -> "module:class", imported only when asked for.
FAKES = {
    "openai": "tests.support.fakes.openai:FakeOpenAI",
    "anthropic": "tests.support.fakes.anthropic:FakeAnthropic",
    "gemini": "tests.support.fakes.gemini:FakeGemini",
    "ollama": "tests.support.fakes.ollama:FakeOllama",
    # The same, with their batch APIs (and flex tiers): tests/support/fakes/*_batches.py.
    "openai-batches": "tests.support.fakes.openai_batches:FakeOpenAIBatches",
    "anthropic-batches": "tests.support.fakes.anthropic_batches:FakeAnthropicBatches",
    "gemini-batches": "tests.support.fakes.gemini_batches:FakeGeminiBatches",
}


def build_fake(provider: str, *, port: int = 0, latency_s: float = 0.0, api_key: str | None = None,
               backlog: int = 4096, latency_jitter_s: float = 0.0) -> FakeProviderServer:
    module_name, class_name = FAKES[provider].split(":")
    fake_class = getattr(importlib.import_module(module_name), class_name)
    options: dict[str, Any] = {"port": port, "latency_s": latency_s, "latency_jitter_s": latency_jitter_s}
    if api_key is not None:
        options["api_key"] = api_key
    fake: FakeProviderServer = fake_class(**options)
    # The base binds with a 1024 backlog; a thousand clients connecting at once need more.
    fake._server.socket.listen(backlog)
    return fake


@dataclass
class ServedFake:
    """A fake provider in a process of its own (`serve_fake`), driven through its control API: what
    a test uses when the fake must not share the GIL with the client (its admission times would
    carry the GIL's waits)."""

    process: subprocess.Popen[str]
    url: str

    def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = httpx.post(f"{self.url}/_fake/{action}", json=body or {}, timeout=30)
        reply.raise_for_status()
        answer: dict[str, Any] = reply.json()
        return answer

    def stats(self) -> dict[str, Any]:
        return self.control("stats")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def serve_fake(provider: str = "openai", *, latency_s: float = 0.0, latency_jitter_s: float = 0.0) -> ServedFake:
    """Start `python -m tests.support.fakes.serve <provider>` and wait until it accepts connections."""
    command = [sys.executable, "-m", "tests.support.fakes.serve", provider, "--latency-s", str(latency_s),
               "--latency-jitter-s", str(latency_jitter_s)]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[3], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return ServedFake(process, json.loads(process.stdout.readline())["url"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fakes.serve", description=__doc__.splitlines()[0])
    parser.add_argument("provider", choices=sorted(FAKES))
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay before every reply, in seconds")
    parser.add_argument("--latency-jitter-s", type=float, default=0.0,
                        help="up to this much more delay, at random, after a request is admitted (s)")
    parser.add_argument("--api-key", help="the key the fake accepts (default: the fake's own)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (pending connections)")
    args = parser.parse_args(argv)
    fake = build_fake(args.provider, port=args.port, latency_s=args.latency_s, api_key=args.api_key,
                      backlog=args.backlog, latency_jitter_s=args.latency_jitter_s).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({"url": fake.url, "port": fake.port, "pid": os.getpid()}), flush=True)
    stop.wait()
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
