"""The durable SQL ledger: jobs, attempts, and one usage/cost row per attempt.

Redis holds the hot state; this store outlives it. Workers do not write here on
the request path: they push rows to an outbox in Redis and a background flusher
hands them to `Store.write` in batches. A batch may be delivered more than once
(the flusher died after the commit, before the ack), so every write is an
idempotent upsert keyed by the job id (jobs) or the job id and attempt number
(attempts, usage):

- a job row takes the newest state, except that a terminal state (succeeded,
  failed, cancelled) is never replaced by a non-terminal one, so a late
  `running` row cannot resurrect a finished job;
- an attempt row is replaced by a later one, except that a finished attempt is
  never replaced by one still open (`started` / `running` / no outcome);
- a usage row is written once and never changed: cost is money already spent.

Only the fields a row carries are written; absent fields keep their stored value.

Rows the database refuses are not retried forever: the flusher sets them aside
in `llmq_quarantine` (`Store.quarantine`) with the error, and writes the rest.

The tables are `llmq.contract.schema`.
"""

from __future__ import annotations

import os
import sqlite3
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Table,
    and_,
    case,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

from llmq.contract.schema import (
    REPORT_GROUPINGS,
    TERMINAL_STATE_NAMES,
    USD_QUANTUM,
    ReportGrouping,
    attempts_table,
    database_url,
    jobs_table,
    metadata,
    normalize_url,
    provider_batch_lines_table,
    provider_batches_table,
    quarantine_table,
    usage_table,
)
from llmq.worker.store.provider_batches import ENDED
from llmq.worker.store.rows import OPEN_ATTEMPT_OUTCOMES, prepare_rows

#: How long a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Serializes table creation when several workers start against one PostgreSQL.
SCHEMA_LOCK_KEY = 0x6C6C6D71  # "llmq"
#: Report groupings read from the usage row's job (`llmq_jobs`), not from the usage row itself.
JOB_GROUPINGS = frozenset({"kind", "lane"})


