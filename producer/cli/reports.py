"""`llmq providers` (live status) and `llmq usage` (tokens, cost and budgets).

Part of the CLI, where the two packages are composed: the SQL ledger and the
live rate-limit usage are worker code, imported inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from llmq.cli.output import CommandRegistrar, redact_url
from llmq.client.status import read_provider_status
from llmq.contract import keys
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.queueing import redis_url
from llmq.contract.schema import REPORT_GROUPINGS

TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_read_tokens", "reasoning_tokens")
_AGE = re.compile(r"(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: How long the CLI waits for Redis before showing the config alone.
REDIS_TIMEOUT_S = 3.0


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
    providers = command("providers", cmd_providers,
                        "every adapter and config entry: configured or not, circuit, health checks, last error, limits in use")
    providers.add_argument("--json", action="store_true", help="print the live status of every entry as JSON")
    usage = command("usage", cmd_usage, "tokens and cost from the SQL ledger, and today's budgets")
    usage.add_argument("--since", help="a date (2026-11-01), a date and time (2026-11-01T12:00, UTC), or an age (24h, 7d)")
    usage.add_argument("--by", default="provider", choices=REPORT_GROUPINGS, help="group rows by (default provider)")
    usage.add_argument("--json", action="store_true", help="print rows and totals as JSON")
    usage.add_argument("--database-url", help="SQLAlchemy URL of the ledger (default $LLMQ_DATABASE_URL)")


# --- llmq providers --------------------------------------------------------------------


def cmd_providers(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    status, problem = asyncio.run(live_status(config))
    if args.json:
        print(json.dumps(status or {}, indent=2, default=str))
        return 0 if status is not None else 1
    print_adapters()
    print(f"\nProviders in {config.path}:")
    for name, entry in config.providers.items():
        live = (status or {}).get(name)
        configured = live["configured"] if live else entry.configured
        where = " (on the workers)" if configured and not entry.configured else ""
        state = f"configured{where}" if configured else f"not configured: {entry.not_configured_reason}"
        print(f"  {name:<14} type={entry.adapter_type:<13} {state}")
        for line in describe_entry(config, name, live):
            print(f"  {'':<14} {line}")
    if config.pools:
        print("\nPools (calls each member served):")
        for pool in config.pools:
            print(f"  {describe_pool(config, pool, status)}")
    if problem:
        print(f"\nlive status unavailable: {problem}")
    return 0


def describe_pool(config: LLMConfig, pool: str, status: dict[str, dict[str, Any]] | None) -> str:
    """One pool's line: its strategy and each member's calls and share, e.g. `gpt (headroom): a 612 (34%), b 1188 (66%)`."""
    parts = []
    for member in config.members(pool):
        split = ((status or {}).get(member) or {}).get("pool") or {}
        share = split.get("share")
        parts.append(f"{member} {split.get('calls', 0)}" + (f" ({share:.0%})" if share is not None else ""))
    return f"{pool} ({config.pools[pool].strategy}): {', '.join(parts)}"


def print_adapters() -> None:
    from llmq.worker.providers.registry import adapter_class, adapter_types

    print(f"Adapters ({len(adapter_types())}):")
    for type_name in adapter_types():
        adapter = adapter_class(type_name)
        traits = [t for t, on in (("streaming", adapter.supports_streaming), ("local", adapter.local), ("simulated", adapter.simulated)) if on]
        print(f"  {type_name:<14} {adapter.description}  [{', '.join(traits)}]")


async def live_status(config: LLMConfig) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """provider_status() plus the limiter's usage right now; (None, why) when Redis is not there."""
    client = aioredis.from_url(redis_url(), decode_responses=True, socket_connect_timeout=REDIS_TIMEOUT_S,
                               socket_timeout=REDIS_TIMEOUT_S)
    try:
        status = await read_provider_status(client, config)
        for name in (name for name, item in status.items() if item["configured"]):
            usage = await _limiter_usage_now(client, config, name)
            if usage is not None:
                status[name]["rate_limits"] = usage
        return status, None
    except (OSError, aioredis.RedisError) as exc:
        return None, f"cannot reach Redis at {redact_url(redis_url())} ({type(exc).__name__})"
    finally:
        await client.aclose()


async def _limiter_usage_now(client: aioredis.Redis, config: LLMConfig, name: str) -> dict[str, Any] | None:
    try:
        from llmq.worker.limiter.limiter import RateLimiter
    except ImportError:
        return None
    return await RateLimiter(client).snapshot(name, config.provider(name).rate_limits)


