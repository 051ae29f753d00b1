"""One attempt of one job: claim -> provider -> record -> next hop.

The retry layer lives here and only here. On an error the class decides:
retryable -> the same provider again after backoff (waiting in the delayed set,
never in worker memory); context window -> a larger model when the config names
one; fallback -> the same job id on the next provider's queue; otherwise the job
fails with the typed error and every attempt on record.

Every message ends in an outcome (worker/outcome.py) that the task tells Celery, and
so Flower: succeeded, handed on (a retry or the next hop), failed, cancelled, or
dropped (stale). It is decided by what the job record says after the step, never
changes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from llmq.contract.config import RetrySettings
from llmq.contract.jobs import WAITING_STATES, Transition, dump_response, dump_route
from llmq.contract.models import EmbeddingRequest, Hop, JobResponse, JobState, LLMResponse
from llmq.contract.routing import can_serve, larger_context_hop
from llmq.contract.tiers import PriceTier, ServiceTier
from llmq.worker import errors
from llmq.worker.attempt import Attempt, public_error
from llmq.worker.middleware.base import Defer, Serve, Skip
from llmq.worker.outcome import Cancelled, Dropped, Failed, HandedOn, Outcome, Succeeded
from llmq.worker.output import check_output
from llmq.worker.pricing import TierCost, tier_cost
from llmq.worker.runtime import Runtime
from llmq.worker.streaming import StreamWriter

log = logging.getLogger("llmq.worker")

async def execute(runtime: Runtime, job_id: str, dispatch: int) -> Outcome:
    lease_ms = int(runtime.config.service.jobs.lease_s * 1000)
    claim = await runtime.jobs.claim(job_id, dispatch, runtime.worker_id, lease_ms)
    if claim.outcome == "skip":
        log.debug("job %s: message for dispatch %s dropped (state %s)", job_id, dispatch, claim.state)
        return Cancelled() if claim.state == JobState.CANCELLED.value else Dropped()
    if claim.outcome == "expired":
        return await _fail_expired(runtime, job_id)
    attempt = Attempt.from_claim(claim.job, dispatch)
    runtime.running.add(job_id)
    try:
        return await _run(runtime, attempt)
    finally:
        runtime.running.discard(job_id)


async def _run(runtime: Runtime, attempt: Attempt) -> Outcome:
    verdict = await runtime.middleware.before_attempt(attempt)
    if isinstance(verdict, Defer):
        return await _defer(runtime, attempt, verdict)
    if isinstance(verdict, Skip):
        return await _after_error(runtime, attempt, verdict.error)
    if isinstance(verdict, Serve):
        usage_row = usage_record(runtime, attempt, verdict.response, cached=verdict.cached)
        await runtime.middleware.after_success(attempt, verdict.response, usage_row)
        return await _succeed(runtime, attempt, verdict.response, usage_row)
    try:
        response = await _call(runtime, attempt)
    except errors.ProviderError as error:
        await runtime.middleware.after_error(attempt, error)
        return await _after_error(runtime, attempt, error)
    except TimeoutError:
        error = errors.DeadlineExceededError(
            f"job did not finish before its deadline (ran out during attempt {attempt.attempt} "
            f"on {attempt.hop.provider}); raise jobs.deadline_s or the request's deadline"
        )
        await runtime.middleware.after_error(attempt, error)
        return await _fail(runtime, attempt, error)
    except Exception as exc:  # a bug in an adapter must not lose the job
        log.exception("job %s: unexpected error from provider %s", attempt.job_id, attempt.hop.provider)
        error = errors.ServerError(
            f"unexpected {type(exc).__name__} in adapter: {exc}", provider=attempt.hop.provider, model=attempt.hop.model
        )
        await runtime.middleware.after_error(attempt, error)
        return await _after_error(runtime, attempt, error)
    else:
        usage_row = usage_record(runtime, attempt, response)
        await runtime.middleware.after_success(attempt, response, usage_row)
        return await _succeed(runtime, attempt, response, usage_row)
    finally:
        await runtime.middleware.after_attempt(attempt)


async def _call(runtime: Runtime, attempt: Attempt) -> JobResponse:
    """The provider call itself, bounded by the job's deadline; a JSON answer checked before it counts."""
    provider = runtime.provider(attempt.hop.provider)
    update: dict[str, Any] = {"model": attempt.hop.model}
    if not isinstance(attempt.request, EmbeddingRequest):
        update["service_tier"] = service_tier(runtime, attempt)
        if update["service_tier"] == "flex":
            attempt.scratch["price_tier"] = "flex"
    request = attempt.request.model_copy(update=update)
    remaining_s = attempt.deadline_at_s - time.time()
    async with asyncio.timeout(max(0.001, remaining_s)):
        if isinstance(request, EmbeddingRequest):
            return await provider.embed(request, job_id=attempt.job_id)
        if request.stream and provider.supports_streaming:
            response = await _stream(runtime, attempt, provider.stream_generate(request, job_id=attempt.job_id))
        else:
            response = await provider.generate(request, job_id=attempt.job_id)
    if provider.supports_flex:  # the tier it ran at, where llmq chooses one: a refused flex call raised
        response.metadata["service_tier"] = request.service_tier
    # Costs one attribute read when no JSON was asked for.
    return check_output(request, response) if request.response_format is not None else response


