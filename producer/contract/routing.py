"""Request -> ordered route of (provider, model) hops -> queue names.

An explicit `provider` wins (and pins the job to it, or to a pool). Otherwise: the
configured providers that serve the model, in config order; then the default provider
and the fallback chain, each with its stand-in model. Providers that are not
configured (missing key, disabled) are skipped, and so is every hop whose model
lacks what the request needs (tools, a JSON schema, vision, embeddings, room for
max_tokens, a context window that can hold the prompt's fewest possible tokens:
`llmq.contract.capabilities`), stand-ins included. A request no hop can serve is
refused, naming what it needs and each entry considered.

A pool expands where any of its members would stand: its members' hops side by side,
each marked with the pool, so the worker runs the job on whichever has the most room
and the route moves past the pool only when none can serve.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from llmq.contract.capabilities import Needs, capabilities_for, needs_of
from llmq.contract.config import LLMConfig
from llmq.contract.models import Hop, JobRequest


class RoutingError(ValueError):
    """No configured provider can take the request; the message says what to fix."""


def plan_route(request: JobRequest, config: LLMConfig, workers_configured: frozenset[str] = frozenset()) -> list[Hop]:
    """`workers_configured`: providers that live workers report configured (they hold the keys,
    which the caller's own environment may not)."""

    def usable(name: str) -> bool:
        entry = config.providers[name]
        return entry.configured or (entry.enabled and name in workers_configured)

    needs = needs_of(request)
    if request.provider is not None:
        return _pinned_route(request, config, usable, needs)
    route: list[Hop] = []
    seen: set[str] = set()
    refused: list[str] = []

    def add(name: str) -> None:
        """The entry's hop, with its pool's other members beside it."""
        pool = config.pool_of(name)
        for member in config.members(pool) if pool else [name]:
            if member in seen:
                continue
            seen.add(member)
            model = config.providers[member].model_for(request.model)
            if not (usable(member) and model):
                continue
            missing = capabilities_for(config.providers[member], model).lacks(needs)
            if missing:
                refused.append(f"{member}/{model} lacks {', '.join(missing)}")
            else:
                route.append(Hop(provider=member, model=model, pool=pool))

    for name, entry in config.providers.items():
        if usable(name) and entry.serves(request.model):
            add(name)
    for name in config.chain():
        for member in config.members(name):
            add(member)
    if not route:
        raise RoutingError(_no_route_message(request.model, needs, refused, config))
    return route


def _no_route_message(model: str, needs: Needs, refused: list[str], config: LLMConfig) -> str:
    if refused:
        return (
            f"model {model!r}: no configured provider can serve this request, which needs "
            f"{', '.join(needs.features)}; considered: {'; '.join(refused)}; fix: ask for a model that has it, "
            "or set the entry's capabilities in the config if the model has it; where room lacks, shorten the "
            "prompt, lower max_tokens or ask for a model with a larger context window (docs/requests.md)"
        )
    configured = config.configured_providers()
    return (
        f"model {model!r}: no configured provider serves it"
        + (f" (configured: {', '.join(configured)})" if configured else " (no provider is configured)")
        + "; fix: add the model to a provider's models or stand_ins, set that provider's API key, or pass provider="
    )


def _pinned_route(request: JobRequest, config: LLMConfig, usable: Callable[[str], bool], needs: Needs) -> list[Hop]:
    """A pinned entry's hop, or a pinned pool's usable members that have what the request needs."""
    name = request.provider
    assert name is not None
    if name in config.pools:
        members = [member for member in config.members(name) if usable(member)]
        if not members:
            raise RoutingError(f"pool {name!r}: none of its members is configured ({', '.join(config.members(name))})")
        return [_pinned_hop(request, config, member, needs, pool=name) for member in members]
    if name not in config.providers:
        raise RoutingError(f"provider {name!r} is not in the config; use one of: "
                           f"{', '.join([*config.providers, *config.pools])}")
    entry = config.providers[name]
    if not usable(name):
        raise RoutingError(f"provider {name!r} is not configured ({entry.not_configured_reason})")
    return [_pinned_hop(request, config, name, needs)]


def _pinned_hop(request: JobRequest, config: LLMConfig, name: str, needs: Needs, pool: str | None = None) -> Hop:
    entry = config.providers[name]
    hop = Hop(provider=name, model=entry.model_for(request.model) or request.model, pool=pool)
    missing = capabilities_for(entry, hop.model).lacks(needs)
    if missing:
        raise RoutingError(
            f"provider {name!r} model {hop.model!r} cannot serve this request: it lacks {', '.join(missing)}; "
            "fix: pin a provider whose model has it, or drop provider= to let routing choose"
        )
    return hop


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


def can_serve(hop: Hop, request: JobRequest, config: LLMConfig) -> bool:
    """Whether a hop's model has what the request needs (for hops added after submit)."""
    return not capabilities_for(config.provider(hop.provider), hop.model).lacks(needs_of(request))


def larger_context_hop(hop: Hop, config: LLMConfig, request: JobRequest | None = None) -> Hop | None:
    """The hop to try after a context-window error, if the config names a larger model that can serve the request."""
    bigger = config.service.context_fallbacks.get(hop.model)
    if not bigger:
        return None
    larger = Hop(provider=hop.provider, model=bigger)
    return larger if request is None or can_serve(larger, request, config) else None
