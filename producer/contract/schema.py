"""The SQL schema: the ledger (jobs, attempts, one usage/cost row per attempt, provider batches
and their lines) and the HTTP front's own records (API keys, files, OpenAI-style batches).

Both sides read the ledger (the worker's store writes it, the command line's reports
read it); the front's tables are written only by `llmq.http` and `llmq keys`. Which
database is used comes from `LLMQ_DATABASE_URL` (`database_url`).

Money is exact: `cost_usd` is NUMERIC(18, 10) on PostgreSQL. SQLite has no
decimal type (SQLAlchemy would go through float), so there the column holds an
integer count of 1e-10 USD; SUM over integers stays exact, and the column type
turns it back into a `Decimal` on the way out. Times are stored as UTC and
returned as timezone-aware UTC datetimes on both databases.

Text is stored as given, on both databases, except for the few characters one
of them refuses: PostgreSQL refuses NUL in text and `\u0000` in JSONB, and
neither driver can encode a lone surrogate. A prompt or a model's answer may
hold them, so every text and JSON column escapes them on the way in and
restores them on the way out (`escape_text`): NUL, a lone surrogate and the
escape mark itself are stored as U+FFFF followed by four hex digits. U+FFFF is
a Unicode noncharacter, set aside for a program's own use, so ordinary text is
stored unchanged and reads the same in a SQL shell.

`llmq_quarantine` holds the outbox rows the ledger refused (a data error that
retrying cannot fix), each with the error, so one bad row never stops the
rows behind it (worker/store/outbox.py).
"""


from __future__ import annotations

import os
import re
from collections.abc import Callable
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

from llmq.contract.home import llmq_home
from llmq.contract.models import TERMINAL_STATES

DATABASE_URL_ENV = "LLMQ_DATABASE_URL"
SQLITE_FILE_NAME = "llmq.sqlite3"

USD_SCALE = 10
USD_QUANTUM = Decimal(1).scaleb(-USD_SCALE)
TERMINAL_STATE_NAMES = tuple(sorted(state.value for state in TERMINAL_STATES))

ReportGrouping = Literal["provider", "model", "caller", "day", "price_tier", "kind", "lane"]
REPORT_GROUPINGS: tuple[ReportGrouping, ...] = ("provider", "model", "caller", "day", "price_tier", "kind", "lane")


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


#: Marks an escaped character in stored text: a noncharacter, so ordinary text never holds it.
TEXT_ESCAPE = "\uffff"
_NEEDS_ESCAPE = re.compile("[\x00\ud800-\udfff\uffff]")
_ESCAPED = re.compile("\uffff([0-9a-f]{4})")


def escape_text(value: str) -> str:
    """Text any SQL store accepts: NUL, lone surrogates and U+FFFF as U+FFFF + 4 hex digits."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(lambda found: f"{TEXT_ESCAPE}{ord(found.group()):04x}", value)


def unescape_text(value: str) -> str:
    """The inverse of `escape_text`."""
    if TEXT_ESCAPE not in value:
        return value
    return _ESCAPED.sub(lambda found: chr(int(found.group(1), 16)), value)


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`change` applied to every string of a JSON value, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(key) if isinstance(key, str) else key: _map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    return value


class EscapedString(TypeDecorator[str]):
    """VARCHAR that stores any Python string (`escape_text`) and gives it back unchanged."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return escape_text(value) if isinstance(value, str) else value

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return unescape_text(value) if isinstance(value, str) else value


class EscapedText(EscapedString):
    """TEXT, escaped as `EscapedString`."""

    impl = Text
    cache_ok = True


class EscapedJSON(TypeDecorator[Any]):
    """JSON (JSONB on PostgreSQL) whose strings, keys included, are escaped as `EscapedString`."""

    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return _map_strings(value, escape_text)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return _map_strings(value, unescape_text)


def _utcnow() -> datetime:
    return datetime.now(UTC)


metadata = MetaData()

jobs_table = Table(
    "llmq_jobs",
    metadata,
    Column("job_id", EscapedString, primary_key=True),
    Column("batch_id", EscapedString),
    Column("custom_id", EscapedString),
    Column("state", EscapedString, nullable=False),
    Column("requested_model", EscapedString),
    Column("provider", EscapedString),
    Column("model", EscapedString),
    Column("caller", EscapedString),
    Column("metadata", EscapedJSON),
    Column("content", EscapedText),
    Column("error_type", EscapedString),
    Column("error_message", EscapedText),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("finished_at", UTCDateTime),
    #: The job's kind (`chat`, `embedding`) and lane (`interactive`, `batch`); NULL in rows written before them.
    Column("kind", EscapedString),
    Column("lane", EscapedString),
    Index("ix_llmq_jobs_batch_id", "batch_id"),
    Index("ix_llmq_jobs_state", "state"),
    Index("ix_llmq_jobs_created_at", "created_at"),
    Index("ix_llmq_jobs_caller", "caller"),
)

