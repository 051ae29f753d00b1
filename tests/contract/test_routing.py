"""Routing (llmq.contract.routing): a request becomes an ordered route of (provider, model) hops.

An explicit provider pins the job to one hop. Otherwise the configured providers
that serve the model come first, in config order, then the default provider and
the fallback chain, each with its stand-in model. Unconfigured providers are
skipped, unless live workers report them configured.
"""

from __future__ import annotations

import pytest

from llmq.contract.config import LLMConfig, parse_config
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.routing import RoutingError, larger_context_hop, plan_route

# Config order on purpose: not alphabetical, and not the fallback chain's order.
CONFIG = """
llm_service:
  default_provider: openai
  fallback_chain: [gemini, anthropic, local, anywhere]
  context_fallbacks: {gpt-4: gpt-4-turbo, gpt-4o-mini: gpt-4o}
  providers:
    zeta_azure: {type: azure_openai, api_key: "${AZURE_KEY}", base_url: "http://azure", models: [gpt-4o, gpt-4]}
    openai: {api_key: "${OPENAI_KEY}", models: [gpt-4o, gpt-4o-mini, gpt-4, gpt-4-turbo]}
    anthropic:
      api_key: "${ANTHROPIC_KEY}"
      models: [claude-3-opus, claude-3-haiku]
      stand_ins: {gpt-4o: claude-3-opus, gpt-4o-mini: claude-3-haiku}
    gemini: {api_key: "${GEMINI_KEY}", models: [gemini-1.5-pro], stand_ins: {gpt-4o: gemini-1.5-pro}}
    local: {type: ollama, models: [llama3], default_model: llama3}
    anywhere: {type: mock}
    switched_off: {type: mock, enabled: false, models: [gpt-4o]}
"""

ALL_KEYS = {"AZURE_KEY": "a", "OPENAI_KEY": "o", "ANTHROPIC_KEY": "c", "GEMINI_KEY": "g"}


def config_with(**environ: str) -> LLMConfig:
    return parse_config(CONFIG, environ=environ)


def ask(model: str, provider: str | None = None) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": "x"}], model=model, provider=provider)


