"""Completion windows and cheaper tiers in the contract (producer/contract/tiers.py): the config
they read, the windows they parse, and which jobs may wait in a provider batch."""

from __future__ import annotations

import pytest

from llmq.contract.config import ConfigError, parse_config
from llmq.contract.models import EmbeddingRequest, LLMRequest
from llmq.contract.tiers import (
    DAY_S,
    PROVIDER_BATCH_DEFAULTS,
    describe_duration,
    parse_window,
    provider_batch_limits,
    provider_batch_refusal,
)

CONFIG = """
llm_service:
  providers:
    openai: {api_key: k, models: [gpt-4o-mini], batch_api: {max_requests: 40, discount: 0.4}, service_tier: flex}
    anthropic: {api_key: k, batch_api: {enabled: false}}
    gemini: {api_key: k}
    local: {type: ollama}
"""


def request(**fields: object) -> LLMRequest:
    return LLMRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini", **fields})


@pytest.mark.parametrize(("text", "seconds"), [("24h", DAY_S), ("90m", 5400.0), ("2d", 2 * DAY_S), ("1w", 7 * DAY_S),
                                               ("3600", 3600.0), (7200, 7200.0), (" 1.5h ", 5400.0)])
def test_windows_are_durations(text: str | int, seconds: float) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["soon", "24 hours", "-1h", "0", "h"])
def test_a_window_that_is_no_duration_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="24h"):
        parse_window(text)


def test_durations_read_back_in_the_largest_whole_unit() -> None:
    assert [describe_duration(value) for value in (DAY_S, 5400.0, 90.0, 3600.0)] == ["1d", "90m", "90s", "1h"]


def test_entry_settings_override_the_providers_documented_limits() -> None:
    config = parse_config(CONFIG)
    openai = provider_batch_limits(config.provider("openai"))
    assert openai is not None and (openai.max_requests, openai.max_bytes) == (40, 200 * 1024 * 1024)
    assert openai.discount == 0.4 and openai.window_s == DAY_S
    gemini = provider_batch_limits(config.provider("gemini"))
    assert gemini is not None and gemini.inline_max_bytes == 20 * 1024 * 1024
    assert config.provider("openai").service_tier == "flex" and config.provider("gemini").service_tier == "standard"
    assert provider_batch_limits(config.provider("anthropic")) is None  # turned off
    assert provider_batch_limits(config.provider("local")) is None  # no batch API


def test_the_batch_api_types_are_the_providers_with_one() -> None:
    assert set(PROVIDER_BATCH_DEFAULTS) == {"openai", "azure_openai", "anthropic", "gemini"}


def test_unknown_batch_settings_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="batch_api.max_request"):
        parse_config(CONFIG.replace("max_requests: 40", "max_request: 40"))
    with pytest.raises(ConfigError, match="service_tier"):
        parse_config(CONFIG.replace("service_tier: flex", "service_tier: cheap"))


def test_which_jobs_may_wait_in_a_provider_batch() -> None:
    config = parse_config(CONFIG)
    openai, anthropic, local = (config.provider(name) for name in ("openai", "anthropic", "local"))
    assert provider_batch_refusal(openai, request(), window_s=DAY_S, deadline_s=DAY_S + 60) is None
    refusals = {
        "short window": provider_batch_refusal(openai, request(), window_s=3600, deadline_s=DAY_S),
        "short deadline": provider_batch_refusal(openai, request(), window_s=DAY_S, deadline_s=600),
        "stream": provider_batch_refusal(openai, request(stream=True), window_s=DAY_S, deadline_s=DAY_S),
        "off": provider_batch_refusal(anthropic, request(), window_s=DAY_S, deadline_s=DAY_S),
        "none": provider_batch_refusal(local, request(), window_s=DAY_S, deadline_s=DAY_S),
    }
    assert "within 1d; a 1h completion window cannot be met" in str(refusals["short window"])
    assert "deadline (10m) ends before the batch window of provider 'openai' (1d)" in str(refusals["short deadline"])
    assert "streamed" in str(refusals["stream"])
    assert "batch_api.enabled: false" in str(refusals["off"])
    assert "no batch API" in str(refusals["none"])
    embedding = EmbeddingRequest(input="hi", model="text-embedding-3-small")
    assert provider_batch_refusal(openai, embedding, window_s=DAY_S, deadline_s=DAY_S) is None
    claude = parse_config(CONFIG.replace("enabled: false", "enabled: true")).provider("anthropic")
    assert "takes no embedding jobs" in str(provider_batch_refusal(claude, embedding, window_s=DAY_S, deadline_s=DAY_S))
