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
#: Each provider entry has a queue per lane: `llm.<provider>` (batch) and `llm.<provider>.interactive`.
LANE_QUEUE_SUFFIXES = {"batch": "", "interactive": ".interactive"}


def queue_name(provider: str, lane: str = "batch") -> str:
    """A provider entry's queue for one lane (`Lane` values: batch, interactive)."""
    return f"{QUEUE_PREFIX}{provider}{LANE_QUEUE_SUFFIXES[getattr(lane, 'value', lane)]}"


def lane_queues(provider: str) -> list[str]:
    """Every queue of a provider entry, the interactive one first."""
    return [queue_name(provider, "interactive"), queue_name(provider, "batch")]


def is_interactive_queue(queue: str) -> bool:
    return queue.endswith(LANE_QUEUE_SUFFIXES["interactive"])


def queue_provider(queue: str) -> str:
    """The provider entry a queue (or a bare provider name) is for."""
    name = queue.removeprefix(QUEUE_PREFIX)
    return name.removesuffix(LANE_QUEUE_SUFFIXES["interactive"])


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
#: Prefix of rate-limit keys (the `rate_limit_*` builders below; worker/limiter/lua/ uses them).
RATE_LIMIT_PREFIX = f"{PREFIX}:rl"
#: Prefix of response-cache keys.
CACHE_PREFIX = f"{PREFIX}:cache"


def cache_entry(request_digest: str) -> str:
    """String: one cached answer (LLMResponse JSON), keyed by the digest of the normalized request."""
    return f"{CACHE_PREFIX}:{request_digest}"


def worker_heartbeat(worker_id: str) -> str:
    """String (JSON, short TTL): one live worker process's heartbeat (pid, queues, configured providers)."""
    return WORKER_PREFIX + worker_id


def restart_recheck(redis_run_id: str) -> str:
    """String: taken by the one worker that rechecks published jobs after Redis restarted with this run id."""
    return RESTART_RECHECK_PREFIX + redis_run_id


#: Prefixes the Lua scripts complete with an id taken from a job record (a batch id, say):
#: a script may only touch keys derived from what it is given, and these keep them in this module.
JOB_KEY_PREFIX = f"{PREFIX}:job:"
BATCH_KEY_PREFIX = f"{PREFIX}:batch:"


def cache_stats(provider: str) -> str:
    """Hash hits/misses: the response cache's counters for one provider entry."""
    return f"{CACHE_PREFIX}:stats:{provider}"


#: Celery task that runs one provider's health check (sent by beat to the provider's queue).
TASK_HEALTH_CHECK = "llmq.health_check"


def health_history(provider: str) -> str:
    """List of JSON health-check results for one provider entry, newest first, bounded."""
    return f"{HEALTH}:history:{provider}"


def circuit(provider: str) -> str:
    """Hash: one provider entry's circuit breaker (state, opened_at, window counts, last error).

    Written only by worker/middleware/lua/circuit.lua; read by `provider_status()`.
    """
    return f"{PREFIX}:circuit:{provider}"


def circuit_failures(provider: str) -> str:
    """Sorted set call id -> epoch ms: the failed calls in the circuit breaker's window (a job counts once)."""
    return f"{PREFIX}:circuit:{provider}:failed"


def circuit_successes(provider: str) -> str:
    """Hash window bucket -> count: the successful calls in the circuit breaker's window."""
    return f"{PREFIX}:circuit:{provider}:ok"


def circuit_probes(provider: str) -> str:
    """Sorted set probe token -> epoch ms its hold ends: the probes a half-open circuit let through."""
    return f"{PREFIX}:circuit:{provider}:probes"


def pool_split(pool: str) -> str:
    """Hash member -> calls it served for the pool, and `since` (epoch s of the first): `llmq providers`' split."""
    return f"{PREFIX}:pool:{pool}:split"


def budget_spend(kind: str, name: str) -> str:
    """Base of the daily spend counters (micro-USD) of a caller or provider entry.

    `kind` is "caller" or "provider"; budget.lua appends ":<UTC day number>" (days since
    the epoch, on Redis's clock; `budget_spend_day` is the same key) and expires each
    counter after two days.
    """
    return f"{PREFIX}:budget:{kind}:{name}"


def budget_spend_day(kind: str, name: str, utc_day: int) -> str:
    """Counter (micro-USD) of one caller's or provider entry's spend on one UTC day (days since the epoch)."""
    return f"{budget_spend(kind, name)}:{utc_day}"


