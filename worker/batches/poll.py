"""Tending one provider batch: submit it, poll it, cancel it, settle its lines.

Every step runs under the provider batch's lock (one process at a time, renewed while it
works) and begins from the record in Redis, so any worker, or beat's task, may take the next
step after another died:

- `submitting`: if an earlier try may have reached the provider (`submit_attempts` > 0), look
  for the batch it made first (`find`: by metadata or display name, or for Anthropic by size
  and time), and adopt it; else record the try, then submit. A retryable failure tries again
  at the next poll; any other failure, or a window spent without getting the batch in, sends
  every line back on its route.
- `submitted`: poll, backing off as the batch ages (age / 10, within poll_min_s..poll_max_s).
  Cancel it at the provider when every llmq batch it serves was cancelled, or when the job's
  window ran out (Azure does not expire a late batch; the lines then count as expired).
- once the provider says it ended: settle each line's answer or error on its job
  (worker/batches/settle.py); a line it never ran goes back on its route; then `ended`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.provider_batches import ProviderBatchState
from llmq.contract.tiers import ProviderBatchLimits
from llmq.worker import errors
from llmq.worker.batches.base import Line, LineResult, ProviderBatchAPI, RemoteBatch
from llmq.worker.batches.lines import held, load_lines
from llmq.worker.batches.settle import settle
from llmq.worker.logs import redact

if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.batches")

#: Held while a step runs, renewed every third of it: a dead holder blocks the next for at most this long.
LOCK_MS = 10_000
#: Lines settled at once (each is one read and one transition in Redis).
SETTLE_CONCURRENCY = 64


async def tend_provider_batch(
    runtime: Runtime, api: ProviderBatchAPI, limits: ProviderBatchLimits, provider_batch_id: str
) -> None:
    async with held(runtime.redis, keys.provider_batch_lock(provider_batch_id), LOCK_MS) as mine:
        if not mine:
            return
        raw = await runtime.provider_batches.raw(provider_batch_id)
        if not raw or raw["state"] == ProviderBatchState.ENDED.value:
            await runtime.redis.zrem(keys.provider_batches_open(api.name), provider_batch_id)
            return
        tender = Tender(runtime, api, limits, raw, await runtime.jobs.now_ms())
        if raw["state"] == ProviderBatchState.SUBMITTING.value:
            await tender.submit()
        else:
            await tender.poll()


class Tender:
    """One step of one provider batch, from its record as it stands."""

    def __init__(
        self, runtime: Runtime, api: ProviderBatchAPI, limits: ProviderBatchLimits, raw: dict[str, str], now_ms: int
    ) -> None:
        self.runtime, self.api, self.limits, self.raw, self.now_ms = runtime, api, limits, raw, now_ms
        self.id = raw["provider_batch_id"]
        self.window_ms = int(float(raw.get("window_s") or limits.window_s) * 1000)

    async def lines(self) -> list[Line]:
        return await load_lines(self.runtime.redis, await self.runtime.provider_batches.job_ids(self.id))

    async def update(self, fields: dict[str, Any], *, next_poll_ms: int | None) -> None:
        await self.runtime.provider_batches.update(self.id, self.api.name, fields, next_poll_ms=next_poll_ms)

    def next_poll_ms(self) -> int:
        """Poll less often as the batch ages: a tenth of its age, within the entry's bounds."""
        age_s = (self.now_ms - int(self.raw.get("submitted_at") or self.raw["created_at"])) / 1000
        return int(min(self.limits.poll_max_s, max(self.limits.poll_min_s, age_s / 10)) * 1000)

    # --- submitting -----------------------------------------------------------------------

    async def submit(self) -> None:
        lines = await self.lines()
        tries = int(self.raw.get("submit_attempts") or 0)
        if tries:
            found = await self.api.find(self.id, lines, int(self.raw["submit_started_at"]) / 1000, await self.taken())
            if found is not None:
                log.warning("provider batch %s: adopted %s, made by an earlier try", self.id, found.remote_id)
                await self.submitted(found)
                return
        if not lines or self.now_ms > int(self.raw["created_at"]) + self.window_ms:
            await self.give_up(lines, "the provider batch could not be submitted within the job's window")
            return
        started = self.raw.get("submit_started_at") or self.now_ms  # the first try's time: find() looks after it
        await self.update({"submit_attempts": tries + 1, "submit_started_at": started},
                          next_poll_ms=int(self.limits.poll_min_s * 1000))
        try:
            remote = await self.api.submit(self.id, lines, self.raw.get("endpoint", ""), self.window_ms / 1000)
        except errors.ProviderError as error:
            if error.retryable:
                await self.update({"error": redact(str(error))}, next_poll_ms=int(self.limits.poll_min_s * 1000))
                return
            await self.give_up(lines, f"the provider refused the batch: {redact(str(error))}")
            return
        await self.submitted(remote)

    async def taken(self) -> frozenset[str]:
        """Remote ids the entry's other provider batches hold (a lost batch is never one of these)."""
        store = self.runtime.provider_batches
        others = [await store.raw(other) for other in await store.open_ids(self.api.name) if other != self.id]
        return frozenset(raw["remote_id"] for raw in others if raw.get("remote_id"))

    async def submitted(self, remote: RemoteBatch) -> None:
        await self.update({
            "state": ProviderBatchState.SUBMITTED.value, "remote_id": remote.remote_id, "remote_state": remote.raw_state,
            "input_file": remote.input_file or "", "submitted_at": self.now_ms, "error": "",
            "patience_at": int(self.raw.get("created_at") or self.now_ms) + self.window_ms,
            "counts": json.dumps(remote.counts),
        }, next_poll_ms=int(self.limits.poll_min_s * 1000))

    async def give_up(self, lines: list[Line], reason: str) -> None:
        log.warning("provider batch %s: %s; its %d lines go back on their routes", self.id, reason, len(lines))
        await self.settle_all(lines, [], lambda line: self.api.not_run(line, reason))
        await self.end(None, error=reason)

    # --- polling --------------------------------------------------------------------------

    async def poll(self) -> None:
        try:
            remote = await self.api.get(self.raw["remote_id"])
        except errors.ProviderError as error:
            if error.retryable:
                await self.update({"error": redact(str(error))}, next_poll_ms=self.next_poll_ms())
                return
            await self.give_up(await self.lines(), f"the provider no longer answers for it: {redact(str(error))}")
            return
        if not remote.ended and self.raw["state"] == ProviderBatchState.SUBMITTED.value:
            reason = await self.cancel_reason()
            if reason is not None:
                log.warning("provider batch %s: cancelling %s at the provider: %s", self.id, remote.remote_id, reason)
                remote = await self.api.cancel(remote.remote_id)
                await self.update({"state": ProviderBatchState.CANCELLING.value, "error": reason},
                                  next_poll_ms=int(self.limits.poll_min_s * 1000))
        if not remote.ended:
            await self.update({"remote_state": remote.raw_state, "counts": json.dumps(remote.counts)},
                              next_poll_ms=self.next_poll_ms())
            return
        await self.collect(remote)

    async def cancel_reason(self) -> str | None:
        if self.now_ms > int(self.raw.get("patience_at") or 0) > 0:
            return "the job's completion window ran out before the provider finished"
        batch_ids = json.loads(self.raw.get("batch_ids") or "[]")
        if not batch_ids:
            return None
        pipe = self.runtime.redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hget(keys.batch(batch_id), "cancel_requested")
        if all(flag == "1" for flag in await pipe.execute()):
            return "every llmq batch it serves was cancelled"
        return None

    async def collect(self, remote: RemoteBatch) -> None:
        """Settle every line, then end the provider batch."""
        lines = await self.lines()
        expired = remote.state == "expired" or self.now_ms > int(self.raw.get("patience_at") or 0) > 0
        reason = remote.error or f"the provider batch ended {remote.raw_state} without running this line"
        results = [result async for result in self.api.results(remote, lines)]
        await self.settle_all(lines, results, lambda line: self.api.not_run(line, reason, expired=expired))
        await self.end(remote)

    async def settle_all(self, lines: list[Line], results: list[LineResult], missing: Any) -> None:
        by_key = {line.key: line for line in lines}
        answered = {result.key for result in results}
        work = [(by_key[result.key].job_id, result.response, result.error) for result in results if result.key in by_key]
        work += [(line.job_id, None, missing(line)) for line in lines if line.key not in answered]
        gate = asyncio.Semaphore(SETTLE_CONCURRENCY)

        async def one(job_id: str, response: Any, error: Any) -> None:
            async with gate:
                await settle(self.runtime, self.id, job_id, response=response, error=error)

        await asyncio.gather(*(one(*item) for item in work))

    async def end(self, remote: RemoteBatch | None, *, error: str | None = None) -> None:
        fields: dict[str, Any] = {"state": ProviderBatchState.ENDED.value, "ended_at": self.now_ms}
        if remote is not None:
            fields.update(remote_state=remote.raw_state, counts=json.dumps(remote.counts))
        if error is not None:
            fields["error"] = error
        await self.update(fields, next_poll_ms=None)
