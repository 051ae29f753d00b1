"""OpenAIProvider against the fake OpenAI server, over real HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.openai import OpenAIProvider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.openai import (
    DEFAULT_API_KEY,
    FakeOpenAI,
    context_length_body,
    insufficient_quota_body,
)
from tests.support.harness import run_adapter

T = TypeVar("T")
PROMPT = "Plan the next step"


def config(fake: FakeOpenAI, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {"type": "openai", "api_key": DEFAULT_API_KEY, "base_url": fake.url + "/v1", "timeout": 5}
    values.update(overrides)
    entry = ProviderConfig.model_validate(values)
    entry.name = "openai_main"
    return entry


def request(**overrides: Any) -> LLMRequest:
    values: dict[str, Any] = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        "model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 50,
    }
    values.update(overrides)
    return LLMRequest.model_validate(values)


def run(entry: ProviderConfig, action: Callable[[OpenAIProvider], Awaitable[T]]) -> T:
    return run_adapter(entry, OpenAIProvider, action)


def collect(entry: ProviderConfig, req: LLMRequest, job_id: str | None = None) -> list[LLMResponse]:
    async def action(provider: OpenAIProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(req, job_id=job_id)]

    return run(entry, action)


def generate(entry: ProviderConfig, req: LLMRequest | None = None, job_id: str | None = None) -> LLMResponse:
    return run(entry, lambda provider: provider.generate(req or request(), job_id=job_id))


def generate_error(entry: ProviderConfig, req: LLMRequest | None = None) -> errors.ProviderError:
    with pytest.raises(errors.ProviderError) as caught:
        generate(entry, req)
    return caught.value


# --- the request on the wire ---------------------------------------------------------


def test_request_matches_chat_completions_format(fake_openai: FakeOpenAI) -> None:
    entry = config(fake_openai, options={"organization": "org-42", "project": "proj_7"})
    generate(entry, job_id="job-123")
    sent = fake_openai.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.header("authorization") == f"Bearer {DEFAULT_API_KEY}"
    assert sent.header("openai-organization") == "org-42"
    assert sent.header("openai-project") == "proj_7"
    assert sent.header("x-client-request-id") == "job-123"
    assert sent.header("content-type") == "application/json"
    assert sent.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        "temperature": 0.2, "max_tokens": 50, "stream": False,
    }


def test_max_completion_tokens_option_and_no_temperature(fake_openai: FakeOpenAI) -> None:
    generate(config(fake_openai, options={"max_tokens_field": "max_completion_tokens", "send_temperature": False}))
    body = fake_openai.requests[-1].body
    assert body["max_completion_tokens"] == 50
    assert "max_tokens" not in body and "temperature" not in body


def test_unknown_option_is_refused(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(errors.BadRequestError, match="max_token_field"):
        OpenAIProvider(config(fake_openai, options={"max_token_field": "x"}))


def test_job_id_not_ascii_or_too_long_is_not_sent(fake_openai: FakeOpenAI) -> None:
    generate(config(fake_openai), job_id="x" * 513)
    generate(config(fake_openai), job_id="jöb")
    assert all("x-client-request-id" not in sent.headers for sent in fake_openai.requests)


# --- responses and streams -----------------------------------------------------------


def test_generate_parses_content_usage_and_ids(fake_openai: FakeOpenAI) -> None:
    fake_openai.cached_tokens, fake_openai.reasoning_tokens = 3, 7
    response = generate(config(fake_openai))
    assert response.content == fake_reply_text(PROMPT, "openai")
    assert (response.provider, response.model) == ("openai_main", "gpt-4o-mini")
    words = len(response.content.split())
    assert response.usage.prompt_tokens == 6
    assert response.usage.completion_tokens == words + 7
    assert response.usage.total_tokens == 6 + words + 7
    assert (response.usage.cached_read_tokens, response.usage.reasoning_tokens) == (3, 7)
    assert response.metadata["finish_reason"] == "stop"
    assert response.metadata["request_id"].startswith("req_")
    assert response.metadata["response_id"].startswith("chatcmpl-")
    assert response.metadata["served_model"] == "gpt-4o-mini-2024-07-18"
    assert DEFAULT_API_KEY not in response.model_dump_json()


def test_length_finish_reason_is_reported(fake_openai: FakeOpenAI) -> None:
    response = generate(config(fake_openai), request(max_tokens=2))
    assert response.metadata["finish_reason"] == "length"
    assert len(response.content.split()) == 2


def test_stream_yields_text_then_final_chunk_with_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.cached_tokens, fake_openai.reasoning_tokens = 2, 4
    chunks = collect(config(fake_openai), request(stream=True))
    sent = fake_openai.requests[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    text = "".join(chunk.content for chunk in chunks)
    assert text == fake_reply_text(PROMPT, "openai")
    assert len(chunks) > 2 and not any(chunk.metadata.get("final") for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.metadata["final"] is True and final.content == ""
    assert final.metadata["finish_reason"] == "stop"
    assert final.metadata["request_id"].startswith("req_")
    assert final.usage.completion_tokens == len(text.split()) + 4
    assert (final.usage.cached_read_tokens, final.usage.reasoning_tokens) == (2, 4)


def test_stream_without_usage_option_still_completes(fake_openai: FakeOpenAI) -> None:
    chunks = collect(config(fake_openai, options={"stream_usage": False}), request())
    assert "stream_options" not in fake_openai.requests[-1].body
    assert chunks[-1].metadata["final"] is True and chunks[-1].usage.total_tokens == 0


def test_content_filter_finish_reason_raises(fake_openai: FakeOpenAI) -> None:
    fake_openai.finish_reason = "content_filter"
    assert isinstance(generate_error(config(fake_openai)), errors.ContentFilteredError)
    with pytest.raises(errors.ContentFilteredError):
        collect(config(fake_openai), request())


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.BadRequestError), (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
        (404, errors.ModelNotFoundError), (429, errors.RateLimitedError), (500, errors.ServerError),
        (503, errors.OverloadedError),
    ],
)
def test_error_statuses_map_to_classes(fake_openai: FakeOpenAI, status: int, expected: type) -> None:
    fake_openai.fail_next(status)
    error = generate_error(config(fake_openai))
    assert type(error) is expected
    assert error.status_code == status and error.provider == "openai_main" and error.model == "gpt-4o-mini"
    assert error.request_id and error.request_id.startswith("req_")
    assert error.retry_after_s == (20.0 if status == 429 else None)
    assert error.message


def test_context_length_body_is_context_window_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(400, body=context_length_body())
    error = generate_error(config(fake_openai))
    assert type(error) is errors.ContextWindowExceededError
    assert "maximum context length" in error.message


def test_insufficient_quota_is_not_a_rate_limit(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(429, body=insufficient_quota_body())
    error = generate_error(config(fake_openai))
    assert type(error) is errors.PermissionDeniedError
    assert not error.retryable and error.fallback


def test_wrong_key_is_401_without_the_key_in_the_error(fake_openai: FakeOpenAI) -> None:
    wrong_key = "sk-proj-WRONGwrongWRONGwrong0123456789abcdefXYZ"
    error = generate_error(config(fake_openai, api_key=wrong_key))
    assert type(error) is errors.AuthenticationError and error.status_code == 401
    assert "Incorrect API key provided" in error.message
    text = str(error) + repr(error.to_dict())
    assert wrong_key not in text and wrong_key[:8] not in text and wrong_key[-4:] not in text


def test_missing_key_fails_before_any_call(fake_openai: FakeOpenAI) -> None:
    error = generate_error(config(fake_openai, api_key=None))
    assert type(error) is errors.AuthenticationError and fake_openai.requests == []


def test_rate_limited_stream_raises_before_any_chunk(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(429)
    with pytest.raises(errors.RateLimitedError) as caught:
        collect(config(fake_openai), request())
    assert caught.value.retry_after_s == 20.0


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("truncate", errors.ProviderConnectionError), ("stream_error", errors.ServerError), ("reset", errors.ProviderConnectionError)],
)
def test_broken_stream_raises_never_a_short_answer(fake_openai: FakeOpenAI, fault: str, expected: type) -> None:
    fake_openai.inject(fault)
    with pytest.raises(expected) as caught:
        collect(config(fake_openai), request())
    assert caught.value.provider == "openai_main"
    if fault == "stream_error":
        assert "server had an error" in caught.value.message and caught.value.request_id


def test_stream_that_ends_without_done_is_malformed(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    original = FakeOpenAI._chunks

    def without_done(self: FakeOpenAI, *args: Any) -> Iterator[bytes]:
        return (chunk for chunk in original(self, *args) if b"[DONE]" not in chunk)

    monkeypatch.setattr(FakeOpenAI, "_chunks", without_done)
    with pytest.raises(errors.MalformedResponseError, match="DONE"):
        collect(config(fake_openai), request())


def test_malformed_json_is_malformed_response(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject("malformed")
    error = generate_error(config(fake_openai))
    assert type(error) is errors.MalformedResponseError and error.retryable


def test_hang_is_timeout(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject("hang")
    error = generate_error(config(fake_openai, timeout=0.3))
    assert type(error) is errors.ProviderTimeoutError and error.retryable


def test_unreachable_server_is_connection_error() -> None:
    entry = ProviderConfig.model_validate(
        {"type": "openai", "api_key": "sk-x", "base_url": "http://127.0.0.1:9/v1", "timeout": 2}
    )
    assert type(generate_error(entry)) is errors.ProviderConnectionError


# --- models and health -----------------------------------------------------------------


def test_model_listing_and_health(fake_openai: FakeOpenAI) -> None:
    models = run(config(fake_openai), lambda provider: provider.get_available_models())
    assert models == ["gpt-4o-mini", "gpt-4o", "o3-mini"]
    sent = fake_openai.requests[-1]
    assert (sent.method, sent.path, sent.header("authorization")) == ("GET", "/v1/models", f"Bearer {DEFAULT_API_KEY}")
    assert run(config(fake_openai), lambda provider: provider.health_check()) is True


def test_health_check_false_on_bad_key_or_outage(fake_openai: FakeOpenAI) -> None:
    assert run(config(fake_openai, api_key="sk-bad"), lambda provider: provider.health_check()) is False
    fake_openai.fail_next(503)
    assert run(config(fake_openai), lambda provider: provider.health_check()) is False
    assert run(config(fake_openai, api_key=None), lambda provider: provider.health_check()) is False
