"""Drains the Redis outbox into the SQL ledger.

Rows enter the outbox in the same Lua step as the state change they describe,
so a result in Redis always has its ledger rows queued. One process at a time
holds the flush lock, reads a chunk from the head without removing it, writes
it to SQL (idempotent: one row per job, per (job, attempt)), and only then trims
the chunk, and only while it still holds the lock. A crash between write and
trim re-writes the same rows, which the idempotent writes absorb. While SQL is
down the rows simply wait in Redis.

Each worker process runs the flusher in a child process of its own
(`start_process`, `python -m llmq.worker.store.outbox`): SQL writes then never compete with
the worker's event loop for its GIL (2-3.7 ms of worker CPU per job when it ran as
a thread, in the overhead benchmark). The child gets the Redis URL through its
environment, never its command line (`ps` shows that), and exits when its parent
does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import redis

from llmq.contract import keys
from llmq.contract.jobs import RELEASE_LOCK
from llmq.contract.scripts import read_script

log = logging.getLogger("llmq.outbox")

CHUNK_ROWS = 500
LOCK_TTL_MS = 30_000
IDLE_SLEEP_S = 0.25
MAX_BACKOFF_S = 30.0

_TRIM_IF_HELD = read_script(__file__, "trim_outbox.lua")


class OutboxFlusher:
    def __init__(self, redis_url: str, database_url: str | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.database_url = database_url
        self.token = uuid.uuid4().hex
        self._trim = self.redis.register_script(_TRIM_IF_HELD)
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
        while not self._stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                return  # the worker that started this process is gone
            try:
                flushed = self.flush_once()
                backoff_s = IDLE_SLEEP_S
                if flushed:
                    continue
            except Exception as exc:  # SQL or Redis down: rows stay in Redis, try again later
                log.warning("outbox: %s: %s (retrying in %.1fs)", type(exc).__name__, exc, backoff_s)
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            self._stop.wait(backoff_s)

    def flush_once(self) -> int:
        """Write one chunk if this process can take the lock; returns rows written."""
        if not self.redis.set(keys.OUTBOX_LOCK, self.token, nx=True, px=LOCK_TTL_MS):
            if self.redis.get(keys.OUTBOX_LOCK) != self.token:
                return 0
            self.redis.pexpire(keys.OUTBOX_LOCK, LOCK_TTL_MS)
        try:
            raw = self.redis.lrange(keys.OUTBOX, 0, CHUNK_ROWS - 1)
            if not raw:
                return 0
            rows = self._expand([json.loads(item) for item in raw])
            self.store.write(rows)
            self._trim(keys=[keys.OUTBOX, keys.OUTBOX_LOCK], args=[self.token, len(raw)])
            return len(raw)
        finally:
            self._release()

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
    }


if __name__ == "__main__":
    sys.exit(main())
