"""GET /v1/models (what configured, healthy entries serve, as the key may use), `llmq keys`,
and the key as the caller in the ledger (`llmq usage --by caller`)."""

from __future__ import annotations

import contextlib
import io
import json
import time

import openai
import pytest
import redis

from llmq.cli.main import main as llmq
from llmq.contract import keys
from llmq.worker.store.outbox import OutboxFlusher
from tests.http.conftest import CACHED_ENTRY, CACHED_MODEL, FrontStack

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Biome: desert."}]}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = llmq(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_models_are_those_of_healthy_configured_entries_that_the_key_may_use(stack: FrontStack) -> None:
    assert [model.id for model in stack.client().models.list()] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", CACHED_MODEL]
    narrow = stack.client(stack.key("--models", "gpt-4o")[1])
    assert [model.id for model in narrow.models.list()] == ["gpt-4o"]
    assert narrow.models.retrieve("gpt-4o").owned_by == "fake"
    with pytest.raises(openai.NotFoundError):
        narrow.models.retrieve("gpt-4o-mini")
    client = redis.Redis.from_url(stack.cluster.redis_url, decode_responses=True)
    seconds, _ = client.time()
    for entry in ("fake", CACHED_ENTRY):
        client.hset(keys.circuit(entry), mapping={"state": "open", "opened_at": int(seconds) * 1000})
    try:  # an entry whose circuit is open serves nothing now
        assert list(stack.client().models.list()) == []
    finally:
        client.delete(keys.circuit("fake"), keys.circuit(CACHED_ENTRY))


def test_keys_are_shown_once_listed_without_the_secret_and_revoked_everywhere(stack: FrontStack) -> None:
    url = stack.cluster.database_url
    code, out, err = run("keys", "create", "--name", "critic", "--daily-usd", "5", "--rpm", "60", "--models", "gpt-4o,gpt-4o-mini",
                         "--database-url", url)
    key = out.strip()
    assert code == 0 and key.startswith("sk-llmq-") and len(key) > 40 and "shown once" in err
    code, out, _ = run("keys", "list", "--json", "--database-url", url)
    listed = {item["name"]: item for item in json.loads(out)}["critic"]
    assert key not in out and listed["key"] == key[:12] + "..."
    assert (listed["daily_usd"], listed["rpm"], listed["models"], listed["revoked_at"]) == (5.0, 60, ["gpt-4o", "gpt-4o-mini"], None)
    assert run("keys", "create", "--name", "critic", "--database-url", url)[0] == 2  # the name is taken
    assert run("keys", "create", "--name", "no spaces", "--database-url", url)[0] == 2

    client = stack.client(key)
    assert client.chat.completions.create(**CHAT).choices
    assert run("keys", "revoke", "critic", "--database-url", url)[0] == 0
    deadline = time.monotonic() + 10  # fronts trust a key lookup for 5 s
    while True:
        try:
            client.chat.completions.create(**CHAT)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert json.loads(run("keys", "list", "--json", "--database-url", url)[1])[-1]["revoked_at"]
    assert run("keys", "revoke", "critic", "--database-url", url)[0] == 2


def test_the_key_is_the_caller_in_the_ledger(stack: FrontStack) -> None:
    name, key = stack.key()
    for _ in range(2):
        stack.client(key).chat.completions.create(**CHAT)
    OutboxFlusher(stack.cluster.redis_url, stack.cluster.database_url).drain(timeout_s=30)
    code, out, _ = run("usage", "--by", "caller", "--json", "--database-url", stack.cluster.database_url)
    rows = {row["caller"]: row for row in json.loads(out)["rows"]}
    assert code == 0 and rows[name]["requests"] == 2
