"""Provider batches: jobs with a completion window, sent together to a provider's batch API.

A provider batch groups the lines of one provider entry and model (jobs from any llmq batch)
into one batch of the provider's own (OpenAI's `/v1/batches`, Anthropic's Message Batches,
Gemini's batch mode). Its record lives in Redis beside the jobs (keys.provider_batch) and in
the SQL ledger (`llmq_provider_batches`, one row per line in `llmq_provider_batch_lines`),
and changes only through the scripts beside this module:

- `provider_batch_claim.lua` takes jobs from the entry's intake into a new record, state
  `submitting`: the intent to submit, recorded before any call to the provider;
- `provider_batch_update.lua` records each step after it: `submitted` (the provider's batch id
  is known), `cancelling`, and `ended` once every line is settled.

Each line's job stays an ordinary job (state `in_provider_batch`, field `provider_batch`);
its result moves it through transition.lua like any attempt (worker/batches/settle.py).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from llmq.contract import keys
from llmq.contract.scripts import read_script


class ProviderBatchState(str, Enum):
    #: Lines taken, intent recorded; the provider does not know of it yet (or we have not seen its answer).
    SUBMITTING = "submitting"
    #: The provider has it (`remote_id`); polled until it ends.
    SUBMITTED = "submitted"
    #: Asked the provider to cancel it (its llmq batches were cancelled, or the window ran out).
    CANCELLING = "cancelling"
    #: Every line settled. Final.
    ENDED = "ended"


class ProviderBatchRecord(BaseModel):
    """What `status` shows of a provider batch."""

    provider_batch_id: str
    provider: str
    model: str
    endpoint: str = ""
    state: ProviderBatchState
    #: The provider's own status, in the provider's words (validating, in_progress, ended, ...).
    remote_state: str | None = None
    #: The provider's id for the batch (OpenAI `batch_...`, Anthropic `msgbatch_...`, Gemini `batches/...`).
    remote_id: str | None = None
    lines: int = 0
    bytes: int = 0
    window_s: float | None = None
    batch_ids: list[str] = []
    #: The provider's request counts (succeeded, failed, expired, ...), as it last reported them.
    counts: dict[str, int] = {}
    error: str | None = None
    created_at: float | None = None
    submitted_at: float | None = None
    ended_at: float | None = None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> ProviderBatchRecord:
        return cls(
            provider_batch_id=raw["provider_batch_id"], provider=raw["provider"], model=raw["model"],
            endpoint=raw.get("endpoint", ""), state=ProviderBatchState(raw["state"]),
            remote_state=raw.get("remote_state") or None, remote_id=raw.get("remote_id") or None,
            lines=int(raw.get("lines") or 0), bytes=int(raw.get("bytes") or 0),
            window_s=float(raw["window_s"]) if raw.get("window_s") else None,
            batch_ids=json.loads(raw.get("batch_ids") or "[]"), counts=json.loads(raw.get("counts") or "{}"),
            error=raw.get("error") or None, created_at=_seconds(raw.get("created_at")),
            submitted_at=_seconds(raw.get("submitted_at")), ended_at=_seconds(raw.get("ended_at")),
        )

    def describe(self) -> str:
        remote = f" {self.remote_id}" if self.remote_id else ""
        status = self.remote_state or self.state.value
        return f"{self.provider_batch_id}: {self.provider}/{self.model}, {self.lines} lines, {status}{remote}"


class ProviderBatchStore:
    """Provider batch records in Redis (redis.asyncio client, decode_responses=True)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(read_script(__file__, "provider_batch_claim.lua"))
        self._update = client.register_script(read_script(__file__, "provider_batch_update.lua"))

    async def claim(
        self, provider_batch_id: str, provider: str, job_ids: list[str], fields: dict[str, Any], *, first_poll_ms: int
    ) -> list[str]:
        """Take these jobs from the entry's intake into a new provider batch; returns those taken."""
        taken = await self._claim(
            keys=[
                keys.provider_batch(provider_batch_id), keys.provider_batch_jobs(provider_batch_id),
                keys.provider_batch_intake(provider), keys.provider_batches_open(provider), keys.OUTBOX,
            ],
            args=[
                provider_batch_id, keys.JOB_KEY_PREFIX, keys.BATCH_KEY_PREFIX, keys.BATCH_PROVIDER_BATCHES_SUFFIX,
                first_poll_ms, json.dumps({"provider": provider, **fields}), *job_ids,
            ],
        )
        return list(taken)

    async def update(
        self, provider_batch_id: str, provider: str, fields: dict[str, Any], *, next_poll_ms: int | None
    ) -> bool:
        """Set fields and schedule the next poll (None: the provider batch ended, poll no more)."""
        changed = await self._update(
            keys=[keys.provider_batch(provider_batch_id), keys.provider_batches_open(provider), keys.OUTBOX],
            args=[provider_batch_id, -1 if next_poll_ms is None else max(0, next_poll_ms), json.dumps(fields)],
        )
        return bool(int(changed))

    async def raw(self, provider_batch_id: str) -> dict[str, str]:
        return await self.redis.hgetall(keys.provider_batch(provider_batch_id))

    async def get(self, provider_batch_id: str) -> ProviderBatchRecord | None:
        raw = await self.raw(provider_batch_id)
        return ProviderBatchRecord.from_hash(raw) if raw else None

    async def job_ids(self, provider_batch_id: str) -> list[str]:
        return await self.redis.lrange(keys.provider_batch_jobs(provider_batch_id), 0, -1)

    async def intake(self, provider: str, limit: int) -> list[tuple[str, float]]:
        """Jobs waiting to be grouped, oldest first: (job id, epoch ms submitted)."""
        return await self.redis.zrange(keys.provider_batch_intake(provider), 0, limit - 1, withscores=True)

    async def due(self, provider: str, now_ms: int, limit: int = 100) -> list[str]:
        """Open provider batches whose next poll has come."""
        return await self.redis.zrangebyscore(keys.provider_batches_open(provider), "-inf", now_ms, start=0, num=limit)

    async def open_ids(self, provider: str) -> list[str]:
        return await self.redis.zrange(keys.provider_batches_open(provider), 0, -1)

    async def for_batch(self, batch_id: str) -> list[ProviderBatchRecord]:
        ids = sorted(await self.redis.smembers(keys.batch_provider_batches(batch_id)))
        found = [await self.get(provider_batch_id) for provider_batch_id in ids]
        return [record for record in found if record is not None]

    async def poke(self, records: list[ProviderBatchRecord]) -> None:
        """Poll these soon (their llmq batch was cancelled): only those still open."""
        now_ms = await _now_ms(self.redis)
        for record in records:
            await self.redis.zadd(keys.provider_batches_open(record.provider), {record.provider_batch_id: now_ms}, xx=True)


async def _now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _seconds(value: str | None) -> float | None:
    return int(float(value)) / 1000.0 if value else None
