"""The flex tier (worker/providers/flex.py): what OpenAI and Gemini are sent, a refusal told apart
from a rate limit, and a job end to end: refused at flex, answered at the standard tier, or
asked again at flex when the caller does not allow the standard tier; each priced at its tier."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from llmq.contract.config import parse_config
from llmq.contract.models import JobState, LLMRequest
from llmq.worker import errors
from llmq.worker.providers.azure_openai import AzureOpenAIProvider
from llmq.worker.providers.gemini import GeminiProvider
from llmq.worker.providers.openai import OpenAIProvider
from llmq.worker.providers.registry import adapter_class
from tests.reliability.support import drain_ledger, wait_until
from tests.support.fakes.gemini_batches import FakeGeminiBatches
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.fakes.openai_batches import FakeOpenAIBatches
from tests.support.harness import Cluster, fast_retry, openai_entry, run_adapter, service_config, start_cluster


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[FakeOpenAIBatches]:
    with FakeOpenAIBatches() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def gemini_fake() -> Iterator[FakeGeminiBatches]:
    with FakeGeminiBatches() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(autouse=True)
def fresh(openai_fake: FakeOpenAIBatches, gemini_fake: FakeGeminiBatches) -> None:
    openai_fake.reset()
    gemini_fake.reset()


def request(model: str, tier: str | None) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": "later is fine"}], model=model, service_tier=tier)  # type: ignore[arg-type]


def entries(openai_fake: FakeOpenAIBatches, gemini_fake: FakeGeminiBatches) -> Any:
    return parse_config(f"""
llm_service:
  providers:
    openai: {{api_key: {DEFAULT_API_KEY}, base_url: "{openai_fake.url}/v1"}}
    gemini: {{api_key: fake-gemini-key, base_url: "{gemini_fake.base_url}"}}
""")


def test_only_openai_and_gemini_sell_flex() -> None:
    flex = {name for name in ("openai", "azure_openai", "anthropic", "gemini", "vllm", "huggingface", "ollama")
            if adapter_class(name).supports_flex}
    assert flex == {"openai", "gemini"}
    assert not AzureOpenAIProvider.supports_flex


def test_a_flex_call_asks_for_flex_and_a_refusal_is_flex_capacity(
    openai_fake: FakeOpenAIBatches, gemini_fake: FakeGeminiBatches,
) -> None:
    config = entries(openai_fake, gemini_fake)
    answer = run_adapter(config.provider("openai"), OpenAIProvider,
                         lambda adapter: adapter.generate(request("gpt-4o-mini", "flex")))
    assert openai_fake.requests[-1].body["service_tier"] == "flex" and answer.content
    openai_fake.flex_refusals = 1
    with pytest.raises(errors.FlexCapacityError) as refused:
        run_adapter(config.provider("openai"), OpenAIProvider,
                    lambda adapter: adapter.generate(request("gpt-4o-mini", "flex")))
    assert refused.value.status_code == 429 and isinstance(refused.value, errors.OverloadedError)
    run_adapter(config.provider("openai"), OpenAIProvider,
                lambda adapter: adapter.generate(request("gpt-4o-mini", "standard")))
    assert "service_tier" not in openai_fake.requests[-1].body
    gemini_fake.flex_refusals = 1
    with pytest.raises(errors.FlexCapacityError) as shed:
        run_adapter(config.provider("gemini"), GeminiProvider,
                    lambda adapter: adapter.generate(request("gemini-2.0-flash", "flex")))
    assert shed.value.status_code == 503 and gemini_fake.requests[-1].body["service_tier"] == "FLEX"


def test_a_rate_limit_on_a_standard_call_stays_a_rate_limit(openai_fake: FakeOpenAIBatches) -> None:
    config = parse_config(f'llm_service: {{providers: {{openai: {{api_key: {DEFAULT_API_KEY}, '
                          f'base_url: "{openai_fake.url}/v1"}}}}}}')
    openai_fake.fail_next(429)
    with pytest.raises(errors.RateLimitedError) as limited:
        run_adapter(config.provider("openai"), OpenAIProvider, lambda adapter: adapter.generate(request("gpt-4o-mini", None)))
    assert not isinstance(limited.value, errors.FlexCapacityError)


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, openai_fake: FakeOpenAIBatches) -> Iterator[Cluster]:
    providers = {"openai": openai_entry(openai_fake, models=["gpt-4o-mini", "gpt-5-mini"], service_tier="flex")}
    started = start_cluster(tmp_path_factory.mktemp("flex"), service_config(providers, retry=fast_retry(3)))
    started.start_workers(1)
    yield started
    started.stop()


def usage_of(cluster: Cluster, job_id: str, count: int) -> list[dict[str, Any]]:
    store = drain_ledger(cluster.redis_url, cluster.database_url)
    try:
        return wait_until(lambda: (rows := store.usage_rows(job_id)) and len(rows) >= count and rows, 30, "usage rows")
    finally:
        store.close()


def test_a_refused_flex_call_is_answered_at_the_standard_tier(cluster: Cluster, openai_fake: FakeOpenAIBatches) -> None:
    openai_fake.flex_refusals = 1  # the entry says flex: the first call asks for it and is refused
    with cluster.service() as service:
        job = service.wait(service.submit({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5-mini"}),
                           timeout_s=60)
    assert job.state is JobState.SUCCEEDED
    assert [(a["outcome"], a.get("error_type")) for a in job.attempts] == [
        ("error", "FlexCapacityError"), ("succeeded", None)]
    assert [r.body.get("service_tier") for r in openai_fake.sync_requests()] == ["flex", None]
    [row] = usage_of(cluster, job.job_id, 1)
    assert (row["attempt"], row["price_tier"], row["standard_cost_usd"]) == (2, "standard", None)


def test_without_leave_for_the_standard_tier_flex_is_asked_again_and_priced_at_flex(
    cluster: Cluster, openai_fake: FakeOpenAIBatches,
) -> None:
    openai_fake.flex_refusals = 1
    with cluster.service() as service:
        job_id = service.submit({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5-mini"},
                                flex_fallback=False)
        job = service.wait(job_id, timeout_s=60)
    assert job.state is JobState.SUCCEEDED and len(job.attempts) == 2
    assert [r.body.get("service_tier") for r in openai_fake.sync_requests()] == ["flex", "flex"]
    [row] = usage_of(cluster, job.job_id, 1)
    assert row["price_tier"] == "flex" and row["standard_cost_usd"] == 2 * row["cost_usd"] > Decimal(0)
