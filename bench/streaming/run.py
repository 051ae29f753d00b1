"""Time to first token: streaming through llmq's queue vs a direct streaming call.

Both stream the same request from the same fake OpenAI server (its own process,
`tests.support.fakes.serve`, with a fixed delay before the first byte and between
chunks). Direct: httpx POST with `stream: true`, timed to the first content
delta. llmq: `LLMService.stream_generate` against a real redis-server and one
real `llmq worker` process, timed to the first chunk the caller receives. Runs
are sequential (one stream at a time), so the difference is llmq's overhead on
the path: enqueue, broker hop, claim, provider call, XADD, XREAD.

    .venv/bin/python -m bench.streaming.run [--runs 40] [--first-byte-s 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmq.client.service import LLMService
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.harness import start_cluster

CONFIG = """
llm_service:
  providers:
    fake:
      type: openai
      api_key: "{key}"
      base_url: "{url}/v1"
      models: [gpt-4o-mini]
"""
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "stream a short task"}], "max_tokens": 64}


def start_fake(first_byte_s: float, chunk_delay_s: float) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "tests.support.fakes.serve", "openai"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = json.loads(process.stdout.readline())["url"]
    httpx.post(f"{url}/_fake/latency", json={"latency_s": first_byte_s, "chunk_delay_s": chunk_delay_s})
    return process, url


async def direct_ttft(url: str) -> float:
    async with httpx.AsyncClient(timeout=30) as client:
        began = time.perf_counter()
        headers = {"authorization": f"Bearer {DEFAULT_API_KEY}"}
        async with client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}, headers=headers) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    return time.perf_counter() - began
    raise RuntimeError("no content in the direct stream")


async def llmq_ttft(service: LLMService) -> float:
    began = time.perf_counter()
    first = None
    async for chunk in service.stream_generate({**BODY, "stream": True}):
        if first is None and chunk.content:
            first = time.perf_counter() - began
    assert first is not None
    return first


def summary(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{name:<8} median {statistics.median(values) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   min {ordered[0] * 1000:7.1f} ms"


async def measure(url: str, service: LLMService, runs: int) -> tuple[list[float], list[float]]:
    await llmq_ttft(service)  # warm-up: connections, scripts, adapter creation
    await direct_ttft(url)
    direct, queued = [], []
    for _ in range(runs):  # interleaved, so drift hits both alike
        direct.append(await direct_ttft(url))
        queued.append(await llmq_ttft(service))
    await service.aclose()
    return direct, queued


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--first-byte-s", type=float, default=0.1, help="fake's delay before the first byte")
    parser.add_argument("--chunk-delay-s", type=float, default=0.01)
    args = parser.parse_args()
    fake, url = start_fake(args.first_byte_s, args.chunk_delay_s)
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="llmq-bench-stream-")), CONFIG.format(key=DEFAULT_API_KEY, url=url))
    try:
        cluster.start_workers(1, concurrency=50)
        service = LLMService(cluster.config, redis_url=cluster.redis_url)
        direct, queued = asyncio.run(measure(url, service, args.runs))
    finally:
        cluster.stop()
        fake.terminate()
    print(f"time to first token, {args.runs} sequential streams, fake first byte after {args.first_byte_s * 1000:.0f} ms")
    print(summary("direct", direct))
    print(summary("llmq", queued))
    overhead = statistics.median(queued) - statistics.median(direct)
    print(f"llmq overhead (median): {overhead * 1000:.1f} ms; ratio {statistics.median(queued) / statistics.median(direct):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
