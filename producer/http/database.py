"""The front's SQL database: the same one as the ledger (`LLMQ_DATABASE_URL`), its own tables.

API keys, files and OpenAI-style batches live in SQL, not in Redis: a key must outlive any
Redis restart, and a batch's files must stay readable after Redis forgets the batch (its
result TTL, seven days by default) — the SQL ledger is already the durable record.

Calls are synchronous SQLAlchemy (the front runs them in a thread): a key is looked up
once per few seconds per process (the front caches it), files and batches are not on
the chat path.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url, text

from llmq.contract.schema import (
    api_keys_table,
    database_url,
    files_table,
    metadata,
    normalize_url,
    openai_batches_table,
)

#: How long a SQLite write waits for another process's lock (the workers' outbox flusher) before failing.
SQLITE_TIMEOUT_S = 30.0
#: Serializes table creation when several fronts start against one PostgreSQL (the ledger's own key + 1).
SCHEMA_LOCK_KEY = 0x6C6C6D72
FRONT_TABLES = (api_keys_table, files_table, openai_batches_table)


def open_database(url: str | None = None) -> Engine:
    """An engine on the ledger's database, with the front's tables created if missing."""
    url = normalize_url(url or database_url())
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: object, _record: object) -> None:
            # Several processes share the file: readers must not block the workers' writer.
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        metadata.create_all(connection, tables=list(FRONT_TABLES), checkfirst=True)
    return engine
