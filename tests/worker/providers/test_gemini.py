"""GeminiProvider against a fake Gemini API over real HTTP: request shape, replies, streams, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from llmq.contract.config import ProviderConfig, parse_config
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.gemini import GeminiProvider
from llmq.worker.providers.registry import create_provider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.gemini import (
    BLOCKED_PROMPT_MARKER,
    UNSAFE_REPLY_MARKER,
    FakeGemini,
    failed_precondition_body,
)
from tests.support.harness import run_adapter

T = TypeVar("T")
MODEL = "gemini-2.0-flash"


@pytest.fixture
def fake(fake_gemini: FakeGemini) -> FakeGemini:
    """The package's shared FakeGemini server (conftest.py), reset for this test."""
    return fake_gemini


def config(fake: FakeGemini, **overrides: Any) -> ProviderConfig:
    fields: dict[str, Any] = {"name": "gemini", "api_key": fake.api_key, "base_url": fake.base_url, "timeout": 5.0}
    return ProviderConfig(**{**fields, **overrides})


def run(cfg: ProviderConfig, action: Callable[[GeminiProvider], Awaitable[T]]) -> T:
    return run_adapter(cfg, GeminiProvider, action)


def request(prompt: str = "What next after wood?", **overrides: Any) -> LLMRequest:
    fields: dict[str, Any] = {
        "messages": [{"role": "system", "content": "You plan Minecraft tasks."}, {"role": "user", "content": prompt}],
        "model": MODEL, "temperature": 0.2, "max_tokens": 50,
    }
    return LLMRequest(**{**fields, **overrides})


async def collect(provider: GeminiProvider, req: LLMRequest, into: list[LLMResponse] | None = None) -> list[LLMResponse]:
    chunks = into if into is not None else []
    async for chunk in provider.stream_generate(req):
        chunks.append(chunk)
    return chunks


def generate(fake: FakeGemini, req: LLMRequest | None = None, **overrides: Any) -> LLMResponse:
    return run(config(fake, **overrides), lambda provider: provider.generate(req or request()))


def stream(fake: FakeGemini, req: LLMRequest | None = None, into: list[LLMResponse] | None = None,
           **overrides: Any) -> list[LLMResponse]:
    return run(config(fake, **overrides), lambda provider: collect(provider, req or request(), into))


# --- requests ---------------------------------------------------------------------------


def test_generate_sends_the_documented_request(fake: FakeGemini) -> None:
    req = request(messages=[
        {"role": "system", "content": "You plan Minecraft tasks."},
        {"role": "user", "content": "I have wood."},
        {"role": "user", "content": "What next?"},
        {"role": "assistant", "content": "Craft a table."},
        {"role": "user", "content": "Then?"},
    ])
    generate(fake, req)
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1beta/models/gemini-2.0-flash:generateContent")
    assert sent.query == {}  # the key never rides in the URL
    assert sent.header("x-goog-api-key") == fake.api_key
    assert sent.header("content-type") == "application/json"
    assert sent.body == {
        "systemInstruction": {"parts": [{"text": "You plan Minecraft tasks."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "I have wood."}, {"text": "What next?"}]},
            {"role": "model", "parts": [{"text": "Craft a table."}]},
            {"role": "user", "parts": [{"text": "Then?"}]},
        ],
        "generationConfig": {"temperature": 0.2, "maxOutputTokens": 50},
    }


def test_thinking_options_reach_generation_config(fake: FakeGemini) -> None:
    generate(fake, options={"include_thoughts": True, "thinking_budget": 1024})
    assert fake.requests[-1].body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 1024}


def test_unknown_option_is_refused_at_construction(fake: FakeGemini) -> None:
    with pytest.raises(ValidationError, match="thinking_budgett"):
        GeminiProvider(config(fake, options={"thinking_budgett": 5}))


def test_resource_style_model_names_are_not_prefixed_twice(fake: FakeGemini) -> None:
    generate(fake, request(model="models/gemini-2.0-flash"))
    assert fake.requests[-1].path == "/v1beta/models/gemini-2.0-flash:generateContent"


def test_system_only_request_fails_before_any_call(fake: FakeGemini) -> None:
    with pytest.raises(errors.BadRequestError, match="user or assistant"):
        generate(fake, request(messages=[{"role": "system", "content": "Only rules."}]))
    assert fake.requests == []


# --- answers ----------------------------------------------------------------------------


def test_generate_parses_content_usage_and_ids(fake: FakeGemini) -> None:
    answer = generate(fake)
    assert answer.content == fake_reply_text("What next after wood?", "gemini")
    assert answer.provider == "gemini" and answer.model == MODEL
    prompt_tokens = len("You plan Minecraft tasks.".split()) + len("What next after wood?".split())
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == len(answer.content.split())
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    assert answer.metadata["finish_reason"] == "stop" and answer.metadata["native_finish_reason"] == "STOP"
    assert answer.metadata["served_model"] == MODEL and len(answer.metadata["response_id"]) == 22