def rate_limit_scope(provider: str, *, api_key_id: str | None = None, model: str | None = None) -> str:
    """Base of one scope's rate-limit keys: a provider entry, one of its API keys, a model under either.

    The braces make the provider a Redis Cluster hash tag, so each limiter script touches one slot.
    """
    scope = f"{RATE_LIMIT_PREFIX}:{{{provider}}}"
    if api_key_id is not None:
        scope = f"{scope}:key:{api_key_id}"
    if model is not None:
        scope = f"{scope}:model:{model}"
    return scope


def rate_limit_pause(scope: str) -> str:
    """String: epoch seconds until which the scope is paused (after a 429, or headers saying a limit is spent)."""
    return f"{scope}:pause"


def rate_limit_leases(scope: str) -> str:
    """Sorted set lease id -> lease expiry (epoch s): the scope's calls in flight."""
    return f"{scope}:leases"


def rate_limit_daily(provider: str) -> str:
    """Hash: day (UTC days since the epoch) and one counter per daily quota, provider-wide."""
    return f"{rate_limit_scope(provider)}:daily"


def rate_limit_bucket(scope: str, name: str) -> str:
    """Hash: one paced bucket (`name`: rpm, tpm) with its line's places and, for tokens, its claim."""
    return f"{scope}:{name}"


def rate_limit_line(bucket: str, lane: str) -> str:
    """Sorted set lease id -> position: the callers of one lane (interactive, batch) waiting in line
    for the bucket `bucket`."""
    return f"{bucket}:line:{lane}"


def rate_limit_flows(bucket: str) -> str:
    """Sorted set flow -> finish tag: the batch lane's flows (callers, batches) sharing the bucket `bucket`."""
    return f"{bucket}:flows"


def rate_limit_usage(scope: str) -> str:
    """Hash: the scope's requests and tokens in each of the last 60 one-second slots, for reports."""
    return f"{scope}:usage"


def caller_requests(caller: str) -> str:
    """String (epoch s, float): one caller's requests/min bucket for the HTTP front (worker/limiter/lua/caller_limits.lua)."""
    return f"{PREFIX}:caller:{caller}:requests"


#: Celery task that tends one provider entry's provider batches (sent by beat to the provider's queue).
TASK_PROVIDER_BATCHES = "llmq.provider_batches"
#: Prefix of every provider batch's keys: PROVIDER_BATCH_PREFIX + provider batch id (+ ":jobs").
PROVIDER_BATCH_PREFIX = f"{PREFIX}:pbatch:"


def provider_batch(provider_batch_id: str) -> str:
    """Hash: one provider batch (contract/provider_batches.py): entry, model, state, remote id, counts, times."""
    return PROVIDER_BATCH_PREFIX + provider_batch_id


def provider_batch_jobs(provider_batch_id: str) -> str:
    """List of the job ids of a provider batch, in line order."""
    return f"{PROVIDER_BATCH_PREFIX}{provider_batch_id}:jobs"


def provider_batch_lock(provider_batch_id: str) -> str:
    """String: held by the one process submitting or polling this provider batch."""
    return f"{PROVIDER_BATCH_PREFIX}{provider_batch_id}:lock"


def provider_batch_intake(provider: str) -> str:
    """Sorted set job_id -> epoch ms submitted: jobs with a completion window waiting to be grouped."""
    return f"{PREFIX}:pbatch-intake:{provider}"


def provider_batch_intake_lock(provider: str) -> str:
    """String: held by the one process grouping a provider entry's intake into provider batches."""
    return f"{PREFIX}:pbatch-intake:{provider}:lock"


def provider_batches_open(provider: str) -> str:
    """Sorted set provider_batch_id -> epoch ms of its next poll: a provider entry's unfinished provider batches."""
    return f"{PREFIX}:pbatch-open:{provider}"


#: batch(batch_id) + this: the set `batch_provider_batches` names (provider_batch_claim.lua completes it).
BATCH_PROVIDER_BATCHES_SUFFIX = ":pbatches"


def batch_provider_batches(batch_id: str) -> str:
    """Set: the provider batches holding lines of an llmq batch (so cancelling the batch cancels them)."""
    return batch(batch_id) + BATCH_PROVIDER_BATCHES_SUFFIX