class Store:
    """The ledger on one database. Thread-safe; one instance per process."""

    def __init__(self, url: str | None = None) -> None:
        self.url = normalize_url(url or database_url())
        self.engine = _create_engine(self.url)
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            self.engine.dispose()
            raise ValueError(f"unsupported database {self.dialect!r}; use a sqlite:// or postgresql:// URL")
        self._create_tables()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_tables(self) -> None:
        with self._write_transaction() as connection:
            if self.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            metadata.create_all(connection, checkfirst=True)
            _add_new_columns(connection)

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            connection.execution_options(llmq_write=True)
            with connection.begin():
                yield connection

    # -- writes ---------------------------------------------------------------

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write a batch of `{"kind": "job" | "attempt" | "usage", ...}` rows in one transaction.

        Every row is checked before anything is written: a bad row raises
        `ValueError` naming it and the field, and the batch is left unwritten.
        Writing the same batch again leaves the same rows.
        """
        prepared = prepare_rows(rows)
        if not any(prepared):
            return
        with self._write_transaction() as connection:
            self._upsert_jobs(connection, prepared.jobs)
            self._upsert_attempts(connection, prepared.attempts)
            self._insert_usage(connection, prepared.usage)
            self._upsert_provider_batches(connection, prepared.provider_batches, prepared.provider_batch_lines)

    def _insert_statement(self, table: Table) -> Any:
        module = sqlite if self.dialect == "sqlite" else postgresql
        return module.insert(table)

    def _upsert_jobs(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        for group in _by_key_set(rows):
            statement = self._insert_statement(jobs_table)
            incoming = statement.excluded
            # A terminal state stays unless another terminal state replaces it.
            may_replace = or_(
                # Spelled out: an expanding IN (...) parameter cannot be used with executemany.
                and_(*(jobs_table.c.state != name for name in TERMINAL_STATE_NAMES)),
                or_(*(incoming.state == name for name in TERMINAL_STATE_NAMES)),
            )
            updates = {key: incoming[key] for key in group[0] if key != "job_id"}
            statement = statement.on_conflict_do_update(index_elements=["job_id"], set_=updates, where=may_replace)
            connection.execute(statement, group)

    def _upsert_attempts(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        for group in _by_key_set(rows):
            statement = self._insert_statement(attempts_table)
            keys = ["job_id", "attempt"]
            updates = {key: statement.excluded[key] for key in group[0] if key not in keys}
            if not updates:
                connection.execute(statement.on_conflict_do_nothing(index_elements=keys), group)
                continue
            # A finished attempt stays unless another finished one replaces it.
            may_replace = or_(_attempt_open(attempts_table.c.outcome), ~_attempt_open(statement.excluded.outcome))
            statement = statement.on_conflict_do_update(index_elements=keys, set_=updates, where=may_replace)
            connection.execute(statement, group)

    def _insert_usage(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        for group in _by_key_set(rows):
            statement = self._insert_statement(usage_table).on_conflict_do_nothing(index_elements=["job_id", "attempt"])
            connection.execute(statement, group)

    def _upsert_provider_batches(
        self, connection: Connection, batches: list[dict[str, Any]], lines: list[dict[str, Any]]
    ) -> None:
        for group in _by_key_set(batches):
            statement = self._insert_statement(provider_batches_table)
            updates = {key: statement.excluded[key] for key in group[0] if key != "provider_batch_id"}
            # An ended provider batch stays ended (worker/store/provider_batches.py).
            may_replace = or_(provider_batches_table.c.state != ENDED, statement.excluded.state == ENDED)
            statement = statement.on_conflict_do_update(index_elements=["provider_batch_id"], set_=updates,
                                                        where=may_replace)
            connection.execute(statement, group)
        for group in _by_key_set(lines):
            statement = self._insert_statement(provider_batch_lines_table)
            connection.execute(statement.on_conflict_do_nothing(index_elements=["provider_batch_id", "job_id"]), group)

    def quarantine(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Set aside rows the ledger refused: `{quarantine_id, job_id, kind, entry, row_json, error}` each.

        Quarantining the same `quarantine_id` again leaves one row.
        """
        rows = [dict(row) for row in rows]
        if not rows:
            return
        statement = self._insert_statement(quarantine_table).on_conflict_do_nothing(index_elements=["quarantine_id"])
        with self._write_transaction() as connection:
            connection.execute(statement, rows)

    # -- reads ----------------------------------------------------------------

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest rows set aside, newest first."""
        query = select(quarantine_table).order_by(quarantine_table.c.quarantined_at.desc()).limit(limit)
        return self._all(query)

    def quarantined_count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(quarantine_table)).scalar_one())

    def job(self, job_id: str) -> dict[str, Any] | None:
        query = select(jobs_table).where(jobs_table.c.job_id == job_id)
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        query = select(attempts_table).where(attempts_table.c.job_id == job_id).order_by(attempts_table.c.attempt)
        return self._all(query)

    def usage_rows(self, job_id: str | None = None) -> list[dict[str, Any]]:
        query = select(usage_table).order_by(usage_table.c.created_at, usage_table.c.job_id, usage_table.c.attempt)
        if job_id is not None:
            query = query.where(usage_table.c.job_id == job_id)
        return self._all(query)

    def usage_report(self, since: datetime | None = None, by: ReportGrouping = "provider") -> list[dict[str, Any]]:
        """Usage and cost per provider, model, caller, UTC day, price tier, or the job's kind or lane
        (read from the job's row: None where it has none, or one written before the columns existed),
        ordered by that key.

        Each row: the key (named after `by`), requests, token sums, `cost_usd`
        (exact `Decimal`, unpriced rows count as nothing), `standard_cost_usd` (what the same calls
        cost at the standard tier: batch and flex rows at their standard price), `saved_usd`
        (the difference), `cheaper_tier` (rows run through a provider batch or the flex tier),
        `cached_hits` (answers from llmq's cache) and `unpriced` (rows with no known price).
        """
        if by not in REPORT_GROUPINGS:
            raise ValueError(f"cannot group usage by {by!r}; use one of: {', '.join(REPORT_GROUPINGS)}")
        key = self._report_key(by)
        query = select(key.label(by), *_report_columns()).group_by(key).order_by(key)
        if by in JOB_GROUPINGS:
            query = query.select_from(usage_table.outerjoin(jobs_table, jobs_table.c.job_id == usage_table.c.job_id))
        if since is not None:
            query = query.where(usage_table.c.created_at >= since)
        return [_report_row(row, by) for row in self._all(query)]

    def _report_key(self, by: ReportGrouping) -> Any:
        if by == "day":
            return self._day_expression()
        return jobs_table.c[by] if by in JOB_GROUPINGS else usage_table.c[by]

    def _day_expression(self) -> Any:
        created_at = usage_table.c.created_at
        if self.dialect == "sqlite":
            # Stored as UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
            return func.strftime("%Y-%m-%d", created_at, type_=String)
        return func.to_char(func.timezone("UTC", created_at), "YYYY-MM-DD", type_=String)

    def _all(self, query: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]


_TOKEN_SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def _report_columns() -> list[Any]:
    columns: list[Any] = [func.count().label("requests")]
    columns += [func.sum(usage_table.c[name]).label(name) for name in _TOKEN_SUMS]
    columns.append(func.sum(usage_table.c.cost_usd).label("cost_usd"))
    columns.append(func.sum(func.coalesce(usage_table.c.standard_cost_usd, usage_table.c.cost_usd)).label("standard"))
    columns.append(func.sum(case((usage_table.c.standard_cost_usd.is_not(None), 1), else_=0)).label("cheaper_tier"))
    columns.append(func.sum(case((usage_table.c.cached, 1), else_=0)).label("cached_hits"))
    columns.append(func.sum(case((usage_table.c.priced, 0), else_=1)).label("unpriced"))
    return columns


def _report_row(row: dict[str, Any], by: str) -> dict[str, Any]:
    report = {by: row[by], "requests": int(row["requests"])}
    # PostgreSQL's SUM over integers comes back as bigint or numeric: make them ints.
    report.update({name: int(row[name] or 0) for name in _TOKEN_SUMS})
    zero = Decimal(0).quantize(USD_QUANTUM)
    report["cost_usd"] = row["cost_usd"] if row["cost_usd"] is not None else zero
    report["standard_cost_usd"] = row["standard"] if row["standard"] is not None else zero
    report["saved_usd"] = report["standard_cost_usd"] - report["cost_usd"]
    report["cheaper_tier"] = int(row["cheaper_tier"] or 0)
    report["cached_hits"] = int(row["cached_hits"] or 0)
    report["unpriced"] = int(row["unpriced"] or 0)
    return report


def _add_new_columns(connection: Connection) -> None:
    """Columns added to a table after a ledger was created (nullable ones only): ALTER TABLE ADD COLUMN."""
    found = inspect(connection)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in found.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=connection.dialect)
                connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _attempt_open(outcome: Any) -> Any:
    return or_(outcome.is_(None), *(outcome == name for name in sorted(OPEN_ATTEMPT_OUTCOMES)))


def _by_key_set(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by the fields they carry: one executemany per group, each setting only those."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
    else:
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if in_memory:
            engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False})
        _configure_sqlite(engine, wal=not in_memory)
    _dispose_after_fork(engine)
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    """WAL and a busy timeout so several worker processes can share one file.

    sqlite3's own transaction handling is switched off and SQLAlchemy emits the
    BEGIN (the recipe in SQLAlchemy's SQLite dialect docs): writes take the lock
    up front with BEGIN IMMEDIATE, so two writers queue on the busy timeout
    instead of one failing at once when it upgrades a read lock.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if wal:
            _set_wal(cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("llmq_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _set_wal(cursor: Any, attempts: int = 50) -> None:
    """WAL mode (kept in the file, so only its first connection changes it).

    Switching needs the database to itself, and SQLite answers "database is locked"
    at once, without its busy handler, when other connections open it at the same
    moment (several writers starting together on a new file): wait and look again.
    """
    for attempt in range(attempts):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


def _dispose_after_fork(engine: Engine) -> None:
    """A forked worker (Celery prefork) must not reuse its parent's open connections."""
    reference = weakref.ref(engine)

    def _reset() -> None:
        forked = reference()
        if forked is not None:
            forked.dispose(close=False)

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset)

