"""Scenario 3: the SQL ledger down (PostgreSQL stopped) or slow (SQLite write-locked).

Workers never wait on SQL: results land in Redis and the ledger rows wait in the
outbox (a Redis list) until the database answers again. The tests check that the
batch finishes while SQL is unavailable, and that the workers themselves (not
the test) bring every row to SQL once it is back.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from llmq import LLMRequest
from llmq.contract import keys
from llmq.contract.models import BatchRecord, JobState
from llmq.worker.store.ledger import Store
from tests.reliability.support import Figures, client, wait_until
from tests.reliability.support import ledger_complete as support_ledger_complete
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster
from tests.support.pg import PostgresServer, postgres_or_skip

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(latency_s=0.2).start()
    yield server
    server.stop()


def config_for(fake: FakeOpenAI) -> str:
    return service_config({"primary": openai_entry(fake)}, jobs={"deadline_s": 120, "lease_s": 3})


def ask(text: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model="gpt-4o-mini", temperature=0, max_tokens=16)


def run_batch(cluster: Cluster, prefix: str, count: int) -> tuple[BatchRecord, list]:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"{prefix} {index}") for index in range(count)])
        batch = service.wait(batch_id, timeout_s=60)
        assert isinstance(batch, BatchRecord)
        return batch, service.results(batch_id)


def outbox_rows(cluster: Cluster) -> int:
    return int(client(cluster.redis_url).llen(keys.OUTBOX))


def ledger_complete(cluster: Cluster, records: list) -> bool:
    """True once the workers' flusher has brought every row to SQL (checked without flushing)."""
    return support_ledger_complete(cluster.redis_url, cluster.database_url, records)


# --- PostgreSQL stopped ----------------------------------------------------------------


def stop_postgres(server: PostgresServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)  # "fast" shutdown: clients are cut off
    server.process.wait(15)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A server of this module's own (not the session's): these tests stop and start it."""
    with postgres_or_skip() as server:
        yield server


@pytest.mark.postgres
def test_jobs_complete_while_postgres_is_down_and_reach_it_when_it_returns(
    tmp_path: Path, fake: FakeOpenAI, postgres: PostgresServer
) -> None:
    cluster = start_cluster(tmp_path, config_for(fake), database_url=postgres.create_schema("outage"))
    try:
        cluster.start_workers(1, concurrency=20)
        _, warmup = run_batch(cluster, "before", 20)
        wait_until(lambda: ledger_complete(cluster, warmup), 30, "the warm-up batch in PostgreSQL")

        stop_postgres(postgres)
        stopped_at = time.monotonic()
        batch, records = run_batch(cluster, "down", 100)
        waiting_rows = outbox_rows(cluster)
        with pytest.raises(OperationalError):
            Store(cluster.database_url)
        time.sleep(max(0.0, 4.0 - (time.monotonic() - stopped_at)))
        down_s = time.monotonic() - stopped_at
        postgres.start_again()
        restarted_at = time.monotonic()
        wait_until(lambda: ledger_complete(cluster, records), 60, "the workers to flush the outbox to PostgreSQL")
        catch_up_s = time.monotonic() - restarted_at
    finally:
        cluster.stop()
    Figures.tally(
        "PostgreSQL stopped mid-batch", [record.job_id for record in records], records,
        sql_down_s=round(down_s, 1), rows_waiting_in_outbox=waiting_rows, restart_to_ledger_complete_s=round(catch_up_s, 1),
    ).record()
    assert batch.counts[JobState.SUCCEEDED] == 100  # all finished while SQL was down
    assert waiting_rows >= 100 * 3  # a job row (twice), an attempt row and a usage row per job


# --- SQLite write-locked ------------------------------------------------------------------


def test_jobs_complete_while_sqlite_is_locked_and_rows_follow_when_it_frees(tmp_path: Path, fake: FakeOpenAI) -> None:
    cluster = start_cluster(tmp_path, config_for(fake))
    try:
        cluster.start_workers(1, concurrency=20)
        _, warmup = run_batch(cluster, "before", 10)
        wait_until(lambda: ledger_complete(cluster, warmup), 30, "the warm-up batch in SQLite")

        blocker = sqlite3.connect(cluster.database_url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")  # every writer now waits on its busy timeout
        locked_at = time.monotonic()
        batch, records = run_batch(cluster, "locked", 100)
        done_while_locked_s = time.monotonic() - locked_at
        waiting_rows = outbox_rows(cluster)
        blocker.execute("ROLLBACK")
        blocker.close()
        freed_at = time.monotonic()
        wait_until(lambda: ledger_complete(cluster, records), 60, "the workers to flush the outbox to SQLite")
        catch_up_s = time.monotonic() - freed_at
    finally:
        cluster.stop()
    Figures.tally(
        "SQLite write-locked mid-batch", [record.job_id for record in records], records,
        batch_done_while_locked_after_s=round(done_while_locked_s, 1), rows_waiting_in_outbox=waiting_rows,
        unlock_to_ledger_complete_s=round(catch_up_s, 1),
    ).record()
    assert batch.counts[JobState.SUCCEEDED] == 100
    assert waiting_rows >= 100 * 3
