"""The live status of each provider entry, and of the ledger's outbox, read from the shared keyspace.

Workers write it (worker/middleware/lua/circuit.lua for the circuit breaker and the last error,
worker/health.py for health checks, worker/middleware/pool.py for pools' splits,
worker/store/outbox.py for the outbox); this module
only reads, so the producer never imports worker code. Times are epoch seconds.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from llmq.client.waiting import read_heartbeats
from llmq.contract import keys
from llmq.contract.config import LLMConfig

#: Health-check results shown per provider (the worker keeps more).
RECENT_CHECKS = 10


async def read_provider_status(client: aioredis.Redis, config: LLMConfig, recent: int = RECENT_CHECKS) -> dict[str, dict[str, Any]]:
    names, pools = list(config.providers), list(config.pools)
    on_workers = await read_workers_configured(client)
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in names:
            pipe.hgetall(keys.circuit(name))
            pipe.hget(keys.HEALTH, name)
            pipe.lrange(keys.health_history(name), 0, recent - 1)
        for pool in pools:
            pipe.hgetall(keys.pool_split(pool))
        replies = await pipe.execute()
    seconds, microseconds = replies[0]
    now_s = int(seconds) + int(microseconds) / 1e6
    status: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        circuit_fields, health, history = replies[1 + 3 * index : 4 + 3 * index]
        status[name] = _provider_status(config, name, circuit_fields or {}, health, history or [], now_s, on_workers)
    for pool, split in zip(pools, replies[1 + 3 * len(names) :]):
        for member, share in pool_split(config, pool, split or {}).items():
            status[member]["pool"] = share
    return status


def pool_split(config: LLMConfig, pool: str, counts: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each member's part of a pool's traffic: the calls it served (keys.pool_split) and their share."""
    served = {member: int(counts.get(member) or 0) for member in config.members(pool)}
    total = sum(served.values())
    since = float(counts["since"]) if counts.get("since") else None
    return {member: {"name": pool, "strategy": config.pools[pool].strategy, "calls": calls,
                     "share": round(calls / total, 4) if total else None, "since": since}
            for member, calls in served.items()}


def _provider_status(
    config: LLMConfig, name: str, fields: dict[str, str], health: str | None, history: list[str], now_s: float,
    on_workers: frozenset[str],
) -> dict[str, Any]:
    entry = config.provider(name)
    configured = entry.configured or (entry.enabled and name in on_workers)
    circuit = _circuit(fields, config.service.health.cooldown_s, now_s)
    last_check = json.loads(health) if health else None
    return {
        "type": entry.adapter_type,
        "configured": configured,
        "not_configured_reason": None if configured else entry.not_configured_reason,
        # Routable now: configured, and its circuit would let a call through (closed, or a probe due).
        "available": configured and (circuit["state"] == "closed" or circuit["probe_due"]),
        "circuit": circuit,
        "last_check": {key: value for key, value in last_check.items() if key != "rate_limits"} if last_check else None,
        "recent_checks": [json.loads(item) for item in history],
        "last_error": fields.get("last_error") or None,
        "last_error_at": _seconds(fields.get("last_error_at")),
        "last_error_source": fields.get("last_error_source") or None,
        "last_success_at": _seconds(fields.get("last_success_at")),
        # The shared limiter's usage as of the last health check (`llmq providers` shows it live).
        "rate_limits": last_check.get("rate_limits") if last_check else None,
        "checked_at": now_s,
    }


def _circuit(fields: dict[str, str], cooldown_s: float, now_s: float) -> dict[str, Any]:
    state = fields.get("state") or "closed"
    opened_at = _seconds(fields.get("opened_at"))
    probe_at: float | None = None
    if state == "open" and opened_at is not None:
        probe_at = opened_at + cooldown_s
    elif state == "half_open":  # probes are out; the next caller probes when a place is free
        probe_at = now_s
    return {
        "state": state,
        # Calls and failed calls (a job counted once) in the breaker's window, as of its last change.
        "window_calls": int(fields.get("window_calls") or 0),
        "window_failures": int(fields.get("window_failures") or 0),
        "opened_at": opened_at,
        # When the circuit lets its next probe through; due = the next call or health check probes.
        "probe_at": probe_at,
        "probe_due": probe_at is not None and probe_at <= now_s,
        "times_opened": int(fields.get("times_opened") or 0),
        "changed_at": _seconds(fields.get("changed_at")),
    }


def _seconds(epoch_ms: str | None) -> float | None:
    return int(epoch_ms) / 1000.0 if epoch_ms else None


async def ledger_backlog(client: aioredis.Redis) -> dict[str, int]:
    """The SQL ledger as the outbox sees it: `outbox` rows waiting for SQL, `needs_attention`
    (rows the ledger refused, in the dead-letter list) and `quarantined_total` (refused so far)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.llen(keys.OUTBOX)
        pipe.llen(keys.OUTBOX_DEAD)
        pipe.get(keys.OUTBOX_QUARANTINED)
        outbox, dead, total = await pipe.execute()
    return {"outbox": int(outbox), "needs_attention": int(dead), "quarantined_total": int(total or 0)}


async def read_workers_configured(client: aioredis.Redis) -> frozenset[str]:
    """Providers that live workers hold keys for, read from their heartbeats; none when Redis is away."""
    try:
        beats = await read_heartbeats(client)
    except redis.exceptions.RedisError:
        return frozenset()
    return frozenset(name for beat in beats for name in beat.get("configured", []))


async def read_cache_stats(client: aioredis.Redis, config: LLMConfig) -> dict[str, dict[str, float]]:
    """Response-cache hits, misses and hit ratio per provider entry (last 7 days)."""
    stats: dict[str, dict[str, float]] = {}
    for name in config.providers:
        raw = await client.hgetall(keys.cache_stats(name))
        hits, misses = int(raw.get("hits", 0)), int(raw.get("misses", 0))
        if hits or misses:
            stats[name] = {"hits": hits, "misses": misses, "hit_ratio": round(hits / (hits + misses), 4)}
    return stats
