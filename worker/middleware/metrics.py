"""Prometheus metrics from each worker process, as engine middleware (optional).

`llmq worker --metrics-port N` (or `LLMQ_METRICS_PORT=N`) serves
`http://<host>:N/metrics` from the process that runs the jobs; 0, the default,
serves nothing and counts nothing. prometheus-client is the `metrics` extra and
is imported only when a port is asked for: without it the worker runs as ever
and says so once in its log. Use the default pool or `--pool threads` (one process holds
every job slot); with `--pool prefork` each child would need its own port.

Series (labels: `provider` is the config entry, `model` the model of the hop):

- `llmq_requests_total{provider, model, outcome}`: outcome is `succeeded`,
  `failed` (the call raised), `cached` (served from llmq's cache), `deferred`
  (set aside by a limit or budget, no call) or `skipped` (circuit open or budget
  spent: moved on, no call)
- `llmq_request_duration_seconds{provider, model}`: provider calls, success or error
- `llmq_tokens_total{provider, model, kind}`: kind `prompt`, `completion`,
  `cached_read`, `cache_write`, `reasoning`
- `llmq_cost_usd_total{provider, model}`
- `llmq_errors_total{provider, model, error_type}`: failed calls and skips, by error class
- `llmq_limit_wait_seconds_total{provider, reason}` and `llmq_deferrals_total{provider, reason}`:
  the waits that limits, budgets and open circuits imposed (as planned at the time)
- `llmq_cache_hits_total{provider, model}`
- `llmq_queue_depth{queue}`, `llmq_delayed_jobs`, `llmq_circuit_state{provider}`
  (0 closed, 1 half-open, 2 open), `llmq_outbox_rows` (ledger rows waiting for
  SQL), `llmq_ledger_dead_letter_rows` (rows the ledger refused that await
  attention) and `llmq_ledger_rows_quarantined_total` (every row the outbox
  flusher set aside, from its counter in Redis): sampled from Redis every few
  seconds. Every worker samples the same shared numbers, so aggregate them with
  `max`, not `sum`.

This middleware runs first in the chain, so it sees every verdict of the ones after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.models import JobResponse
from llmq.worker import errors
from llmq.worker.middleware.base import Defer, Middleware, Skip

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

log = logging.getLogger("llmq.worker.metrics")

ADDRESS_ENV = "LLMQ_METRICS_ADDRESS"
SAMPLE_INTERVAL_S = 5.0
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_KINDS = ("prompt", "completion", "cached_read", "cache_write", "reasoning")
CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class Instruments:
    requests: Any
    duration: Any
    tokens: Any
    cost: Any
    errors: Any
    limit_wait: Any
    deferrals: Any
    cache_hits: Any
    queue_depth: Any
    delayed: Any
    circuit: Any
    outbox_rows: Any
    dead_letter_rows: Any
    quarantined: Any


_instruments: Instruments | None = None


def instruments() -> Instruments | None:
    """The process's metric objects, created once; None when prometheus-client is not installed."""
    global _instruments
    if _instruments is not None:
        return _instruments
    try:
        import prometheus_client as prom
    except ImportError:
        return None
    hop = ["provider", "model"]
    _instruments = Instruments(
        requests=prom.Counter("llmq_requests", "Attempts by outcome", [*hop, "outcome"]),
        duration=prom.Histogram("llmq_request_duration_seconds", "Provider call latency", hop, buckets=LATENCY_BUCKETS_S),
        tokens=prom.Counter("llmq_tokens", "Tokens used", [*hop, "kind"]),
        cost=prom.Counter("llmq_cost_usd", "Cost in USD", hop),
        errors=prom.Counter("llmq_errors", "Failed calls and skips by error class", [*hop, "error_type"]),
        limit_wait=prom.Counter("llmq_limit_wait_seconds", "Waits imposed by limits, budgets, circuits", ["provider", "reason"]),
        deferrals=prom.Counter("llmq_deferrals", "Jobs set aside without a call", ["provider", "reason"]),
        cache_hits=prom.Counter("llmq_cache_hits", "Answers from llmq's response cache", hop),
        queue_depth=prom.Gauge("llmq_queue_depth", "Messages waiting in a provider queue", ["queue"]),
        delayed=prom.Gauge("llmq_delayed_jobs", "Jobs waiting in the delayed set (retries, limits)"),
        circuit=prom.Gauge("llmq_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["provider"]),
        outbox_rows=prom.Gauge("llmq_outbox_rows", "Ledger rows waiting in the outbox for SQL"),
        dead_letter_rows=prom.Gauge("llmq_ledger_dead_letter_rows", "Rows the ledger refused, awaiting attention"),
        quarantined=prom.Counter("llmq_ledger_rows_quarantined", "Rows the outbox flusher set aside (data errors)"),
    )
    return _instruments


class MetricsMiddleware(Middleware):
    def __init__(self) -> None:
        self.instruments: Instruments | None = None
        #: The flusher's count in Redis when last sampled: the counter grows by what it grew since.
        self._quarantined_seen: int | None = None

    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        port = runtime.settings.metrics_port or 0
        if not port:
            return
        found = instruments()
        if found is None:
            log.warning("metrics port %s asked for, but prometheus-client is not installed "
                        "(pip install 'llmq[metrics]'); running without metrics", port)
            return
        import prometheus_client

        try:
            prometheus_client.start_http_server(port, addr=os.environ.get(ADDRESS_ENV, "0.0.0.0"))
        except OSError as exc:  # a second process on the same port: run on, without an endpoint
            log.warning("metrics endpoint on port %s not started: %s", port, exc)
            return
        self.instruments = found
        self._sampler = asyncio.get_running_loop().create_task(self._sample_loop())
        log.info("metrics on http://0.0.0.0:%s/metrics", port)

    async def before_attempt(self, attempt: Attempt) -> None:
        if self.instruments is not None:
            attempt.scratch["metrics_started_at"] = time.monotonic()
        return None

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        found = self.instruments
        if found is None:
            return
        labels = (attempt.hop.provider, attempt.hop.model)
        if usage_row.get("cached"):
            found.requests.labels(*labels, "cached").inc()
            found.cache_hits.labels(*labels).inc()
            return
        found.requests.labels(*labels, "succeeded").inc()
        self._observe_duration(attempt, labels)
        usage = response.usage
        for kind in TOKEN_KINDS:
            count = getattr(usage, f"{kind}_tokens", 0) or 0
            if count:
                found.tokens.labels(*labels, kind).inc(count)
        if usage_row.get("cost_usd") not in (None, ""):
            found.cost.labels(*labels).inc(float(usage_row["cost_usd"]))

    async def after_error(self, attempt: Attempt, error: errors.LLMQError) -> None:
        found = self.instruments
        if found is None:
            return
        labels = (attempt.hop.provider, attempt.hop.model)
        found.requests.labels(*labels, "failed").inc()
        found.errors.labels(*labels, type(error).__name__).inc()
        self._observe_duration(attempt, labels)

    async def after_attempt(self, attempt: Attempt) -> None:
        """A verdict from later middleware (Defer, Skip) ends the attempt here, without a call."""
        found = self.instruments
        verdict = attempt.scratch.get("verdict")
        if found is None or verdict is None:
            return
        provider, model = attempt.hop.provider, attempt.hop.model
        if isinstance(verdict, Defer):
            reason = verdict.reason or verdict.state
            found.requests.labels(provider, model, "deferred").inc()
            found.deferrals.labels(provider, reason).inc()
            found.limit_wait.labels(provider, reason).inc(max(0.0, verdict.delay_s))
        elif isinstance(verdict, Skip):
            found.requests.labels(provider, model, "skipped").inc()
            found.errors.labels(provider, model, type(verdict.error).__name__).inc()

    def _observe_duration(self, attempt: Attempt, labels: tuple[str, str]) -> None:
        started = attempt.scratch.get("metrics_started_at")
        if started is not None and self.instruments is not None:
            self.instruments.duration.labels(*labels).observe(time.monotonic() - started)

    async def _sample_loop(self) -> None:
        while True:
            try:
                await self._sample()
            except Exception as exc:  # Redis restarting: the next sample will do
                log.debug("metrics sample: %s", exc)
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def _sample(self) -> None:
        found = self.instruments
        assert found is not None
        names = list(self.runtime.config.providers)
        queues = [queue for name in names for queue in keys.lane_queues(name)]
        async with self.runtime.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            for name in names:
                pipe.hget(keys.circuit(name), "state")
            pipe.zcard(keys.DELAYED)
            pipe.llen(keys.OUTBOX)
            pipe.llen(keys.OUTBOX_DEAD)
            pipe.get(keys.OUTBOX_QUARANTINED)
            replies = await pipe.execute()
        self._sample_ledger(*replies[-3:])
        replies = replies[:-3]
        for queue, depth in zip(queues, replies[: len(queues)]):
            found.queue_depth.labels(queue).set(int(depth))
        for name, state in zip(names, replies[len(queues) : len(queues) + len(names)]):
            found.circuit.labels(name).set(CIRCUIT_STATE_VALUES.get(state or "closed", 0))
        found.delayed.set(int(replies[-1]))

    def _sample_ledger(self, outbox_rows: int, dead_letter_rows: int, quarantined: str | None) -> None:
        found = self.instruments
        assert found is not None
        found.outbox_rows.set(int(outbox_rows))
        found.dead_letter_rows.set(int(dead_letter_rows))
        total = int(quarantined or 0)
        # The flusher runs in a child process: its count lives in Redis, and this counter follows it.
        grown = total - (self._quarantined_seen or 0)
        if grown > 0:
            found.quarantined.inc(grown)
        self._quarantined_seen = total
