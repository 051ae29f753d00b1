"""The Bedrock adapter against FakeBedrock over real HTTP: bearer keys and SigV4, both ways."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.bedrock import BedrockProvider
from llmq.worker.providers.registry import create_provider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.bedrock import (
    TEST_ACCESS_KEY_ID,
    TEST_API_KEY,
    TEST_SECRET_ACCESS_KEY,
    FakeBedrock,
    event_frame,
)

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
MODEL_PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0"
T = TypeVar("T")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBedrock]:
    with FakeBedrock() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _clean(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    # botocore's credential chain must never find a developer's real AWS profile or an instance role.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def make(fake: FakeBedrock, *, api_key: str | None = TEST_API_KEY, timeout_s: float = 5.0, **options: Any) -> BedrockProvider:
    config = ProviderConfig(
        name="bedrock_test", type="bedrock", api_key=api_key, base_url=fake.url, models=[MODEL],
        timeout=timeout_s, options={"region": "us-west-2", "control_endpoint_url": fake.url, **options},
    )
    provider = create_provider(config)
    assert isinstance(provider, BedrockProvider)
    return provider


def sigv4(fake: FakeBedrock, **overrides: Any) -> BedrockProvider:
    keys = {"aws_access_key_id": TEST_ACCESS_KEY_ID, "aws_secret_access_key": TEST_SECRET_ACCESS_KEY, **overrides}
    return make(fake, api_key=None, **keys)


def run(provider: BedrockProvider, action: Callable[[BedrockProvider], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await action(provider)
        finally:
            await provider.aclose()
    return asyncio.run(main())


def ask(text: str = "Suggest the next Minecraft task", **fields: Any) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], model=MODEL, **fields)


async def collect(provider: BedrockProvider, request: LLMRequest) -> list[LLMResponse]:
    return [chunk async for chunk in provider.stream_generate(request)]


def expected_text(prompt: str = "Suggest the next Minecraft task") -> str:
    return fake_reply_text(prompt, "bedrock")


# --- requests and answers -------------------------------------------------------------


def test_converse_request_and_answer_with_bearer_key(fake: FakeBedrock) -> None:
    request = LLMRequest(messages=[
        {"role": "system", "content": "You plan Minecraft tasks."},
        {"role": "user", "content": "Inventory: 3 logs"},
        {"role": "user", "content": "Suggest the next Minecraft task"},
    ], model=MODEL, temperature=0.2, max_tokens=300)
    answer = run(make(fake), lambda p: p.generate(request))

    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", f"{MODEL_PATH}/converse")
    assert sent.header("authorization") == f"Bearer {TEST_API_KEY}"
    assert sent.header("content-type") == "application/json"
    assert sent.body == {
        "messages": [{"role": "user", "content": [{"text": "Inventory: 3 logs"}, {"text": "Suggest the next Minecraft task"}]}],
        "system": [{"text": "You plan Minecraft tasks."}],
        "inferenceConfig": {"maxTokens": 300, "temperature": 0.2},
    }
    assert answer.content == expected_text()
    assert (answer.provider, answer.model) == ("bedrock_test", MODEL)
    assert answer.metadata["finish_reason"] == "stop" and answer.metadata["stop_reason"] == "end_turn"
    assert answer.metadata["latency_ms"] == 123
    assert re.fullmatch(r"[0-9a-f-]{36}", answer.metadata["request_id"])
    assert answer.usage.completion_tokens == len(answer.content.split())
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_cached_tokens_are_added_to_the_prompt_count(fake: FakeBedrock) -> None:
    fake.cache_read_tokens, fake.cache_write_tokens = 1000, 200
    answer = run(make(fake), lambda p: p.generate(ask("Hi")))
    assert answer.usage.cached_read_tokens == 1000 and answer.usage.cache_write_tokens == 200
    # Bedrock's inputTokens leaves the cache out; llmq's prompt_tokens is the whole prompt.
    assert answer.usage.prompt_tokens == 1 + 1000 + 200
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_max_tokens_stop_is_a_length_finish(fake: FakeBedrock) -> None:
    answer = run(make(fake), lambda p: p.generate(ask(max_tokens=2)))
    assert answer.content == " ".join(expected_text().split(" ")[:2])
    assert answer.metadata["finish_reason"] == "length"


@pytest.mark.parametrize("stop_reason", ["content_filtered", "guardrail_intervened"])
def test_filtered_answer_without_text_is_content_filtered(fake: FakeBedrock, stop_reason: str) -> None:
    fake.reply_text, fake.stop_reason = "", stop_reason
    with pytest.raises(errors.ContentFilteredError) as caught:
        run(make(fake), lambda p: p.generate(ask()))
    assert caught.value.request_id and stop_reason in caught.value.message


def test_guardrail_message_with_text_is_returned(fake: FakeBedrock) -> None:
    fake.reply_text, fake.stop_reason = "Sorry, the model cannot answer this question.", "guardrail_intervened"
    answer = run(make(fake), lambda p: p.generate(ask()))
    assert answer.content == "Sorry, the model cannot answer this question."
    assert answer.metadata["finish_reason"] == "content_filter"


def test_malformed_json_is_a_malformed_response(fake: FakeBedrock) -> None:
    fake.inject("malformed")
    with pytest.raises(errors.MalformedResponseError):
        run(make(fake), lambda p: p.generate(ask()))


def test_hang_is_a_timeout(fake: FakeBedrock) -> None:
    fake.inject("hang")
    with pytest.raises(errors.ProviderTimeoutError):
        run(make(fake, timeout_s=0.3), lambda p: p.generate(ask()))


def test_reset_is_a_connection_error(fake: FakeBedrock) -> None:
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        run(make(fake), lambda p: p.generate(ask()))


# --- SigV4 ------------------------------------------------------------------------------


def test_sigv4_signature_is_verified_by_the_fake(fake: FakeBedrock) -> None:
    answer = run(sigv4(fake), lambda p: p.generate(ask()))
    assert answer.content == expected_text()
    authorization = fake.requests[-1].header("authorization") or ""
    assert re.fullmatch(
        rf"AWS4-HMAC-SHA256 Credential={TEST_ACCESS_KEY_ID}/\d{{8}}/us-west-2/bedrock/aws4_request, "
        r"SignedHeaders=content-type;host;x-amz-date, Signature=[0-9a-f]{64}", authorization)
    assert re.fullmatch(r"\d{8}T\d{6}Z", fake.requests[-1].header("x-amz-date") or "")


def test_sigv4_with_session_token_signs_the_token(fake: FakeBedrock) -> None:
    fake.session_tokens[TEST_ACCESS_KEY_ID] = "FwoGZXIvYXdzEXAMPLETOKEN"
    try:
        run(sigv4(fake, aws_session_token="FwoGZXIvYXdzEXAMPLETOKEN"), lambda p: p.generate(ask()))
    finally:
        fake.session_tokens.clear()
    assert "x-amz-security-token" in (fake.requests[-1].header("authorization") or "")


def test_sigv4_wrong_secret_is_rejected_by_signature(fake: FakeBedrock) -> None:
    provider = sigv4(fake, aws_secret_access_key="not-the-secret-at-all")
    with pytest.raises(errors.AuthenticationError) as caught:
        run(provider, lambda p: p.generate(ask()))
    assert "InvalidSignatureException" in caught.value.message
    assert "/converse" in caught.value.message  # AWS echoes the canonical request it expected
    assert "not-the-secret-at-all" not in str(caught.value)
    assert caught.value.status_code == 403 and caught.value.request_id


def test_signature_error_hides_a_session_token_from_the_chain(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
    fake.session_tokens[TEST_ACCESS_KEY_ID] = token
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-from-the-environment")
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    try:
        with pytest.raises(errors.AuthenticationError, match="InvalidSignatureException") as caught:
            run(make(fake, api_key=None), lambda p: p.generate(ask()))
    finally:
        fake.session_tokens.clear()
    assert "x-amz-security-token:[redacted]" in caught.value.message and token not in str(caught.value)


def test_sigv4_unknown_access_key_is_unrecognized(fake: FakeBedrock) -> None:
    with pytest.raises(errors.AuthenticationError, match="UnrecognizedClientException"):
        run(sigv4(fake, aws_access_key_id="AKIAUNKNOWNEXAMPLE00"), lambda p: p.generate(ask()))


def test_sigv4_from_environment_credential_chain(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    answer = run(make(fake, api_key=None), lambda p: p.generate(ask()))
    assert answer.content == expected_text()


def test_sigv4_stream_and_listing(fake: FakeBedrock) -> None:
    async def both(provider: BedrockProvider) -> tuple[list[LLMResponse], list[str]]:
        return await collect(provider, ask()), await provider.get_available_models()
    chunks, models = run(sigv4(fake), both)
    assert "".join(chunk.content for chunk in chunks) == expected_text()
    assert MODEL in models


def test_no_credentials_at_all_is_an_authentication_error(fake: FakeBedrock) -> None:
    with pytest.raises(errors.AuthenticationError, match="AWS_BEARER_TOKEN_BEDROCK"):
        run(make(fake, api_key=None), lambda p: p.generate(ask()))
    assert fake.requests == []


def test_bad_bearer_key_is_an_authentication_error_without_the_key(fake: FakeBedrock) -> None:
    with pytest.raises(errors.AuthenticationError) as caught:
        run(make(fake, api_key="bedrock-api-key-WRONG"), lambda p: p.generate(ask()))
    assert "Authentication failed" in caught.value.message
    assert "bedrock-api-key-WRONG" not in str(caught.value)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), [
    (400, errors.BadRequestError), (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
    (404, errors.ModelNotFoundError), (408, errors.ProviderTimeoutError), (424, errors.ServerError),
    (429, errors.RateLimitedError), (500, errors.ServerError), (503, errors.OverloadedError),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_error_statuses_map_to_classes(fake: FakeBedrock, status: int, error_class: type, streaming: bool) -> None:
    fake.fail_next(status)

    async def call(provider: BedrockProvider) -> Any:
        return await (collect(provider, ask()) if streaming else provider.generate(ask()))
    with pytest.raises(error_class) as caught:
        run(make(fake), call)
    assert type(caught.value) is error_class
    assert caught.value.status_code == status
    assert re.fullmatch(r"[0-9a-f-]{36}", caught.value.request_id or "")
    assert caught.value.retry_after_s is None  # Bedrock sends no retry-after


@pytest.mark.parametrize(("error_type", "status", "message", "error_class"), [
    ("ValidationException", 400, "Input is too long for requested model.", errors.ContextWindowExceededError),
    ("ValidationException", 400, "Request has too many input tokens.", errors.ContextWindowExceededError),
    ("ValidationException", 400, "The provided model identifier is invalid.", errors.ModelNotFoundError),
    ("ServiceQuotaExceededException", 400, "Your request exceeds the service quota.", errors.RateLimitedError),
    ("ModelNotReadyException", 429, "Model is not ready for inference.", errors.OverloadedError),
    ("ExpiredTokenException", 403, "The security token included in the request is expired", errors.AuthenticationError),
    ("InvalidSignatureException", 403, "Signature expired", errors.AuthenticationError),
])
def test_error_types_map_by_name(fake: FakeBedrock, error_type: str, status: int, message: str, error_class: type) -> None:
    fake.fail_with(error_type, status, message)
    with pytest.raises(error_class) as caught:
        run(make(fake), lambda p: p.generate(ask()))
    assert type(caught.value) is error_class
    assert caught.value.message == f"{error_type}: {message}"


def test_unknown_model_is_model_not_found(fake: FakeBedrock) -> None:
    request = LLMRequest(messages=[{"role": "user", "content": "hi"}], model="nobody.no-such-model-v1:0")
    with pytest.raises(errors.ModelNotFoundError):
        run(make(fake), lambda p: p.generate(request))
    assert fake.requests[-1].path == "/model/nobody.no-such-model-v1%3A0/converse"


def test_rate_limit_carries_retry_after(fake: FakeBedrock) -> None:
    fake.rate_limit(requests_per_minute=1, tokens_per_minute=None)

    async def twice(provider: BedrockProvider) -> None:
        await provider.generate(ask())
        await provider.generate(ask())
    with pytest.raises(errors.RateLimitedError) as caught:
        run(make(fake), twice)
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1
    assert "ThrottlingException" in caught.value.message


# --- streaming ----------------------------------------------------------------------------


def test_stream_chunks_and_final_usage(fake: FakeBedrock) -> None:
    fake.cache_read_tokens = 50
    chunks = run(make(fake), lambda p: collect(p, ask()))
    sent = fake.requests[-1]
    assert sent.path == f"{MODEL_PATH}/converse-stream"
    assert sent.body["inferenceConfig"] == {"maxTokens": 2000, "temperature": 0.7}
    *parts, final = chunks
    assert "".join(chunk.content for chunk in parts) == expected_text() and len(parts) == 4
    assert final.metadata["final"] is True and final.content == ""
    assert final.metadata["finish_reason"] == "stop" and final.metadata["latency_ms"] == 321
    assert final.usage.completion_tokens == len(expected_text().split())
    assert final.usage.cached_read_tokens == 50
    assert final.metadata["request_id"] == parts[0].metadata["request_id"]


@pytest.mark.parametrize(("exception_type", "error_class"), [
    ("modelStreamErrorException", errors.ServerError),
    ("throttlingException", errors.RateLimitedError),
    ("internalServerException", errors.ServerError),
    ("serviceUnavailableException", errors.OverloadedError),
    ("validationException", errors.ContextWindowExceededError),
    ("error-frame", errors.ServerError),
])
def test_in_stream_exceptions_raise_typed_errors(fake: FakeBedrock, exception_type: str, error_class: type) -> None:
    fake.stream_exception = exception_type
    fake.inject("stream_error")
    received: list[LLMResponse] = []

    async def consume(provider: BedrockProvider) -> None:
        async for chunk in provider.stream_generate(ask()):
            received.append(chunk)
    with pytest.raises(error_class) as caught:
        run(make(fake), consume)
    assert type(caught.value) is error_class
    assert [chunk.content for chunk in received] == ["Task: partial"]  # text came, then the error: never a short answer
    assert caught.value.request_id
    assert exception_type[1:] in caught.value.message or "InternalFailure" in caught.value.message


def test_stream_cut_part_way_raises(fake: FakeBedrock) -> None:
    fake.inject("truncate")
    with pytest.raises(errors.ProviderError) as caught:
        run(make(fake), lambda p: collect(p, ask()))
    assert caught.value.retryable


def test_stream_reset_is_a_connection_error(fake: FakeBedrock) -> None:
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        run(make(fake), lambda p: collect(p, ask()))


def test_stream_without_message_stop_and_metadata_is_malformed(fake: FakeBedrock) -> None:
    fake.omit_final_events = True
    with pytest.raises(errors.MalformedResponseError, match="messageStop"):
        run(make(fake), lambda p: collect(p, ask()))


def test_stream_with_bad_crc_is_malformed(fake: FakeBedrock) -> None:
    fake.corrupt_crc = True
    with pytest.raises(errors.MalformedResponseError, match="corrupt"):
        run(make(fake), lambda p: collect(p, ask()))


def test_stream_filtered_without_text_is_content_filtered(fake: FakeBedrock) -> None:
    fake.reply_text, fake.stop_reason = "", "content_filtered"
    with pytest.raises(errors.ContentFilteredError):
        run(make(fake), lambda p: collect(p, ask()))


def test_event_frame_round_trips_through_botocore() -> None:
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    buffer.add_data(event_frame({":event-type": "messageStop", ":message-type": "event"}, b'{"stopReason":"end_turn"}'))
    (message,) = list(buffer)
    assert message.headers == {":event-type": "messageStop", ":message-type": "event"}
    assert json.loads(message.payload) == {"stopReason": "end_turn"}


# --- discovery, health, options -------------------------------------------------------


def test_model_listing_from_control_plane(fake: FakeBedrock) -> None:
    models = run(make(fake), lambda p: p.get_available_models())
    assert models == list(fake.models)  # the embedding model is filtered out by byOutputModality
    sent = fake.requests[-1]
    assert (sent.method, sent.path, sent.query) == ("GET", "/foundation-models", {"byOutputModality": ["TEXT"]})


def test_model_listing_falls_back_to_configured_models(fake: FakeBedrock) -> None:
    fake.fail_next(500, path_contains="foundation-models")
    assert run(make(fake), lambda p: p.get_available_models()) == [MODEL]


def test_health_check(fake: FakeBedrock) -> None:
    assert run(make(fake), lambda p: p.health_check()) is True
    assert run(make(fake, api_key="bedrock-api-key-WRONG"), lambda p: p.health_check()) is False
    fake.fail_next(403, path_contains="foundation-models")  # a role that may invoke but not list
    assert run(make(fake), lambda p: p.health_check()) is True
    assert fake.requests[-1].body["inferenceConfig"]["maxTokens"] == 1


def test_health_check_false_when_unreachable(fake: FakeBedrock) -> None:
    provider = make(fake, control_endpoint_url="http://127.0.0.1:9", endpoint_url="http://127.0.0.1:9")
    assert run(provider, lambda p: p.health_check()) is False


def test_regional_urls_by_default() -> None:
    config = ProviderConfig(name="bedrock", api_key="k", options={"region": "eu-central-1"})
    provider = BedrockProvider(config)
    assert provider.base_url == "https://bedrock-runtime.eu-central-1.amazonaws.com"
    assert provider.control_url == "https://bedrock.eu-central-1.amazonaws.com"
    asyncio.run(provider.aclose())


@pytest.mark.parametrize(("options", "problem"), [
    ({"regoin": "us-east-1"}, "regoin"),
    ({"aws_access_key_id": TEST_ACCESS_KEY_ID}, "both"),
    ({"region": "us-east-1.evil.example/"}, "region"),
])
def test_bad_options_fail_at_construction(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        BedrockProvider(ProviderConfig(name="bedrock", api_key="k", options=options))


def test_blank_interpolated_options_count_as_unset() -> None:
    config = ProviderConfig(name="bedrock", options={"region": "", "aws_access_key_id": "", "aws_secret_access_key": ""})
    provider = BedrockProvider(config)
    assert provider.options.region == "us-east-1" and provider.options.aws_access_key_id is None
    asyncio.run(provider.aclose())


def test_missing_botocore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'llmq[bedrock]'")):
        BedrockProvider(ProviderConfig(name="bedrock", api_key="k"))
