"""Cost of a call, checked by hand against the rates in genai-prices' bundled table."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import data_snapshot

from llmq.contract.config import ModelPrice
from llmq.contract.models import Usage
from llmq.worker.pricing import cost_usd, tier_cost
from llmq.worker.providers import registry
from llmq.worker.providers.mock import MockProvider

MILLION = Decimal(1_000_000)


def table_rates(provider_id: str, model: str) -> Any:
    """The rates genai-prices holds for a model today (its ModelPrice: *_mtok attributes)."""
    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    return info.get_prices(datetime.now(UTC))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pricing must work offline: any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pricing tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_openai_cached_input_is_billed_at_the_cache_rate_and_not_twice() -> None:
    rates = table_rates("openai", "gpt-4o")
    # prompt_tokens includes the 4,000 cached tokens.
    usage = Usage.of(12_000, 3_000, cached_read_tokens=4_000)
    expected = (8_000 * rates.input_mtok + 4_000 * rates.cache_read_mtok + 3_000 * rates.output_mtok) / MILLION
    assert rates.cache_read_mtok < rates.input_mtok
    assert cost_usd("openai", "gpt-4o", usage, overrides={}, local=False) == (expected, True)


def test_anthropic_cache_reads_and_writes_each_have_their_own_rate() -> None:
    rates = table_rates("anthropic", "claude-3-5-haiku-latest")
    usage = Usage.of(10_000, 2_000, cached_read_tokens=6_000, cache_write_tokens=1_000)
    expected = (
        3_000 * rates.input_mtok
        + 6_000 * rates.cache_read_mtok
        + 1_000 * rates.cache_write_mtok
        + 2_000 * rates.output_mtok
    ) / MILLION
    cost, priced = cost_usd("anthropic", "claude-3-5-haiku-20241022", usage, overrides={}, local=False)
    assert priced and cost == expected
    assert isinstance(cost, Decimal)


def test_reasoning_tokens_are_part_of_completion_tokens() -> None:
    rates = table_rates("openai", "o3-mini")
    assert rates.output_reasoning_mtok is None  # billed as output: must not be counted on top
    usage = Usage.of(1_000, 5_000, reasoning_tokens=4_000)
    expected = (1_000 * rates.input_mtok + 5_000 * rates.output_mtok) / MILLION
    assert cost_usd("openai", "o3-mini", usage, overrides={}, local=False) == (expected, True)


def test_a_table_reasoning_rate_applies_to_reasoning_tokens_only() -> None:
    # An outside adapter named after a provider the table knows is priced from it.
    rates = table_rates("perplexity", "sonar-deep-research")
    assert rates.output_reasoning_mtok is not None
    usage = Usage.of(1_000, 5_000, reasoning_tokens=4_000)
    expected = (
        1_000 * rates.input_mtok + 1_000 * rates.output_mtok + 4_000 * rates.output_reasoning_mtok
    ) / MILLION + (rates.requests_kcount or Decimal(0)) / 1_000  # a per-request fee, if the table has one
    assert cost_usd("perplexity", "sonar-deep-research", usage, overrides={}, local=False) == (expected, True)


@pytest.mark.parametrize(
    ("provider_type", "model", "table_provider", "table_model"),
    [
        ("azure_openai", "gpt-4o-2024-08-06", "azure", "gpt-4o"),
        ("gemini", "gemini-2.0-flash-001", "google", "gemini-2.0-flash"),
        ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0", "aws", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("huggingface", "openai/gpt-oss-120b:fireworks-ai", "huggingface_fireworks-ai", "openai/gpt-oss-120b"),
    ],
)
def test_each_cloud_adapter_reads_its_own_provider_in_the_table(
    provider_type: str, model: str, table_provider: str, table_model: str
) -> None:
    rates = table_rates(table_provider, table_model)
    usage = Usage.of(2_000, 500)
    expected = (2_000 * rates.input_mtok + 500 * rates.output_mtok) / MILLION
    assert cost_usd(provider_type, model, usage, overrides={}, local=False) == (expected, True)


def test_the_table_id_is_the_adapter_class_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    class HouseGateway(MockProvider):
        type_name = "house_gateway"
        price_provider_id = "openai"

    monkeypatch.setitem(registry._registered, "house_gateway", HouseGateway)
    rates = table_rates("openai", "gpt-4o")
    usage = Usage.of(2_000, 500)
    expected = (2_000 * rates.input_mtok + 500 * rates.output_mtok) / MILLION
    assert cost_usd("house_gateway", "gpt-4o", usage, overrides={}, local=False) == (expected, True)


def test_config_overrides_win_over_the_table() -> None:
    price = ModelPrice(input_per_mtok=1.1, output_per_mtok=2.2, cached_read_per_mtok=0.3, reasoning_per_mtok=9)
    usage = Usage.of(1_000_000, 1_000_000, cached_read_tokens=400_000, reasoning_tokens=250_000)
    # 600k x 1.1 + 400k x 0.3 + 750k x 2.2 + 250k x 9, per million
    expected = Decimal("0.66") + Decimal("0.12") + Decimal("1.65") + Decimal("2.25")
    cost = cost_usd("openai", "gpt-4o", usage, overrides={"gpt-4o": price}, local=False)
    assert cost == (expected, True)


def test_override_rates_left_out_fall_back_to_input_and_output() -> None:
    price = ModelPrice(input_per_mtok=2, output_per_mtok=8)
    usage = Usage.of(3_000, 1_000, cached_read_tokens=1_000, cache_write_tokens=500, reasoning_tokens=600)
    expected = (3_000 * Decimal(2) + 1_000 * Decimal(8)) / MILLION
    assert cost_usd("my-gateway", "house-model", usage, overrides={"house-model": price}, local=False) == (
        expected,
        True,
    )


def test_local_providers_cost_nothing_even_for_unknown_models() -> None:
    usage = Usage.of(5_000, 5_000)
    assert cost_usd("ollama", "llama3.1:8b", usage, overrides={}, local=True) == (Decimal(0), True)
    assert cost_usd("huggingface", "gpt2", usage, overrides={}, local=True) == (Decimal(0), True)
    # An operator's own rate for local hardware is still honoured.
    price = ModelPrice(input_per_mtok=1, output_per_mtok=1)
    assert cost_usd("vllm", "m", usage, overrides={"m": price}, local=True) == (Decimal("0.01"), True)


@pytest.mark.parametrize(
    ("provider_type", "model"),
    [
        ("openai", "no-such-model-9000"),
        ("openai", "claude-3-5-haiku-latest"),  # another company's model is not priced at its rates
        ("some_plugin", "gpt-4o"),
        ("huggingface", "meta-llama/Llama-3.1-8B-Instruct"),  # the router picks the backend: rate unknown
        ("huggingface", "meta-llama/Llama-3.1-8B-Instruct:no-such-backend"),
    ],
)
def test_unknown_prices_are_left_empty_never_guessed(provider_type: str, model: str) -> None:
    assert cost_usd(provider_type, model, Usage.of(10, 10), overrides={}, local=False) == (None, False)


def test_inconsistent_usage_is_left_unpriced() -> None:
    usage = Usage.of(10, 10, cached_read_tokens=50)
    assert cost_usd("openai", "gpt-4o", usage, overrides={}, local=False) == (None, False)
    price = ModelPrice(input_per_mtok=1, output_per_mtok=1)
    assert cost_usd("openai", "x", usage, overrides={"x": price}, local=False) == (None, False)


def test_prices_come_from_the_bundled_table() -> None:
    cost_usd("openai", "gpt-4o", Usage.of(1, 1), overrides={}, local=False)
    assert data_snapshot.get_snapshot().from_auto_update is False


# --- cheaper tiers: provider batch lines and flex calls -------------------------------------


def variant_rates(provider_id: str, model: str, when: dict[str, str]) -> Any:
    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    return info.get_prices(datetime.now(UTC), when)


def test_batch_lines_cost_the_tables_batch_price_with_the_standard_price_beside() -> None:
    usage = Usage.of(1_000_000, 1_000_000)
    batch = variant_rates("openai", "gpt-4o-mini", {"processing": "batch"})
    price = tier_cost("openai", "gpt-4o-mini", usage, overrides={}, local=False, tier="batch", discount=0.9)
    assert price.cost_usd == batch.input_mtok + batch.output_mtok  # the table's own batch price, not the discount
    assert price.standard_cost_usd == cost_usd("openai", "gpt-4o-mini", usage, overrides={}, local=False)[0]
    assert price.cost_usd * 2 == price.standard_cost_usd and price.priced


def test_flex_calls_cost_the_tables_flex_price_where_it_has_one() -> None:
    usage = Usage.of(2_000_000, 500_000)
    flex = variant_rates("openai", "gpt-5-mini", {"service_tier": "flex"})
    price = tier_cost("openai", "gpt-5-mini", usage, overrides={}, local=False, tier="flex", discount=0.9)
    assert price.cost_usd == 2 * flex.input_mtok + flex.output_mtok / 2


@pytest.mark.parametrize(("provider_type", "model"), [
    ("anthropic", "claude-3-5-haiku-latest"),  # the table has no batch price for it
    ("azure_openai", "gpt-4o-mini"),  # the table borrows OpenAI's model for Azure, without its variants
])
def test_without_a_price_in_the_table_a_cheaper_tier_costs_the_entrys_discount(provider_type: str, model: str) -> None:
    usage = Usage.of(1_000_000, 1_000_000)
    standard, _ = cost_usd(provider_type, model, usage, overrides={}, local=False)
    price = tier_cost(provider_type, model, usage, overrides={}, local=False, tier="batch", discount=0.4)
    assert standard is not None and price.cost_usd == standard * Decimal("0.4")
    assert price.standard_cost_usd == standard


def test_an_override_or_a_local_model_takes_the_discount_and_standard_calls_carry_no_standard_price() -> None:
    usage = Usage.of(1_000_000, 0)
    override = {"gpt-4o-mini": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)}
    price = tier_cost("openai", "gpt-4o-mini", usage, overrides=override, local=False, tier="batch", discount=0.5)
    assert (price.cost_usd, price.standard_cost_usd) == (Decimal("0.5"), Decimal("1.0"))
    local = tier_cost("ollama", "llama3", usage, overrides={}, local=True, tier="batch", discount=0.5)
    assert (local.cost_usd, local.standard_cost_usd) == (0, 0)
    standard = tier_cost("openai", "gpt-4o-mini", usage, overrides={}, local=False, tier="standard", discount=0.5)
    assert standard.standard_cost_usd is None and standard.cost_usd == cost_usd(
        "openai", "gpt-4o-mini", usage, overrides={}, local=False)[0]
