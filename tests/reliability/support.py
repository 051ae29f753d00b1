"""What the reliability scenarios share: waiting, process lookup, ledger checks, figures.

Every scenario ends by tallying its jobs into `Figures` (submitted, succeeded,
failed with a typed error, lost) and recording them: printed, and appended as a
JSON line to the file named by `RELIABILITY_FIGURES` when it is set, which
is where the tables in docs/reliability.md come from.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from sqlalchemy import func, select

from llmq.contract import keys
from llmq.contract.models import JobRecord, JobState
from llmq.worker.errors import ERRORS_BY_NAME
from llmq.worker.store.ledger import Store, attempts_table, jobs_table, usage_table
from llmq.worker.store.outbox import OutboxFlusher

#: Not LLMQ_*: the suite clears those from the environment of every test.
FIGURES_ENV = "RELIABILITY_FIGURES"
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call `check` until it returns something truthy; fail the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def redis_now_ms(connection: redis.Redis) -> int:
    """Redis's own clock: the one every lease, deadline and attempt record is stamped with."""
    seconds, micros = connection.time()
    return int(seconds) * 1000 + int(micros) // 1000


def job_keys(connection: redis.Redis) -> list[str]:
    """The main hash key of every job in Redis (not its attempts list or stream)."""
    prefix = keys.job("")
    return [key for key in connection.scan_iter(prefix + "*", count=1000) if ":" not in key[len(prefix):]]


def running_on(connection: redis.Redis, worker_id: str) -> list[str]:
    """Job ids a given worker process (`host:pid`) is running right now."""
    found = []
    for key in job_keys(connection):
        state, worker = connection.hmget(key, "state", "worker")
        if state == "running" and worker == worker_id:
            found.append(key.removeprefix(keys.job("")))
    return found


def child_pids(parent_pid: int) -> list[int]:
    """Direct children of a process, read from /proc (no psutil)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # Field 4 is the parent pid; field 2 (the command) may hold spaces, so split after its ')'.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == parent_pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def pool_children(worker_pid: int) -> list[int]:
    """A prefork worker's pool children: forks of it, so they keep its command line. The
    worker's other children (the SQL outbox flusher) run a command of their own."""
    command = _command_line(worker_pid)
    return [pid for pid in child_pids(worker_pid) if command is not None and _command_line(pid) == command]


