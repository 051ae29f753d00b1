"""The SQL schema: the ledger (jobs, attempts, one usage/cost row per attempt) and the
HTTP front's own records (API keys, files, OpenAI-style batches).

Both sides read the ledger (the worker's store writes it, the command line's reports
read it); the front's tables are written only by `llmq.http` and `llmq keys`. Which
database is used comes from `LLMQ_DATABASE_URL` (`database_url`).

Money is exact: `cost_usd` is NUMERIC(18, 10) on PostgreSQL. SQLite has no
decimal type (SQLAlchemy would go through float), so there the column holds an
integer count of 1e-10 USD; SUM over integers stays exact, and the column type
turns it back into a `Decimal` on the way out. Times are stored as UTC and
returned as timezone-aware UTC datetimes on both databases.
"""


from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

from llmq.contract.config import llmq_home
from llmq.contract.models import TERMINAL_STATES

DATABASE_URL_ENV = "LLMQ_DATABASE_URL"
SQLITE_FILE_NAME = "llmq.sqlite3"

USD_SCALE = 10
USD_QUANTUM = Decimal(1).scaleb(-USD_SCALE)
TERMINAL_STATE_NAMES = tuple(sorted(state.value for state in TERMINAL_STATES))

ReportGrouping = Literal["provider", "model", "caller", "day"]
REPORT_GROUPINGS: tuple[ReportGrouping, ...] = ("provider", "model", "caller", "day")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite's naive text column stores UTC wall time."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ExactUSD(TypeDecorator[Decimal]):
    """NUMERIC(18, 10) where the database has it; integer 1e-10 USD units on SQLite."""

    impl = Numeric(18, USD_SCALE, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(18, USD_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Decimal | int | None:
        if value is None:
            return None
        value = Decimal(value).quantize(USD_QUANTUM)
        return int(value.scaleb(USD_SCALE)) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-USD_SCALE).quantize(USD_QUANTUM)
        return Decimal(value).quantize(USD_QUANTUM)


def _utcnow() -> datetime:
    return datetime.now(UTC)


_JSON = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

metadata = MetaData()

jobs_table = Table(
    "llmq_jobs",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("batch_id", String),
    Column("custom_id", String),
    Column("state", String, nullable=False),
    Column("requested_model", String),
    Column("provider", String),
    Column("model", String),
    Column("caller", String),
    Column("metadata", _JSON),
    Column("content", Text),
    Column("error_type", String),
    Column("error_message", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("finished_at", UTCDateTime),
    Index("ix_llmq_jobs_batch_id", "batch_id"),
    Index("ix_llmq_jobs_state", "state"),
    Index("ix_llmq_jobs_created_at", "created_at"),
    Index("ix_llmq_jobs_caller", "caller"),
)

attempts_table = Table(
    "llmq_attempts",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("provider", String),
    Column("model", String),
    Column("outcome", String),
    Column("error_type", String),
    Column("error_message", Text),
    Column("status_code", Integer),
    Column("provider_request_id", String),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("latency_ms", Integer),
)

usage_table = Table(
    "llmq_usage",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("provider", String),
    Column("provider_type", String),
    Column("model", String),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("total_tokens", Integer, nullable=False, default=0),
    Column("cached_read_tokens", Integer, nullable=False, default=0),
    Column("cache_write_tokens", Integer, nullable=False, default=0),
    Column("reasoning_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", ExactUSD),
    Column("priced", Boolean, nullable=False, default=False),
    Column("cached", Boolean, nullable=False, default=False),
    Column("simulated", Boolean, nullable=False, default=False),
    Column("caller", String),
    Column("batch_id", String),
    Column("latency_ms", Integer),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Index("ix_llmq_usage_created_at", "created_at"),
    Index("ix_llmq_usage_provider", "provider"),
    Index("ix_llmq_usage_model", "model"),
    Index("ix_llmq_usage_caller", "caller"),
    Index("ix_llmq_usage_batch_id", "batch_id"),
)

# --- the HTTP front's records (llmq.http): durable, so they outlive Redis's result TTL -------

api_keys_table = Table(
    "llmq_api_keys",
    metadata,
    #: The caller's name: usage rows, budgets and `llmq usage --by caller` carry it.
    Column("name", String, primary_key=True),
    #: sha256 of the whole key, hex; the key itself is never stored.
    Column("key_hash", String(64), nullable=False, unique=True),
    #: The key's first characters, to tell keys apart in `llmq keys list`.
    Column("key_prefix", String, nullable=False),
    Column("daily_usd", ExactUSD),
    Column("requests_per_minute", Integer),
    #: Models the key may use (a JSON list); NULL: every model.
    Column("models", _JSON),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("revoked_at", UTCDateTime),
)

files_table = Table(
    "llmq_files",
    metadata,
    Column("file_id", String, primary_key=True),
    #: The key name that uploaded it (or the front that wrote a batch's output); only it reads the file.
    Column("owner", String, nullable=False),
    Column("purpose", String, nullable=False),
    Column("filename", String, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Index("ix_llmq_files_owner", "owner"),
)

openai_batches_table = Table(
    "llmq_openai_batches",
    metadata,
    #: The llmq batch id itself: one batch, one id, in Redis, in the ledger and over HTTP.
    Column("batch_id", String, primary_key=True),
    Column("owner", String, nullable=False),
    Column("input_file_id", String, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("completion_window", String, nullable=False),
    Column("lane", String, nullable=False),
    Column("metadata", _JSON),
    #: Validation errors ({"line", "message", "param", "code"} each) when the batch failed before any job ran.
    Column("errors", _JSON),
    #: request_counts once finalized (Redis forgets the batch after the result TTL).
    Column("request_counts", _JSON),
    Column("output_file_id", String),
    Column("error_file_id", String),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("cancelling_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Index("ix_llmq_openai_batches_owner_created", "owner", "created_at"),
)


def database_url() -> str:
    """`$LLMQ_DATABASE_URL`, else SQLite at `$LLMQ_HOME/llmq.sqlite3` (home default `./.llmq`)."""
    explicit = os.environ.get(DATABASE_URL_ENV)
    if explicit:
        return explicit
    home = llmq_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / SQLITE_FILE_NAME}"


def normalize_url(url: str) -> str:
    """Point plain PostgreSQL URLs at psycopg 3 (SQLAlchemy's default would be psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


