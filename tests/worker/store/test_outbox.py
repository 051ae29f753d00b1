"""The outbox flusher against a real redis-server and a real SQLite or PostgreSQL ledger:
a row the database refuses is set aside with its error and the rows around it are
written; a lost connection is waited out, and nothing is set aside for it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import event
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, ProgrammingError, StatementError

from llmq.contract import keys
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import CHUNK_ROWS, OutboxFlusher, is_data_error
from tests.reliability.support import Figures
from tests.support.pg import PostgresServer

GOOD_JOBS = 60


@pytest.fixture
def connection(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def flusher(redis_url: str, store_url: str) -> Iterator[OutboxFlusher]:
    opened = OutboxFlusher(redis_url, store_url)
    yield opened
    opened.stop()
    opened.redis.close()


def good_rows(job_id: str) -> list[dict[str, Any]]:
    return [
        {"kind": "attempt", "job_id": job_id, "attempt": 1, "outcome": "succeeded", "provider": "openai"},
        {"kind": "usage", "job_id": job_id, "attempt": 1, "provider": "openai", "model": "gpt-4o-mini",
         "prompt_tokens": 12, "completion_tokens": 3, "cost_usd": "0.0001"},
    ]


#: Rows no retry can write, each with what its error must name.
POISON = {
    # Refused by the database itself (PostgreSQL: integer out of range; SQLite: too large for INTEGER).
    "out of range": (json.dumps({"kind": "usage", "job_id": "poison-db", "attempt": 1, "prompt_tokens": 2**70}),
                     ("out of range", "too large")),
    # Refused by the ledger's own checks before any SQL.
    "bad field": (json.dumps({"kind": "attempt", "job_id": "poison-check", "attempt": -1}), ("count >= 0",)),
    # Not a row at all.
    "not JSON": ("{not json", ("JSONDecodeError",)),
}


def fill(connection: redis.Redis, poison_at: dict[int, str]) -> list[str]:
    """GOOD_JOBS jobs' rows with the poison entries at the given positions; returns the entries in order."""
    entries = [json.dumps(row) for index in range(GOOD_JOBS) for row in good_rows(f"job-{index}")]
    for position, name in sorted(poison_at.items()):
        entries.insert(position, POISON[name][0])
    connection.rpush(keys.OUTBOX, *entries)
    return entries


def test_poison_rows_are_set_aside_with_their_error_and_every_other_row_is_written(
    flusher: OutboxFlusher, connection: redis.Redis, store_url: str
) -> None:
    entries = fill(connection, {3: "out of range", 50: "bad field", 111: "not JSON"})
    assert len(entries) < CHUNK_ROWS  # one chunk: the poison shares it with the good rows
    transactions = []
    event.listen(flusher.store.engine, "begin", lambda _: transactions.append(1))
    assert flusher.flush_once() == len(entries)
    write_transactions = len(transactions)

    assert connection.llen(keys.OUTBOX) == 0
    store = flusher.store
    written = {row["job_id"] for row in store.usage_rows()}
    assert written == {f"job-{index}" for index in range(GOOD_JOBS)}
    assert all(store.attempts(f"job-{index}")[0]["outcome"] == "succeeded" for index in range(GOOD_JOBS))

    dead = [json.loads(item) for item in connection.lrange(keys.OUTBOX_DEAD, 0, -1)]
    assert [item["entry"] for item in dead] == [POISON[name][0] for name in ("out of range", "bad field", "not JSON")]
    for item, name in zip(dead, ("out of range", "bad field", "not JSON")):
        assert any(fragment in item["error"] for fragment in POISON[name][1]), item["error"]
    assert int(connection.get(keys.OUTBOX_QUARANTINED)) == 3
    quarantined = {row["entry"]: row for row in store.quarantined()}
    assert set(quarantined) == {item["entry"] for item in dead}
    assert quarantined[POISON["out of range"][0]]["job_id"] == "poison-db"
    assert all(row["error"] for row in quarantined.values())
    Figures(f"poison rows in one outbox chunk ({store.dialect})", submitted=len(entries),
            succeeded=len(entries) - len(dead),
            measured={"rows_written": len(entries) - len(dead), "rows_quarantined": len(dead),
                      "sql_transactions_to_find_them": write_transactions}).record()


def test_a_chunk_without_poison_is_written_whole(flusher: OutboxFlusher, connection: redis.Redis) -> None:
    entries = fill(connection, {})
    assert flusher.flush_once() == len(entries)
    assert len(flusher.store.usage_rows()) == GOOD_JOBS
    assert connection.llen(keys.OUTBOX_DEAD) == 0 and connection.get(keys.OUTBOX_QUARANTINED) is None


def test_quarantining_the_same_row_again_keeps_one(store_url: str) -> None:
    row = {"quarantine_id": "a" * 64, "job_id": "j", "kind": "usage", "entry": "{}", "row_json": None, "error": "E: x"}
    with Store(store_url) as store:
        store.quarantine([row])
        store.quarantine([row])  # a flusher that died before settling its chunk does it again
        assert store.quarantined_count() == 1


@pytest.mark.postgres
def test_a_lost_connection_is_waited_out_and_a_data_error_is_not(
    redis_url: str, connection: redis.Redis, postgres: PostgresServer, closed_port: int
) -> None:
    entries = fill(connection, {7: "out of range"})
    unreachable = f"postgresql+psycopg://llmq@127.0.0.1:{closed_port}/postgres"  # nothing listens: refused
    waiting = OutboxFlusher(redis_url, unreachable)
    try:
        for _ in range(3):
            with pytest.raises(OperationalError):
                waiting.flush_once()
    finally:
        waiting.stop()
        waiting.redis.close()
    assert connection.lrange(keys.OUTBOX, 0, -1) == entries  # every row still waits, poison included
    assert connection.llen(keys.OUTBOX_DEAD) == 0

    flusher = OutboxFlusher(redis_url, postgres.create_schema("back"))
    try:
        assert flusher.flush_once() == len(entries)  # the database answers: now the poison is told apart
        assert len(flusher.store.usage_rows()) == GOOD_JOBS
        [dead] = [json.loads(item) for item in connection.lrange(keys.OUTBOX_DEAD, 0, -1)]
        assert dead["entry"] == POISON["out of range"][0] and "NumericValueOutOfRange" in dead["error"]
    finally:
        flusher.stop()
        flusher.redis.close()


def test_data_errors_are_told_from_connection_errors() -> None:
    def wrapped(kind: type[Exception], orig: Exception) -> Exception:
        return kind("INSERT ...", {}, orig)  # type: ignore[call-arg]

    assert is_data_error(wrapped(DataError, Exception("PostgreSQL text fields cannot contain NUL (0x00) bytes")))
    assert is_data_error(wrapped(IntegrityError, Exception("null value in column")))
    assert is_data_error(StatementError("bind failed", "INSERT ...", {}, OverflowError("too large")))
    assert is_data_error(ValueError("row 3 (usage) field 'cost_usd': expected a decimal amount"))
    assert is_data_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert not is_data_error(wrapped(OperationalError, Exception("connection refused")))
    assert not is_data_error(wrapped(InterfaceError, Exception("connection already closed")))
    assert not is_data_error(wrapped(ProgrammingError, Exception('relation "llmq_jobs" does not exist')))
    assert not is_data_error(redis.exceptions.ConnectionError("Connection refused"))
    assert not is_data_error(ConnectionRefusedError(111, "Connection refused"))
