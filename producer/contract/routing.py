"""Request -> ordered route of (provider, model) hops -> queue names.

An explicit `provider` wins (and pins the job to it). Otherwise: the configured
providers that serve the model, in config order; then the default provider and
the fallback chain, each with its stand-in model. Providers that are not
configured (missing key, disabled) are skipped, and so is every hop whose model
lacks what the request needs (tools, a JSON schema, vision, embeddings, room for
max_tokens: `llmq.contract.capabilities`), stand-ins included. A request no hop
can serve is refused, naming what it needs and each entry considered.
"""

from __future__ import annotations

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
        return [_pinned_hop(request, config, usable, needs)]
    route: list[Hop] = []
    seen: set[str] = set()
    refused: list[str] = []

    def add(name: str, model: str) -> None:
        missing = capabilities_for(config.providers[name], model).lacks(needs)
        if missing:
            refused.append(f"{name}/{model} lacks {', '.join(missing)}")
        else:
            route.append(Hop(provider=name, model=model))

    for name, entry in config.providers.items():
        if usable(name) and entry.serves(request.model):
            add(name, entry.model_for(request.model) or request.model)
            seen.add(name)
    chain = [config.service.default_provider, *config.service.fallback_chain]
    for name in chain:
        if name is None or name in seen:
            continue
        seen.add(name)
        entry = config.providers[name]
        model = entry.model_for(request.model)
        if usable(name) and model:
            add(name, model)
    if not route:
        raise RoutingError(_no_route_message(request.model, needs, refused, config))
    return route


def _no_route_message(model: str, needs: Needs, refused: list[str], config: LLMConfig) -> str:
    if refused:
        return (
            f"model {model!r}: no configured provider can serve this request, which needs "
            f"{', '.join(needs.features)}; considered: {'; '.join(refused)}; fix: ask for a model that has it, "
            "or set the entry's capabilities in the config if the model has it (docs/requests.md)"
        )
    configured = config.configured_providers()
    return (
        f"model {model!r}: no configured provider serves it"
        + (f" (configured: {', '.join(configured)})" if configured else " (no provider is configured)")
        + "; fix: add the model to a provider's models or stand_ins, set that provider's API key, or pass provider="
    )


def _pinned_hop(request: JobRequest, config: LLMConfig, usable: Callable[[str], bool], needs: Needs) -> Hop:
    name = request.provider
    assert name is not None
    if name not in config.providers:
        raise RoutingError(f"provider {name!r} is not in the config; use one of: {', '.join(config.providers)}")
    entry = config.providers[name]
    if not usable(name):
        raise RoutingError(f"provider {name!r} is not configured ({entry.not_configured_reason})")
    hop = Hop(provider=name, model=entry.model_for(request.model) or request.model)
    missing = capabilities_for(entry, hop.model).lacks(needs)
    if missing:
        raise RoutingError(
            f"provider {name!r} model {hop.model!r} cannot serve this request: it lacks {', '.join(missing)}; "
            "fix: pin a provider whose model has it, or drop provider= to let routing choose"
        )
    return hop


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
