"""What the limiter limits: every kind of limit, where the config sets it, and the groups the scripts take.

Each kind is enforced by one of three mechanisms, each a group the Lua scripts loop over:

- `bucket`: a paced token bucket (requests/min, tokens/min), one per kind and scope, with a line
  of refused callers (lua/acquire.lua);
- `slots`: calls in flight at once, a sorted set of leases that expire;
- `quota`: a daily counter, checked at acquire and counted at settle with real usage.

Pauses (a 429, a provider's headers) and the usage rings (what `snapshot` reports for the last
minute) apply to every call whatever is configured.

So a new kind of limit that one of these mechanisms enforces is one entry in `KINDS` and its
field in `RateLimits` (or `ModelLimits` when `per_model`); the scripts need no change. A new
mechanism adds its group here (a method, named in the `for_*` of each script that takes it) and
its loop to that script: lua/acquire.lua to enforce it, lua/snapshot.lua to report it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from llmq.contract import keys
from llmq.contract.config import ModelLimits, RateLimits

Mechanism = Literal["bucket", "slots", "quota"]
#: What a call counts against a limit.
Measure = Literal["requests", "tokens", "cost_usd"]
#: One call's amount of each measure; None where it is not known yet (cost, before the call).
Amounts = Mapping[Measure, float | None]


@dataclass(frozen=True)
class LimitKind:
    """One kind of limit."""

    #: Its field in `RateLimits`, or in `ModelLimits` when `per_model`.
    field: str
    mechanism: Mechanism
    measure: Measure
    #: Its unit in `llmq providers` ("12/600 req/min").
    label: str
    per_model: bool = False
    #: A bucket's name in its Redis keys (keys.rate_limit_bucket).
    key_name: str = ""

    @property
    def limit(self) -> str:
        """Its config name, as `Decision.limit` and the snapshot report give it."""
        return f"per_model.{self.field}" if self.per_model else self.field

    def value(self, limits: RateLimits, model: str | None) -> float | None:
        """What the config sets for it (None: no limit)."""
        if not self.per_model:
            return getattr(limits, self.field)
        model_limits = limits.per_model.get(model) if model is not None else None
        return getattr(model_limits or ModelLimits(), self.field)


#: Every kind of limit; provider-wide ones in the order `snapshot` reports them.
KINDS = (
    LimitKind("requests_per_minute", "bucket", "requests", "req/min", key_name="rpm"),
    LimitKind("tokens_per_minute", "bucket", "tokens", "tok/min", key_name="tpm"),
    LimitKind("max_concurrent", "slots", "requests", "in flight"),
    LimitKind("daily_tokens", "quota", "tokens", "tokens today"),
    LimitKind("daily_cost_usd", "quota", "cost_usd", "USD today"),
    LimitKind("requests_per_minute", "bucket", "requests", "req/min", per_model=True, key_name="rpm"),
    LimitKind("tokens_per_minute", "bucket", "tokens", "tok/min", per_model=True, key_name="tpm"),
)
#: Limits a daily quota binds: waiting means waiting for the next UTC day.
QUOTA_LIMITS = frozenset(kind.limit for kind in KINDS if kind.mechanism == "quota")


def any_configured(limits: RateLimits) -> bool:
    """Whether the entry sets any limit (per-model limits count when any model has an entry)."""
    return bool(limits.per_model) or any(kind.value(limits, None) for kind in KINDS if not kind.per_model)


def pause_key(provider: str, *, model: str | None = None, api_key_id: str | None = None) -> str:
    """The pause of a provider entry, or of one of its models, or else of one of its API keys."""
    if model is not None:
        return keys.rate_limit_pause(keys.rate_limit_scope(provider, model=model))
    return keys.rate_limit_pause(keys.rate_limit_scope(provider, api_key_id=api_key_id))


def burst_units(per_minute: float | None, burst_s: float) -> int:
    """Bucket capacity: `burst_s` seconds of the limit, at least one unit (0 when there is no limit)."""
    if not per_minute:
        return 0
    return max(1, min(int(per_minute), math.floor(per_minute * burst_s / 60.0)))


@dataclass(frozen=True)
class LimitPlan:
    """The limits on one call and their Redis keys, as the named groups the scripts take.

    `api_key_id` names a key (a digest, never the key itself): it becomes part of key names.
    """

    provider: str
    model: str | None
    limits: RateLimits
    api_key_id: str | None = None

    # --- each script's groups ----------------------------------------------------

    def for_acquire(self, costs: Amounts, burst_s: Mapping[Measure, float]) -> dict[str, Any]:
        """acquire.lua's groups: what may hold the call back (pauses, quotas, slots, buckets) and the rings.

        `costs`: what the call takes, by measure; `burst_s`: seconds of its limit each bucket holds, by measure.
        """
        return {"pauses": self.pauses(), "daily_key": self.daily_key, "quotas": self.quotas(costs),
                "slots": self.slots(), "buckets": self.buckets(burst_s, costs), "rings": self.rings()}

    def for_settle(self, amounts: Amounts, burst_s: Mapping[Measure, float]) -> dict[str, Any]:
        """settle.lua's groups: the token buckets and rings to correct, the daily counters to add
        `amounts` to, the slots to free."""
        return {"buckets": self.buckets(burst_s, measure="tokens"), "rings": self.rings(),
                "daily_key": self.daily_key, "spent": self.spent(amounts), "slots": self.slots()}

    def for_snapshot(self) -> dict[str, Any]:
        """snapshot.lua's groups: every limit of this call, set or not, with where its usage is counted."""
        return {"pauses": self.pauses(), "slots": self.slots(), "daily_key": self.daily_key,
                "quotas": self.quotas(configured=False), "usage": self.usage()}

    # --- the groups ---------------------------------------------------------------

    def kinds(self, mechanism: Mechanism | None = None, *, configured: bool = False) -> list[LimitKind]:
        """This call's kinds (of one `mechanism`, if given): per-model ones only with a model; only
        those the config sets, if `configured`."""
        return [
            kind for kind in KINDS
            if mechanism in (None, kind.mechanism) and (self.model is not None or not kind.per_model)
            and (not configured or kind.value(self.limits, self.model))
        ]

    def scope(self, *, per_model: bool = False) -> str:
        """Where limits live: per API key when the config says so, under the model for per-model limits."""
        api_key_id = (self.api_key_id or None) if self.limits.per_api_key else None
        model = self.model if per_model else None
        return keys.rate_limit_scope(self.provider, api_key_id=api_key_id, model=model)

    @property
    def daily_key(self) -> str:
        return keys.rate_limit_daily(self.provider)

    def pauses(self) -> list[dict[str, Any]]:
        """Every pause that holds this call back: the provider's, its model's, its API key's."""
        names = [pause_key(self.provider)]
        if self.model is not None:
            names.append(pause_key(self.provider, model=self.model))
        if self.api_key_id:
            names.append(pause_key(self.provider, api_key_id=self.api_key_id))
        return [{"key": name} for name in dict.fromkeys(names)]

    def slots(self) -> list[dict[str, Any]]:
        """Every concurrency cap; a lease is kept in each even without a cap, to count calls in flight."""
        return [
            {"limit": kind.limit, "most": kind.value(self.limits, self.model) or 0,
             "key": keys.rate_limit_leases(self.scope(per_model=kind.per_model))}
            for kind in self.kinds("slots")
        ]

    def quotas(self, asks: Amounts | None = None, *, configured: bool = True) -> list[dict[str, Any]]:
        """The daily quotas set (every quota, for a report); `asks`: what this call would add, where known."""
        groups = []
        for kind in self.kinds("quota", configured=configured):
            quota, ask = kind.value(self.limits, self.model), asks.get(kind.measure) if asks is not None else None
            group = {"limit": kind.limit, "field": kind.measure, "quota": quota, "ask": ask}
            # Absent, not null: a script reads a missing field as nil (JSON null is not).
            groups.append({name: value for name, value in group.items() if value is not None})
        return groups

    def spent(self, amounts: Amounts) -> list[dict[str, Any]]:
        """What a finished call adds to each daily counter (counted whether a quota is set or not)."""
        return [{"field": kind.measure, "amount": amounts.get(kind.measure) or 0} for kind in self.kinds("quota")]

    def buckets(self, burst_s: Mapping[Measure, float], costs: Amounts | None = None,
                measure: Measure | None = None) -> list[dict[str, Any]]:
        """The buckets set (of one `measure`, if given); `costs`: what this call takes from each, by measure."""
        groups = []
        for kind in self.kinds("bucket", configured=True):
            if measure is not None and kind.measure != measure:
                continue
            per_minute = kind.value(self.limits, self.model)
            key = keys.rate_limit_bucket(self.scope(per_model=kind.per_model), kind.key_name)
            burst = burst_units(per_minute, burst_s[kind.measure])
            group = {"limit": kind.limit, "per_minute": per_minute, "burst": burst, "key": key}
            if costs is not None:  # acquire: what the call takes, and the bucket's line
                claims = kind.measure == "tokens"  # so a large request is not starved by small ones
                group |= {"cost": costs[kind.measure], "claims": claims, "line_key": keys.rate_limit_line(key)}
            groups.append(group)
        return groups

    def rings(self) -> list[dict[str, Any]]:
        """The usage rings of the scopes the buckets live in: the provider's (or API key's), the model's."""
        names = dict.fromkeys(self._ring(kind) for kind in self.kinds("bucket"))
        return [{"key": name} for name in names]

    def usage(self) -> list[dict[str, Any]]:
        """For `snapshot`: each bucket kind with the ring that counts its measure, configured or not."""
        return [{"limit": kind.limit, "measure": kind.measure, "key": self._ring(kind)} for kind in self.kinds("bucket")]

    def _ring(self, kind: LimitKind) -> str:
        return keys.rate_limit_usage(self.scope(per_model=kind.per_model))
