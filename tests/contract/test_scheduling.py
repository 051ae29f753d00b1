"""Pools and lanes in the config (llmq.contract.scheduling) and on routes (llmq.contract.routing):
a pool expands to its members' hops side by side wherever one member would stand; a bad pool
fails at load naming the key and the fix."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from llmq.contract.config import ConfigError, LLMConfig, parse_config
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.routing import RoutingError, plan_route, pool_group, spread_pools

CONFIG = """
llm_service:
  fallback_chain: [[claude_eu, claude_us], mock]
  pools:
    gpt:
      members: [openai_a, openai_b, azure]
      strategy: weighted
      weights: {openai_a: 3}
  lanes:
    weights: {curriculum: 2, "*": 0.5}
  providers:
    openai_a: {type: openai, api_key: "${KEY_A}", models: [gpt-4o-mini], rate_limits: {requests_per_minute: 600}}
    openai_b: {type: openai, api_key: "${KEY_B}", models: [gpt-4o-mini], rate_limits: {requests_per_minute: 1200}}
    azure: {type: azure_openai, api_key: "${AZURE_KEY}", base_url: "http://azure", stand_ins: {gpt-4o-mini: gpt-4o}}
    claude_eu:
      type: anthropic
      api_key: "${ANTHROPIC_KEY}"
      stand_ins: {gpt-4o-mini: claude-3-haiku}
      rate_limits: {tokens_per_minute: 100000}
    claude_us:
      type: anthropic
      api_key: "${ANTHROPIC_KEY}"
      stand_ins: {gpt-4o-mini: claude-3-haiku}
      rate_limits: {tokens_per_minute: 300000}
    mock: {type: mock}
"""
KEYS = {"KEY_A": "a", "KEY_B": "b", "AZURE_KEY": "z", "ANTHROPIC_KEY": "c"}


def config_with(**environ: str) -> LLMConfig:
    return parse_config(CONFIG, environ=environ)


def ask(model: str = "gpt-4o-mini", provider: str | None = None) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": "x"}], model=model, provider=provider)


def test_pools_are_named_or_nested_in_the_chain() -> None:
    config = config_with(**KEYS)
    assert set(config.pools) == {"gpt", "claude_eu+claude_us"}
    assert config.pool_of("openai_b") == "gpt" and config.pool_of("claude_us") == "claude_eu+claude_us"
    assert config.pool_of("mock") is None
    assert config.pools["gpt"].strategy == "weighted" and config.pools["claude_eu+claude_us"].strategy == "headroom"
    # Weights as given (members not named weigh 1), else each member's limit.
    assert config.pool_weights("gpt") == {"openai_a": 3.0, "openai_b": 1.0, "azure": 1.0}
    assert config.pool_weights("claude_eu+claude_us") == {"claude_eu": 100_000.0, "claude_us": 300_000.0}
    assert (config.service.lanes.weight("curriculum"), config.service.lanes.weight("other")) == (2.0, 0.5)


def test_a_pool_stands_where_its_first_member_would() -> None:
    config = config_with(**KEYS)
    route = plan_route(ask(), config)
    assert route == [
        Hop(provider="openai_a", model="gpt-4o-mini", pool="gpt"),
        Hop(provider="openai_b", model="gpt-4o-mini", pool="gpt"),
        Hop(provider="azure", model="gpt-4o", pool="gpt"),  # a member that only stands in comes with its pool
        Hop(provider="claude_eu", model="claude-3-haiku", pool="claude_eu+claude_us"),
        Hop(provider="claude_us", model="claude-3-haiku", pool="claude_eu+claude_us"),
        Hop(provider="mock", model="gpt-4o-mini"),
    ]
    assert list(pool_group(route, 1)) == [1, 2] and list(pool_group(route, 3)) == [3, 4]
    assert list(pool_group(route, 5)) == [5]


def test_members_without_keys_are_left_out_and_a_pool_can_be_pinned() -> None:
    config = config_with(KEY_B="b", ANTHROPIC_KEY="c")
    assert [hop.provider for hop in plan_route(ask(), config)] == ["openai_b", "claude_eu", "claude_us", "mock"]
    # Workers that hold a key make the member routable, as for any entry.
    with_workers = plan_route(ask(), config, frozenset({"openai_a"}))
    assert [hop.provider for hop in with_workers][:2] == ["openai_a", "openai_b"]
    assert [(hop.provider, hop.pool) for hop in plan_route(ask(provider="gpt"), config)] == [("openai_b", "gpt")]
    # Pinned to one member, the job stays there: no pool.
    assert plan_route(ask(provider="openai_b"), config) == [Hop(provider="openai_b", model="gpt-4o-mini")]
    with pytest.raises(RoutingError, match="pool 'gpt': none of its members is configured"):
        plan_route(ask(provider="gpt"), config_with())


def test_first_messages_spread_over_the_members_by_weight() -> None:
    config = config_with(**KEYS)
    route, rng = plan_route(ask(), config), random.Random(1)
    firsts = Counter(spread_pools(route, config, rng)[0].provider for _ in range(5000))
    assert firsts["openai_a"] / 5000 == pytest.approx(0.6, abs=0.03)  # 3 of 3 + 1 + 1
    assert firsts["openai_b"] / 5000 == pytest.approx(0.2, abs=0.03)
    spread = spread_pools(route, config, rng)
    # Only the order inside each pool changes.
    assert sorted(spread[:3], key=route.index) == route[:3] and spread[5:] == route[5:]
    assert {hop.provider for hop in spread[3:5]} == {"claude_eu", "claude_us"}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("  fallback_chain: [[openai_a]]\n", "fallback_chain[0]: a pool needs at least two members"),
        ("  fallback_chain: [[openai_a, ghost]]\n", "fallback_chain[0] names 'ghost', which is not under providers"),
        ("  fallback_chain: [[openai_a, openai_a]]\n", "lists a member twice"),
        ("  pools: {openai_a: {members: [openai_a, openai_b]}}\n", "pools.openai_a: a pool cannot share its name"),
        ("  pools: {p: {members: [openai_a, openai_b], weights: {mock: 2}}}\n",
         "pools.p.weights names 'mock', which is not a member"),
        ("  pools: {p: {members: [openai_a, openai_b], strategy: fastest}}\n", "llm_service.pools.p.strategy"),
        ("  pools: {p: {members: [openai_a, openai_b], weights: {openai_a: 0}}}\n", "llm_service.pools.p.weights.openai_a"),
        ("  pools: {p: {members: [openai_a, openai_b]}}\n  fallback_chain: [[openai_b, mock]]\n",
         "provider 'openai_b' is in two pools (p and openai_b+mock)"),
        ("  default_provider: nothing\n", "default_provider 'nothing' is not under providers or pools"),
        ("  lanes: {weights: {etl: -1}}\n", "llm_service.lanes.weights.etl"),
    ],
)
def test_bad_pools_and_lanes_fail_at_load_with_the_key_and_the_fix(section: str, expected: str) -> None:
    text = ("llm_service:\n" + section + "  providers:\n    openai_a: {type: openai}\n    openai_b: {type: openai}\n"
            "    mock: {type: mock}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source=Path("conf/llm.yaml"), environ={})
    assert expected in str(caught.value)


def test_a_pool_may_be_the_default_provider() -> None:
    text = CONFIG.replace("  fallback_chain: [[claude_eu, claude_us], mock]\n", "  default_provider: gpt\n")
    config = parse_config(text, environ=KEYS)
    assert config.chain() == ["gpt"]
    assert [hop.pool for hop in plan_route(ask(), config)] == ["gpt", "gpt", "gpt"]
