"""OllamaProvider against a fake Ollama over real HTTP: request shape, replies, streams, errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.ollama import OllamaProvider
from tests.support.fakes.base import RecordedRequest, StreamReply, count_words, fake_reply_text
from tests.support.fakes.ollama import DURATIONS, FakeOllama
from tests.support.harness import run_adapter

T = TypeVar("T")
SECRET = "ollama-proxy-secret-123"


@pytest.fixture
def fake(fake_ollama: FakeOllama) -> FakeOllama:
    """The package's shared FakeOllama server (conftest.py), reset for this test."""
    return fake_ollama


def config(base_url: str | None, **overrides: Any) -> ProviderConfig:
    return ProviderConfig(name=overrides.pop("name", "ollama"), base_url=base_url,
                          timeout=overrides.pop("timeout", 5.0), **overrides)


def run(cfg: ProviderConfig, action: Callable[[OllamaProvider], Awaitable[T]]) -> T:
    return run_adapter(cfg, OllamaProvider, action)


def request(**overrides: Any) -> LLMRequest:
    fields: dict[str, Any] = {
        "messages": [{"role": "system", "content": "You plan Minecraft tasks."},
                     {"role": "user", "content": "What next after wood?"}],
        "model": "llama3", "temperature": 0.2, "max_tokens": 50,
    }
    return LLMRequest(**{**fields, **overrides})


async def collect(
    provider: OllamaProvider, req: LLMRequest, into: list[LLMResponse] | None = None
) -> list[LLMResponse]:
    chunks = into if into is not None else []
    async for chunk in provider.stream_generate(req):
        chunks.append(chunk)
    return chunks


def generate(fake: FakeOllama, **overrides: Any) -> LLMResponse:
    return run(config(fake.url), lambda p: p.generate(request(**overrides)))


def stream(fake: FakeOllama, req: LLMRequest | None = None, **cfg: Any) -> list[LLMResponse]:
    return run(config(fake.url, **cfg), lambda p: collect(p, req or request()))


# --- requests and replies ------------------------------------------------------------


def test_generate_sends_documented_chat_body(fake: FakeOllama) -> None:
    generate(fake)
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/api/chat")
    assert sent.header("content-type") == "application/json"
    assert sent.header("authorization") is None
    assert sent.body == {
        "model": "llama3",
        "messages": [{"role": "system", "content": "You plan Minecraft tasks."},
                     {"role": "user", "content": "What next after wood?"}],
        "stream": False,  # Ollama streams unless told not to
        "options": {"temperature": 0.2, "num_predict": 50},
    }


def test_generate_parses_content_usage_and_durations(fake: FakeOllama) -> None:
    response = generate(fake)
    expected = fake_reply_text("What next after wood?", "ollama")
    assert response.content == expected
    assert (response.provider, response.model) == ("ollama", "llama3")
    prompt_words = count_words("You plan Minecraft tasks.\nWhat next after wood?")
    assert response.usage.prompt_tokens == prompt_words
    assert response.usage.completion_tokens == count_words(expected)
    assert response.usage.total_tokens == prompt_words + count_words(expected)
    assert response.metadata["finish_reason"] == "stop"
    assert response.metadata["total_duration_ns"] == DURATIONS["total_duration"]
    assert response.metadata["eval_duration_ns"] == DURATIONS["eval_duration"]


def test_num_predict_cut_reports_length(fake: FakeOllama) -> None:
    response = generate(fake, max_tokens=2)
    assert response.metadata["finish_reason"] == "length"
    assert response.usage.completion_tokens == 2


def test_adapter_options_reach_the_body_and_unknown_ones_are_refused(fake: FakeOllama) -> None:
    cfg = config(fake.url, options={"num_ctx": 8192, "keep_alive": "10m"})
    run(cfg, lambda p: p.generate(request()))
    body = fake.requests[-1].body
    assert body["options"]["num_ctx"] == 8192 and body["keep_alive"] == "10m"
    with pytest.raises(ValidationError, match="num_gpu"):
        OllamaProvider(config(fake.url, options={"num_gpu": 1}))


def test_api_key_goes_as_bearer_and_never_into_errors(fake: FakeOllama) -> None:
    cfg = config(fake.url, api_key=SECRET)
    run(cfg, lambda p: p.generate(request()))
    assert fake.requests[-1].header("authorization") == f"Bearer {SECRET}"
    fake.fail_next(500, body={"error": f"proxy refused key {SECRET}"})
    with pytest.raises(errors.ServerError) as caught:
        run(cfg, lambda p: p.generate(request()))
    assert SECRET not in str(caught.value) and "[redacted]" in caught.value.message


def test_entry_name_is_the_provider_and_base_url_defaults_to_localhost(fake: FakeOllama) -> None:
    response = run(config(fake.url, name="local_llama", type="ollama"), lambda p: p.generate(request()))
    assert response.provider == "local_llama"
    provider = OllamaProvider(config(None))
    assert provider.base_url == "http://localhost:11434"
    asyncio.run(provider.aclose())


# --- streaming -------------------------------------------------------------------------


