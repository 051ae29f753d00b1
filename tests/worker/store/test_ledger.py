"""The SQL ledger on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from llmq.worker.store.ledger import Store, database_url, normalize_url
from tests.support.pg import PostgresServer

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


def job_row(job_id: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "job", "job_id": job_id, "state": state, **fields}


def attempt_row(job_id: str, attempt: int, outcome: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "attempt", "job_id": job_id, "attempt": attempt, "outcome": outcome, **fields}


def usage_row(job_id: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    row = {
        "kind": "usage", "job_id": job_id, "attempt": attempt, "provider": "openai", "provider_type": "openai",
        "model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
        "cost_usd": "0.0000270000", "priced": True, "created_at": T0.timestamp(),
    }
    return {**row, **fields}


def snapshot(store: Store, job_ids: list[str]) -> list[Any]:
    return [(store.job(job_id), store.attempts(job_id)) for job_id in job_ids] + [store.usage_rows()]


def a_finished_job(job_id: str = "job-1") -> list[dict[str, Any]]:
    return [
        job_row(job_id, "queued", requested_model="gpt-4o-mini", batch_id="b1", custom_id="c1",
                metadata={"caller": "billing-app", "ticket": 7}, created_at=T0.timestamp()),
        job_row(job_id, "running", attempts=1),
        attempt_row(job_id, 1, "running", provider="openai", model="gpt-4o-mini", started_at=T0.isoformat()),
        attempt_row(job_id, 1, "failed", error_type="RateLimitedError", status_code=429,
                    provider_request_id="req_1", finished_at=T0.timestamp() + 1, latency_ms=812.4),
        attempt_row(job_id, 2, "running", provider="openai", model="gpt-4o-mini"),
        usage_row(job_id, 2),
        attempt_row(job_id, 2, "succeeded", finished_at=T0.timestamp() + 3, latency_ms=950),
        job_row(job_id, "succeeded", provider="openai", model="gpt-4o-mini", content="hello", attempts=2,
                finished_at=(T0 + timedelta(seconds=3)).isoformat()),
    ]


def test_a_batch_written_twice_leaves_the_same_rows(store: Store) -> None:
    # Two jobs, so each statement runs over several rows (executemany).
    batch = a_finished_job("job-1") + a_finished_job("job-2")
    store.write(batch)
    first = snapshot(store, ["job-1", "job-2"])
    store.write(batch)
    assert snapshot(store, ["job-1", "job-2"]) == first

    job = store.job("job-1")
    assert job is not None
    assert (job["state"], job["content"], job["attempts"], job["caller"]) == ("succeeded", "hello", 2, "billing-app")
    assert job["metadata"] == {"caller": "billing-app", "ticket": 7}
    assert job["created_at"] == T0 and job["finished_at"] == T0 + timedelta(seconds=3)
    attempts = store.attempts("job-1")
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    assert attempts[0]["status_code"] == 429 and attempts[0]["latency_ms"] == 812
    assert attempts[0]["started_at"] == T0  # kept from the started row: absent fields are not erased
    assert len(store.usage_rows()) == 2


def test_a_rerun_after_a_crash_does_not_undo_later_batches(store: Store) -> None:
    rows = a_finished_job()
    early, late = rows[:3], rows[3:]
    store.write(early)
    store.write(late)
    settled = snapshot(store, ["job-1"])
    store.write(early)  # the flusher died after committing `early`, before acking it
    assert snapshot(store, ["job-1"]) == settled


def test_a_terminal_state_is_never_replaced_by_a_non_terminal_one(store: Store) -> None:
    store.write([job_row("job-1", "succeeded", content="done", finished_at=T0.timestamp())])
    store.write([job_row("job-1", "running", content=None)])
    store.write([job_row("job-1", "retrying"), job_row("job-1", "queued")])
    store.write([job_row("job-1", "running"), job_row("job-2", "running"), job_row("job-3", "failed")])
    job = store.job("job-1")
    assert job is not None and (job["state"], job["content"]) == ("succeeded", "done")
    assert [store.job(name)["state"] for name in ("job-2", "job-3")] == ["running", "failed"]  # type: ignore[index]

    store.write([job_row("job-1", "cancelled", content=None)])  # terminal over terminal is a real update
    job = store.job("job-1")
    assert job is not None and (job["state"], job["content"]) == ("cancelled", None)


def test_the_same_rule_holds_inside_one_batch(store: Store) -> None:
    store.write([job_row("job-1", "failed", error_type="ServerError"), job_row("job-1", "running")])
    job = store.job("job-1")
    assert job is not None and (job["state"], job["error_type"]) == ("failed", "ServerError")


def test_a_finished_attempt_is_not_reopened(store: Store) -> None:
    store.write([attempt_row("job-1", 1, "succeeded", latency_ms=5)])
    store.write([attempt_row("job-1", 1, "running", latency_ms=None), attempt_row("job-1", 2, "running", latency_ms=None)])
    [first, second] = store.attempts("job-1")
    assert (first["outcome"], first["latency_ms"]) == ("succeeded", 5)
    assert second["outcome"] == "running"


def test_a_usage_row_is_written_once(store: Store) -> None:
    store.write([usage_row("job-1", cost_usd="0.5")])
    store.write([usage_row("job-1", cost_usd="0.9", prompt_tokens=999)])
    [row] = store.usage_rows("job-1")
    assert (row["cost_usd"], row["prompt_tokens"]) == (Decimal("0.5"), 100)


def test_costs_are_exact_decimals(store: Store) -> None:
    costs = ["0.1", "0.2", "0.3", "0.0000000001", "0.0000000001", "0.0000000001"]
    store.write([usage_row(f"job-{index}", cost_usd=cost) for index, cost in enumerate(costs)])
    rows = store.usage_rows()
    assert all(isinstance(row["cost_usd"], Decimal) for row in rows)
    assert sorted(row["cost_usd"] for row in rows)[-1] == Decimal("0.3")
    [report] = store.usage_report(by="provider")
    assert report["cost_usd"] == Decimal("0.6000000003")
    assert isinstance(report["cost_usd"], Decimal)


def test_cached_answers_cost_nothing_and_unknown_prices_stay_empty(store: Store) -> None:
    store.write([
        usage_row("job-1", cached=True, cost_usd="1.25"),
        usage_row("job-2", cost_usd=None, priced=False, model="no-such-model"),
        usage_row("job-3", provider="mock", provider_type="mock", cost_usd="0", simulated=True),
    ])
    rows = {row["job_id"]: row for row in store.usage_rows()}
    assert (rows["job-1"]["cost_usd"], rows["job-1"]["priced"], rows["job-1"]["cached"]) == (Decimal(0), True, True)
    assert (rows["job-2"]["cost_usd"], rows["job-2"]["priced"]) == (None, False)
    assert rows["job-3"]["simulated"] is True
    by_provider = {row["provider"]: row for row in store.usage_report(by="provider")}
    assert by_provider["openai"]["cached_hits"] == 1 and by_provider["openai"]["unpriced"] == 1
    assert by_provider["openai"]["cost_usd"] == Decimal(0)


def ledger_rows() -> list[dict[str, Any]]:
    rows = []
    for index in range(24):
        rows.append(usage_row(
            f"job-{index}", attempt=1 + index % 2,
            provider=["openai", "anthropic", "local"][index % 3],
            model=["gpt-4o-mini", "claude-haiku", "llama3"][index % 3],
            caller=["alice", "bob", None, "carol"][index % 4],
            prompt_tokens=100 + index, completion_tokens=10 + index, total_tokens=110 + 2 * index,
            cached_read_tokens=index, reasoning_tokens=index % 5,
            cost_usd=f"0.000{index:02d}00017", cached=index % 7 == 0,
            created_at=(T0 + timedelta(hours=5 * index)).timestamp(),
        ))
    return rows


@pytest.mark.parametrize("by", ["provider", "model", "caller", "day"])
def test_report_totals_equal_the_sum_of_the_rows(store: Store, by: str) -> None:
    store.write(ledger_rows())
    rows = store.usage_rows()
    report = store.usage_report(by=by)
    assert sum(group["requests"] for group in report) == len(rows) == 24
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_read_tokens", "reasoning_tokens"):
        assert sum(group[name] for group in report) == sum(row[name] for row in rows)
    assert sum(group["cost_usd"] for group in report) == sum(row["cost_usd"] for row in rows)
    assert sum(group["cached_hits"] for group in report) == sum(row["cached"] for row in rows)
    if by != "day":
        for group in report:
            members = [row for row in rows if row[by] == group[by]]
            assert group["cost_usd"] == sum(row["cost_usd"] for row in members)
            assert group["requests"] == len(members)


def test_days_are_utc_days(store: Store) -> None:
    store.write([
        usage_row("late", created_at="2026-03-01T23:59:59.999999+00:00", cost_usd="1"),
        usage_row("early", created_at="2026-03-02T00:00:00Z", cost_usd="2"),
        # 04:00 in India on March 2nd is still March 1st in UTC.
        usage_row("offset", created_at="2026-03-02T04:00:00+05:30", cost_usd="4"),
        usage_row("naive", created_at="2026-03-03T10:00:00", cost_usd="8"),
    ])
    report = store.usage_report(by="day")
    assert [(row["day"], row["requests"], row["cost_usd"]) for row in report] == [
        ("2026-03-01", 2, Decimal(5)), ("2026-03-02", 1, Decimal(2)), ("2026-03-03", 1, Decimal(8)),
    ]
    since = store.usage_report(since=datetime(2026, 3, 2, tzinfo=UTC), by="day")
    assert [row["day"] for row in since] == ["2026-03-02", "2026-03-03"]
    [offset] = store.usage_rows("offset")
    assert offset["created_at"] == datetime(2026, 3, 1, 22, 30, tzinfo=UTC)
    assert offset["created_at"].utcoffset() == timedelta(0)


def test_a_bad_row_fails_the_whole_batch_before_anything_is_written(store: Store) -> None:
    good = job_row("job-1", "queued")
    with pytest.raises(ValueError, match=r"row 1 \(usage\): unknown field\(s\) tokens"):
        store.write([good, {**usage_row("job-1"), "tokens": 5}])
    with pytest.raises(ValueError, match="unknown job state 'done'"):
        store.write([good, job_row("job-2", "done")])
    with pytest.raises(ValueError, match="missing required field"):
        store.write([{"kind": "attempt", "job_id": "job-1"}])
    with pytest.raises(ValueError, match="field 'cost_usd'"):
        store.write([usage_row("job-1", cost_usd="a lot")])
    assert store.job("job-1") is None and store.usage_rows() == []


def test_writers_in_parallel_each_with_their_own_store(store_url: str) -> None:
    def flush(worker: int) -> None:
        with Store(store_url) as own:
            for index in range(10):
                job_id = f"w{worker}-{index}"
                own.write([job_row(job_id, "running"), usage_row(job_id), job_row(job_id, "succeeded")])

    threads = [threading.Thread(target=flush, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Store(store_url) as reader:
        [report] = reader.usage_report(by="provider")
        assert report["requests"] == 40
        assert report["cost_usd"] == Decimal("0.0000270000") * 40


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "ledger.sqlite3"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_url_is_sqlite_under_llmq_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQ_HOME", str(tmp_path / "home"))
    assert database_url() == f"sqlite:///{tmp_path / 'home' / 'llmq.sqlite3'}"
    assert (tmp_path / "home").is_dir()
    monkeypatch.setenv("LLMQ_DATABASE_URL", "postgresql://u@db/llmq")
    assert database_url() == "postgresql://u@db/llmq"


def test_plain_postgresql_urls_use_psycopg_3() -> None:
    assert normalize_url("postgresql://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.postgres
def test_store_accepts_a_plain_postgresql_url(postgres: PostgresServer) -> None:
    url = postgres.create_database("plain").replace("postgresql+psycopg://", "postgresql://")
    with Store(url) as opened:
        assert opened.dialect == "postgresql"
        opened.write([job_row("job-1", "queued")])
        assert opened.job("job-1") is not None


# --- each job's kind and lane ------------------------------------------------------------------


def kinds_and_lanes() -> list[dict[str, Any]]:
    """Four jobs, one usage row each: a chat in each lane, an embedding job, and a usage row with no job row."""
    return [
        job_row("chat-interactive", "succeeded", job_kind="chat", lane="interactive"), usage_row("chat-interactive"),
        job_row("chat-batch", "succeeded", job_kind="chat", lane="batch"), usage_row("chat-batch", cost_usd="1"),
        job_row("index", "succeeded", job_kind="embedding", lane="batch"),
        usage_row("index", model="text-embedding-3-small", completion_tokens=0, total_tokens=100),
        usage_row("job-row-not-flushed-yet", cost_usd="2"),
    ]


def test_each_jobs_kind_and_lane_are_recorded_and_usage_groups_by_them(store: Store) -> None:
    store.write(kinds_and_lanes())
    assert {name: (store.job(name) or {}).get("kind") for name in ("chat-batch", "index")} == {
        "chat-batch": "chat", "index": "embedding"}
    assert store.job("chat-interactive")["lane"] == "interactive"  # type: ignore[index]
    by_kind = {row["kind"]: (row["requests"], row["completion_tokens"], row["cost_usd"])
               for row in store.usage_report(by="kind")}
    assert by_kind == {"chat": (2, 40, Decimal("1.000027")), "embedding": (1, 0, Decimal("0.000027")),
                       None: (1, 20, Decimal(2))}
    by_lane = {row["lane"]: row["requests"] for row in store.usage_report(by="lane")}
    assert by_lane == {"interactive": 1, "batch": 2, None: 1}
    assert store.usage_report(by="lane", since=T0 + timedelta(days=1)) == []


def test_a_ledger_made_before_kind_and_lane_gains_them_and_keeps_its_rows(store_url: str) -> None:
    with Store(store_url) as older:  # the tables as an older version made them: no kind, no lane
        with older.engine.begin() as connection:
            for name in ("kind", "lane"):
                connection.execute(text(f'ALTER TABLE llmq_jobs DROP COLUMN "{name}"'))
        assert {"kind", "lane"}.isdisjoint(column["name"] for column in inspect(older.engine).get_columns("llmq_jobs"))
        older.write([job_row("old-job", "succeeded", requested_model="gpt-4o-mini"), usage_row("old-job")])
    with Store(store_url) as store:
        assert {"kind", "lane"} <= {column["name"] for column in inspect(store.engine).get_columns("llmq_jobs")}
        old = store.job("old-job")
        assert old is not None and (old["kind"], old["lane"], old["requested_model"]) == (None, None, "gpt-4o-mini")
        store.write(kinds_and_lanes())
        assert {row["kind"]: row["requests"] for row in store.usage_report(by="kind")} == {
            "chat": 2, "embedding": 1, None: 2}
    with Store(store_url) as again:  # opening it again adds nothing twice
        assert again.job("index")["kind"] == "embedding"  # type: ignore[index]