def service_tier(runtime: Runtime, attempt: Attempt) -> ServiceTier:
    """The tier this call asks for: the job's own (set after a flex refusal), the request's, the entry's."""
    if not runtime.provider(attempt.hop.provider).supports_flex:
        return "standard"
    entry = runtime.config.provider(attempt.hop.provider)
    asked = None if isinstance(attempt.request, EmbeddingRequest) else attempt.request.service_tier
    return attempt.options.get("service_tier") or asked or entry.service_tier


def _standard_on_refusal(runtime: Runtime, attempt: Attempt) -> bool:
    allowed = attempt.options.get("flex_fallback")
    return runtime.config.provider(attempt.hop.provider).flex.standard_on_refusal if allowed is None else allowed


async def _stream(runtime: Runtime, attempt: Attempt, chunks: AsyncIterator[LLMResponse]) -> LLMResponse:
    """Relay chunks to the job's Redis Stream as they arrive; return the whole answer."""
    writer = _writer(runtime, attempt)
    parts: list[str] = []
    async for chunk in chunks:
        if chunk.metadata.get("final"):
            metadata = {key: value for key, value in chunk.metadata.items() if key != "final"}
            return chunk.model_copy(update={"content": "".join(parts), "metadata": metadata})
        if chunk.content or chunk.tool_call_deltas:
            parts.append(chunk.content)
            await writer.chunk(chunk, attempt.attempt)
    raise errors.MalformedResponseError(
        "stream ended without its final chunk", provider=attempt.hop.provider, model=attempt.hop.model
    )


def _writer(runtime: Runtime, attempt: Attempt) -> StreamWriter:
    if "stream" not in attempt.scratch:
        attempt.scratch["stream"] = StreamWriter(runtime.redis, attempt.job_id, runtime.config.service.jobs.result_ttl_s)
    return attempt.scratch["stream"]


