"""Request -> ordered route of (provider, model) hops -> queue names.

An explicit `provider` wins (and pins the job to it). Otherwise: the configured
providers that serve the model, in config order; then the default provider and
the fallback chain, each with its stand-in model. Providers that are not
configured (missing key, disabled) are skipped.
"""

from __future__ import annotations

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
        return [_pinned_hop(request, config, usable)]
    route: list[Hop] = []
    seen: set[str] = set()
    for name, entry in config.providers.items():
        if usable(name) and entry.serves(request.model):
            route.append(Hop(provider=name, model=entry.model_for(request.model) or request.model))
            seen.add(name)
    chain = [config.service.default_provider, *config.service.fallback_chain]
    for name in chain:
        if name is None or name in seen:
            continue
        seen.add(name)
        entry = config.providers[name]
        model = entry.model_for(request.model)
        if usable(name) and model:
            route.append(Hop(provider=name, model=model))
    if not route:
        configured = config.configured_providers()
        raise RoutingError(
            f"model {request.model!r}: no configured provider serves it"
            + (f" (configured: {', '.join(configured)})" if configured else " (no provider is configured)")
            + "; fix: add the model to a provider's models or stand_ins, set that provider's API key, or pass provider="
        )
    return route


def _pinned_hop(request: LLMRequest, config: LLMConfig, usable: Callable[[str], bool]) -> Hop:
    name = request.provider
    assert name is not None
    if name not in config.providers:
        raise RoutingError(f"provider {name!r} is not in the config; use one of: {', '.join(config.providers)}")
    entry = config.providers[name]
    if not usable(name):
        raise RoutingError(f"provider {name!r} is not configured ({entry.not_configured_reason})")
    return Hop(provider=name, model=entry.model_for(request.model) or request.model)


def larger_context_hop(hop: Hop, config: LLMConfig) -> Hop | None:
    """The hop to try after a context-window error, if the config names a larger model."""
    bigger = config.service.context_fallbacks.get(hop.model)
    return Hop(provider=hop.provider, model=bigger) if bigger else None
