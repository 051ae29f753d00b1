"""The fakes' rate limits: a sliding 60 s window, or a strict token bucket (one second of burst),
driven directly on a clock the test sets and through the control API of a fake in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.support.fakes.base import RateLimitPolicy, TokenBucketPolicy
from tests.support.fakes.openai import DEFAULT_API_KEY


def test_a_strict_bucket_admits_one_seconds_burst_then_the_refill_only() -> None:
    policy = TokenBucketPolicy(requests_per_minute=1200, tokens_per_minute=240_000)  # 20 req and 4,000 tok a second
    start = 1000.0
    assert all(policy.admit(10, now=start) is None for _ in range(20))  # the burst: one second's worth
    wait_s = policy.admit(10, now=start)
    assert wait_s == pytest.approx(1 / 20)  # one request refills in 50 ms
    assert policy.admit(10, now=start + 0.049) is not None
    assert policy.admit(10, now=start + 0.051) is None
    # Tokens bind on their own: 3,000 tokens take 0.75 s to come back, however few requests.
    later = start + 10.0  # both buckets full again
    assert policy.admit(3000, now=later) is None
    assert policy.admit(3000, now=later) == pytest.approx(2000 / 4000)
    assert policy.admit(3000, now=later + 0.5) is None
    # Nothing evens out over the minute: 1,200 requests a minute is never 1,200 in the first second.
    assert (policy.accepted, policy.rejected) == (23, 3)
    assert policy.figures()["lowest_share"]["tokens"] == pytest.approx(0.0, abs=1e-9)


def test_a_sliding_window_admits_the_whole_minute_at_once() -> None:
    policy = RateLimitPolicy(requests_per_minute=1200, tokens_per_minute=None)
    assert all(policy.admit(1, now=5.0) is None for _ in range(1200))
    assert policy.admit(1, now=5.0) == pytest.approx(60.0)
    assert policy.admit(1, now=65.01) is None


@pytest.fixture
def served_url() -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-m", "tests.support.fakes.serve", "openai"], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    yield json.loads(process.stdout.readline())["url"]
    process.kill()
    process.wait()


def test_the_control_api_selects_the_strict_bucket(served_url: str) -> None:
    reply = httpx.post(f"{served_url}/_fake/rate_limit",
                       json={"requests_per_minute": 60, "tokens_per_minute": None, "mode": "bucket", "burst_s": 1})
    assert reply.json()["mode"] == "bucket"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    headers = {"authorization": f"Bearer {DEFAULT_API_KEY}"}
    # 60 a minute with one second of burst: one request now, the next a second later (a window would take 60 now).
    statuses = [httpx.post(f"{served_url}/v1/chat/completions", json=body, headers=headers) for _ in range(2)]
    assert [reply.status_code for reply in statuses] == [200, 429]
    assert statuses[1].headers["retry-after"] == "1"
    stats = httpx.get(f"{served_url}/_fake/stats").json()
    assert (stats["mode"], stats["accepted"], stats["rate_limited"], stats["burst_s"]) == ("bucket", 1, 1, 1)
