"""Tending provider entries' provider batches: a worker's background loop, and beat's task."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.config import LLMConfig
from llmq.contract.tiers import PROVIDER_BATCH_DEFAULTS, provider_batch_limits
from llmq.worker.batches.assemble import assemble, release_intake
from llmq.worker.batches.poll import tend_provider_batch
from llmq.worker.batches.registry import batch_api_for

if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.batches")

#: How often a worker looks at its provider entries' intakes and provider batches; each provider
#: batch is polled only when its own next poll comes.
INTERVAL_S = 0.5


async def tend(runtime: Runtime, provider: str) -> None:
    """One pass over a provider entry: group its intake into provider batches, then tend those due."""
    entry = runtime.config.providers.get(provider)
    if entry is None or not entry.configured:
        return
    limits = provider_batch_limits(entry)
    api = batch_api_for(runtime.provider(provider)) if limits is not None else None
    if limits is None or api is None:
        if await release_intake(runtime, provider):
            log.warning("provider %s has no batch API on: its waiting jobs went to the normal lane", provider)
        return
    made = await assemble(runtime, api, limits)
    due = await runtime.provider_batches.due(provider, await runtime.jobs.now_ms())
    for provider_batch_id in dict.fromkeys([*made, *due]):
        await tend_provider_batch(runtime, api, limits, provider_batch_id)


async def tend_all(runtime: Runtime) -> None:
    """Tend every provider entry this worker serves that may have provider batches."""
    served = set(runtime.settings.consumed_queues)
    for name, entry in runtime.config.providers.items():
        if keys.queue_name(name) in served and entry.configured and entry.adapter_type in PROVIDER_BATCH_DEFAULTS:
            try:
                await tend(runtime, name)
            except Exception as exc:  # a provider batch that cannot be tended now is tried again next pass
                log.warning("provider batches of %s: %s: %s", name, type(exc).__name__, exc)


def beat_schedule(config: LLMConfig) -> dict[str, dict[str, Any]]:
    """Beat's entry per provider entry with a batch API: tend its provider batches on its own queue."""
    schedule: dict[str, dict[str, Any]] = {}
    for name, entry in config.providers.items():
        limits = provider_batch_limits(entry)
        if limits is None or not entry.enabled:
            continue
        queue = keys.queue_name(name)
        schedule[f"llmq provider batches {name}"] = {
            "task": keys.TASK_PROVIDER_BATCHES, "schedule": limits.poll_min_s, "args": (name,),
            "options": {"queue": queue, "routing_key": queue, "expires": limits.poll_min_s},
        }
    return schedule


async def provider_batch_loop(runtime: Runtime) -> None:
    """A worker's background loop (worker/app.py hands it to the runtime): no beat needed."""
    while True:
        await asyncio.sleep(INTERVAL_S)
        try:
            await tend_all(runtime)
        except Exception as exc:  # Redis restarting: keep going
            log.warning("provider batches: %s", exc)
