"""Every Redis key llmq uses, in one place. Producer and worker meet here.

Durations in names carry units; every key starts with `PREFIX` so a shared Redis
can hold several deployments (set LLMQ_REDIS_PREFIX).
"""

from __future__ import annotations

import os

PREFIX = os.environ.get("LLMQ_REDIS_PREFIX", "llmq")

#: Celery task name and queue names: the producer sends by name, never importing worker code.
TASK_GENERATE = "llmq.generate"
QUEUE_PREFIX = "llm."


def queue_name(provider: str) -> str:
    return f"{QUEUE_PREFIX}{provider}"


def job(job_id: str) -> str:
    """Hash: state, request, route, route_index, attempt, dispatch, result, error, timestamps."""
    return f"{PREFIX}:job:{job_id}"


def job_attempts(job_id: str) -> str:
    """List of JSON attempt records, oldest first."""
    return f"{PREFIX}:job:{job_id}:attempts"


def job_stream(job_id: str) -> str:
    """Redis Stream of output chunks for a streamed job."""
    return f"{PREFIX}:job:{job_id}:stream"


def batch(batch_id: str) -> str:
    """Hash: total, one counter per state, created_at, cancel_requested."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_jobs(batch_id: str) -> str:
    """List of job ids in submission order."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_custom_ids(batch_id: str) -> str:
    """Hash custom_id -> job_id: one job per custom_id in a batch."""
    return f"{PREFIX}:batch:{batch_id}:custom"


#: Sorted set job_id -> epoch ms when the job is due to be (re)published to its queue.
DELAYED = f"{PREFIX}:delayed"
#: Sorted set job_id -> epoch ms when a running job's lease runs out.
LEASES = f"{PREFIX}:leases"
#: Sorted set job_id -> epoch ms of the job's deadline (non-terminal jobs only).
DEADLINES = f"{PREFIX}:deadlines"
#: List of JSON ledger rows waiting to be written to SQL.
OUTBOX = f"{PREFIX}:outbox"
#: Lock held by the one process flushing the outbox at a time.
OUTBOX_LOCK = f"{PREFIX}:outbox:lock"
#: List of outbox rows the SQL ledger refused (a data error), each JSON {entry, row, error, at}:
#: the rows that need attention. The same rows are in the ledger's quarantine table.
OUTBOX_DEAD = f"{PREFIX}:outbox:dead"
#: Counter: outbox rows quarantined so far (what the metrics sampler reports).
OUTBOX_QUARANTINED = f"{PREFIX}:outbox:quarantined"
#: Lock held by the one process sweeping leases and deadlines at a time.
REAPER_LOCK = f"{PREFIX}:reaper:lock"
#: RESTART_RECHECK_PREFIX + Redis run id: set by the one worker that rechecks published jobs after a restart.
RESTART_RECHECK_PREFIX = f"{PREFIX}:restart-recheck:"
#: Per-process heartbeat of live workers: WORKER_PREFIX + worker id -> JSON, short TTL.
WORKER_PREFIX = f"{PREFIX}:worker:"
#: Hash provider -> JSON health record; and per-provider history lists.
HEALTH = f"{PREFIX}:health"
#: Prefix of rate-limit keys (see worker/ratelimit.lua).
RATE_LIMIT_PREFIX = f"{PREFIX}:rl"
#: Prefix of response-cache keys.
CACHE_PREFIX = f"{PREFIX}:cache"


def cache_stats(provider: str) -> str:
    """Hash hits/misses: the response cache's counters for one provider entry."""
    return f"{CACHE_PREFIX}:stats:{provider}"


#: Celery task that runs one provider's health check (sent by beat to the provider's queue).
TASK_HEALTH_CHECK = "llmq.health_check"


def health_history(provider: str) -> str:
    """List of JSON health-check results for one provider entry, newest first, bounded."""
    return f"{HEALTH}:history:{provider}"


def circuit(provider: str) -> str:
    """Hash: one provider entry's circuit breaker (state, failures, opened_at, probe, last error).

    Written only by worker/circuit.lua; read by `provider_status()`.
    """
    return f"{PREFIX}:circuit:{provider}"


def budget_spend(kind: str, name: str) -> str:
    """Base of the daily spend counters (micro-USD) of a caller or provider entry.

    `kind` is "caller" or "provider"; worker/budget.lua appends ":<UTC day number>"
    (days since the epoch, on Redis's clock) and expires each counter after two days.
    """
    return f"{PREFIX}:budget:{kind}:{name}"
