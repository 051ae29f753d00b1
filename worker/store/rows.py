"""Checking and merging the rows a flusher hands to `Store.write`.

Rows come from the Redis outbox, so they arrive as JSON: timestamps as epoch
seconds or ISO-8601 strings, money as decimal strings. Each row is checked and
converted here, before any SQL runs, so a bad row fails the batch with a
message naming the row and the field, and nothing of it is half-written.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from llmq.contract.models import JobKind, JobState, Lane
from llmq.worker.store.provider_batches import PROVIDER_BATCH_FIELDS, PROVIDER_BATCH_LINE_FIELDS
from llmq.worker.store.provider_batches import may_replace as provider_batch_may_replace

#: Attempt outcomes that mean "not finished yet"; a finished attempt never reverts to one.
OPEN_ATTEMPT_OUTCOMES = frozenset({"started", "running"})

Coerce = Callable[[Any], Any]


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _label(value: Any) -> str | None:
    """A caller name. It comes from callers' free-form metadata, so any JSON value is
    kept as text rather than failing the batch (and blocking the outbox behind it)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _integer(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    return int(value)


def _count(value: Any) -> int:
    count = _integer(value) or 0
    if count < 0:
        raise ValueError(f"expected a count >= 0, got {count}")
    return count


def _milliseconds(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("expected milliseconds, got a boolean")
    return round(float(value))


def _flag(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise TypeError(f"expected true or false, got {value!r}")


def _member_of(enum_class: type[enum.Enum], what: str) -> Coerce:
    """A coercion to one of the enum's values (a job's state, kind or lane), naming them when it is not."""

    def coerce(value: Any) -> str | None:
        if value is None:
            return None
        try:
            return str(enum_class(value).value)
        except ValueError:
            names = ", ".join(str(member.value) for member in enum_class)
            raise ValueError(f"unknown {what} {value!r}; use one of: {names}") from None

    return coerce


_state = _member_of(JobState, "job state")


def _json_object(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    json.dumps(value, allow_nan=False)
    return dict(value)


def timestamp(value: Any) -> datetime | None:
    """Epoch seconds, an ISO-8601 string or a datetime, as an aware UTC datetime (naive means UTC)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("expected a timestamp, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite epoch time, got {value!r}")
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise TypeError(f"expected epoch seconds or an ISO-8601 string, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def usd(value: Any) -> Decimal | None:
    """A cost as an exact Decimal. Strings are best; a float is read as its shortest repr."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("expected a decimal amount, got a boolean")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"expected a decimal amount, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"expected a finite amount >= 0, got {value!r}")
    return amount


JOB_FIELDS: dict[str, Coerce] = {
    "job_id": _text,
    "batch_id": _text,
    "custom_id": _text,
    "state": _state,
    "requested_model": _text,
    "provider": _text,
    "model": _text,
    "caller": _label,
    "metadata": _json_object,
    "content": _text,
    "error_type": _text,
    "error_message": _text,
    "attempts": _count,
    "created_at": timestamp,
    "finished_at": timestamp,
    # The job's kind, stored in the `kind` column (the row's own `kind` says it is a job row).
    "job_kind": _member_of(JobKind, "job kind"),
    "lane": _member_of(Lane, "lane"),
}

ATTEMPT_FIELDS: dict[str, Coerce] = {
    "job_id": _text,
    "attempt": _count,
    "provider": _text,
    "model": _text,
    "outcome": _text,
    "error_type": _text,
    "error_message": _text,
    "status_code": _integer,
    "provider_request_id": _text,
    "started_at": timestamp,
    "finished_at": timestamp,
    "latency_ms": _milliseconds,
}

USAGE_FIELDS: dict[str, Coerce] = {
    "job_id": _text,
    "attempt": _count,
    "provider": _text,
    "provider_type": _text,
    "model": _text,
    "prompt_tokens": _count,
    "completion_tokens": _count,
    "total_tokens": _count,
    "cached_read_tokens": _count,
    "cache_write_tokens": _count,
    "reasoning_tokens": _count,
    "cost_usd": usd,
    "price_tier": _text,
    "standard_cost_usd": usd,
    "priced": _flag,
    "cached": _flag,
    "simulated": _flag,
    "caller": _label,
    "batch_id": _text,
    "latency_ms": _milliseconds,
    "created_at": timestamp,
}

FIELDS_BY_KIND: dict[str, dict[str, Coerce]] = {
    "job": JOB_FIELDS, "attempt": ATTEMPT_FIELDS, "usage": USAGE_FIELDS,
    "provider_batch": PROVIDER_BATCH_FIELDS, "provider_batch_line": PROVIDER_BATCH_LINE_FIELDS,
}
REQUIRED_BY_KIND: dict[str, tuple[str, ...]] = {
    "job": ("job_id", "state"),
    "attempt": ("job_id", "attempt"),
    "usage": ("job_id", "attempt"),
    "provider_batch": ("provider_batch_id", "state"),
    "provider_batch_line": ("provider_batch_id", "job_id"),
}


class PreparedRows(NamedTuple):
    """One batch of outbox rows, checked and folded to one row per key."""

    jobs: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    usage: list[dict[str, Any]]
    provider_batches: list[dict[str, Any]]
    provider_batch_lines: list[dict[str, Any]]


def check_row(index: int, raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """One outbox row, checked and converted: (kind, column values)."""
    kind = raw.get("kind")
    fields = FIELDS_BY_KIND.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ValueError(f"row {index}: kind must be one of {', '.join(FIELDS_BY_KIND)}, got {kind!r}")
    unknown = sorted(set(raw) - set(fields) - {"kind"})
    if unknown:
        raise ValueError(f"row {index} ({kind}): unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [name for name in REQUIRED_BY_KIND[kind] if raw.get(name) is None]
    if missing:
        raise ValueError(f"row {index} ({kind}): missing required field(s) {', '.join(missing)}")
    row: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "kind":
            continue
        try:
            row[name] = fields[name](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"row {index} ({kind}) field {name!r}: {exc}") from None
    return kind, _complete(kind, row)


def _complete(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    if kind == "job" and "job_kind" in row:
        row["kind"] = row.pop("job_kind")
    if kind == "job" and "caller" not in row and isinstance(row.get("metadata"), dict):
        row["caller"] = _label(row["metadata"].get("caller"))
    if kind == "usage":
        if row.get("cached"):
            # An answer from llmq's own cache cost nothing, whatever the row says.
            row["cost_usd"], row["priced"] = Decimal(0), True
        row.setdefault("priced", row.get("cost_usd") is not None)
        if not row["priced"]:
            row["cost_usd"] = None
    return row


def prepare_rows(rows: Iterable[Mapping[str, Any]]) -> PreparedRows:
    """Check every row, then fold the batch to one row per key.

    Folding applies the same rules as the SQL upserts, in batch order, so one
    statement never has to touch a row twice.
    """
    jobs: dict[str, dict[str, Any]] = {}
    attempts: dict[tuple[str, int], dict[str, Any]] = {}
    usage: dict[tuple[str, int], dict[str, Any]] = {}
    batches: dict[str, dict[str, Any]] = {}
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for index, raw in enumerate(rows):
        kind, row = check_row(index, raw)
        if kind == "job":
            _fold(jobs, row["job_id"], row, _job_may_replace)
        elif kind == "attempt":
            _fold(attempts, (row["job_id"], row["attempt"]), row, _attempt_may_replace)
        elif kind == "usage":
            usage.setdefault((row["job_id"], row["attempt"]), row)
        elif kind == "provider_batch":
            _fold(batches, row["provider_batch_id"], row, provider_batch_may_replace)
        else:
            lines.setdefault((row["provider_batch_id"], row["job_id"]), row)
    return PreparedRows(*(list(folded.values()) for folded in (jobs, attempts, usage, batches, lines)))


def _fold(
    folded: dict[Any, dict[str, Any]],
    key: Any,
    row: dict[str, Any],
    may_replace: Callable[[dict[str, Any], dict[str, Any]], bool],
) -> None:
    current = folded.get(key)
    if current is None:
        folded[key] = row
    elif may_replace(current, row):
        current.update(row)


def job_state_is_terminal(state: str | None) -> bool:
    return state is not None and JobState(state).terminal


def _job_may_replace(current: dict[str, Any], incoming: dict[str, Any]) -> bool:
    return not job_state_is_terminal(current["state"]) or job_state_is_terminal(incoming["state"])


def attempt_is_open(outcome: str | None) -> bool:
    return outcome is None or outcome in OPEN_ATTEMPT_OUTCOMES


def _attempt_may_replace(current: dict[str, Any], incoming: dict[str, Any]) -> bool:
    return attempt_is_open(current.get("outcome")) or not attempt_is_open(incoming.get("outcome"))
