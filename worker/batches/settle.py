"""A provider batch line's result, settled on its job like the result of a call.

The job must still wait in this provider batch (its `provider_batch` field names it): a line
settled before (a poller that died part-way through, then the next one reading the results
again) is skipped, so each line is settled once. A job that ended while it waited (cancelled,
or past its deadline) still gets its attempt and usage row on record: the provider answered,
and charged, all the same (transition.lua records the attempt as cancelled or superseded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmq.contract import keys
from llmq.contract.models import JobState, LLMResponse
from llmq.worker import errors
from llmq.worker.attempt import Attempt
from llmq.worker.engine import settle_line
from llmq.worker.outcome import Outcome

if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime


async def settle(
    runtime: Runtime, provider_batch_id: str, job_id: str, *,
    response: LLMResponse | None = None, error: errors.ProviderError | None = None,
) -> Outcome | None:
    """Settle one line's answer or error on its job; None when the line was settled already."""
    raw = await runtime.redis.hgetall(keys.job(job_id))
    if not raw or raw.get("provider_batch") != provider_batch_id:
        return None
    attempt = Attempt.from_claim(raw, int(raw["dispatch"]))
    attempt.holds = JobState.IN_PROVIDER_BATCH
    # The attempt began when the line was taken into the provider batch (provider_batch_claim.lua).
    attempt.started_at_s = int(raw.get("started_at") or 0) / 1000.0 or attempt.started_at_s
    return await settle_line(runtime, attempt, response, error)