def test_cached_and_thought_tokens_are_counted_and_thoughts_left_out(fake: FakeGemini) -> None:
    fake.cached_tokens, fake.thinking_tokens = 4, 120
    answer = generate(fake, options={"include_thoughts": True})
    reply = fake_reply_text("What next after wood?", "gemini")
    assert answer.content == reply  # the thought summary part is not content
    assert answer.metadata["thought_parts"] == 1
    usage = answer.usage
    assert usage.cached_read_tokens == 4 and usage.reasoning_tokens == 120
    # Thoughts are billed as output: inside completion_tokens, and the total still adds up.
    assert usage.completion_tokens == len(reply.split()) + 120
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_finish_is_reported(fake: FakeGemini) -> None:
    answer = generate(fake, request(max_tokens=3))
    assert len(answer.content.split()) == 3
    assert answer.metadata["finish_reason"] == "length" and answer.metadata["native_finish_reason"] == "MAX_TOKENS"


@pytest.mark.parametrize("marker", [BLOCKED_PROMPT_MARKER, UNSAFE_REPLY_MARKER])
def test_blocked_prompt_or_reply_raises_content_filtered(fake: FakeGemini, marker: str) -> None:
    with pytest.raises(errors.ContentFilteredError, match="blockReason=SAFETY|finishReason=SAFETY"):
        generate(fake, request(f"how to {marker}"))
    with pytest.raises(errors.ContentFilteredError):
        stream(fake, request(f"how to {marker}"))


# --- streams ----------------------------------------------------------------------------


def test_stream_yields_text_then_a_final_chunk_with_usage(fake: FakeGemini) -> None:
    fake.cached_tokens, fake.thinking_tokens = 2, 30
    chunks = stream(fake, options={"include_thoughts": True})
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    assert sent.query == {"alt": ["sse"]} and sent.header("x-goog-api-key") == fake.api_key
    *pieces, final = chunks
    reply = fake_reply_text("What next after wood?", "gemini")
    assert len(pieces) > 1 and "".join(piece.content for piece in pieces) == reply
    assert final.metadata["final"] is True and final.content == ""
    assert final.metadata["finish_reason"] == "stop" and final.metadata["thought_parts"] == 1
    assert final.usage.completion_tokens == len(reply.split()) + 30
    assert final.usage.reasoning_tokens == 30 and final.usage.cached_read_tokens == 2


@pytest.mark.parametrize("framing", ["raw", "sse"])
def test_error_inside_the_stream_raises_after_partial_text(fake: FakeGemini, framing: str) -> None:
    fake.stream_error_framing = framing
    fake.inject("stream_error")
    received: list[LLMResponse] = []
    with pytest.raises(errors.OverloadedError, match="overloaded") as caught:
        stream(fake, into=received)
    assert received and not any(chunk.metadata.get("final") for chunk in received)
    assert caught.value.status_code == 503


def test_truncated_stream_raises_a_typed_error(fake: FakeGemini) -> None:
    fake.inject("truncate")
    received: list[LLMResponse] = []
    with pytest.raises((errors.ProviderConnectionError, errors.MalformedResponseError)):
        stream(fake, into=received)
    assert not any(chunk.metadata.get("final") for chunk in received)


def test_stream_that_ends_without_finish_reason_is_malformed(fake: FakeGemini) -> None:
    fake.drop_finish_reason = True
    with pytest.raises(errors.MalformedResponseError, match="finishReason"):
        stream(fake)


def test_stream_refused_before_any_chunk_maps_the_status(fake: FakeGemini) -> None:
    fake.fail_next(429)
    with pytest.raises(errors.RateLimitedError) as caught:
        stream(fake)
    assert caught.value.retry_after_s == 37


def test_stream_reset_raises_connection_error(fake: FakeGemini) -> None:
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        stream(fake)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), [
    (400, errors.BadRequestError),
    (401, errors.AuthenticationError),
    (403, errors.PermissionDeniedError),
    (404, errors.ModelNotFoundError),
    (429, errors.RateLimitedError),
    (500, errors.ServerError),
    (503, errors.OverloadedError),
    (504, errors.ProviderTimeoutError),
])
def test_error_statuses_map_to_classes(fake: FakeGemini, status: int, error_class: type[errors.ProviderError]) -> None:
    fake.fail_next(status)
    with pytest.raises(error_class) as caught:
        generate(fake)
    error = caught.value
    assert type(error) is error_class
    assert error.status_code == status and error.provider == "gemini" and error.model == MODEL
    assert error.request_id is None  # Google documents no request-id header
    assert error.retry_after_s == (37 if status == 429 else None)


