"""Drains the Redis outbox into the SQL ledger.

Rows enter the outbox in the same Lua step as the state change they describe,
so a result in Redis always has its ledger rows queued. One process at a time
holds the flush lock, reads a chunk from the head without removing it, writes
it to SQL (idempotent: one row per job, per (job, attempt)), and only then trims
the chunk, and only while it still holds the lock. A crash between write and
trim re-writes the same rows, which the idempotent writes absorb. While SQL is
down the rows simply wait in Redis.

No row stops the rows behind it. When the database refuses a chunk for its data
(`is_data_error`: a value it cannot store, a constraint, a row that fails the
ledger's checks), retrying cannot help: the flusher halves the chunk until each
refused row stands alone, writes every other row, and sets each refused one
aside with its error, in the ledger's `llmq_quarantine` table and in the Redis
list `keys.OUTBOX_DEAD`, counted in `keys.OUTBOX_QUARANTINED` (`llmq status`,
`llmq usage` and the metrics read them). A lost connection is not a data
error: the chunk waits, and the flusher tries again with backoff.

Each worker process runs the flusher in a child process of its own
(`start_process`, `python -m llmq.worker.store.outbox`): SQL writes then never compete with
the worker's event loop for its GIL (2-3.7 ms of worker CPU per job when it ran as
a thread, in the overhead benchmark). The child gets the Redis URL through its
environment, never its command line (`ps` shows that), and exits when its parent
does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import exc as sql_errors

from llmq.contract import keys
from llmq.contract.jobs import RELEASE_LOCK, job_kind, job_lane
from llmq.contract.scripts import read_script

log = logging.getLogger("llmq.outbox")

CHUNK_ROWS = 500
LOCK_TTL_MS = 30_000
IDLE_SLEEP_S = 0.25
MAX_BACKOFF_S = 30.0
#: A flusher whose worker died notices within this long, even while it backs off.
PARENT_CHECK_S = 1.0
#: Refused rows' errors are kept to this many characters.
MAX_ERROR_CHARS = 1000

_SETTLE_IF_HELD = read_script(__file__, "settle_outbox.lua")


def is_data_error(exc: BaseException) -> bool:
    """True when the rows themselves are at fault, so writing them again cannot succeed.

    The database refused a value or a constraint (DataError, IntegrityError), a value
    could not be bound (a StatementError that is no DBAPI error), or a row failed the
    ledger's own checks (ValueError, TypeError, KeyError, OverflowError). A lost or
    refused connection, a locked SQLite file, a missing table (OperationalError,
    InterfaceError, ProgrammingError, ...) and any Redis error are not: they pass.
    """
    if isinstance(exc, sql_errors.DataError | sql_errors.IntegrityError):
        return True
    if isinstance(exc, sql_errors.DBAPIError):
        return False
    if isinstance(exc, sql_errors.StatementError):
        return exc.orig is None or is_data_error(exc.orig)
    return isinstance(exc, ValueError | TypeError | KeyError | OverflowError)


def describe_error(exc: BaseException) -> str:
    """One line naming the error (the driver's own, for a database error), without the SQL or its values."""
    cause = exc.orig if isinstance(exc, sql_errors.StatementError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    line = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return line[:MAX_ERROR_CHARS]


@dataclass
class Refused:
    """An outbox entry the ledger refused, with the row it expanded to (None when it got no further)."""

    entry: str
    row: dict[str, Any] | None
    error: str

    @property
    def row_json(self) -> str | None:
        return None if self.row is None else json.dumps(self.row, sort_keys=True, default=str)

    def quarantine_row(self) -> dict[str, Any]:
        digest = hashlib.sha256(f"{self.entry}\n{self.row_json}".encode("utf-8", "surrogatepass")).hexdigest()
        source = self.row or _loads_or_none(self.entry) or {}
        return {
            "quarantine_id": digest, "job_id": _text_or_none(source.get("job_id")),
            "kind": _text_or_none(source.get("kind")), "entry": self.entry, "row_json": self.row_json,
            "error": self.error,
        }

    def dead_letter(self) -> str:
        record = {"entry": self.entry, "row": self.row, "error": self.error, "at": time.time()}
        return json.dumps(record, default=str)


class OutboxFlusher:
    def __init__(self, redis_url: str, database_url: str | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.database_url = database_url
        self.token = uuid.uuid4().hex
        self._settle = self.redis.register_script(_SETTLE_IF_HELD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from llmq.worker.store.ledger import Store

            self._store = Store(self.database_url)
        return self._store

    def start(self) -> OutboxFlusher:
        """Flush in a thread of this process (tests, the demo); workers use `start_process`."""
        self._thread = threading.Thread(target=self._loop, name="llmq-outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_store()

    def halt(self) -> None:
        """Stop looping after the chunk in hand (safe from a signal handler)."""
        self._stop.set()

    def run(self, parent_pid: int | None = None) -> None:
        """Flush in this thread until halted, or until the process `parent_pid` is gone."""
        try:
            self._loop(parent_pid)
        finally:
            self._close_store()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()

    def _loop(self, parent_pid: int | None = None) -> None:
        backoff_s = IDLE_SLEEP_S
        while not self._stop.is_set() and _alive(parent_pid):
            try:
                flushed = self.flush_once()
                backoff_s = IDLE_SLEEP_S
                if flushed:
                    continue
            except Exception as exc:  # SQL or Redis down: rows stay in Redis, try again later
                log.warning("outbox: %s (retrying in %.1fs)", describe_error(exc), backoff_s)
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            self._pause(backoff_s, parent_pid)

    def _pause(self, seconds: float, parent_pid: int | None) -> None:
        """Sleep, noticing a halt at once and the worker's death within `PARENT_CHECK_S`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and _alive(parent_pid):
            if self._stop.wait(min(PARENT_CHECK_S, left)):
                return

    def flush_once(self) -> int:
        """Handle one chunk if this process can take the lock; returns how many outbox rows it settled
        (written, or set aside when the ledger refused them)."""
        if not self._hold_lock():
            return 0
        try:
            raw = self.redis.lrange(keys.OUTBOX, 0, CHUNK_ROWS - 1)
            if not raw:
                return 0
            refused = self._write_or_split(raw)
            if refused:
                self._set_aside(refused)
            settled = self._settle(keys=[keys.OUTBOX, keys.OUTBOX_LOCK, keys.OUTBOX_DEAD, keys.OUTBOX_QUARANTINED],
                                   args=[self.token, len(raw), *(item.dead_letter() for item in refused)])
            if refused and settled:
                log.error("outbox: the ledger refused %d of %d rows (first: %s); they are set aside in SQL table "
                          "llmq_quarantine and Redis list %s, and the rows behind them go on",
                          len(refused), len(raw), refused[0].error, keys.OUTBOX_DEAD)
            return len(raw)
        finally:
            self._release()

    def _hold_lock(self) -> bool:
        """Take the flush lock, or extend it when this process holds it already."""
        if self.redis.set(keys.OUTBOX_LOCK, self.token, nx=True, px=LOCK_TTL_MS):
            return True
        if self.redis.get(keys.OUTBOX_LOCK) != self.token:
            return False
        self.redis.pexpire(keys.OUTBOX_LOCK, LOCK_TTL_MS)
        return True

    def _write_or_split(self, entries: list[str]) -> list[Refused]:
        """Write the rows of `entries`; when the database refuses them for their data, halve the
        entries until each refused one stands alone. Halves are written in order, so a job's
        rows still arrive oldest first. Returns the refused entries."""
        self._hold_lock()  # a long split must not lose the lock to another flusher
        try:
            self.store.write(self._rows(entries))
            return []
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(entries) == 1:
                return [Refused(entries[0], self._row_or_none(entries[0]), describe_error(exc))]
        middle = len(entries) // 2
        return self._write_or_split(entries[:middle]) + self._write_or_split(entries[middle:])

    def _rows(self, entries: list[str]) -> list[dict[str, Any]]:
        decoded = [json.loads(entry) for entry in entries]
        if not all(isinstance(row, dict) for row in decoded):
            raise ValueError("an outbox entry is not a JSON object")
        return self._expand(decoded)

    def _row_or_none(self, entry: str) -> dict[str, Any] | None:
        try:
            rows = self._rows([entry])
        except Exception as exc:
            if not is_data_error(exc):
                raise
            return None
        return rows[0] if rows else None

    def _set_aside(self, refused: list[Refused]) -> None:
        """Into the ledger's quarantine table; the Redis dead-letter list follows in the settle step."""
        try:
            self.store.quarantine([item.quarantine_row() for item in refused])
        except Exception as exc:
            if not is_data_error(exc):
                raise
            # The dead-letter list in Redis still gets every row: the ledger must not stall on its own quarantine.
            log.error("outbox: the quarantine table refused %d rows too (%s); they are in Redis list %s",
                      len(refused), describe_error(exc), keys.OUTBOX_DEAD)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Flush until the outbox is empty (the demo and tests call this); True when it is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.redis.llen(keys.OUTBOX) == 0:
                return True
            if not self.flush_once():
                time.sleep(0.05)
        return self.redis.llen(keys.OUTBOX) == 0

    def _release(self) -> None:
        self.redis.eval(RELEASE_LOCK, 1, keys.OUTBOX_LOCK, self.token)

    def _expand(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Job rows are queued as references; write the job's state as it is now."""
        refs = [row["job_id"] for row in rows if row.get("kind") == "job"]
        if not refs:
            return rows
        pipe = self.redis.pipeline(transaction=False)
        for job_id in refs:
            pipe.hgetall(keys.job(job_id))
        found = {job_id: raw for job_id, raw in zip(refs, pipe.execute()) if raw}
        expanded = []
        for row in rows:
            if row.get("kind") != "job":
                expanded.append(row)
            elif row["job_id"] in found:
                expanded.append(job_row(found[row["job_id"]]))
        return expanded


def _alive(parent_pid: int | None) -> bool:
    """False once the worker that started this process is gone (this process was handed to another parent)."""
    return parent_pid is None or os.getppid() == parent_pid


def _loads_or_none(entry: str) -> dict[str, Any] | None:
    try:
        value = json.loads(entry)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def start_process(redis_url: str) -> subprocess.Popen[bytes]:
    """A flusher in a child process of this one (`python -m llmq.worker.store.outbox`)."""
    env = {**os.environ, "LLMQ_OUTBOX_REDIS_URL": redis_url, "LLMQ_OUTBOX_PARENT_PID": str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "llmq.worker.store.outbox"], env=env, stdin=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Stop after the chunk in hand: a chunk cut short is written again by the next flusher."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    from urllib.parse import urlsplit

    from llmq.worker import logs
    from llmq.worker.store.ledger import database_url

    redis_url = os.environ["LLMQ_OUTBOX_REDIS_URL"]
    # Its log lines never show a password of the two URLs it holds.
    logs.install([password for password in (urlsplit(redis_url).password, urlsplit(database_url()).password) if password])
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    flusher = OutboxFlusher(redis_url)
    signal.signal(signal.SIGTERM, lambda *_: flusher.halt())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the worker stops us
    flusher.run(parent_pid=int(os.environ["LLMQ_OUTBOX_PARENT_PID"]))
    return 0


def job_row(raw: dict[str, str]) -> dict[str, Any]:
    request = json.loads(raw["request"])
    result = json.loads(raw["result"]) if raw.get("result") else None
    # A job that recovered from an earlier error carries no error in the ledger.
    error = json.loads(raw["error"]) if raw.get("error") and raw["state"] in ("failed", "cancelled") else None
    route = json.loads(raw["route"])
    hop = route[int(raw.get("route_index", 0))]
    return {
        "kind": "job",
        "job_id": raw["job_id"],
        "batch_id": raw.get("batch_id") or None,
        "custom_id": raw.get("custom_id") or None,
        "state": raw["state"],
        "requested_model": request["model"],
        "provider": result["provider"] if result else hop["provider"],
        "model": result["model"] if result else hop["model"],
        "caller": request.get("metadata", {}).get("caller"),
        "metadata": request.get("metadata", {}),
        "content": result.get("content") if result else None,
        "error_type": error["type"] if error else None,
        "error_message": error["message"] if error else None,
        "attempts": int(raw.get("attempt", 0)),
        "created_at": int(raw["created_at"]) / 1000.0,
        "finished_at": int(raw["finished_at"]) / 1000.0 if raw.get("finished_at") else None,
        # The row's own `kind` says it is a job row: the job's kind travels as `job_kind`.
        "job_kind": job_kind(raw).value,
        "lane": job_lane(raw).value,
    }


if __name__ == "__main__":
    sys.exit(main())