def route(config: LLMConfig, model: str, workers_configured: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    return [(hop.provider, hop.model) for hop in plan_route(ask(model), config, workers_configured)]


# --- explicit provider -----------------------------------------------------------------


def test_an_explicit_provider_is_the_only_hop() -> None:
    config = config_with(**ALL_KEYS)
    assert plan_route(ask("gpt-4o", provider="zeta_azure"), config) == [Hop(provider="zeta_azure", model="gpt-4o")]


def test_an_explicit_provider_runs_its_stand_in_or_default_model() -> None:
    config = config_with(**ALL_KEYS)
    assert plan_route(ask("gpt-4o-mini", provider="anthropic"), config) == [
        Hop(provider="anthropic", model="claude-3-haiku")
    ]
    assert plan_route(ask("gpt-4o", provider="local"), config) == [Hop(provider="local", model="llama3")]
    # No stand-in and no default: the requested model goes as it is (the caller asked for this provider).
    assert plan_route(ask("gpt-4o", provider="openai"), config) == [Hop(provider="openai", model="gpt-4o")]
    assert plan_route(ask("mystery", provider="openai"), config) == [Hop(provider="openai", model="mystery")]


def test_an_explicit_provider_not_in_the_config_names_the_ones_that_are() -> None:
    with pytest.raises(RoutingError) as raised:
        plan_route(ask("gpt-4o", provider="nowhere"), config_with(**ALL_KEYS))
    assert str(raised.value) == (
        "provider 'nowhere' is not in the config; use one of: "
        "zeta_azure, openai, anthropic, gemini, local, anywhere, switched_off"
    )


def test_an_explicit_provider_that_is_not_configured_says_why() -> None:
    config = config_with()
    with pytest.raises(RoutingError) as missing_key:
        plan_route(ask("gpt-4o", provider="openai"), config)
    assert str(missing_key.value) == "provider 'openai' is not configured (environment variable not set: OPENAI_KEY)"
    with pytest.raises(RoutingError) as disabled:
        plan_route(ask("gpt-4o", provider="switched_off"), config)
    assert str(disabled.value) == "provider 'switched_off' is not configured (disabled in config (enabled: false))"


def test_an_explicit_provider_whose_key_only_the_workers_hold_is_usable() -> None:
    config = config_with()
    pinned = plan_route(ask("gpt-4o", provider="openai"), config, frozenset({"openai"}))
    assert pinned == [Hop(provider="openai", model="gpt-4o")]
    # A provider switched off in the config stays off, whatever the workers say.
    with pytest.raises(RoutingError, match="disabled in config"):
        plan_route(ask("gpt-4o", provider="switched_off"), config, frozenset({"switched_off"}))


# --- providers that serve the model, then the chain ----------------------------------------


def test_providers_serving_the_model_come_first_in_config_order() -> None:
    assert route(config_with(**ALL_KEYS), "gpt-4") == [
        ("zeta_azure", "gpt-4"), ("openai", "gpt-4"),
        # Then the chain, default provider first (already on the route: not repeated).
        ("local", "llama3"), ("anywhere", "gpt-4"),
    ]


def test_config_order_not_name_order_decides() -> None:
    def two_providers(first: str, second: str) -> LLMConfig:
        entries = "".join(f"    {name}: {{type: mock, models: [m]}}\n" for name in (first, second))
        return parse_config(f"llm_service:\n  providers:\n{entries}", environ={})

    assert route(two_providers("beta", "alpha"), "m") == [("beta", "m"), ("alpha", "m")]
    assert route(two_providers("alpha", "beta"), "m") == [("alpha", "m"), ("beta", "m")]


def test_the_fallback_chain_follows_with_each_providers_stand_in() -> None:
    assert route(config_with(**ALL_KEYS), "gpt-4o") == [
        ("zeta_azure", "gpt-4o"), ("openai", "gpt-4o"),
        ("gemini", "gemini-1.5-pro"), ("anthropic", "claude-3-opus"), ("local", "llama3"), ("anywhere", "gpt-4o"),
    ]


def test_a_chain_provider_with_no_stand_in_and_no_default_is_left_out() -> None:
    # gemini has no stand-in for gpt-4o-mini and no default_model: it is not given a model it was never told of.
    assert route(config_with(**ALL_KEYS), "gpt-4o-mini") == [
        ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-haiku"), ("local", "llama3"), ("anywhere", "gpt-4o-mini"),
    ]


def test_the_default_provider_comes_before_the_chain() -> None:
    config = config_with(**ALL_KEYS)
    # openai does not list claude-3-opus and has no stand-in for it: as default provider it is skipped.
    assert route(config, "claude-3-opus") == [
        ("anthropic", "claude-3-opus"), ("local", "llama3"), ("anywhere", "claude-3-opus"),
    ]
    with_default_stand_in = CONFIG.replace(
        'models: [gpt-4o, gpt-4o-mini, gpt-4, gpt-4-turbo]}',
        'models: [gpt-4o, gpt-4o-mini, gpt-4, gpt-4-turbo], stand_ins: {claude-3-opus: gpt-4}}',
    )
    config = parse_config(with_default_stand_in, environ=ALL_KEYS)
    assert route(config, "claude-3-opus")[:2] == [("anthropic", "claude-3-opus"), ("openai", "gpt-4")]


def test_no_default_provider_and_no_chain_leaves_only_the_serving_providers() -> None:
    config = parse_config(
        "llm_service:\n  providers:\n    first: {type: mock, models: [m]}\n    second: {type: mock, models: [n]}\n"
        "    third: {type: mock, models: [m]}\n",
        environ={},
    )
    assert route(config, "m") == [("first", "m"), ("third", "m")]


# --- what is configured --------------------------------------------------------------------


def test_unconfigured_providers_are_skipped_in_both_parts_of_the_route() -> None:
    assert route(config_with(OPENAI_KEY="o"), "gpt-4o") == [
        ("openai", "gpt-4o"), ("local", "llama3"), ("anywhere", "gpt-4o"),
    ]
    assert route(config_with(), "gpt-4o") == [("local", "llama3"), ("anywhere", "gpt-4o")]


def test_a_disabled_provider_is_skipped_even_when_it_serves_the_model() -> None:
    assert "switched_off" not in {provider for provider, _ in route(config_with(**ALL_KEYS), "gpt-4o")}


def test_providers_configured_only_on_the_workers_are_routed_to() -> None:
    workers = frozenset({"openai", "gemini", "switched_off"})
    assert route(config_with(), "gpt-4o", workers) == [
        ("openai", "gpt-4o"), ("gemini", "gemini-1.5-pro"), ("local", "llama3"), ("anywhere", "gpt-4o"),
    ]


# --- refusals ------------------------------------------------------------------------------


def test_a_model_nobody_serves_is_refused_with_the_fix() -> None:
    config = parse_config(
        "llm_service:\n  default_provider: a\n  providers:\n    a: {type: mock, models: [m]}\n"
        "    b: {type: openai, api_key: '${B_KEY}', models: [n]}\n",
        environ={},
    )
    with pytest.raises(RoutingError) as raised:
        plan_route(ask("mystery"), config)
    assert str(raised.value) == (
        "model 'mystery': no configured provider serves it (configured: a); fix: add the model to a provider's "
        "models or stand_ins, set that provider's API key, or pass provider="
    )


def test_with_no_provider_configured_the_message_says_so() -> None:
    config = parse_config(
        "llm_service:\n  providers:\n    b: {type: openai, api_key: '${B_KEY}', models: [n]}\n", environ={}
    )
    with pytest.raises(RoutingError, match=r"no configured provider serves it \(no provider is configured\); fix: "):
        plan_route(ask("n"), config)
    assert route(config, "n", frozenset({"b"})) == [("b", "n")]


def test_a_routing_error_is_a_value_error() -> None:
    assert issubclass(RoutingError, ValueError)


# --- larger context --------------------------------------------------------------------------


def test_a_context_window_error_moves_to_the_larger_model_on_the_same_provider() -> None:
    config = config_with(**ALL_KEYS)
    assert larger_context_hop(Hop(provider="zeta_azure", model="gpt-4"), config) == Hop(
        provider="zeta_azure", model="gpt-4-turbo"
    )
    assert larger_context_hop(Hop(provider="openai", model="gpt-4o-mini"), config) == Hop(
        provider="openai", model="gpt-4o"
    )


def test_no_larger_model_configured_means_no_hop() -> None:
    config = config_with(**ALL_KEYS)
    assert larger_context_hop(Hop(provider="openai", model="gpt-4-turbo"), config) is None
    assert larger_context_hop(Hop(provider="anthropic", model="claude-3-opus"), config) is None
