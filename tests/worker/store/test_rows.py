"""The rows a ledger entry turns into (llmq.worker.store.rows.prepare_rows), and their upserts on real SQLite.

`prepare_rows` checks and converts every outbox row, then folds a batch to one
row per key by the same rules the SQL upserts apply. The last tests write the
same rows through `Store` in one batch, row by row and twice, and check that the
tables come out the same: the fold and the upserts agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from llmq.contract import schema
from llmq.contract.models import TERMINAL_STATES, JobState
from llmq.worker.store.ledger import Store
from llmq.worker.store.rows import check_row, prepare_rows

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FINISHED_OUTCOMES = ("succeeded", "failed", "worker_lost", "superseded", "cancelled")
OPEN_OUTCOMES = (None, "started", "running")


def job(job_id: str, state: JobState, **fields: Any) -> dict[str, Any]:
    return {"kind": "job", "job_id": job_id, "state": state, **fields}


def attempt(job_id: str, number: int, outcome: str | None, **fields: Any) -> dict[str, Any]:
    row = {"kind": "attempt", "job_id": job_id, "attempt": number, **fields}
    return row if outcome is None else {**row, "outcome": outcome}


def usage(job_id: str, number: int = 1, **fields: Any) -> dict[str, Any]:
    return {"kind": "usage", "job_id": job_id, "attempt": number, "provider": "openai", **fields}


def only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    [row] = rows
    return row


def refusal(*rows: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as raised:
        prepare_rows(rows)
    return str(raised.value)


# --- folding a batch --------------------------------------------------------------------------------


def test_a_batch_folds_to_one_row_per_job_attempt_and_usage_key() -> None:
    jobs, attempts, usages, *_ = prepare_rows([
        job("j1", JobState.QUEUED), job("j2", JobState.QUEUED), attempt("j1", 1, "failed"),
        job("j1", JobState.RUNNING), attempt("j1", 2, "succeeded"), attempt("j1", 1, "failed"),
        usage("j1", 2), usage("j1", 2), usage("j2", 1),
    ])
    assert [(row["job_id"], row["state"]) for row in jobs] == [("j1", JobState.RUNNING), ("j2", JobState.QUEUED)]
    assert [(row["job_id"], row["attempt"]) for row in attempts] == [("j1", 1), ("j1", 2)]
    assert [(row["job_id"], row["attempt"]) for row in usages] == [("j1", 2), ("j2", 1)]


def test_a_later_job_row_wins_and_fields_it_lacks_keep_their_value() -> None:
    folded = only(prepare_rows([
        job("j1", JobState.QUEUED, requested_model="gpt-4o", batch_id="b1"),
        job("j1", JobState.SUCCEEDED, content="hello", attempts=2),
    ])[0])
    assert folded == {
        "job_id": "j1", "state": JobState.SUCCEEDED, "requested_model": "gpt-4o", "batch_id": "b1",
        "content": "hello", "attempts": 2,
    }


@pytest.mark.parametrize(("first", "then"), list(itertools.product(JobState, repeat=2)))
def test_a_terminal_job_state_is_replaced_only_by_a_terminal_one(first: JobState, then: JobState) -> None:
    folded = only(prepare_rows([job("j1", first, content="first"), job("j1", then, content="then")])[0])
    kept = first.terminal and not then.terminal
    assert (folded["state"], folded["content"]) == ((first, "first") if kept else (then, "then"))


@pytest.mark.parametrize(("first", "then"), list(itertools.product(OPEN_OUTCOMES + FINISHED_OUTCOMES, repeat=2)))
def test_a_finished_attempt_is_never_reopened(first: str | None, then: str | None) -> None:
    rows = [attempt("j1", 1, first, provider="first"), attempt("j1", 1, then, provider="then")]
    folded = only(prepare_rows(rows)[1])
    kept = first in FINISHED_OUTCOMES and then not in FINISHED_OUTCOMES
    # A row with no outcome leaves the outcome as it was, like any field a row does not carry.
    replaced = (first if then is None else then, "then")
    assert (folded.get("outcome"), folded["provider"]) == ((first, "first") if kept else replaced)


def test_the_first_usage_row_of_an_attempt_is_the_one_kept() -> None:
    folded = only(prepare_rows([usage("j1", cost_usd="0.5"), usage("j1", cost_usd="0.7", cached=True)])[2])
    assert folded["cost_usd"] == Decimal("0.5") and folded["priced"] is True and "cached" not in folded


# --- converting fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [T0.timestamp(), int(T0.timestamp()), T0.isoformat(), "2026-03-01T12:00:00", "2026-03-01 13:00:00+01:00",
     T0, T0.replace(tzinfo=None), T0.astimezone(timezone(timedelta(hours=-5)))],
    ids=["float", "int", "iso-utc", "iso-naive", "iso-offset", "aware", "naive", "other-zone"],
)
def test_timestamps_become_aware_utc(value: Any) -> None:
    _, row = check_row(0, job("j1", JobState.QUEUED, created_at=value))
    assert row["created_at"] == T0 and row["created_at"].tzinfo == UTC


@pytest.mark.parametrize(
    ("given_cost", "stored"),
    [("0.0000270000", Decimal("0.0000270000")), (0.1, Decimal("0.1")), (3, Decimal(3)), ("0", Decimal(0))],
)
def test_costs_are_exact_decimals(given_cost: Any, stored: Decimal) -> None:
    _, row = check_row(0, usage("j1", cost_usd=given_cost))
    assert row["cost_usd"] == stored and isinstance(row["cost_usd"], Decimal) and row["priced"] is True


def test_a_row_with_no_cost_is_unpriced_and_a_cached_answer_costs_nothing() -> None:
    unknown = check_row(0, usage("j1"))[1]
    assert unknown == {"job_id": "j1", "attempt": 1, "provider": "openai", "priced": False, "cost_usd": None}
    cached = check_row(0, usage("j1", cost_usd="0.25", cached=True, priced=False))[1]
    assert (cached["cost_usd"], cached["priced"]) == (Decimal(0), True)
    unpriced = check_row(0, usage("j1", cost_usd="0.25", priced=False))[1]
    assert (unpriced["cost_usd"], unpriced["priced"]) == (None, False)


def test_the_caller_comes_from_the_jobs_metadata_as_text() -> None:
    assert check_row(0, job("j1", JobState.QUEUED, metadata={"caller": "billing"}))[1]["caller"] == "billing"
    assert check_row(0, job("j1", JobState.QUEUED, metadata={"caller": {"team": 7}}))[1]["caller"] == '{"team": 7}'
    assert check_row(0, job("j1", JobState.QUEUED, metadata={}))[1]["caller"] is None
    explicit = check_row(0, job("j1", JobState.QUEUED, caller="ops", metadata={"caller": "billing"}))[1]
    assert explicit["caller"] == "ops"
    assert check_row(0, usage("j1", caller=["a", 1]))[1]["caller"] == '["a", 1]'


def test_a_jobs_kind_goes_to_the_kind_column_beside_its_lane() -> None:
    # The row's own `kind` says it is a job row, so the job's kind travels as `job_kind`.
    kind, row = check_row(0, job("j1", JobState.QUEUED, job_kind="embedding", lane="interactive"))
    assert kind == "job" and (row["kind"], row["lane"]) == ("embedding", "interactive") and "job_kind" not in row


def test_numbers_are_read_strictly() -> None:
    _, row = check_row(0, attempt("j1", 2.0, "failed", status_code="429", latency_ms=812.6))
    assert (row["attempt"], row["status_code"], row["latency_ms"]) == (2, 429, 813)
    _, row = check_row(0, usage("j1", prompt_tokens=None, completion_tokens=3.0, cached=1, simulated=0))
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached"], row["simulated"]) == (0, 3, True, False)


# --- refusing bad rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"job_id": "j1"}, "row 1: kind must be one of job, attempt, usage, provider_batch, provider_batch_line, got None"),
        ({"kind": "jobs", "job_id": "j1"}, "row 1: kind must be one of job, attempt, usage, provider_batch, provider_batch_line, got 'jobs'"),
        (job("j1", JobState.QUEUED, colour="red", size=1), "row 1 (job): unknown field(s) colour, size; known: "),
        ({"kind": "job", "job_id": "j1"}, "row 1 (job): missing required field(s) state"),
        (attempt("j1", None, "failed"), "row 1 (attempt): missing required field(s) attempt"),
        (usage(None), "row 1 (usage): missing required field(s) job_id"),
        (job("j1", "paused"), "row 1 (job) field 'state': unknown job state 'paused'; use one of: queued, running,"),
        (job("j1", JobState.QUEUED, job_kind="image"),
         "row 1 (job) field 'job_kind': unknown job kind 'image'; use one of: chat, embedding"),
        (job("j1", JobState.QUEUED, lane="express"), "row 1 (job) field 'lane': unknown lane 'express'; use one of: interactive, batch"),
        (usage("j1", cost_usd="-1"), "row 1 (usage) field 'cost_usd': expected a finite amount >= 0, got '-1'"),
        (usage("j1", cost_usd="NaN"), "row 1 (usage) field 'cost_usd': expected a finite amount >= 0"),
        (usage("j1", cost_usd="lots"), "row 1 (usage) field 'cost_usd': expected a decimal amount, got 'lots'"),
        (usage("j1", cost_usd=True), "row 1 (usage) field 'cost_usd': expected a decimal amount, got a boolean"),
        (usage("j1", prompt_tokens=-3), "row 1 (usage) field 'prompt_tokens': expected a count >= 0, got -3"),
        (usage("j1", prompt_tokens=True), "row 1 (usage) field 'prompt_tokens': expected an integer, got a boolean"),
        (usage("j1", prompt_tokens=1.5), "row 1 (usage) field 'prompt_tokens': expected a whole number, got 1.5"),
        (usage("j1", cached="yes"), "row 1 (usage) field 'cached': expected true or false, got 'yes'"),
        (usage("j1", created_at=float("inf")), "row 1 (usage) field 'created_at': expected a finite epoch time"),
        (usage("j1", created_at="yesterday"), "row 1 (usage) field 'created_at': Invalid isoformat string"),
        (usage("j1", created_at=[2026]), "row 1 (usage) field 'created_at': expected epoch seconds or an ISO-8601"),
        (job("j1", JobState.QUEUED, metadata=["a"]), "row 1 (job) field 'metadata': expected a JSON object, got list"),
        (job("j1", JobState.QUEUED, content=3.5), "row 1 (job) field 'content': expected a string, got float"),
    ],
)
def test_a_bad_row_is_refused_naming_the_row_and_the_field(bad: dict[str, Any], message: str) -> None:
    assert refusal(job("j0", JobState.QUEUED), bad, job("j2", JobState.QUEUED)).startswith(message)


# --- the same rules in SQL -------------------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[Store]:
    with Store("sqlite://") as opened:
        yield opened


def tables(store: Store, job_ids: list[str]) -> list[Any]:
    return [(store.job(job_id), store.attempts(job_id)) for job_id in job_ids] + [store.usage_rows()]


def test_sql_keeps_a_terminal_state_across_batches(store: Store) -> None:
    pairs = list(itertools.product(JobState, JobState))
    for index, (first, then) in enumerate(pairs):
        store.write([job(f"j{index}", first, content="first")])
        store.write([job(f"j{index}", then, content="then")])
    for index, (first, then) in enumerate(pairs):
        row = store.job(f"j{index}")
        assert row is not None
        kept = first in TERMINAL_STATES and then not in TERMINAL_STATES
        assert (row["state"], row["content"]) == ((first, "first") if kept else (then, "then")), (first, then)


def test_sql_writes_a_usage_row_once(store: Store) -> None:
    store.write([usage("j1", cost_usd="0.5", created_at=T0.timestamp())])
    store.write([usage("j1", cost_usd="0.7", prompt_tokens=9, created_at=T0.timestamp())])
    [row] = store.usage_rows("j1")
    assert (row["cost_usd"], row["prompt_tokens"]) == (Decimal("0.5"), 0)


# Rows shaped as their producers write them: a full job snapshot (the outbox flusher's
# job_row), the engine's attempt record with or without its error, the reaper's
# worker_lost record, an open attempt marker, and a usage row.
JOB_IDS = ["j1", "j2"]


def job_snapshot(job_id: str, state: JobState, second: int) -> dict[str, Any]:
    stamp = T0.timestamp() + second
    return job(job_id, state, requested_model="gpt-4o", provider="openai", model="gpt-4o",
               content=f"answer {second}" if state is JobState.SUCCEEDED else None, attempts=1,
               metadata={"caller": "billing"}, created_at=T0.timestamp(), finished_at=stamp if state.terminal else None)


def finished_attempt(job_id: str, number: int, outcome: str, second: int, error_type: str | None) -> dict[str, Any]:
    row = attempt(job_id, number, outcome, provider="openai", model="gpt-4o", started_at=T0.timestamp(),
                  finished_at=T0.timestamp() + second)
    if error_type is None:
        return {**row, "latency_ms": second * 1000}
    return {**row, "error_type": error_type, "error_message": f"{outcome} after {second} s"}


def usage_of(job_id: str, number: int, cost_usd: str, second: int) -> dict[str, Any]:
    return usage(job_id, number, cost_usd=cost_usd, prompt_tokens=second, created_at=T0.timestamp() + second)


@st.composite
def ledger_rows(draw: st.DrawFn) -> dict[str, Any]:
    job_id, number, second = draw(st.sampled_from(JOB_IDS)), draw(st.integers(1, 2)), draw(st.integers(0, 100))
    kind = draw(st.sampled_from(["job", "job", "attempt", "error", "lost", "open", "open", "usage"]))
    if kind == "job":
        return job_snapshot(job_id, draw(st.sampled_from(list(JobState))), second)
    if kind == "usage":
        return usage_of(job_id, number, f"0.{draw(st.integers(0, 999)):03d}", second)
    if kind == "open":
        return attempt(job_id, number, draw(st.sampled_from(OPEN_OUTCOMES)))
    if kind == "lost":
        return finished_attempt(job_id, number, "worker_lost", second, "WorkerLost")
    outcome = draw(st.sampled_from(FINISHED_OUTCOMES))
    return finished_attempt(job_id, number, outcome, second, "RateLimitedError" if kind == "error" else None)


@pytest.fixture(scope="module")
def ledger() -> Iterator[Store]:
    """One database for every example: emptied before each way of writing them."""
    with Store("sqlite://") as opened:
        yield opened


def emptied(store: Store) -> Store:
    with store.engine.begin() as connection:
        for table in schema.metadata.sorted_tables:
            connection.execute(table.delete())
    return store


# Not shrunk: a failing example of at most 10 rows reads well as drawn, and shrinking takes minutes.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(rows=st.lists(ledger_rows(), min_size=1, max_size=10), cut=st.integers(0, 10))
# The corners, every run: a late non-terminal job row, an attempt reopened, a second usage row, in one batch.
@example(rows=[job_snapshot("j1", JobState.SUCCEEDED, 1), job_snapshot("j1", JobState.RUNNING, 2)], cut=0)
@example(rows=[finished_attempt("j1", 1, "failed", 1, "RateLimitedError"), attempt("j1", 1, "running")], cut=0)
@example(rows=[usage_of("j1", 1, "0.1", 1), usage_of("j1", 1, "0.2", 2)], cut=0)
def test_one_batch_row_by_row_split_or_twice_leave_the_same_tables(
    ledger: Store, rows: list[dict[str, Any]], cut: int,
) -> None:
    written: list[list[Any]] = []
    for batches in ([rows], [[row] for row in rows], [rows[:cut], rows[cut:]], [rows, rows]):
        store = emptied(ledger)
        for batch in batches:
            store.write(batch)
        written.append(tables(store, JOB_IDS))
    assert all(snapshot == written[0] for snapshot in written[1:])