async def _succeed(runtime: Runtime, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> Outcome:
    record = attempt.record("succeeded")
    done = await _move(
        runtime, attempt, JobState.SUCCEEDED, ttl_s=runtime.config.service.jobs.result_ttl_s, attempt=_public(record),
        rows=[record, usage_row], fields={"result": dump_response(response)},
    )
    if not done.moved:
        return _not_moved(done)
    if attempt.request.stream:
        assert isinstance(response, LLMResponse)
        await _writer(runtime, attempt).final(response, attempt.attempt)
    return Succeeded.from_usage(usage_row)


async def _defer(runtime: Runtime, attempt: Attempt, verdict: Defer) -> Outcome:
    """Set the job aside without a call: it does not count as an attempt."""
    done = await _move(
        runtime, attempt, verdict.state, delay_ms=int(verdict.delay_s * 1000), new_dispatch=True,
        fields={"attempt": attempt.attempt - 1, "hop_attempt": attempt.hop_attempt - 1, "waiting_for": verdict.reason},
    )
    if not done.moved:
        return _not_moved(done)
    return HandedOn.to(verdict.reason or "capacity", attempt.hop, attempt.attempt, new_hop=False,
                       delay_s=verdict.delay_s)


async def _move(runtime: Runtime, attempt: Attempt, new_state: JobState, /, **step: Any) -> Transition:
    """Move the job this attempt holds (running, or waiting in a provider batch) on its dispatch."""
    fields = dict(step.pop("fields", None) or {})
    if attempt.holds is JobState.IN_PROVIDER_BATCH:
        fields["provider_batch"] = ""  # it no longer waits in one
    return await runtime.jobs.transition(
        attempt.job_id, new_state=new_state, allowed=(attempt.holds,), expected_dispatch=attempt.dispatch,
        fields=fields, **step,
    )


def _not_moved(done: Transition) -> Outcome:
    """The job was no longer this attempt's to move: cancelled meanwhile, or taken over after a lost lease."""
    return Cancelled() if done.previous_state is JobState.CANCELLED else Dropped()


def usage_record(runtime: Runtime, attempt: Attempt, response: JobResponse, *, cached: bool = False) -> dict[str, Any]:
    entry = runtime.config.provider(attempt.hop.provider)
    provider = runtime.provider(attempt.hop.provider)
    tier: PriceTier = attempt.scratch.get("price_tier", "standard")
    price = TierCost(Decimal(0), True) if cached else tier_cost(
        entry.adapter_type, response.model, response.usage, overrides=entry.pricing, local=provider.local,
        tier=tier, discount=entry.flex.discount if tier == "flex" else entry.batch_api.discount,
    )
    cost, priced = price.cost_usd, price.priced
    return {
        "kind": "usage",
        "job_id": attempt.job_id,
        "attempt": attempt.attempt,
        "provider": attempt.hop.provider,
        "provider_type": entry.adapter_type,
        "model": response.model,
        **response.usage.model_dump(),
        "cost_usd": None if cost is None else str(cost),
        "price_tier": "standard" if cached else tier,
        "standard_cost_usd": None if price.standard_cost_usd is None else str(price.standard_cost_usd),
        "priced": priced,
        "cached": cached,
        "simulated": bool(response.metadata.get("simulated")),
        "caller": attempt.request.metadata.get("caller"),
        "batch_id": attempt.batch_id,
        "latency_ms": round((time.time() - attempt.started_at_s) * 1000, 3),
        "created_at": time.time(),
    }


async def _after_error(runtime: Runtime, attempt: Attempt, error: errors.ProviderError) -> Outcome:
    settings = runtime.config.service.retry
    log.info("job %s attempt %d on %s failed: %s", attempt.job_id, attempt.attempt, attempt.hop.provider, error)
    if isinstance(error, errors.FlexCapacityError) and _standard_on_refusal(runtime, attempt):
        # The same hop again at once, at the standard tier: the job's options now say so.
        return await _requeue(runtime, attempt, error, state=JobState.RETRYING, route_index=attempt.route_index,
                              options={**attempt.options, "service_tier": "standard"})
    if error.retryable and attempt.hop_attempt < _attempts_allowed(error, settings):
        # An answer that missed its schema is asked for again at once: the provider is not busy.
        invalid = isinstance(error, errors.OutputValidationError)
        delay_s = 0.0 if invalid else backoff_s(attempt.hop_attempt, error.retry_after_s, settings)
        state = JobState.RATE_LIMITED if isinstance(error, errors.RateLimitedError) else JobState.RETRYING
        return await _requeue(runtime, attempt, error, state=state, delay_s=delay_s)
    if isinstance(error, errors.ContextWindowExceededError):
        bigger = larger_context_hop(attempt.hop, runtime.config, attempt.request)
        if bigger is not None and bigger not in attempt.route:
            route = [*attempt.route[: attempt.route_index + 1], bigger, *attempt.route[attempt.route_index + 1 :]]
            return await _requeue(runtime, attempt, error, state=JobState.QUEUED, route=route,
                                  route_index=attempt.route_index + 1)
    next_index = _next_hop(runtime, attempt) if error.fallback else None
    if next_index is not None:
        return await _requeue(runtime, attempt, error, state=JobState.QUEUED, route_index=next_index)
    return await _fail(runtime, attempt, error)


def _attempts_allowed(error: errors.ProviderError, settings: RetrySettings) -> int:
    """Attempts on one hop before the job moves on: fewer for an answer that missed its schema."""
    if isinstance(error, errors.OutputValidationError):
        return min(settings.max_attempts_per_provider, 1 + settings.invalid_output_retries)
    return settings.max_attempts_per_provider


def _next_hop(runtime: Runtime, attempt: Attempt) -> int | None:
    """The next hop on the route that is configured and whose model can serve the request."""
    for index in range(attempt.route_index + 1, len(attempt.route)):
        hop = attempt.route[index]
        if runtime.config.provider(hop.provider).configured and can_serve(hop, attempt.request, runtime.config):
            return index
    return None


async def _requeue(
    runtime: Runtime,
    attempt: Attempt,
    error: errors.LLMQError,
    *,
    state: JobState,
    delay_s: float = 0.0,
    route: list[Hop] | None = None,
    route_index: int | None = None,
    options: dict[str, Any] | None = None,
) -> Outcome:
    """Send the same job id on: later to the same provider, or now to another hop's queue."""
    details = public_error(error)
    fields: dict[str, Any] = {"error": json.dumps(details)}
    if options is not None:
        fields["options"] = json.dumps(options)
    if route is not None:
        fields["route"] = dump_route(route)
    next_hop = attempt.hop
    if route_index is not None:
        next_hop = (route or attempt.route)[route_index]
        # Its queue, and what Flower shows for its next message (the promoter publishes it).
        fields.update(route_index=route_index, hop_attempt=0, **attempt.hop_fields(next_hop))
    record = attempt.record("error", error)
    done = await _move(
        runtime, attempt, state, delay_ms=int(delay_s * 1000), new_dispatch=True, attempt=_public(record),
        rows=[record], fields=fields,
    )
    if not done.moved:
        return _not_moved(done)
    if attempt.request.stream and _writer(runtime, attempt).sent_chunks:
        # Readers drop what this attempt streamed; the next attempt's chunks follow the marker.
        await _writer(runtime, attempt).reset(attempt.attempt, attempt.hop.provider, attempt.hop.model, details)
    # delay 0: the promoter publishes within its next tick (< 0.1 s); its safety net covers a crash here.
    return HandedOn.to(details, next_hop, attempt.attempt + 1, new_hop=route_index is not None, delay_s=delay_s)


async def _fail(runtime: Runtime, attempt: Attempt, error: errors.LLMQError) -> Outcome:
    details = public_error(error)
    record = attempt.record("error", error)
    done = await _move(
        runtime, attempt, JobState.FAILED, new_dispatch=True, ttl_s=runtime.config.service.jobs.result_ttl_s,
        attempt=_public(record), rows=[record], fields={"error": json.dumps(details)},
    )
    if not done.moved:
        return _not_moved(done)
    if attempt.request.stream:
        await _writer(runtime, attempt).error(details)
    return Failed(details)


async def settle_line(
    runtime: Runtime, attempt: Attempt, response: JobResponse | None, error: errors.ProviderError | None
) -> Outcome:
    """A provider batch line's result, taken as a call's (worker/batches/settle.py): an answer at batch
    prices, or an error that sends the job on its route, unless the caller asked for batch-only."""
    attempt.scratch["price_tier"] = "batch"
    request = attempt.request
    if isinstance(response, LLMResponse) and not isinstance(request, EmbeddingRequest) and request.response_format:
        try:  # JSON that misses its schema is no answer, as in a call (worker/output.py)
            response = check_output(request, response)
        except errors.OutputValidationError as invalid:
            response, error = None, invalid
    if response is not None:
        usage_row = usage_record(runtime, attempt, response)
        await runtime.middleware.after_success(attempt, response, usage_row)
        return await _succeed(runtime, attempt, response, usage_row)
    assert error is not None
    if attempt.options.get("batch_only"):
        return await _fail(runtime, attempt, error)
    return await _after_error(runtime, attempt, error)


async def _fail_expired(runtime: Runtime, job_id: str) -> Outcome:
    details = public_error(errors.DeadlineExceededError(
        "job did not start before its deadline; raise jobs.deadline_s or the request's deadline, or add workers"
    ))
    done = await runtime.jobs.transition(
        job_id, new_state=JobState.FAILED, allowed=WAITING_STATES, new_dispatch=True,
        ttl_s=runtime.config.service.jobs.result_ttl_s, fields={"error": json.dumps(details)},
    )
    return Failed(details) if done.moved else _not_moved(done)


def backoff_s(hop_attempt: int, retry_after_s: float | None, settings: RetrySettings) -> float:
    """Exponential backoff with jitter; a provider's retry-after wins, up to the cap."""
    if retry_after_s is not None:
        return min(retry_after_s, settings.retry_after_cap_s) * random.uniform(1.0, 1.1)
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** max(0, hop_attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in {"kind", "job_id"}}
