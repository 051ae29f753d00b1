"""AzureOpenAIProvider against the fake's Azure paths, over real HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.azure_openai import DEFAULT_API_VERSION, AzureOpenAIProvider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.openai import (
    DEFAULT_API_KEY,
    FakeOpenAI,
    azure_content_filter_body,
    context_length_body,
)
from tests.support.harness import run_adapter

T = TypeVar("T")
PROMPT = "Summarise the plan"
CHAT_PATH = "/openai/deployments/{}/chat/completions"


@pytest.fixture
def fake_azure(fake_openai: FakeOpenAI) -> FakeOpenAI:
    """The package's fake OpenAI server, which serves Azure's paths too."""
    return fake_openai


def config(fake: FakeOpenAI, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "type": "azure", "api_key": DEFAULT_API_KEY, "base_url": fake.url, "timeout": 5,
        "models": ["gpt-4o-mini"], "options": {"deployments": {"gpt-4o": "prod-gpt4o"}},
    }
    values.update(overrides)
    entry = ProviderConfig.model_validate(values)
    entry.name = "azure_east"
    return entry


def request(**overrides: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "model": "gpt-4o", "max_tokens": 40}
    values.update(overrides)
    return LLMRequest.model_validate(values)


def run(entry: ProviderConfig, action: Callable[[AzureOpenAIProvider], Awaitable[T]]) -> T:
    return run_adapter(entry, AzureOpenAIProvider, action)


def generate(entry: ProviderConfig, req: LLMRequest | None = None, job_id: str | None = None) -> LLMResponse:
    return run(entry, lambda provider: provider.generate(req or request(), job_id=job_id))


def collect(entry: ProviderConfig, req: LLMRequest | None = None) -> list[LLMResponse]:
    async def action(provider: AzureOpenAIProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(req or request())]

    return run(entry, action)


def generate_error(entry: ProviderConfig, req: LLMRequest | None = None) -> errors.ProviderError:
    with pytest.raises(errors.ProviderError) as caught:
        generate(entry, req)
    return caught.value


def test_request_uses_deployment_path_api_version_and_api_key(fake_azure: FakeOpenAI) -> None:
    response = generate(config(fake_azure), job_id="job-9")
    sent = fake_azure.requests[-1]
    assert (sent.method, sent.path) == ("POST", CHAT_PATH.format("prod-gpt4o"))
    assert sent.query == {"api-version": [DEFAULT_API_VERSION]}
    assert sent.header("api-key") == DEFAULT_API_KEY and sent.header("authorization") is None
    assert sent.header("x-ms-client-request-id") == "job-9"
    assert sent.body["messages"] == [{"role": "user", "content": PROMPT}] and sent.body["max_tokens"] == 40
    assert response.content == fake_reply_text(PROMPT, "azure_openai")
    assert response.provider == "azure_east" and response.model == "gpt-4o"


def test_unmapped_model_uses_its_own_name_as_deployment(fake_azure: FakeOpenAI) -> None:
    generate(config(fake_azure), request(model="gpt-4o-mini"))
    assert fake_azure.requests[-1].path == CHAT_PATH.format("gpt-4o-mini")


def test_bearer_auth_and_api_version_option(fake_azure: FakeOpenAI) -> None:
    options = {"auth": "bearer", "api_version": "2025-04-01-preview", "max_tokens_field": "max_completion_tokens"}
    generate(config(fake_azure, options=options))
    sent = fake_azure.requests[-1]
    assert sent.header("authorization") == f"Bearer {DEFAULT_API_KEY}" and sent.header("api-key") is None
    assert sent.query["api-version"] == ["2025-04-01-preview"] and sent.body["max_completion_tokens"] == 40


def test_usage_and_request_id_from_apim_header(fake_azure: FakeOpenAI) -> None:
    fake_azure.cached_tokens = 5
    response = generate(config(fake_azure))
    assert response.usage.prompt_tokens == 3 and response.usage.cached_read_tokens == 5
    assert len(response.metadata["request_id"]) == 36  # apim-request-id, a UUID


def test_stream_skips_filter_chunk_and_ends_with_usage(fake_azure: FakeOpenAI) -> None:
    chunks = collect(config(fake_azure))
    assert "".join(chunk.content for chunk in chunks) == fake_reply_text(PROMPT, "azure_openai")
    assert chunks[-1].metadata["final"] is True and chunks[-1].usage.prompt_tokens == 3
    assert fake_azure.requests[-1].body["stream_options"] == {"include_usage": True}


def test_wrong_key_gets_azure_401(fake_azure: FakeOpenAI) -> None:
    error = generate_error(config(fake_azure, api_key="not-the-key"))
    assert type(error) is errors.AuthenticationError and error.status_code == 401
    assert "Access denied" in error.message and "not-the-key" not in str(error)
    assert error.request_id


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.BadRequestError), (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
        (404, errors.ModelNotFoundError), (429, errors.RateLimitedError), (500, errors.ServerError),
        (503, errors.OverloadedError),
    ],
)
def test_error_statuses_map_to_classes(fake_azure: FakeOpenAI, status: int, expected: type) -> None:
    fake_azure.fail_next(status)
    error = generate_error(config(fake_azure))
    assert type(error) is expected and error.status_code == status
    assert error.request_id and len(error.request_id) == 36
    # Azure sends retry-after-ms next to retry-after; the millisecond one wins.
    assert error.retry_after_s == (6.0 if status == 429 else None)


def test_unknown_deployment_is_model_not_found(fake_azure: FakeOpenAI) -> None:
    fake_azure.deployments = {"something-else"}
    error = generate_error(config(fake_azure))
    assert type(error) is errors.ModelNotFoundError and "deployment" in error.message


def test_unsupported_api_version_is_bad_request(fake_azure: FakeOpenAI) -> None:
    error = generate_error(config(fake_azure, options={"api_version": "1999-01-01"}))
    assert type(error) is errors.BadRequestError and "API version" in error.message


def test_content_filter_body_is_content_filtered(fake_azure: FakeOpenAI) -> None:
    fake_azure.fail_next(400, body=azure_content_filter_body())
    error = generate_error(config(fake_azure))
    assert type(error) is errors.ContentFilteredError and error.fallback


def test_output_filter_finish_reason_is_content_filtered(fake_azure: FakeOpenAI) -> None:
    fake_azure.finish_reason = "content_filter"
    assert type(generate_error(config(fake_azure))) is errors.ContentFilteredError
    with pytest.raises(errors.ContentFilteredError):
        collect(config(fake_azure))


def test_context_length_is_context_window_error(fake_azure: FakeOpenAI) -> None:
    fake_azure.fail_next(400, body=context_length_body())
    assert type(generate_error(config(fake_azure))) is errors.ContextWindowExceededError


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("truncate", errors.ProviderConnectionError), ("stream_error", errors.ServerError), ("reset", errors.ProviderConnectionError)],
)
def test_broken_stream_raises(fake_azure: FakeOpenAI, fault: str, expected: type) -> None:
    fake_azure.inject(fault)
    with pytest.raises(expected):
        collect(config(fake_azure))


def test_malformed_and_timeout(fake_azure: FakeOpenAI) -> None:
    fake_azure.inject("malformed")
    assert type(generate_error(config(fake_azure))) is errors.MalformedResponseError
    fake_azure.inject("hang")
    assert type(generate_error(config(fake_azure, timeout=0.3))) is errors.ProviderTimeoutError


def test_models_are_the_configured_deployments(fake_azure: FakeOpenAI) -> None:
    assert run(config(fake_azure), lambda provider: provider.get_available_models()) == ["gpt-4o-mini", "gpt-4o"]
    assert fake_azure.requests == []


def test_health_check(fake_azure: FakeOpenAI) -> None:
    assert run(config(fake_azure), lambda provider: provider.health_check()) is True
    sent = fake_azure.requests[-1]
    assert (sent.method, sent.path, sent.query) == ("GET", "/openai/models", {"api-version": [DEFAULT_API_VERSION]})
    assert run(config(fake_azure, api_key="wrong"), lambda provider: provider.health_check()) is False
    assert run(config(fake_azure, api_key=None), lambda provider: provider.health_check()) is False


def test_endpoint_is_required(fake_azure: FakeOpenAI) -> None:
    with pytest.raises(errors.BadRequestError, match="base_url"):
        AzureOpenAIProvider(config(fake_azure, base_url=None))
