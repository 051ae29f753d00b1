"""The Anthropic adapter against a fake that speaks the Messages API over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.anthropic import AnthropicProvider, anthropic_usage
from llmq.worker.providers.registry import create_provider
from tests.support.fakes.anthropic import API_KEY, MODELS, THINKING_TEXT, FakeAnthropic
from tests.support.fakes.base import count_words, fake_reply_text
from tests.support.harness import run_adapter

T = TypeVar("T")
MODEL = MODELS[0]
PROMPT = "Give me the next Minecraft task"


@pytest.fixture
def fake(fake_anthropic: FakeAnthropic) -> FakeAnthropic:
    return fake_anthropic  # the package's shared server (conftest.py), reset


def make_config(fake: FakeAnthropic, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {"api_key": API_KEY, "base_url": fake.url, "models": list(MODELS), "timeout": 5.0}
    values.update(overrides)
    config = ProviderConfig.model_validate(values)
    config.name = "anthropic"
    return config


def run(fake: FakeAnthropic, action: Callable[[AnthropicProvider], Awaitable[T]], **overrides: Any) -> T:
    return run_adapter(make_config(fake, **overrides), AnthropicProvider, action)


def request(content: str = PROMPT, **fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "model": MODEL, "temperature": 0.2, "max_tokens": 256}
    values.update(fields)
    return LLMRequest.model_validate(values)


async def collect(provider: AnthropicProvider, llm_request: LLMRequest, into: list[LLMResponse] | None = None) -> list[LLMResponse]:
    chunks = into if into is not None else []
    async for chunk in provider.stream_generate(llm_request):
        chunks.append(chunk)
    return chunks


# --- the request on the wire ------------------------------------------------------------


def test_request_carries_documented_headers_and_body(fake: FakeAnthropic) -> None:
    messages = [
        {"role": "system", "content": "You plan Minecraft tasks."},
        {"role": "system", "content": "Answer with one task."},
        {"role": "user", "content": "I have wood."},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "Task:"},
        {"role": "assistant", "content": ""},
    ]
    run(fake, lambda provider: provider.generate(request(messages=messages, temperature=0.5, max_tokens=300)))
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.header("x-api-key") == API_KEY
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.header("content-type") == "application/json"
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": MODEL,
        "max_tokens": 300,
        "temperature": 0.5,
        "system": "You plan Minecraft tasks.\n\nAnswer with one task.",
        "messages": [
            {"role": "user", "content": f"I have wood.\n\n{PROMPT}"},
            {"role": "assistant", "content": "Task:"},
        ],
    }


def test_options_set_version_and_beta_headers_and_unknown_options_are_refused(fake: FakeAnthropic) -> None:
    options = {"api_version": "2023-01-01", "beta": ["prompt-caching-2024-07-31", "output-128k-2025-02-19"]}
    run(fake, lambda provider: provider.generate(request()), options=options)
    assert fake.requests[-1].header("anthropic-version") == "2023-01-01"
    assert fake.requests[-1].header("anthropic-beta") == "prompt-caching-2024-07-31,output-128k-2025-02-19"
    with pytest.raises(ValueError, match="api_versoin"):
        AnthropicProvider(make_config(fake, options={"api_versoin": "x"}))


def test_registry_builds_the_anthropic_adapter(fake: FakeAnthropic) -> None:
    provider = create_provider(make_config(fake))
    assert isinstance(provider, AnthropicProvider)
    asyncio.run(provider.aclose())


def test_temperature_above_anthropics_range_is_refused_before_sending(fake: FakeAnthropic) -> None:
    with pytest.raises(errors.BadRequestError, match=r"temperature 1\.5 .* 0\.\.1") as caught:
        run(fake, lambda provider: provider.generate(request(temperature=1.5)))
    assert type(caught.value) is errors.BadRequestError and not caught.value.fallback
    assert fake.requests == []


def test_system_only_request_and_missing_key_fail_before_sending(fake: FakeAnthropic) -> None:
    system_only = request(messages=[{"role": "system", "content": "Be brief."}])
    with pytest.raises(errors.BadRequestError, match="user message"):
        run(fake, lambda provider: provider.generate(system_only))
    with pytest.raises(errors.AuthenticationError, match="api_key"):
        run(fake, lambda provider: provider.generate(request()), api_key=None)
    assert fake.requests == []


# --- answers and usage --------------------------------------------------------------------


def test_generate_parses_content_usage_finish_reason_and_ids(fake: FakeAnthropic) -> None:
    response = run(fake, lambda provider: provider.generate(request()))
    text = fake_reply_text(PROMPT, "anthropic")
    assert response.content == text
    assert (response.provider, response.model) == ("anthropic", MODEL)
    prompt_tokens = count_words(PROMPT)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == len(text.split(" "))
    assert response.usage.total_tokens == prompt_tokens + len(text.split(" "))
    assert response.metadata["finish_reason"] == "stop"
    assert response.metadata["stop_reason"] == "end_turn"
    assert response.metadata["request_id"].startswith("req_fake")
    assert response.metadata["response_id"].startswith("msg_fake")


def test_cache_tokens_are_part_of_the_prompt(fake: FakeAnthropic) -> None:
    fake.cache_read_tokens, fake.cache_write_tokens = 1000, 200
    usage = run(fake, lambda provider: provider.generate(request())).usage
    uncached = count_words(PROMPT)
    assert usage.prompt_tokens == uncached + 1000 + 200
    assert (usage.cached_read_tokens, usage.cache_write_tokens) == (1000, 200)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_thinking_blocks_stay_out_of_the_answer_but_count_as_reasoning(fake: FakeAnthropic) -> None:
    fake.thinking = True
    response = run(fake, lambda provider: provider.generate(request()))
    assert THINKING_TEXT not in response.content
    assert response.content == fake_reply_text(PROMPT, "anthropic")
    assert response.usage.reasoning_tokens == count_words(THINKING_TEXT)
    assert response.usage.completion_tokens > response.usage.reasoning_tokens


def test_max_tokens_stop_is_reported_as_length(fake: FakeAnthropic) -> None:
    response = run(fake, lambda provider: provider.generate(request(max_tokens=3)))
    assert response.metadata["finish_reason"] == "length"
    assert response.usage.completion_tokens == 3


def test_refusal_is_a_content_filter_error(fake: FakeAnthropic) -> None:
    fake.stop_reason = "refusal"
    with pytest.raises(errors.ContentFilteredError) as caught:
        run(fake, lambda provider: provider.generate(request()))
    assert caught.value.request_id and caught.value.fallback
    with pytest.raises(errors.ContentFilteredError):
        run(fake, lambda provider: collect(provider, request()))


def test_usage_mapping_ignores_absent_and_null_counts() -> None:
    usage = anthropic_usage({"input_tokens": 5, "cache_read_input_tokens": None, "output_tokens": 2})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_read_tokens) == (5, 2, 7, 0)


# --- streaming ----------------------------------------------------------------------------


def test_stream_yields_text_pieces_then_a_final_chunk_with_usage(fake: FakeAnthropic) -> None:
    fake.cache_read_tokens = 40
    chunks = run(fake, lambda provider: collect(provider, request()))
    assert fake.requests[-1].body["stream"] is True
    *pieces, final = chunks
    assert len(pieces) > 1 and not any(piece.metadata.get("final") for piece in pieces)
    assert "".join(piece.content for piece in pieces) == fake_reply_text(PROMPT, "anthropic")
    assert final.metadata["final"] is True and final.content == ""
    assert final.metadata["finish_reason"] == "stop"
    assert final.metadata["request_id"].startswith("req_fake")
    assert final.usage.prompt_tokens == count_words(PROMPT) + 40
    assert final.usage.cached_read_tokens == 40
    # message_delta's output count is cumulative: the total, not message_start's 1 plus it.
    assert final.usage.completion_tokens == len(fake_reply_text(PROMPT, "anthropic").split(" "))


def test_stream_with_thinking_yields_only_answer_text(fake: FakeAnthropic) -> None:
    fake.thinking = True
    *pieces, final = run(fake, lambda provider: collect(provider, request()))
    assert "".join(piece.content for piece in pieces) == fake_reply_text(PROMPT, "anthropic")
    assert final.usage.reasoning_tokens == count_words(THINKING_TEXT)


def test_in_stream_error_event_raises_the_typed_error_after_partial_text(fake: FakeAnthropic) -> None:
    fake.inject("stream_error")
    received: list[LLMResponse] = []
    with pytest.raises(errors.OverloadedError, match="overloaded_error") as caught:
        run(fake, lambda provider: collect(provider, request(), received))
    assert received and not any(chunk.metadata.get("final") for chunk in received)
    assert caught.value.request_id and caught.value.retryable


@pytest.mark.parametrize("fault", ["truncate", "reset"])
def test_stream_cut_off_raises_a_typed_error(fake: FakeAnthropic, fault: str) -> None:
    fake.inject(fault)
    received: list[LLMResponse] = []
    with pytest.raises(errors.ProviderError) as caught:
        run(fake, lambda provider: collect(provider, request(), received))
    assert caught.value.retryable
    assert not any(chunk.metadata.get("final") for chunk in received)


def test_stream_closed_cleanly_without_message_stop_is_malformed(fake: FakeAnthropic) -> None:
    fake.drop_events = {"message_stop"}
    with pytest.raises(errors.MalformedResponseError, match="message_stop"):
        run(fake, lambda provider: collect(provider, request()))


def test_stream_rejected_before_it_starts_raises_with_retry_after(fake: FakeAnthropic) -> None:
    fake.fail_next(429)
    with pytest.raises(errors.RateLimitedError) as caught:
        run(fake, lambda provider: collect(provider, request()))
    assert caught.value.retry_after_s == 7.0 and caught.value.request_id


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, errors.BadRequestError),
        (401, errors.AuthenticationError),
        (402, errors.PermissionDeniedError),
        (403, errors.PermissionDeniedError),
        (404, errors.ModelNotFoundError),
        (413, errors.ContextWindowExceededError),
        (429, errors.RateLimitedError),
        (500, errors.ServerError),
        (503, errors.OverloadedError),
        (504, errors.ProviderTimeoutError),
        (529, errors.OverloadedError),
    ],
)
def test_error_statuses_map_to_the_error_tree(fake: FakeAnthropic, status: int, error_class: type[errors.ProviderError]) -> None:
    fake.fail_next(status)
    with pytest.raises(errors.ProviderError) as caught:
        run(fake, lambda provider: provider.generate(request()))
    assert type(caught.value) is error_class
    assert caught.value.status_code == status
    assert caught.value.request_id and caught.value.request_id.startswith("req_fake")
    assert caught.value.retry_after_s == (7.0 if status == 429 else None)


def test_request_id_is_read_from_the_body_when_the_header_is_missing(fake: FakeAnthropic) -> None:
    fake.fail_next(500, body={"type": "error", "error": {"type": "api_error", "message": "boom"}, "request_id": "req_body"},
                   headers={"request-id": ""})
    with pytest.raises(errors.ServerError) as caught:
        run(fake, lambda provider: provider.generate(request()))
    assert caught.value.request_id == "req_body"


def test_prompt_too_long_is_a_context_window_error(fake: FakeAnthropic) -> None:
    fake.context_window_tokens = 3
    with pytest.raises(errors.ContextWindowExceededError, match="prompt is too long") as caught:
        run(fake, lambda provider: provider.generate(request()))
    assert caught.value.status_code == 400 and caught.value.fallback


def test_wrong_key_is_an_authentication_error_that_never_shows_the_key(fake: FakeAnthropic) -> None:
    secret = "sk-ant-wrong-secret"
    fake.fail_next(401, body={"type": "error", "error": {"type": "authentication_error", "message": f"bad key {secret}"}})
    with pytest.raises(errors.AuthenticationError) as caught:
        run(fake, lambda provider: provider.generate(request()), api_key=secret)
    assert secret not in str(caught.value) and secret not in repr(caught.value.to_dict())
    with pytest.raises(errors.AuthenticationError, match="invalid x-api-key"):
        run(fake, lambda provider: provider.generate(request()), api_key=secret)


def test_unknown_model_is_model_not_found(fake: FakeAnthropic) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="claude-9"):
        run(fake, lambda provider: provider.generate(request(model="claude-9")))


def test_malformed_body_timeout_and_reset_are_typed(fake: FakeAnthropic) -> None:
    fake.inject("malformed")
    with pytest.raises(errors.MalformedResponseError):
        run(fake, lambda provider: provider.generate(request()))
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        run(fake, lambda provider: provider.generate(request()))
    fake.inject("hang")
    with pytest.raises(errors.ProviderTimeoutError):
        run(fake, lambda provider: provider.generate(request()), timeout=0.3)


def test_rate_limit_headers_reach_the_header_observer(fake: FakeAnthropic) -> None:
    seen: list[httpx.Headers] = []

    async def generate(provider: AnthropicProvider) -> LLMResponse:
        provider.header_observer = lambda model, headers: seen.append(headers)
        return await provider.generate(request())

    run(fake, generate)
    headers = seen[-1]
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        assert headers[f"anthropic-ratelimit-{kind}-limit"].isdigit()
        assert headers[f"anthropic-ratelimit-{kind}-reset"].endswith("Z")


# --- models and health --------------------------------------------------------------------


def test_model_listing_follows_pagination(fake: FakeAnthropic) -> None:
    fake.max_models_page = 2
    models = run(fake, lambda provider: provider.get_available_models())
    assert models == list(MODELS)
    listing = [sent for sent in fake.requests if sent.path == "/v1/models"]
    assert [sent.query.get("after_id") for sent in listing] == [None, [MODELS[1]]]
    assert all(sent.header("x-api-key") == API_KEY and sent.header("anthropic-version") for sent in listing)


def test_health_check_true_then_false_on_errors_and_unreachable_server(fake: FakeAnthropic) -> None:
    assert run(fake, lambda provider: provider.health_check()) is True
    fake.fail_next(529)
    assert run(fake, lambda provider: provider.health_check()) is False
    assert run(fake, lambda provider: provider.health_check(), api_key="sk-ant-wrong") is False
    assert run(fake, lambda provider: provider.health_check(), base_url="http://127.0.0.1:9") is False


# --- the fake itself ----------------------------------------------------------------------


def test_fake_requires_the_version_header_and_streams_events_in_documented_order(fake: FakeAnthropic) -> None:
    body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    with httpx.Client(base_url=fake.url) as client:
        missing = client.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})
        assert missing.status_code == 400
        assert missing.json()["error"] == {"type": "invalid_request_error", "message": "anthropic-version: header is required"}
        system_role = client.post("/v1/messages", headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                                  json=body | {"messages": [{"role": "system", "content": "x"}]})
        assert system_role.status_code == 400 and "top-level `system`" in system_role.json()["error"]["message"]
        streamed = client.post("/v1/messages", json=body, headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"})
    names = [line.removeprefix("event: ") for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