def _command_line(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # the process ended while we looked
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


# --- checks ----------------------------------------------------------------------------


def assert_each_attempt_recorded_once(records: Iterable[JobRecord]) -> None:
    """Redis appends every attempt record it is given, so a double write would show here
    (SQL's primary keys would hide it): attempt numbers unique, one success per success."""
    for record in records:
        numbers = [entry["attempt"] for entry in record.attempts]
        assert len(numbers) == len(set(numbers)), f"{record.job_id}: attempt recorded twice: {record.attempts}"
        successes = [entry for entry in record.attempts if entry["outcome"] == "succeeded"]
        assert len(successes) == (1 if record.state is JobState.SUCCEEDED else 0), record.attempts


def drain_ledger(redis_url: str, database_url: str, timeout_s: float = 45.0) -> Store:
    """Flush what the workers have not flushed yet. The wait covers a flush lock left by
    a killed worker (it expires after llmq.worker.store.outbox.LOCK_TTL_MS)."""
    flusher = OutboxFlusher(redis_url, database_url)
    try:
        assert flusher.drain(timeout_s=timeout_s), "outbox did not drain into SQL"
    finally:
        flusher.stop()
        flusher.redis.close()
    return Store(database_url)


def ledger_complete(redis_url: str, database_url: str, records: list[JobRecord]) -> bool:
    """True once the workers' flushers have brought every row of `records` to SQL (checked without flushing)."""
    if client(redis_url).llen(keys.OUTBOX):
        return False
    store = Store(database_url)
    try:
        assert_ledger_matches(store, records)
    except AssertionError:
        return False
    finally:
        store.close()
    return True


def ledger_rows(store: Store, records: Iterable[JobRecord]) -> int:
    """How many rows the ledger holds for these jobs: a job row, and an attempt and a usage row per call."""
    return sum((store.job(record.job_id) is not None) + len(store.attempts(record.job_id))
               + len(store.usage_rows(record.job_id)) for record in records)


def assert_ledger_matches(store: Store, records: list[JobRecord]) -> None:
    """SQL holds every job in its Redis state, one usage row per successful attempt and
    none twice: checked with GROUP BY, not only through the primary keys. A job that
    succeeded has its winning attempt's row; any other row belongs to a late result."""
    by_id = {record.job_id: record for record in records}
    with store.engine.connect() as connection:
        states = dict(connection.execute(select(jobs_table.c.job_id, jobs_table.c.state)
                                         .where(jobs_table.c.job_id.in_(list(by_id)))).all())
        usage = connection.execute(
            select(usage_table.c.job_id, usage_table.c.attempt, func.count())
            .where(usage_table.c.job_id.in_(list(by_id))).group_by(usage_table.c.job_id, usage_table.c.attempt)
        ).all()
        attempt_rows = connection.execute(
            select(attempts_table.c.job_id, attempts_table.c.attempt, attempts_table.c.outcome)
            .where(attempts_table.c.job_id.in_(list(by_id)))
        ).all()
    assert {job_id: by_id[job_id].state.value for job_id in by_id} == states
    assert all(count == 1 for _, _, count in usage), "a usage row written twice"
    usage_attempts: dict[str, set[int]] = {}
    for job_id, attempt, _ in usage:
        usage_attempts.setdefault(job_id, set()).add(attempt)
    for record in records:
        rows = usage_attempts.get(record.job_id, set())
        winning = {entry["attempt"] for entry in record.attempts if entry["outcome"] == "succeeded"}
        # A call that returned after its lease ran out (or after a cancel) was paid for: its usage
        # row stays, and its attempt says "superseded" (or "cancelled"), whatever the job's end.
        late = {entry["attempt"] for entry in record.attempts if entry["outcome"] in ("superseded", "cancelled")}
        assert len(winning) == (1 if record.state is JobState.SUCCEEDED else 0), (record.job_id, record.attempts)
        assert winning <= rows <= winning | late, f"{record.job_id}: usage rows for attempts {sorted(rows)}"
        for attempt in winning:
            assert (record.job_id, attempt, "succeeded") in set(map(tuple, attempt_rows))


# --- figures ---------------------------------------------------------------------------


@dataclass
class Figures:
    scenario: str
    submitted: int
    succeeded: int = 0
    cancelled: int = 0
    failed_typed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    measured: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def tally(cls, scenario: str, submitted: list[str], records: Iterable[JobRecord | None], **measured: Any) -> Figures:
        """Lost = submitted but not in a terminal state, or failed without a typed error, or gone."""
        found = {record.job_id: record for record in records if record is not None}
        figures = cls(scenario, len(submitted), measured=measured)
        failed: Counter[str] = Counter()
        for job_id in submitted:
            record = found.get(job_id)
            if record is None or not record.state.terminal:
                figures.lost += 1
            elif record.state is JobState.SUCCEEDED and record.result is not None:
                figures.succeeded += 1
            elif record.state is JobState.CANCELLED:
                figures.cancelled += 1
            elif record.error and record.error.get("type") in ERRORS_BY_NAME:
                failed[record.error["type"]] += 1
            else:
                figures.lost += 1
        figures.failed_typed = dict(sorted(failed.items()))
        return figures

    def record(self) -> Figures:
        line = json.dumps({key: value for key, value in self.__dict__.items()}, default=str)
        print(f"\nFIGURES {line}")
        target = os.environ.get(FIGURES_ENV)
        if target:
            with open(target, "a") as handle:
                handle.write(line + "\n")
        return self
