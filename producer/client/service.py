"""LLMService: what callers use. Async first; `SyncLLMService` (client/sync.py) wraps it for scripts.

Everything is checked before anything is enqueued: the request (pydantic), its
route (a configured provider must serve the model), and for batches every line,
so a bad request never leaves half a batch in the queue.
`jobs` retries through a Redis restart (~30 s); `poller` fails fast, for waits and
checks that decide themselves how long to keep trying, and say why (client/waiting.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from llmq.client.errors import JobFailedError, RequestError, check_id, describe_validation_error
from llmq.client.status import read_cache_stats, read_workers_configured
from llmq.client.streams import read_stream
from llmq.client.submission import BatchItem, Submission, job_id_for, new_id
from llmq.client.typed import ResponseModels
from llmq.client.waiting import Notify, WaitWatch, ping, poll_client, require_served, wait_until_done
from llmq.contract import keys
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.jobs import JobStore, NewJob
from llmq.contract.models import (
    REQUEST_MODELS,
    BatchRecord,
    EmbeddingRequest,
    EmbeddingResponse,
    Hop,
    JobKind,
    JobRecord,
    JobRequest,
    JobState,
    Lane,
    LLMRequest,
    LLMResponse,
)
from llmq.contract.provider_batches import ProviderBatchRecord, ProviderBatchStore
from llmq.contract.queueing import async_redis, make_celery, publish_messages, redact_url, redis_url_source
from llmq.contract.queueing import redis_url as resolve_redis_url
from llmq.contract.routing import RoutingError, plan_route, spread_pools
from llmq.contract.validation import summarize_problems

SUBMIT_CHUNK = 500
#: The first chunk is small, so workers start on a large batch while the rest is being enqueued.
FIRST_SUBMIT_CHUNK = 50
#: How long the providers that live workers report configured are trusted (seconds).
WORKERS_CACHE_S = 5.0
#: How long an interactive call tries to reach Redis before it says it cannot (`ping`).
CONNECT_TIMEOUT_S = 2.0

RequestInput = LLMRequest | EmbeddingRequest | Mapping[str, Any]


class LLMService:
    def __init__(
        self, config: LLMConfig | str | None = None, *, redis_url: str | None = None,
        redis_max_connections: int | None = None,
    ) -> None:
        """`redis_max_connections`: the Redis pool's size (redis-py's default is 100); each stream
        being read holds a connection while it waits, so a server reading many at once needs more."""
        self.config = config if isinstance(config, LLMConfig) else load_config(config)
        self.redis_url = resolve_redis_url(redis_url)
        self._redis_url_source = redis_url_source(redis_url)
        self.redis_max_connections = redis_max_connections
        self.celery = make_celery(self.config, self.redis_url, name="llmq-producer")
        self._redis: aioredis.Redis | None = None
        self._jobs: JobStore | None = None
        self._poller: JobStore | None = None
        self._workers_configured: frozenset[str] = frozenset()
        self._workers_seen_at = float("-inf")
        #: The pydantic classes requests gave as response_format, by job id (this process only).
        self.response_models = ResponseModels()

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            options = {"max_connections": self.redis_max_connections} if self.redis_max_connections else {}
            self._redis = async_redis(self.redis_url, **options)
            self._jobs = JobStore(self._redis)
        return self._jobs

    @property
    def poller(self) -> JobStore:
        """Job records through a client that never retries and times out in seconds (waits, checks)."""
        if self._poller is None:
            self._poller = JobStore(poll_client(self.redis_url, CONNECT_TIMEOUT_S, self.redis_max_connections))
        return self._poller

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis, self._jobs = None, None
        if self._poller is not None:
            await self._poller.redis.aclose()
            self._poller = None

    async def ping(self) -> None:
        """RedisUnreachableError unless Redis answers within `CONNECT_TIMEOUT_S` (not the job client's ~30 s)."""
        await ping(self.poller.redis, f"{redact_url(self.redis_url)} ({self._redis_url_source})", CONNECT_TIMEOUT_S)

    async def require_live_worker(
        self, request: LLMRequest | Mapping[str, Any], lane: Lane | str = Lane.INTERACTIVE
    ) -> None:
        """Raise NoLiveWorkerError when no live worker consumes the lane's queue of any hop of the
        request's route (a worker older than lanes consumes only the batch queues)."""
        await self.workers_configured()
        route = plan_route(self.prepare(request), self.config, self._workers_configured)
        await require_served([keys.queue_name(hop.provider, Lane(lane)) for hop in route], self.poller.redis)

    # --- the ADR's interface ----------------------------------------------------------

    async def generate(
        self, request: LLMRequest | Mapping[str, Any], *, timeout_s: float | None = None,
        lane: Lane | str = Lane.INTERACTIVE,
    ) -> LLMResponse:
        """Submit one request and wait for its answer; raises JobFailedError if it fails.

        `lane`: `interactive` (the default) goes before every waiting batch job; `batch` waits its turn.
        With a pydantic class as `response_format`, the answer's `parsed` is an instance of it.
        """
        result = await self._run_to_end(self.prepare(request), timeout_s, lane)
        assert isinstance(result, LLMResponse)
        return result

    async def embed(
        self, input: str | list[str], *, model: str, timeout_s: float | None = None,
        lane: Lane | str = Lane.INTERACTIVE, **fields: Any,
    ) -> EmbeddingResponse:
        """Embed one text or many (`fields`: dimensions, provider, metadata, provider_options);
        returns the vectors in input order and the tokens counted."""
        request = self.prepare({"input": input, "model": model, **fields}, kind=JobKind.EMBEDDING)
        result = await self._run_to_end(request, timeout_s, lane)
        assert isinstance(result, EmbeddingResponse)
        return result

    async def _run_to_end(
        self, request: JobRequest, timeout_s: float | None, lane: Lane | str
    ) -> LLMResponse | EmbeddingResponse:
        job_id = await self.submit(request, lane=lane)
        job = await self.wait(job_id, timeout_s=timeout_s)
        assert isinstance(job, JobRecord)
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise JobFailedError(job)
        return job.result

    async def stream_generate(
        self, request: LLMRequest | Mapping[str, Any], *, deadline_s: float | None = None,
        lane: Lane | str = Lane.INTERACTIVE,
        on_notice: Notify | None = None,
    ) -> AsyncIterator[LLMResponse]:
        """Submit a request and yield its chunks as the worker receives them from the provider.

        Each chunk's metadata carries `job_id` and `stream_id`; pass them to `stream_job`
        to pick up after a disconnect. A chunk with metadata["reset"] means the provider
        failed part-way and the job moved on: drop what came before it. The last chunk has
        metadata["final"] and the usage of the whole answer.
        """
        await self.workers_configured()
        parsed = self.prepare(request)
        if not isinstance(parsed, LLMRequest):
            raise RequestError("request: an embedding job does not stream; use embed() or submit()")
        if not parsed.stream:
            parsed = parsed.model_copy(update={"stream": True})
        job_id = await self.submit(parsed, deadline_s=deadline_s, lane=lane)
        async for chunk in self.stream_job(job_id, on_notice=on_notice):
            yield chunk

    async def stream_job(
        self, job_id: str, after_id: str = "0-0", *, on_notice: Notify | None = None
    ) -> AsyncIterator[LLMResponse]:
        """Read a streamed job's chunks after `after_id`: none lost, none repeated, across reconnects.
        Chunks carry `tool_call_deltas`; the final one the whole `tool_calls` and `parsed`. `on_notice`
        hears why nothing comes (see `wait`); RedisUnreachableError after `client.redis_unreachable_s`."""
        give_up_s = self.config.service.client.redis_unreachable_s
        watch = WaitWatch(self.poller, job_id, give_up_s=give_up_s, on_notice=on_notice)
        async for chunk in read_stream(self.poller, job_id, after_id, watch=watch):
            yield self.response_models.response(job_id, chunk) if chunk.metadata.get("final") else chunk

    async def workers_configured(self) -> frozenset[str]:
        """Providers that live workers hold keys for, read from their heartbeats (cached a few seconds).

        Keys belong in the workers' environment; a caller without them can still route there.
        `submit`, `submit_batch` and the streaming calls refresh this before they validate;
        `prepare` alone uses what was last read.
        """
        now = time.monotonic()
        if now - self._workers_seen_at > WORKERS_CACHE_S:
            self._workers_seen_at = now
            self._workers_configured = await read_workers_configured(self.jobs.redis)
        return self._workers_configured

    def get_available_models(self) -> list[str]:
        models: list[str] = []
        for entry in self.config.providers.values():
            if entry.configured:
                models += [model for model in entry.models if model not in models]
        return models

    async def cache_stats(self) -> dict[str, dict[str, float]]:
        """Response-cache hits, misses and hit ratio per provider entry (last 7 days)."""
        return await read_cache_stats(self.jobs.redis, self.config)

    def get_provider_status(self) -> dict[str, bool]:
        """The ADR's view: configured or not (no I/O); `provider_status()` has the live detail."""
        return {name: entry.configured for name, entry in self.config.providers.items()}

    async def provider_status(self) -> dict[str, dict[str, Any]]:
        """Live status per provider entry, from what the workers record in Redis.

        Each: `configured` (and why not), `available` (routable now), `circuit`
        (state closed/open/half_open, consecutive failures, opened_at, probe_at),
        `last_check` and `recent_checks` (health checks: ok, at, latency_ms, error),
        `last_error` with `last_error_at` and its source (job or health),
        `last_success_at`, and `rate_limits` (the shared limiter's usage at the last check).
        """
        from llmq.client.status import read_provider_status

        return await read_provider_status(self.jobs.redis, self.config)

    # --- submitting ------------------------------------------------------------------

    def prepare(self, request: RequestInput, where: str = "request", *, kind: JobKind = JobKind.CHAT) -> JobRequest:
        """Validate a request and its route; raises RequestError naming the field and the fix.

        A mapping is read as a request of `kind` (a chat unless told otherwise)."""
        try:
            if isinstance(request, (LLMRequest, EmbeddingRequest)):
                parsed: JobRequest = request
            else:
                parsed = REQUEST_MODELS[kind].model_validate(request)
            plan_route(parsed, self.config, self._workers_configured)
        except ValidationError as exc:
            raise RequestError(f"{where}: {describe_validation_error(exc)}") from None
        except RoutingError as exc:
            raise RequestError(f"{where}: {exc}") from None
        return parsed

    async def submit(
        self,
        request: RequestInput,
        *,
        job_id: str | None = None,
        deadline_s: float | None = None,
        cache: bool | None = None,
        caller_daily_usd: float | None = None,
        completion_window: str | float | None = None,
        batch_only: bool = False,
        flex_fallback: bool | None = None,
        lane: Lane | str = Lane.INTERACTIVE,
    ) -> str:
        """Enqueue one request; returns its job id. The keywords are `Submission`'s (client/submission.py);
        `lane`: `interactive` (the default for one request) or `batch`."""
        check_id("job_id", job_id)
        how = Submission(deadline_s, cache, caller_daily_usd, completion_window, batch_only, flex_fallback, lane)
        await self.workers_configured()
        parsed = self.prepare(request)
        new = how.new_job(self.config, parsed, self._route(parsed), job_id or new_id("job"))
        created = await self._enqueue([new])
        self.response_models.remember(created[0], parsed)
        return created[0]

    async def submit_batch(
        self,
        items: Iterable[BatchItem | RequestInput],
        *,
        batch_id: str | None = None,
        deadline_s: float | None = None,
        cache: bool | None = None,
        on_progress: Callable[[int], None] | None = None,
        caller_daily_usd: float | None = None,
        completion_window: str | float | None = None,
        batch_only: bool = False,
        flex_fallback: bool | None = None,
        lane: Lane | str = Lane.BATCH,
    ) -> str:
        """Validate every item first, then create and publish in pipelined chunks (keywords: `Submission`).

        `lane`: `batch` (the default) shares what interactive calls leave, fairly with other
        callers' batches (by `metadata["caller"]`, else by batch); `interactive` goes first.
        """
        check_id("batch_id", batch_id)
        how = Submission(deadline_s, cache, caller_daily_usd, completion_window, batch_only, flex_fallback, lane)
        batch_id = batch_id or new_id("batch")
        await self.workers_configured()
        prepared = self._prepare_batch(items, how)
        ttl_s = self.config.service.jobs.result_ttl_s + int(how.deadline_for(self.config))
        if await self.jobs.batch(batch_id) is None:
            await self.jobs.create_batch(batch_id, ttl_s)
        starts = [0, *range(FIRST_SUBMIT_CHUNK, len(prepared), SUBMIT_CHUNK)]
        for start, end in zip(starts, [*starts[1:], len(prepared)]):
            chunk = prepared[start:end]
            job_ids = [job_id_for(batch_id, item, start + index) for index, item in enumerate(chunk)]
            new = [
                how.new_job(self.config, item.request, self._route(item.request), job_id, batch_id, item.custom_id)
                for job_id, item in zip(job_ids, chunk)
            ]
            await self._enqueue(new)
            for job_id, item in zip(job_ids, chunk):
                self.response_models.remember(job_id, item.request)
            if on_progress:
                on_progress(len(chunk))
        await self.jobs.expire_batch(batch_id, ttl_s)
        return batch_id

    def _prepare_batch(self, items: Iterable[BatchItem | RequestInput], how: Submission) -> list[BatchItem]:
        prepared: list[BatchItem] = []
        problems: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            item = item if isinstance(item, BatchItem) else BatchItem(item)  # type: ignore[arg-type]
            where = f"item {index + 1}" + (f" (custom_id {item.custom_id!r})" if item.custom_id else "")
            if item.custom_id is not None and item.custom_id in seen:
                problems.append((where, f"custom_id repeats item {seen[item.custom_id] + 1}; give each request its own"))
                continue
            if item.custom_id is not None:
                seen[item.custom_id] = index
            try:
                check_id("custom_id", item.custom_id)
                prepared.append(BatchItem(self.prepare(item.request, where), item.custom_id))
                how.check(self.config, prepared[-1].request, self._route(prepared[-1].request), where)
            except RequestError as exc:
                problems.append((where, str(exc).removeprefix(where + ": ")))
        if problems:
            raise RequestError(f"batch refused, nothing enqueued: {summarize_problems(problems)}", problems)
        if not prepared:
            raise RequestError("batch refused: it holds no requests")
        return prepared

    def _route(self, request: JobRequest) -> list[Hop]:
        return spread_pools(plan_route(request, self.config, self._workers_configured), self.config)

    async def _enqueue(self, jobs: list[NewJob]) -> list[str]:
        """Create records (dedup by job id / custom id), then publish the new ones not in a provider batch."""
        results = await self.jobs.create_many(jobs, self.config.service.jobs.result_ttl_s)
        fresh = [job for job, (created, _) in zip(jobs, results) if created and not job.via_provider_batch]
        if fresh:
            # Each job's watchdog entry in the delayed set stays until a worker claims it.
            await asyncio.to_thread(publish_messages, self.celery, [job.first_message() for job in fresh])
        return [job_id for _, job_id in results]

    # --- reading ---------------------------------------------------------------------

    async def poll(self, job_id: str) -> JobRecord | None:
        record = await self.jobs.get(job_id)
        return self.response_models.record(record) if record is not None else None

    async def batch(self, batch_id: str) -> BatchRecord | None:
        return await self.jobs.batch(batch_id)

    async def status(self, some_id: str) -> JobRecord | BatchRecord | None:
        """A job or a batch, whichever the id names."""
        return await self.jobs.batch(some_id) or await self.jobs.get(some_id)

    async def wait(
        self, some_id: str, *, timeout_s: float | None = None, on_progress: Callable[[BatchRecord], None] | None = None,
        on_notice: Notify | None = None,
    ) -> JobRecord | BatchRecord:
        """Poll a job or batch until it is done; `on_progress` gets each batch record. Never silent:
        `on_notice` hears why it is not moving when that changes (a `WaitNotice`), None once it is gone;
        RedisUnreachableError (saying how to resume) after `client.redis_unreachable_s` without Redis."""
        give_up_s = self.config.service.client.redis_unreachable_s
        watch = WaitWatch(self.poller, some_id, give_up_s=give_up_s, on_notice=on_notice)
        record = await wait_until_done(watch, some_id, timeout_s=timeout_s, on_progress=on_progress)
        return self.response_models.record(record) if isinstance(record, JobRecord) else record

    async def results(self, batch_id: str) -> list[JobRecord]:
        """Every job of a batch, in submission order."""
        job_ids = await self.jobs.batch_job_ids(batch_id)
        records: list[JobRecord] = []
        for start in range(0, len(job_ids), SUBMIT_CHUNK):
            found = await self.jobs.get_many(job_ids[start : start + SUBMIT_CHUNK])
            records += [self.response_models.record(record) for record in found if record is not None]
        return records

    async def results_by_custom_id(self, batch_id: str) -> dict[str, JobRecord]:
        return {record.custom_id or record.job_id: record for record in await self.results(batch_id)}

    async def provider_batches(self, batch_id: str) -> list[ProviderBatchRecord]:
        """The provider batches a batch's jobs with a completion window wait (or waited) in."""
        return await ProviderBatchStore(self.jobs.redis).for_batch(batch_id)

    async def cancel(self, some_id: str) -> int:
        """Cancel a job, or every unfinished job of a batch; returns how many were cancelled."""
        ttl_s = self.config.service.jobs.result_ttl_s
        if await self.jobs.batch(some_id) is not None:
            await self.jobs.redis.hset(keys.batch(some_id), "cancel_requested", "1")
            job_ids = await self.jobs.batch_job_ids(some_id)
            cancelled = 0
            for start in range(0, len(job_ids), SUBMIT_CHUNK // 10):
                chunk = job_ids[start : start + SUBMIT_CHUNK // 10]
                cancelled += sum(await asyncio.gather(*(self.jobs.cancel(job_id, ttl_s) for job_id in chunk)))
            await ProviderBatchStore(self.jobs.redis).poke(await self.provider_batches(some_id))  # cancelled there too
            return cancelled
        return int(await self.jobs.cancel(some_id, ttl_s))
