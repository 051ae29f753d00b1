"""What a call cost, in exact decimal USD.

Three sources, in this order:

1. A `pricing:` entry in the provider's config (`llmq.contract.config.ModelPrice`,
   USD per million tokens) wins over everything, so an operator can charge an
   internal rate even for local hardware.
2. Local providers (adapters with `local = True`: ollama, LM Studio, LocalAI, vLLM,
   an in-process Hugging Face pipeline, the mock) cost nothing: `Decimal(0)`, priced.
3. The maintained table of pydantic's `genai-prices`, under the provider id the
   adapter class names (`price_provider_id`, `price_table_key`), read from the data
   bundled in the installed package. Only `genai_prices.UpdatePrices` ever fetches
   newer prices over the network, and llmq never starts it, so pricing works offline
   and a worker's figures change only when the package is upgraded.

A model found in none of them is unpriced: `(None, False)`, never a guess.

Cheaper tiers (`tier_cost`): a line of a provider batch and a flex-tier call are priced from
the table's own price for that tier where it has one (genai-prices' price variants for
`processing: batch` and `service_tier: flex`), else at the entry's documented discount of the
standard price (`batch_api.discount`, `flex.discount`, default 0.5), and a `pricing:` override
or a local model likewise at the discount. The standard price is kept beside it, so the ledger
shows what the cheaper tier saved.

Token accounting. `Usage` is normalized by the adapters so that `prompt_tokens`
includes `cached_read_tokens` and `cache_write_tokens`, and `completion_tokens`
includes `reasoning_tokens`. genai-prices counts the same way (its
`input_tokens` is the parent of `cache_read_tokens` / `cache_write_tokens`, and
`output_tokens` the parent of `output_reasoning_tokens`; it bills each child at
its own rate and the remainder at the parent's), so the counts pass through
unchanged and nothing is billed twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from functools import cache

import genai_prices
from genai_prices.data_snapshot import get_snapshot

from llmq.contract.config import ModelPrice
from llmq.contract.models import Usage
from llmq.contract.tiers import PriceTier
from llmq.worker.providers.registry import adapter_class

logger = logging.getLogger(__name__)

TOKENS_PER_MILLION = Decimal(1_000_000)


def cost_usd(
    provider_type: str,
    model: str,
    usage: Usage,
    *,
    overrides: Mapping[str, ModelPrice],
    local: bool,
    at: datetime | None = None,
) -> tuple[Decimal | None, bool]:
    """The cost of one call and whether a price was known: `(cost, priced)`.

    `overrides` is the provider's `pricing:` config, keyed by model. `at` picks
    the price in force at that moment for tables with dated prices (default: now).
    """
    if model in overrides:
        return _cost_from_override(overrides[model], usage, model)
    if local:
        return Decimal(0), True
    return _cost_from_table(provider_type, model, usage, at)


def _cost_from_override(price: ModelPrice, usage: Usage, model: str) -> tuple[Decimal | None, bool]:
    uncached_input = usage.prompt_tokens - usage.cached_read_tokens - usage.cache_write_tokens
    visible_output = usage.completion_tokens - usage.reasoning_tokens
    if uncached_input < 0 or visible_output < 0:
        logger.warning("usage for %s has more cache/reasoning tokens than its totals; left unpriced", model)
        return None, False
    input_rate = _per_mtok(price.input_per_mtok)
    output_rate = _per_mtok(price.output_per_mtok)
    # A rate the config leaves out falls back to the plain rate of its direction.
    cached_read_rate = _per_mtok(price.cached_read_per_mtok, default=input_rate)
    cache_write_rate = _per_mtok(price.cache_write_per_mtok, default=input_rate)
    reasoning_rate = _per_mtok(price.reasoning_per_mtok, default=output_rate)
    with localcontext() as context:
        context.prec = 50
        total = (
            uncached_input * input_rate
            + usage.cached_read_tokens * cached_read_rate
            + usage.cache_write_tokens * cache_write_rate
            + visible_output * output_rate
            + usage.reasoning_tokens * reasoning_rate
        ) / TOKENS_PER_MILLION
    return total, True


def _per_mtok(value: float | None, *, default: Decimal | None = None) -> Decimal:
    """A config rate as the decimal the operator typed (str() of a float is its shortest form)."""
    if value is None:
        assert default is not None
        return default
    return Decimal(str(value))


def _cost_from_table(
    provider_type: str, model: str, usage: Usage, at: datetime | None
) -> tuple[Decimal | None, bool]:
    target = table_lookup(provider_type, model)
    if target is None:
        return None, False
    provider_id, model_ref = target
    try:
        calculation = genai_prices.calc_price(
            _table_usage(usage),
            model_ref,
            provider_id=provider_id,
            genai_request_timestamp=at,
        )
    except LookupError:
        return None, False
    except ValueError as exc:
        # Inconsistent counts (more cached tokens than prompt tokens): a wrong
        # figure in the ledger is worse than a missing one.
        logger.warning("cannot price %s/%s usage: %s", provider_id, model_ref, exc)
        return None, False
    return calculation.total_price, True


def table_lookup(provider_type: str, model: str) -> tuple[str, str] | None:
    """The (genai-prices provider id, model reference) to price a call with, if any."""
    try:
        target = adapter_class(provider_type).price_table_key(model)
    except KeyError:
        # No adapter of that name in this process (a usage row from elsewhere): the name itself.
        target = provider_type, model
    if target is None or not _known_provider_id(target[0]):
        return None
    return target


def _known_provider_id(provider_id: str) -> bool:
    # Exact ids only: genai-prices' own fuzzy provider matching could price a
    # call at another company's rates.
    return provider_id in _table_provider_ids()


@cache
def _table_provider_ids() -> frozenset[str]:
    return frozenset(provider.id for provider in get_snapshot().providers)


def _table_usage(usage: Usage) -> genai_prices.Usage:
    return genai_prices.Usage(
        input_tokens=usage.prompt_tokens,
        cache_read_tokens=usage.cached_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.completion_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
    )


#: genai-prices' price context of each cheaper tier (its price variants' `when`).
TIER_PRICE_CONTEXT: dict[str, dict[str, str]] = {"batch": {"processing": "batch"}, "flex": {"service_tier": "flex"}}


@dataclass(frozen=True)
class TierCost:
    cost_usd: Decimal | None
    priced: bool
    #: What the call would have cost at the standard tier; None for standard calls.
    standard_cost_usd: Decimal | None = None


def tier_cost(
    provider_type: str,
    model: str,
    usage: Usage,
    *,
    overrides: Mapping[str, ModelPrice],
    local: bool,
    tier: PriceTier,
    discount: float,
    at: datetime | None = None,
) -> TierCost:
    """The cost of one call at `tier`, and at the standard tier beside it (see the module docstring)."""
    standard, priced = cost_usd(provider_type, model, usage, overrides=overrides, local=local, at=at)
    if tier == "standard" or standard is None:
        return TierCost(standard, priced)
    from_table = None
    if model not in overrides and not local:
        from_table = _tier_cost_from_table(provider_type, model, usage, TIER_PRICE_CONTEXT[tier], at)
    if from_table is None:
        from_table = standard * Decimal(str(discount))
    return TierCost(from_table, True, standard)


def _tier_cost_from_table(
    provider_type: str, model: str, usage: Usage, context: dict[str, str], at: datetime | None
) -> Decimal | None:
    """The table's price for a tier, only where the model has a price variant for it (never a standard price)."""
    target = table_lookup(provider_type, model)
    if target is None:
        return None
    provider_id, model_ref = target
    try:
        calculation = genai_prices.calc_price(
            _table_usage(usage), model_ref, provider_id=provider_id, genai_request_timestamp=at, price_context=context,
        )
    except (LookupError, ValueError):
        return None
    moment = at or datetime.now(UTC)
    # A model the table borrows from another provider (Azure's OpenAI models) is priced without variants.
    own_model = any(model is calculation.model for model in calculation.provider.models)
    variants = (calculation.model.price_variants or ()) if own_model else ()
    has_variant = any(
        variant.when == context and (variant.constraint is None or variant.constraint.active(moment))
        for variant in variants
    )
    return calculation.total_price if has_variant else None