def describe_entry(config: LLMConfig, name: str, status: dict[str, Any] | None) -> list[str]:
    from llmq.worker.limiter.limits import KINDS

    entry = config.provider(name)
    paced = (kind for kind in KINDS if kind.mechanism == "bucket" and not kind.per_model)
    limit_text = ", ".join(
        f"{value} {kind.label}" for kind in paced if (value := kind.value(entry.rate_limits, None))
    )
    lines = [f"models: {', '.join(entry.models) or '(any)'}" + (f"; limits: {limit_text}" if limit_text else "")]
    if status is None or not status["configured"]:
        return lines
    now_s = status["checked_at"]
    lines.append("circuit: " + describe_circuit(status["circuit"], now_s))
    lines.append("last check: " + describe_check(status["last_check"], now_s, name))
    if status["last_error"]:
        lines.append(f"last error: {status['last_error']} ({status['last_error_source']}, {ago(status['last_error_at'], now_s)})")
    in_use = describe_limits(status.get("rate_limits"))
    if in_use:
        lines.append(f"in use: {in_use}")
    return lines


def describe_circuit(circuit: dict[str, Any], now_s: float) -> str:
    calls, failures = circuit["window_calls"], circuit["window_failures"]
    window = f"{failures} of {calls} recent calls failed"
    if circuit["state"] == "closed":
        return "closed" + (f" ({window})" if failures else "")
    if circuit["state"] == "half_open":
        return "half-open (probing with health checks)"
    since = ago(circuit["opened_at"], now_s)
    probe = "probe due" if circuit["probe_due"] else f"probe in {circuit['probe_at'] - now_s:.0f}s"
    return f"OPEN (opened {since}: {window}; skipped by routing; {probe})"


def describe_check(check: dict[str, Any] | None, now_s: float, name: str) -> str:
    if check is None:
        return f"none yet (beat sends them to {keys.queue_name(name)}; a worker on that queue runs them)"
    if check["ok"]:
        return f"ok in {check['latency_ms']:.0f} ms, {ago(check['checked_at'], now_s)}"
    return f"FAILED {ago(check['checked_at'], now_s)}: {check['error']}"


def describe_limits(snapshot: dict[str, Any] | None) -> str:
    """The provider-wide limits set, as used/limit with each kind's unit (the limiter's KINDS)."""
    if not snapshot:
        return ""
    from llmq.worker.limiter.limits import KINDS

    parts = []
    for kind in (kind for kind in KINDS if not kind.per_model):
        item = snapshot.get(kind.field) or {}
        if item.get("limit"):
            parts.append(f"{item['used']}/{item['limit']} {kind.label}")
    if snapshot.get("paused_for_s"):
        parts.append(f"paused {snapshot['paused_for_s']:.1f}s more")
    return ", ".join(parts)


def ago(epoch_s: float | None, now_s: float) -> str:
    if epoch_s is None:
        return "never"
    age_s = max(0.0, now_s - epoch_s)
    for unit_s, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if age_s >= unit_s:
            return f"{age_s / unit_s:.0f}{unit} ago"
    return f"{age_s:.0f}s ago"


