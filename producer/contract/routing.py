"""Request -> ordered route of (provider, model) hops -> queue names.

An explicit `provider` wins (and pins the job to it, or to a pool). Otherwise: the
configured providers that serve the model, in config order; then the default provider
and the fallback chain, each with its stand-in model. Providers that are not
configured (missing key, disabled) are skipped.

A pool expands where any of its members would stand: its members' hops side by side,
each marked with the pool, so the worker runs the job on whichever has the most room
and the route moves past the pool only when none can serve.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from llmq.contract.config import LLMConfig
from llmq.contract.models import Hop, LLMRequest


class RoutingError(ValueError):
    """No configured provider can take the request; the message says what to fix."""


def plan_route(request: LLMRequest, config: LLMConfig, workers_configured: frozenset[str] = frozenset()) -> list[Hop]:
    """`workers_configured`: providers that live workers report configured (they hold the keys,
    which the caller's own environment may not)."""

    def usable(name: str) -> bool:
        entry = config.providers[name]
        return entry.configured or (entry.enabled and name in workers_configured)

    if request.provider is not None:
        return _pinned_route(request, config, usable)
    route: list[Hop] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        """The entry's hop, with its pool's other members beside it."""
        pool = config.pool_of(name)
        for member in config.members(pool) if pool else [name]:
            if member in seen:
                continue
            seen.add(member)
            model = config.providers[member].model_for(request.model)
            if usable(member) and model:
                route.append(Hop(provider=member, model=model, pool=pool))

    for name, entry in config.providers.items():
        if usable(name) and entry.serves(request.model):
            add(name)
    for name in config.chain():
        for member in config.members(name):
            add(member)
    if not route:
        configured = config.configured_providers()
        raise RoutingError(
            f"model {request.model!r}: no configured provider serves it"
            + (f" (configured: {', '.join(configured)})" if configured else " (no provider is configured)")
            + "; fix: add the model to a provider's models or stand_ins, set that provider's API key, or pass provider="
        )
    return route


def _pinned_route(request: LLMRequest, config: LLMConfig, usable: Callable[[str], bool]) -> list[Hop]:
    """A pinned entry's hop, or a pinned pool's usable members."""
    name = request.provider
    assert name is not None
    if name in config.pools:
        hops = [Hop(provider=member, model=config.providers[member].model_for(request.model) or request.model,
                    pool=name) for member in config.members(name) if usable(member)]
        if not hops:
            raise RoutingError(f"pool {name!r}: none of its members is configured ({', '.join(config.members(name))})")
        return hops
    if name not in config.providers:
        raise RoutingError(f"provider {name!r} is not in the config; use one of: "
                           f"{', '.join([*config.providers, *config.pools])}")
    entry = config.providers[name]
    if not usable(name):
        raise RoutingError(f"provider {name!r} is not configured ({entry.not_configured_reason})")
    return [Hop(provider=name, model=entry.model_for(request.model) or request.model)]


def pool_group(route: list[Hop], index: int) -> range:
    """The indexes of the hops from `index` on that share its pool (just `index` for a hop in none)."""
    pool, end = route[index].pool, index + 1
    while pool is not None and end < len(route) and route[end].pool == pool:
        end += 1
    return range(index, end)


def spread_pools(route: list[Hop], config: LLMConfig, rng: random.Random | None = None) -> list[Hop]:
    """Put a member drawn by the pool's weights first in each pool's group of hops, so the jobs'
    first messages spread over the members' queues in proportion. Workers then move each job to
    the member with the most room when it runs; this only spreads the broker's work."""
    draw = rng or random
    spread, index = list(route), 0
    while index < len(spread):
        group = pool_group(spread, index)
        if len(group) > 1 and (pool := spread[index].pool) in config.pools:
            weights = config.pool_weights(pool)
            chosen = draw.choices(list(group), weights=[weights.get(spread[i].provider, 1.0) for i in group])[0]
            spread.insert(index, spread.pop(chosen))
        index = group.stop
    return spread


def larger_context_hop(hop: Hop, config: LLMConfig) -> Hop | None:
    """The hop to try after a context-window error, if the config names a larger model."""
    bigger = config.service.context_fallbacks.get(hop.model)
    return Hop(provider=hop.provider, model=bigger) if bigger else None
