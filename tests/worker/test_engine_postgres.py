"""The batch-of-hundreds end to end with the SQL ledger on PostgreSQL: real redis-server,
real `llmq worker` processes writing through their outbox to a throwaway PostgreSQL
server (tests/support/pg.py), fake OpenAI servers over real HTTP. Skips where PostgreSQL is absent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from llmq.contract.models import JobState
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI
from tests.support.harness import Cluster, start_cluster
from tests.support.pg import PostgresServer
from tests.worker.test_engine import CONFIG, ask

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BATCH_SIZE = 300



@pytest.fixture(scope="module")
def primary() -> Iterator[FakeOpenAI]:
    fakes = FakeOpenAI().start(), FakeOpenAI().start()
    yield fakes[0]
    for fake in fakes:
        fake.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer, primary: FakeOpenAI) -> Iterator[Cluster]:
    config = CONFIG.format(key=DEFAULT_API_KEY, primary=primary.url, backup="http://127.0.0.1:9")
    started = start_cluster(tmp_path_factory.mktemp("engine-pg"), config, database_url=postgres.create_schema("engine"))
    started.start_workers(2, concurrency=100)
    yield started
    started.stop()


def test_a_batch_of_hundreds_lands_in_redis_and_in_postgresql(cluster: Cluster, primary: FakeOpenAI) -> None:
    with cluster.service() as service:
        batch_id = service.submit_batch([ask(f"task {index}") for index in range(BATCH_SIZE)])
        batch = service.wait(batch_id, timeout_s=120)
        jobs = service.results(batch_id)
    assert batch.total == BATCH_SIZE and batch.counts[JobState.SUCCEEDED] == BATCH_SIZE
    assert [job.request.messages[0].content for job in jobs] == [f"task {index}" for index in range(BATCH_SIZE)]
    assert all(job.result.provider == "primary" and job.result.usage.total_tokens > 0 for job in jobs)
    # At least one call per job; never a call without an attempt on record (a busy machine
    # may time a call out, or fail to connect, and retry it).
    assert len(jobs) <= len(primary.requests) <= sum(len(job.attempts) for job in jobs)

    OutboxFlusher(cluster.redis_url, cluster.database_url).drain(timeout_s=30)
    store = Store(cluster.database_url)
    try:
        assert store.dialect == "postgresql"
        usage = [row for row in store.usage_rows() if row["batch_id"] == batch_id]
        assert len(usage) == BATCH_SIZE
        assert {row["job_id"] for row in usage} == {job.job_id for job in jobs}
        assert sum(row["total_tokens"] for row in usage) == sum(job.result.usage.total_tokens for job in jobs)
        assert {store.job(job.job_id)["state"] for job in jobs} == {"succeeded"}
        assert {(store.job(job.job_id)["kind"], store.job(job.job_id)["lane"]) for job in jobs} == {("chat", "batch")}
        assert [(row["lane"], row["requests"]) for row in store.usage_report(by="lane")] == [("batch", BATCH_SIZE)]
        # One SQL row per attempt, whatever the attempt's outcome, never two.
        assert all(len(store.attempts(job.job_id)) == len(job.attempts) for job in jobs)
    finally:
        store.close()


def test_the_ledger_tables_live_in_the_schema_the_url_names(cluster: Cluster) -> None:
    engine = create_engine(cluster.database_url)
    try:
        with engine.connect() as connection:
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            tables = connection.execute(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = :schema"), {"schema": schema}
            ).scalars().all()
    finally:
        engine.dispose()
    assert schema.startswith("engine_")
    assert {"llmq_jobs", "llmq_attempts", "llmq_usage"} <= set(tables)
