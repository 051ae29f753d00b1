"""Provider batches in the SQL ledger: one row per provider batch, one per line.

Their outbox rows come from the provider batch scripts (contract/lua/provider_batch_*.lua):
a `provider_batch` row carries the whole Redis record as it stood after a step (strings,
times in epoch milliseconds), a `provider_batch_line` row one job taken into it. Writes are
idempotent like the rest of the ledger (ledger.py writes them): a provider batch row takes the newest record, except
that an ended one is never replaced by an earlier step; a line is written once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from llmq.contract.provider_batches import ProviderBatchState

ENDED = ProviderBatchState.ENDED.value


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _whole(value: Any) -> int | None:
    return None if value is None or value == "" else int(float(value))


def _epoch_ms(value: Any) -> datetime | None:
    return None if value is None or value == "" else datetime.fromtimestamp(float(value) / 1000.0, UTC)


def _json(value: Any) -> Any:
    if value is None or value == "":
        return None
    return json.loads(value) if isinstance(value, str) else value


def _state(value: Any) -> str:
    return ProviderBatchState(value).value


PROVIDER_BATCH_FIELDS: dict[str, Callable[[Any], Any]] = {
    "provider_batch_id": _text, "provider": _text, "model": _text, "endpoint": _text, "state": _state,
    "remote_state": _text, "remote_id": _text, "input_file": _text, "lines": _whole, "bytes": _whole,
    "window_s": _whole, "batch_ids": _json, "counts": _json, "error": _text, "submit_attempts": _whole,
    "created_at": _epoch_ms, "updated_at": _epoch_ms, "submit_started_at": _epoch_ms, "submitted_at": _epoch_ms,
    "patience_at": _epoch_ms, "ended_at": _epoch_ms,
}
PROVIDER_BATCH_LINE_FIELDS: dict[str, Callable[[Any], Any]] = {"provider_batch_id": _text, "job_id": _text}


def may_replace(current: dict[str, Any], incoming: dict[str, Any]) -> bool:
    """A later step replaces an earlier one; nothing replaces the end."""
    return current.get("state") != ENDED or incoming.get("state") == ENDED