def test_retry_info_delay_is_read_from_the_body(fake: FakeGemini) -> None:
    fake.retry_delay_s = 4
    fake.fail_next(429)
    with pytest.raises(errors.RateLimitedError, match="quota") as caught:
        generate(fake)
    assert caught.value.retry_after_s == 4


def test_limiter_retry_after_header_wins_over_the_body(fake: FakeGemini) -> None:
    fake.rate_limit(requests_per_minute=1, tokens_per_minute=None)
    generate(fake)
    with pytest.raises(errors.RateLimitedError) as caught:
        generate(fake)
    assert caught.value.retry_after_s is not None and 1 <= caught.value.retry_after_s <= 60


def test_invalid_key_is_an_authentication_error_without_the_key(fake: FakeGemini) -> None:
    wrong_key = "AIza-wrong-key-0123456789"
    with pytest.raises(errors.AuthenticationError, match="API key not valid") as caught:
        generate(fake, api_key=wrong_key)
    assert caught.value.status_code == 400
    assert wrong_key not in str(caught.value) and wrong_key not in repr(caught.value.to_dict())


def test_missing_key_is_permission_denied(fake: FakeGemini) -> None:
    with pytest.raises(errors.PermissionDeniedError, match="unregistered callers"):
        generate(fake, api_key=None)
    assert "x-goog-api-key" not in fake.requests[-1].headers


def test_unknown_model_is_model_not_found(fake: FakeGemini) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="not found for API version v1beta"):
        generate(fake, request(model="gemini-0.1-nope"))


def test_token_limit_is_context_window_exceeded(fake: FakeGemini) -> None:
    fake.context_window_tokens = 5
    with pytest.raises(errors.ContextWindowExceededError, match="exceeds the maximum number of tokens"):
        generate(fake)
    with pytest.raises(errors.ContextWindowExceededError):
        stream(fake)


def test_failed_precondition_moves_on_to_another_provider(fake: FakeGemini) -> None:
    fake.fail_next(400, body=failed_precondition_body())
    with pytest.raises(errors.PermissionDeniedError, match="User location is not supported") as caught:
        generate(fake)
    assert caught.value.fallback and not caught.value.retryable


def test_malformed_body_is_malformed_response(fake: FakeGemini) -> None:
    fake.inject("malformed")
    with pytest.raises(errors.MalformedResponseError):
        generate(fake)


def test_reset_is_connection_error(fake: FakeGemini) -> None:
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        generate(fake)


def test_hang_is_timeout(fake: FakeGemini) -> None:
    fake.inject("hang")
    with pytest.raises(errors.ProviderTimeoutError):
        generate(fake, timeout=0.3)


# --- discovery and health -----------------------------------------------------------------


def test_model_listing_follows_pages_and_keeps_generate_content_models(fake: FakeGemini) -> None:
    fake.page_size_cap = 2
    models = run(config(fake), lambda provider: provider.get_available_models())
    assert models == ["gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-pro"]
    listing = [sent for sent in fake.requests if sent.path == "/v1beta/models"]
    assert len(listing) == 2 and "pageToken" in listing[1].query
    assert all(sent.header("x-goog-api-key") == fake.api_key and "key" not in sent.query for sent in listing)


def test_health_check(fake: FakeGemini) -> None:
    assert run(config(fake), lambda provider: provider.health_check()) is True
    assert run(config(fake, api_key="wrong"), lambda provider: provider.health_check()) is False
    fake.fail_next(503)
    assert run(config(fake), lambda provider: provider.health_check()) is False


def test_health_check_false_when_nothing_listens() -> None:
    server = FakeGemini()
    base_url = server.base_url
    server._server.server_close()  # the port is free again: connection refused
    cfg = ProviderConfig(name="gemini", api_key="k", base_url=base_url, timeout=1.0)
    assert run(cfg, lambda provider: provider.health_check()) is False


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["google", "palm", "gemini"])
def test_google_and_palm_entries_create_the_gemini_adapter(type_name: str) -> None:
    loaded = parse_config(
        "llm_service:\n  providers:\n    google_ai:\n"
        f"      type: {type_name}\n      api_key: ${{GOOGLE_API_KEY}}\n      models: [gemini-2.0-flash]\n",
        environ={"GOOGLE_API_KEY": "k"},
    )
    provider = create_provider(loaded.provider("google_ai"))
    try:
        assert isinstance(provider, GeminiProvider) and provider.name == "google_ai"
        assert provider.base_url == "https://generativelanguage.googleapis.com/v1beta"
    finally:
        asyncio.run(provider.aclose())