def test_stream_sends_stream_true_and_joins_to_the_full_answer(fake: FakeOllama) -> None:
    full = generate(fake)
    chunks = stream(fake)
    assert fake.requests[-1].body["stream"] is True
    *pieces, final = chunks
    assert len(pieces) > 1 and all(not chunk.metadata.get("final") for chunk in pieces)
    assert "".join(chunk.content for chunk in pieces) == full.content
    assert all(chunk.usage.total_tokens == 0 for chunk in pieces)
    assert final.metadata["final"] is True and final.content == ""
    assert final.usage == full.usage
    assert final.metadata["finish_reason"] == "stop"
    assert final.metadata["load_duration_ns"] == DURATIONS["load_duration"]


def test_in_stream_error_line_raises_after_partial_output(fake: FakeOllama) -> None:
    fake.inject("stream_error")
    received: list[LLMResponse] = []
    with pytest.raises(errors.ServerError, match="error was encountered while running the model"):
        run(config(fake.url), lambda p: collect(p, request(), received))
    assert [chunk.content for chunk in received] == ["Task:", " fake"]


def test_truncated_stream_raises_typed_retryable_error(fake: FakeOllama) -> None:
    fake.inject("truncate")
    with pytest.raises(errors.ProviderError) as caught:
        stream(fake)
    assert isinstance(caught.value, (errors.ProviderConnectionError, errors.MalformedResponseError))
    assert caught.value.retryable


def test_stream_that_ends_without_done_raises() -> None:
    class NoDone(FakeOllama):
        def route(self, request: RecordedRequest) -> Any:
            reply = super().route(request)
            if isinstance(reply, StreamReply):
                reply.chunks = list(reply.chunks)[:-1]  # a clean end, but no done: true line
            return reply

    server = NoDone()
    server.start()
    try:
        with pytest.raises(errors.MalformedResponseError, match="done: true"):
            stream(server)
    finally:
        server.stop()


def test_stream_reset_raises_connection_error(fake: FakeOllama) -> None:
    fake.inject("reset")
    with pytest.raises(errors.ProviderConnectionError):
        stream(fake)


def test_stream_error_status_raises_before_any_chunk(fake: FakeOllama) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="try pulling it first"):
        stream(fake, request(model="mistral"))


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, errors.BadRequestError),
        (401, errors.AuthenticationError),
        (403, errors.PermissionDeniedError),
        (404, errors.ModelNotFoundError),
        (500, errors.ServerError),
        (502, errors.ServerError),
        (503, errors.OverloadedError),
    ],
)
def test_error_status_maps_to_class_with_ollama_message(
    fake: FakeOllama, status: int, error_class: type[errors.ProviderError]
) -> None:
    fake.fail_next(status)
    with pytest.raises(error_class) as caught:
        generate(fake)
    assert type(caught.value) is error_class
    assert caught.value.status_code == status
    assert caught.value.provider == "ollama" and caught.value.model == "llama3"
    assert caught.value.request_id is None  # Ollama sends no request id header
    assert caught.value.message  # Ollama's own {"error": "..."} text


def test_429_carries_retry_after(fake: FakeOllama) -> None:
    fake.fail_next(429, headers={"retry-after": "7"})
    with pytest.raises(errors.RateLimitedError) as caught:
        generate(fake)
    assert caught.value.retry_after_s == 7.0 and caught.value.message == "too many requests"


def test_unpulled_model_is_model_not_found(fake: FakeOllama) -> None:
    with pytest.raises(errors.ModelNotFoundError) as caught:
        generate(fake, model="mistral")
    assert caught.value.message == 'model "mistral" not found, try pulling it first'


@pytest.mark.parametrize("status", [400, 500])
def test_context_length_error_is_context_window_exceeded(fake: FakeOllama, status: int) -> None:
    fake.fail_next(status, body={"error": "the input length exceeds the context length"})
    with pytest.raises(errors.ContextWindowExceededError):
        generate(fake)


def test_malformed_json_is_malformed_response(fake: FakeOllama) -> None:
    fake.inject("malformed")
    with pytest.raises(errors.MalformedResponseError):
        generate(fake)


def test_hang_is_timeout(fake: FakeOllama) -> None:
    fake.inject("hang")
    with pytest.raises(errors.ProviderTimeoutError):
        run(config(fake.url, timeout=0.3), lambda p: p.generate(request()))


def test_refused_connection_is_connection_error() -> None:
    url = closed_port_url()
    with pytest.raises(errors.ProviderConnectionError):
        run(config(url), lambda p: p.generate(request()))


# --- discovery and health ------------------------------------------------------------------


def test_models_listed_with_bare_names_for_latest(fake: FakeOllama) -> None:
    models = run(config(fake.url), lambda p: p.get_available_models())
    assert models == ["llama3:latest", "llama3", "qwen2.5:0.5b"]
    assert fake.requests[-1].path == "/api/tags"


def test_health_check(fake: FakeOllama) -> None:
    assert run(config(fake.url), lambda p: p.health_check()) is True
    assert fake.requests[-1].path == "/"
    fake.fail_next(404)  # an odd root page: /api/tags answering still counts
    assert run(config(fake.url), lambda p: p.health_check()) is True
    fake.fail_next(500, times=2)
    assert run(config(fake.url), lambda p: p.health_check()) is False
    assert run(config(closed_port_url()), lambda p: p.health_check()) is False


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
