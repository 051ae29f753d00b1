"""Daily budgets per caller and per provider entry, as engine middleware.

A caller is the request's `metadata["caller"]` (set by the HTTP front to the name of the
caller's API key). Its budget is the job's `caller_daily_usd` option when the job has one
(the front passes the key's own `--daily-usd`), else `per_caller_daily_usd`. Spend is counted in Redis per
UTC day (lua/budget.lua beside this module, whole micro-USD, on Redis's clock) from each usage
row's cost, after the call; before a call the middleware compares what the
caller and the provider have spent today with their budgets
(`llm_service.budgets`). Once either is spent:

- `on_exhausted: hold`: the job waits for the next UTC day without holding a
  slot (state `rate_limited`, `waiting_for: budget`); its deadline still applies;
- `on_exhausted: reroute`: the job moves to the next provider on its route
  (`QuotaExceededError` on this hop, no call); with none left it fails with it.

A provider that costs nothing (a local adapter with no `pricing:` override) is
never held back by a budget: a caller over budget may still use it.

A budget is a cap checked before each call, not a reservation: calls already in
flight when it fills may pass it by their own cost.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.jobs import CALLER_BUDGET_OPTION
from llmq.contract.models import JobResponse, JobState
from llmq.contract.scripts import read_script
from llmq.worker import errors
from llmq.worker.middleware.base import Defer, Middleware, Skip, Verdict

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

LUA_SOURCE = read_script(__file__, "budget.lua")
MICRO_USD_PER_USD = 1_000_000
#: Counters outlive their day by a day, so a report for yesterday still reads them.
COUNTER_TTL_S = 2 * 86400
#: Held jobs wake spread over this long after midnight (UTC), not all at once.
WAKE_SPREAD_S = 60.0
WILDCARD_CALLER = "*"


@dataclass(frozen=True)
class Overspend:
    kind: str  # "caller" or "provider"
    name: str
    spent_usd: float
    budget_usd: float


class BudgetMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.config.service.budgets
        self._script = runtime.redis.register_script(LUA_SOURCE)

    def _free(self, provider: str) -> bool:
        entry = self.runtime.config.provider(provider)
        return self.runtime.provider(provider).local and not entry.pricing

    def _caller(self, attempt: Attempt) -> str | None:
        caller = attempt.request.metadata.get("caller")
        return str(caller) if caller not in (None, "") else None

    def _caller_budget(self, attempt: Attempt, caller: str | None) -> float | None:
        if caller is None:
            return None
        own = attempt.options.get(CALLER_BUDGET_OPTION)
        if own is not None:
            return float(own)
        budgets = self.settings.per_caller_daily_usd
        return budgets.get(caller, budgets.get(WILDCARD_CALLER))

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        if not self.settings.enabled and CALLER_BUDGET_OPTION not in attempt.options:
            return None
        provider, caller = attempt.hop.provider, self._caller(attempt)
        caller_budget = self._caller_budget(attempt, caller)
        provider_budget = self.settings.per_provider_daily_usd.get(provider)
        if (caller_budget is None and provider_budget is None) or self._free(provider):
            return None
        caller_spent, provider_spent, next_day_s = await self._script(
            keys=[keys.budget_spend("caller", caller) if caller else "", keys.budget_spend("provider", provider)],
            args=["check"],
        )
        over = _overspend(caller, caller_budget, int(caller_spent), provider, provider_budget, int(provider_spent))
        if over is None:
            return None
        if self.settings.on_exhausted == "reroute":
            return Skip(errors.QuotaExceededError(
                f"daily budget of {over.kind} {over.name!r} is spent (${over.spent_usd:.4f} of ${over.budget_usd:g} "
                "today, UTC); moved to the next provider", provider=provider, model=attempt.hop.model,
            ))
        return Defer(int(next_day_s) + random.uniform(0, WAKE_SPREAD_S), JobState.RATE_LIMITED, reason="budget")

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        own_budget = CALLER_BUDGET_OPTION in attempt.options
        if not self.settings.enabled and not own_budget:
            return
        amount = micro_usd(usage_row.get("cost_usd"))
        if amount <= 0:
            return
        # Everyone's spend is counted while any budget exists, so a budget added mid-day sees the whole day.
        caller = self._caller(attempt) if self.settings.per_caller_daily_usd or own_budget else None
        await self._script(
            keys=[keys.budget_spend("caller", caller) if caller else "", keys.budget_spend("provider", attempt.hop.provider)],
            args=["add", amount, COUNTER_TTL_S],
        )


def micro_usd(cost: Any) -> int:
    """A usage row's cost (a decimal string, or None when unpriced) in whole micro-USD, rounded up."""
    if cost in (None, ""):
        return 0
    return math.ceil(Decimal(str(cost)) * MICRO_USD_PER_USD)


def _overspend(
    caller: str | None, caller_budget: float | None, caller_spent: int,
    provider: str, provider_budget: float | None, provider_spent: int,
) -> Overspend | None:
    if caller is not None and caller_budget is not None and caller_spent >= caller_budget * MICRO_USD_PER_USD:
        return Overspend("caller", caller, caller_spent / MICRO_USD_PER_USD, caller_budget)
    if provider_budget is not None and provider_spent >= provider_budget * MICRO_USD_PER_USD:
        return Overspend("provider", provider, provider_spent / MICRO_USD_PER_USD, provider_budget)
    return None
