"""Scenario 6: a canary API key in the config must appear nowhere else.

Every provider entry carries the canary. Some fakes know another key and answer
401 (OpenAI's echoes the presented key masked, first 8 and last 4 characters),
one echoes the whole key in its error body (the worst case), one resets
connections, and some jobs succeed. Then everything is scanned: every Redis key
and value (Celery/kombu messages decoded, in queues and unacked), every SQL row,
the worker logs, exception messages, and the CLI's output. Flower's API is
scanned by tests/worker/test_flower.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import select

from llmq import LLMRequest
from llmq.client.service import JobFailedError
from llmq.contract.config import ConfigError, parse_config
from llmq.contract.models import JobState
from llmq.worker.store.ledger import metadata
from tests.reliability.support import Figures, drain_ledger, wait_until
from tests.support.fakes.anthropic import FakeAnthropic
from tests.support.fakes.gemini import FakeGemini
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, fast_retry, service_config, start_cluster

pytestmark = pytest.mark.slow

CANARY = f"sk-canary-{secrets.token_hex(16)}"
SECRET_PART = CANARY.removeprefix("sk-canary-")
#: Any run of this many characters of the key's secret part counts as a leak.
WINDOW = 10


def leaks(text: str) -> list[str]:
    """What in `text` gives the key away: the key, a window of its secret part, or its masked tail."""
    found = [CANARY] if CANARY in text else []
    found += sorted({SECRET_PART[i : i + WINDOW] for i in range(len(SECRET_PART) - WINDOW + 1)
                     if SECRET_PART[i : i + WINDOW] in text})
    found += re.findall(r"\*{4,}" + re.escape(SECRET_PART[-4:]), text)
    return found


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    servers: dict[str, Any] = {
        "wrong_openai": FakeOpenAI(api_key="sk-proj-the-key-this-server-expects-0123456789").start(),
        "wrong_anthropic": FakeAnthropic(api_key="sk-ant-the-key-this-server-expects").start(),
        "wrong_gemini": FakeGemini(api_key="the-key-this-server-expects").start(),
        "echo": FakeOpenAI(api_key=CANARY).start(),
        "flaky": FakeOpenAI(api_key=CANARY).start(),
        "slow": FakeOpenAI(api_key=CANARY, latency_s=6).start(),
    }
    echo = {"error": {"message": f"upstream trouble for key {CANARY} (Bearer {CANARY})", "type": "invalid_request_error"}}
    servers["echo"].fail_next(400, 10**6, body=echo)
    servers["flaky"].fail_next(500, 2)
    servers["flaky"].inject("reset", 2)
    yield servers
    for server in servers.values():
        server.stop()


def entry(kind: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "api_key": CANARY, "base_url": url, "models": ["gpt-4o-mini"], **fields}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, Any]) -> Iterator[Cluster]:
    providers = {
        "wrong_openai": entry("openai", fakes["wrong_openai"].url + "/v1"),
        "wrong_anthropic": entry("anthropic", fakes["wrong_anthropic"].url),
        "wrong_gemini": entry("gemini", fakes["wrong_gemini"].url),
        "echo": entry("openai", fakes["echo"].url + "/v1"),
        "flaky": entry("openai", fakes["flaky"].url + "/v1"),
        "slow": entry("openai", fakes["slow"].url + "/v1", timeout=60),
        "parked": entry("openai", fakes["flaky"].url + "/v1"),
    }
    config = service_config(providers, retry=fast_retry(3))
    started = start_cluster(tmp_path_factory.mktemp("secrets"), config)
    # Nobody reads llm.parked: its message stays in the queue for the scan.
    started.start_workers(1, concurrency=20, queues="wrong_openai,wrong_anthropic,wrong_gemini,echo,flaky,slow")
    yield started
    started.stop()


def ask(provider: str, text: str, **extra: Any) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", provider=provider,
                      max_tokens=16, **extra)


# --- reading everything ----------------------------------------------------------------------


def decoded(value: str) -> list[str]:
    """A value, plus what kombu hides in it: base64 message bodies inside JSON envelopes."""
    found = [value]
    try:
        parsed = json.loads(value)
    except (ValueError, TypeError):
        return found
    stack = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("body"), str) and item.get("properties", {}).get("body_encoding") == "base64":
                found.append(base64.b64decode(item["body"]).decode(errors="replace"))
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
    return found


def redis_dump(connection: redis.Redis) -> dict[str, list[str]]:
    """Every key with its contents read the way its type is read, decoded where kombu encodes."""
    readers = {
        "string": lambda key: [connection.get(key)],
        "hash": lambda key: [f"{field}={value}" for field, value in connection.hgetall(key).items()],
        "list": lambda key: connection.lrange(key, 0, -1),
        "set": lambda key: list(connection.smembers(key)),
        "zset": lambda key: [member for member, _ in connection.zrange(key, 0, -1, withscores=True)],
        "stream": lambda key: [json.dumps(fields) for _, fields in connection.xrange(key)],
    }
    dump: dict[str, list[str]] = {}
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key)
        values = readers.get(kind, lambda _key: [])(key)
        dump[key] = [part for value in values if value is not None for part in decoded(value)]
    return dump


def sql_dump(cluster: Cluster) -> list[str]:
    store = drain_ledger(cluster.redis_url, cluster.database_url)
    rows: list[str] = []
    with store.engine.connect() as connection:
        for table in metadata.sorted_tables:
            rows += [repr(tuple(row)) for row in connection.execute(select(table)).all()]
    return rows


def cli(cluster: Cluster, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
    env["LLMQ_REDIS_URL"] = cluster.redis_url
    done = subprocess.run([sys.executable, "-m", "llmq.cli", "--config", str(cluster.config_path), *args],
                          capture_output=True, text=True, env=env, timeout=60)
    return done.stdout + done.stderr


# --- the test ---------------------------------------------------------------------------------


def test_the_canary_key_appears_nowhere(cluster: Cluster) -> None:
    failures_seen: list[str] = []
    with cluster.service() as service:
        batch_id = service.submit_batch(
            [ask(provider, f"{provider} {n}") for provider in ("wrong_openai", "wrong_anthropic", "wrong_gemini", "echo")
             for n in range(3)]
            + [ask("flaky", f"flaky {n}") for n in range(4)] + [ask("flaky", "streamed", stream=True)]
        )
        parked = service.submit(ask("parked", "waiting in the queue"))
        batch = service.wait(batch_id, timeout_s=60)
        records = service.results(batch_id)
        try:
            service.generate(ask("wrong_openai", "raise for me"), timeout_s=60)
        except JobFailedError as exc:
            failures_seen += [str(exc), repr(exc), json.dumps(exc.error)]
        connection = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        slow = service.submit(ask("slow", "in flight during the scan"))  # its message is unacked meanwhile
        wait_until(lambda: service.poll(slow).state is JobState.RUNNING, 30, "the slow job to be running")
        in_redis = redis_dump(connection)
        queued_messages = [value for key, values in in_redis.items() if key.startswith("llm.") for value in values]
        unacked = [value for key, values in in_redis.items() if key == "unacked" for value in values]
        service.cancel(slow)
        assert service.poll(parked).state is JobState.QUEUED
    outputs = {f"llmq {' '.join(args)}": cli(cluster, *args) for args in (
        ("status", batch_id), ("results", batch_id), ("--verbose", "results", records[0].job_id),
        ("status", records[0].job_id), ("providers",), ("models",), ("results", "no-such-id"),
    )}
    places: dict[str, list[str]] = {f"redis {key}": values for key, values in in_redis.items()}
    places["sql rows"] = sql_dump(cluster)
    places.update({f"log {worker.log_path.name}": [worker.log_path.read_text()] for worker in cluster.workers})
    places["exceptions"] = failures_seen + [json.dumps(record.error) for record in records if record.error]
    places.update({name: [output] for name, output in outputs.items()})

    found = {place: hits for place, texts in places.items() if (hits := [h for text in texts for h in leaks(text)])}
    Figures.tally("secrets: canary key after a batch with failures", [r.job_id for r in records], records,
                  redis_keys_scanned=len(in_redis), sql_rows_scanned=len(places["sql rows"]),
                  places_scanned=len(places), leaks=len(found)).record()
    assert not found, f"the canary key leaked: {found}"
    # The scan saw what it had to see: failures of every kind, messages queued and unacked.
    errors = {record.error["type"] for record in records if record.state is JobState.FAILED}
    assert {"AuthenticationError", "BadRequestError"} <= errors, errors
    assert batch.counts[JobState.SUCCEEDED] == 5 and failures_seen
    assert queued_messages and unacked, (list(in_redis), queued_messages, unacked)
    assert any("Incorrect API key provided" in text for text in places["sql rows"])  # the 401 text is kept, masked


# Ids of their own: the canary is random per process, and every xdist worker must collect the same ids.
@pytest.mark.parametrize("line", [f'apikey: "{CANARY}"', f'api_key: ["{CANARY}"]', f'api-key: "{CANARY}"'],
                         ids=["apikey", "api_key-list", "api-key"])
def test_a_config_error_never_prints_a_key(line: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(f"llm_service:\n  providers:\n    openai:\n      {line}\n")
    assert not leaks(str(refused.value)), str(refused.value)


def test_the_scan_would_see_a_leak() -> None:
    envelope = {"body": base64.b64encode(json.dumps([[CANARY], {}, {}]).encode()).decode(),
                "properties": {"body_encoding": "base64"}}
    assert leaks(f"x{CANARY}y") and leaks(SECRET_PART[3:15]) and leaks("sk-canar****" + SECRET_PART[-4:])
    assert not leaks(SECRET_PART[:WINDOW - 1]) and not leaks("sk-canar****[redacted]")
    assert any(leaks(part) for part in decoded(json.dumps([envelope, "exchange", "llm.x"])))