attempts_table = Table(
    "llmq_attempts",
    metadata,
    Column("job_id", EscapedString, primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("provider", EscapedString),
    Column("model", EscapedString),
    Column("outcome", EscapedString),
    Column("error_type", EscapedString),
    Column("error_message", EscapedText),
    Column("status_code", Integer),
    Column("provider_request_id", EscapedString),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("latency_ms", Integer),
)

usage_table = Table(
    "llmq_usage",
    metadata,
    Column("job_id", EscapedString, primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("provider", EscapedString),
    Column("provider_type", EscapedString),
    Column("model", EscapedString),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("total_tokens", Integer, nullable=False, default=0),
    Column("cached_read_tokens", Integer, nullable=False, default=0),
    Column("cache_write_tokens", Integer, nullable=False, default=0),
    Column("reasoning_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", ExactUSD),
    #: "batch" (a provider batch line), "flex" (the flex tier) or "standard"; NULL in rows of older versions.
    Column("price_tier", EscapedString),
    #: What the call would have cost at the standard tier (batch and flex rows): the saving is the difference.
    Column("standard_cost_usd", ExactUSD),
    Column("priced", Boolean, nullable=False, default=False),
    Column("cached", Boolean, nullable=False, default=False),
    Column("simulated", Boolean, nullable=False, default=False),
    Column("caller", EscapedString),
    Column("batch_id", EscapedString),
    Column("latency_ms", Integer),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Index("ix_llmq_usage_created_at", "created_at"),
    Index("ix_llmq_usage_provider", "provider"),
    Index("ix_llmq_usage_model", "model"),
    Index("ix_llmq_usage_caller", "caller"),
    Index("ix_llmq_usage_batch_id", "batch_id"),
)

quarantine_table = Table(
    "llmq_quarantine",
    metadata,
    #: A digest of `entry` and `row_json`: quarantining the same row again (a flusher re-running its
    #: chunk after a crash) keeps one row.
    Column("quarantine_id", String(64), primary_key=True),
    Column("job_id", EscapedString),
    Column("kind", EscapedString),
    #: The outbox entry as it was queued (JSON), and the row it expanded to, when it got that far.
    Column("entry", EscapedText, nullable=False),
    Column("row_json", EscapedText),
    Column("error", EscapedText, nullable=False),
    Column("quarantined_at", UTCDateTime, nullable=False, default=_utcnow),
    Index("ix_llmq_quarantine_job_id", "job_id"),
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
    Column("models", EscapedJSON),
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
    Column("metadata", EscapedJSON),
    #: Validation errors ({"line", "message", "param", "code"} each) when the batch failed before any job ran.
    Column("errors", EscapedJSON),
    #: request_counts once finalized (Redis forgets the batch after the result TTL).
    Column("request_counts", EscapedJSON),
    Column("output_file_id", String),
    Column("error_file_id", String),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("cancelling_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Index("ix_llmq_openai_batches_owner_created", "owner", "created_at"),
)


provider_batches_table = Table(
    "llmq_provider_batches",
    metadata,
    Column("provider_batch_id", EscapedString, primary_key=True),
    Column("provider", EscapedString),
    Column("model", EscapedString),
    Column("endpoint", EscapedString),
    Column("state", EscapedString, nullable=False),
    Column("remote_state", EscapedString),
    Column("remote_id", EscapedString),
    Column("input_file", EscapedString),
    Column("lines", Integer),
    Column("bytes", BigInteger),
    Column("window_s", Integer),
    Column("batch_ids", EscapedJSON),
    Column("counts", EscapedJSON),
    Column("error", EscapedText),
    Column("submit_attempts", Integer),
    Column("created_at", UTCDateTime, nullable=False, default=_utcnow),
    Column("updated_at", UTCDateTime),
    Column("submit_started_at", UTCDateTime),
    Column("submitted_at", UTCDateTime),
    Column("patience_at", UTCDateTime),
    Column("ended_at", UTCDateTime),
    Index("ix_llmq_provider_batches_provider", "provider"),
    Index("ix_llmq_provider_batches_remote_id", "remote_id"),
)

#: Which job each line of a provider batch was (its custom_id at the provider is derived from the job id).
provider_batch_lines_table = Table(
    "llmq_provider_batch_lines",
    metadata,
    Column("provider_batch_id", EscapedString, primary_key=True),
    Column("job_id", EscapedString, primary_key=True),
    Index("ix_llmq_provider_batch_lines_job_id", "job_id"),
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


