"""Scheduling settings: pools (provider entries that share one hop's traffic) and lanes.

A pool is named under `pools:` or written in place as a nested list of the fallback chain
(`fallback_chain: [[openai_a, openai_b], anthropic]`, named `openai_a+openai_b`). Routing
(routing.py) expands a pool where any member would stand; the worker picks the member each
job runs on (worker/middleware/pool.py). Lanes: interactive jobs go before batch jobs, and
batch jobs share what is left fairly by flow, each with its weight here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

#: How a pool picks the member a job runs on (docs/configuration.md, "Pools").
PoolStrategy = Literal["headroom", "weighted", "latency"]
#: A limit a pool's members may be weighed by when the pool names no weights, in order of preference.
SHARE_LIMITS = ("requests_per_minute", "tokens_per_minute")


class PoolSettings(BaseModel):
    """Provider entries that share the traffic of one hop of a route (a pool)."""

    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(min_length=2)
    #: `headroom`: the member that can take the job soonest, then the one with the most room left;
    #: `weighted`: a member drawn by `weights` among those that can take it now; `latency`: the fastest
    #: lately among those that can take it now. Whatever the strategy, a job a member's limits would
    #: set aside goes to a member that can take it now, and an open circuit is avoided.
    strategy: PoolStrategy = "headroom"
    #: Member -> its share of the traffic: what `weighted` draws by, and how every strategy spreads
    #: the jobs' first messages over the members' queues. Members not named weigh 1; without any,
    #: each member weighs its requests_per_minute (else tokens_per_minute) when all set one.
    weights: dict[str, PositiveFloat] = Field(default_factory=dict)

    def shares(self, limits: Mapping[str, Any]) -> dict[str, float]:
        """Each member's share: its weight, else its limit (`limits`: member -> its RateLimits)."""
        if self.weights:
            return {member: self.weights.get(member, 1.0) for member in self.members}
        for field in SHARE_LIMITS:
            values = [getattr(limits[member], field) for member in self.members]
            if all(values):
                return dict(zip(self.members, map(float, values)))
        return dict.fromkeys(self.members, 1.0)


class LaneSettings(BaseModel):
    """Lanes: interactive jobs go before batch jobs; batch jobs share what is left by flow."""

    model_config = ConfigDict(extra="forbid")

    #: A batch-lane flow (a request's metadata["caller"], else its batch id) -> its weight in the lane's
    #: fair share; "*" weighs every flow not named (default 1).
    weights: dict[str, PositiveFloat] = Field(default_factory=dict)

    def weight(self, flow_name: str | None) -> float:
        default = self.weights.get("*", 1.0)
        return self.weights.get(flow_name, default) if flow_name is not None else default


ChainItem = str | list[str]


def all_pools(chain: list[ChainItem], pools: Mapping[str, PoolSettings]) -> dict[str, PoolSettings]:
    """The named pools and the chain's nested lists (named by their members, joined by '+')."""
    nested = {"+".join(item): PoolSettings(members=item) for item in chain if isinstance(item, list)}
    return {**pools, **nested}


def chain_names(default_provider: str | None, chain: list[ChainItem]) -> list[str]:
    """The default provider and the chain as names of entries and pools, in order."""
    items = [default_provider, *chain]
    return ["+".join(item) if isinstance(item, list) else item for item in items if item is not None]


def check_routes(default_provider: str | None, chain: list[ChainItem], pools: Mapping[str, PoolSettings],
                 known: set[str]) -> None:
    """The names routes are written with: the default provider and the chain name entries (`known`)
    or pools; pools name entries, each in one pool at most. A ValueError names the key and the fix."""
    routable = known | set(pools)
    if default_provider is not None and default_provider not in routable:
        raise ValueError(f"default_provider {default_provider!r} is not under providers or pools; "
                         f"use one of: {', '.join(sorted(routable))}")
    for index, item in enumerate(chain):
        if isinstance(item, list):
            _check_members(f"fallback_chain[{index}]", item, known)
        elif item not in routable:
            raise ValueError(f"fallback_chain names {item!r}, which is not under providers or pools; "
                             f"use only: {', '.join(sorted(routable))}")
    for name, pool in pools.items():
        if name in known:
            raise ValueError(f"pools.{name}: a pool cannot share its name with a provider entry; rename the pool")
        _check_members(f"pools.{name}.members", pool.members, known)
        strangers = sorted(set(pool.weights) - set(pool.members))
        if strangers:
            raise ValueError(f"pools.{name}.weights names {strangers[0]!r}, which is not a member; "
                             f"weigh only: {', '.join(pool.members)}")
    owner: dict[str, str] = {}
    for name, pool in all_pools(chain, pools).items():
        for member in pool.members:
            if member in owner:
                raise ValueError(f"provider {member!r} is in two pools ({owner[member]} and {name}); "
                                 "an entry belongs to one pool at most")
            owner[member] = name


def _check_members(where: str, members: list[str], known: set[str]) -> None:
    if len(members) < 2:
        raise ValueError(f"{where}: a pool needs at least two members; list them, or name the entry alone")
    for member in members:
        if member not in known:
            raise ValueError(f"{where} names {member!r}, which is not under providers; "
                             f"use only: {', '.join(sorted(known))}")
    if len(set(members)) < len(members):
        raise ValueError(f"{where} lists a member twice; list each provider entry once")