# --- llmq usage ------------------------------------------------------------------------


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An age (`24h`, `7d`, `30m`, `2w`) back from now, or an ISO date/time (UTC unless it says)."""
    now = now or datetime.now(UTC)
    match = _AGE.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match["amount"]) * _UNIT_S[match["unit"]])
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: use a date (2026-11-01), a date and time (2026-11-01T12:00, UTC) or an age (24h, 7d)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def cmd_usage(args: argparse.Namespace) -> int:
    from llmq.worker.store.ledger import Store

    since = parse_since(args.since) if args.since else None
    config = load_config(args.config)
    store = Store(args.database_url)
    try:
        rows = store.usage_report(since=since, by=args.by)
        quarantined = store.quarantined_count()
    finally:
        store.close()
    totals = usage_totals(rows)
    budgets = asyncio.run(budget_status(config)) if config.service.budgets.enabled else None
    if args.json:
        print(json.dumps({"since": since, "by": args.by, "rows": rows, "totals": totals, "budgets": budgets,
                          "quarantined_rows": quarantined}, indent=2, default=str))
        return 0
    print_usage_table(rows, totals, args.by, since)
    if budgets:
        print_budgets(budgets)
    if quarantined:
        print(f"\nNeeds attention: {quarantined} ledger row(s) the database refused are set aside, each with its "
              "error, in table llmq_quarantine (and Redis list "
              f"{keys.OUTBOX_DEAD}); what they record is not in the figures above.")
    return 0


def usage_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {"requests": sum(row["requests"] for row in rows)}
    for column in (*TOKEN_COLUMNS, "cache_write_tokens", "cached_hits", "unpriced", "cheaper_tier"):
        totals[column] = sum(int(row.get(column) or 0) for row in rows)
    for column in ("cost_usd", "standard_cost_usd", "saved_usd"):
        totals[column] = sum((Decimal(row.get(column) or 0) for row in rows), Decimal(0))
    return totals


def print_usage_table(rows: list[dict[str, Any]], totals: dict[str, Any], by: str, since: datetime | None) -> None:
    header = f"Usage by {by}" + (f" since {since:%Y-%m-%d %H:%M} UTC" if since else " (all time)")
    print(header)
    columns = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "cached_hits", "unpriced")
    titles = ("requests", "prompt", "completion", "total", "cost USD", "cached", "unpriced")
    if totals.get("cheaper_tier"):  # provider batches or flex ran some of it: what that saved
        columns += ("standard_cost_usd", "saved_usd")
        titles += ("standard USD", "saved USD")
    width = max([len(by), 5, *(len(str(row[by])) for row in rows)])
    print(f"  {by:<{width}} " + " ".join(f"{title:>12}" for title in titles))
    for row in [*rows, {by: "TOTAL", **totals}]:
        cells = [f"{_money(row[c]) if c.endswith('_usd') else row[c]:>12}" for c in columns]
        print(f"  {str(row[by] if row[by] is not None else '-'):<{width}} " + " ".join(cells))
    if totals["unpriced"]:
        print(f"  ({totals['unpriced']} rows had no known price and count as $0; add `pricing:` to their provider entry)")
    if totals.get("cheaper_tier"):
        share = totals["saved_usd"] / totals["standard_cost_usd"] if totals["standard_cost_usd"] else Decimal(0)
        print(f"  ({totals['cheaper_tier']} requests ran through provider batches or the flex tier: "
              f"${_money(totals['saved_usd'])} saved, {share:.0%} off the standard price of all rows shown)")


def _money(value: Any) -> str:
    return f"{Decimal(value):.6f}"


async def budget_status(config: LLMConfig) -> dict[str, list[dict[str, Any]]] | None:
    """Today's spend (UTC day on Redis's clock) against each budget; None when Redis is not there."""
    budgets = config.service.budgets
    client = aioredis.from_url(redis_url(), decode_responses=True, socket_connect_timeout=REDIS_TIMEOUT_S,
                               socket_timeout=REDIS_TIMEOUT_S)
    try:
        seconds, _ = await client.time()
        day = int(seconds) // 86400
        callers = [name for name in budgets.per_caller_daily_usd if name != "*"]
        spent_callers = [await client.get(keys.budget_spend_day('caller', name, day)) for name in callers]
        spent_providers = [await client.get(keys.budget_spend_day('provider', name, day)) for name in budgets.per_provider_daily_usd]
    except (OSError, aioredis.RedisError):
        return None
    finally:
        await client.aclose()
    return {
        "callers": [_budget_line(name, budgets.per_caller_daily_usd[name], spent) for name, spent in zip(callers, spent_callers)],
        "providers": [_budget_line(name, limit, spent)
                      for (name, limit), spent in zip(budgets.per_provider_daily_usd.items(), spent_providers)],
    }


def _budget_line(name: str, budget_usd: float, spent_micro_usd: str | None) -> dict[str, Any]:
    spent_usd = int(spent_micro_usd or 0) / 1_000_000
    return {"name": name, "spent_usd": spent_usd, "budget_usd": budget_usd, "spent": spent_usd >= budget_usd}


def print_budgets(budgets: dict[str, list[dict[str, Any]]]) -> None:
    print("\nBudgets today (UTC):")
    for kind in ("callers", "providers"):
        for line in budgets[kind]:
            flag = "  SPENT" if line["spent"] else ""
            print(f"  {kind[:-1]} {line['name']:<16} ${line['spent_usd']:.4f} of ${line['budget_usd']:g}{flag}")
    sys.stdout.flush()
