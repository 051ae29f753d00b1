"""LM Studio, LocalAI, vLLM and Hugging Face TGI against the fake, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from llmq.contract.capabilities import capabilities_for
from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.huggingface import HuggingFaceProvider
from llmq.worker.providers.openai import OpenAIProvider
from llmq.worker.providers.openai_compatible import (
    LMStudioProvider,
    LocalAIProvider,
    VLLMProvider,
)
from llmq.worker.providers.registry import adapter_class, create_provider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.openai import FakeOpenAI, fake_vector, tgi_context_body
from tests.support.harness import run_adapter

T = TypeVar("T")
PROMPT = "Write the next task"
HF_TOKEN = "hf_fakeTOKENabcdefghijklmnopqrstuvwxyz01"
LOCAL_TYPES = [
    ("lmstudio", LMStudioProvider, "http://localhost:1234/v1"),
    ("localai", LocalAIProvider, "http://localhost:8080/v1"),
    ("vllm", VLLMProvider, "http://localhost:8000/v1"),
]
VLLM_CONTEXT_ERROR = {
    "object": "error", "type": "BadRequestError", "param": None, "code": 400,
    "message": "This model's maximum context length is 4096 tokens. However, you requested 5021 tokens "
               "(4509 in the messages, 512 in the completion). Please reduce the length of the messages or completion.",
}


@pytest.fixture(scope="module")
def _tgi_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=HF_TOKEN, flavor="tgi") as fake:
        yield fake


@pytest.fixture
def fake_local(fake_openai: FakeOpenAI) -> FakeOpenAI:
    """The package's fake OpenAI server as a local one: no key asked for."""
    fake_openai.api_key = None
    return fake_openai


@pytest.fixture
def fake_tgi(_tgi_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    _tgi_server.reset()
    yield _tgi_server


def config(kind: str, base_url: str | None, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {"type": kind, "base_url": base_url, "timeout": 5}
    values.update(overrides)
    entry = ProviderConfig.model_validate(values)
    entry.name = f"my_{kind}"
    return entry


def request(**overrides: Any) -> LLMRequest:
    values: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}], "model": "llama-3.1-8b", "max_tokens": 30,
    }
    values.update(overrides)
    return LLMRequest.model_validate(values)


def run(entry: ProviderConfig, action: Callable[[OpenAIProvider], Awaitable[T]]) -> T:
    return run_adapter(entry, OpenAIProvider, action)


def generate(entry: ProviderConfig, job_id: str | None = None) -> LLMResponse:
    return run(entry, lambda provider: provider.generate(request(), job_id=job_id))


def collect(entry: ProviderConfig) -> list[LLMResponse]:
    async def action(provider: OpenAIProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request())]

    return run(entry, action)


def generate_error(entry: ProviderConfig) -> errors.ProviderError:
    with pytest.raises(errors.ProviderError) as caught:
        generate(entry)
    return caught.value


# --- LM Studio, LocalAI, vLLM ----------------------------------------------------------


@pytest.mark.parametrize(("kind", "adapter", "default_url"), LOCAL_TYPES)
def test_local_adapters_are_thin_subclasses(kind: str, adapter: type[OpenAIProvider], default_url: str) -> None:
    assert adapter_class(kind) is adapter and issubclass(adapter, OpenAIProvider)
    assert adapter.local and not adapter.requires_api_key and adapter.default_base_url == default_url
    assert create_provider(config(kind, None)).base_url == default_url


@pytest.mark.parametrize(("kind", "adapter", "default_url"), LOCAL_TYPES)
def test_local_request_response_and_models(fake_local: FakeOpenAI, kind: str, adapter: type, default_url: str) -> None:
    entry = config(kind, fake_local.url + "/v1")
    response = generate(entry, job_id="job-1")
    sent = fake_local.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.header("authorization") is None and sent.header("x-client-request-id") is None
    assert sent.body["model"] == "llama-3.1-8b" and sent.body["max_tokens"] == 30
    assert response.content == fake_reply_text(PROMPT, "openai") and response.provider == f"my_{kind}"
    assert run(entry, lambda provider: provider.get_available_models()) == ["gpt-4o-mini", "gpt-4o", "o3-mini"]
    assert fake_local.requests[-1].path == "/v1/models"
    assert run(entry, lambda provider: provider.health_check()) is True


def test_configured_key_is_sent_as_bearer(fake_local: FakeOpenAI) -> None:
    fake_local.api_key = "token-abc123"
    generate(config("vllm", fake_local.url + "/v1", api_key="token-abc123"))
    assert fake_local.requests[-1].header("authorization") == "Bearer token-abc123"
    assert type(generate_error(config("vllm", fake_local.url + "/v1"))) is errors.AuthenticationError


def test_local_stream(fake_local: FakeOpenAI) -> None:
    chunks = collect(config("lmstudio", fake_local.url + "/v1"))
    assert "".join(chunk.content for chunk in chunks) == fake_reply_text(PROMPT, "openai")
    assert chunks[-1].metadata["final"] is True and chunks[-1].usage.prompt_tokens == 4


def test_vllm_flat_error_body_with_context_message(fake_local: FakeOpenAI) -> None:
    fake_local.fail_next(400, body=VLLM_CONTEXT_ERROR)
    error = generate_error(config("vllm", fake_local.url + "/v1"))
    assert type(error) is errors.ContextWindowExceededError and "maximum context length" in error.message


def test_vllm_flat_error_inside_stream() -> None:
    provider = VLLMProvider(config("vllm", None))
    with pytest.raises(errors.ContextWindowExceededError):
        provider.parse_chunk(json.dumps(VLLM_CONTEXT_ERROR), "m", None)
    asyncio.run(provider.aclose())


def test_lmstudio_string_error_body(fake_local: FakeOpenAI) -> None:
    fake_local.fail_next(404, body={"error": "Model 'llama-3.1-8b' not found. Please load it first."})
    error = generate_error(config("lmstudio", fake_local.url + "/v1"))
    assert type(error) is errors.ModelNotFoundError and "not found" in error.message


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("truncate", errors.ProviderConnectionError), ("stream_error", errors.ServerError), ("reset", errors.ProviderConnectionError)],
)
def test_local_broken_stream(fake_local: FakeOpenAI, fault: str, expected: type) -> None:
    fake_local.inject(fault)
    with pytest.raises(expected):
        collect(config("localai", fake_local.url + "/v1"))


def test_local_malformed_timeout_and_down(fake_local: FakeOpenAI) -> None:
    fake_local.inject("malformed")
    assert type(generate_error(config("localai", fake_local.url + "/v1"))) is errors.MalformedResponseError
    fake_local.inject("hang")
    assert type(generate_error(config("localai", fake_local.url + "/v1", timeout=0.3))) is errors.ProviderTimeoutError
    assert run(config("lmstudio", "http://127.0.0.1:9/v1"), lambda provider: provider.health_check()) is False


# --- Hugging Face TGI ----------------------------------------------------------------------


def test_tgi_request_and_response(fake_tgi: FakeOpenAI) -> None:
    entry = config("huggingface", fake_tgi.url, api_key=HF_TOKEN)
    response = generate(entry)
    sent = fake_tgi.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.header("authorization") == f"Bearer {HF_TOKEN}"
    assert response.content == fake_reply_text(PROMPT, "huggingface")
    assert response.usage.prompt_tokens == 4 and response.usage.cached_read_tokens == 0
    assert run(entry, lambda provider: provider.get_available_models()) == ["gpt-4o-mini", "gpt-4o", "o3-mini"]
    assert fake_tgi.requests[-1].path == "/v1/models"


def test_tgi_default_base_url_and_alias() -> None:
    provider = create_provider(config("hf", None))
    assert isinstance(provider, HuggingFaceProvider) and provider.base_url == "https://router.huggingface.co"
    asyncio.run(provider.aclose())


def test_tgi_stream(fake_tgi: FakeOpenAI) -> None:
    chunks = collect(config("huggingface", fake_tgi.url, api_key=HF_TOKEN))
    assert "".join(chunk.content for chunk in chunks) == fake_reply_text(PROMPT, "huggingface")
    assert chunks[-1].metadata["final"] is True and chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.BadRequestError), (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
        (404, errors.ModelNotFoundError), (422, errors.BadRequestError), (424, errors.ServerError),
        (429, errors.OverloadedError), (500, errors.ServerError), (503, errors.OverloadedError),
    ],
)
def test_tgi_error_types_map_to_classes(fake_tgi: FakeOpenAI, status: int, expected: type) -> None:
    fake_tgi.fail_next(status)
    error = generate_error(config("huggingface", fake_tgi.url, api_key=HF_TOKEN))
    assert type(error) is expected and error.status_code == status and error.request_id
    assert HF_TOKEN not in str(error)


def test_tgi_wrong_token(fake_tgi: FakeOpenAI) -> None:
    error = generate_error(config("huggingface", fake_tgi.url, api_key="hf_wrong"))
    assert type(error) is errors.AuthenticationError and "token" in error.message


def test_tgi_context_validation_is_context_window(fake_tgi: FakeOpenAI) -> None:
    fake_tgi.fail_next(422, body=tgi_context_body())
    error = generate_error(config("huggingface", fake_tgi.url, api_key=HF_TOKEN))
    assert type(error) is errors.ContextWindowExceededError


def test_tgi_error_inside_stream(fake_tgi: FakeOpenAI) -> None:
    fake_tgi.inject("stream_error")
    with pytest.raises(errors.ServerError) as caught:
        collect(config("huggingface", fake_tgi.url, api_key=HF_TOKEN))
    assert type(caught.value) is errors.ServerError and "CUDA out of memory" in caught.value.message
    provider = HuggingFaceProvider(config("huggingface", None))
    with pytest.raises(errors.ContextWindowExceededError):
        provider.parse_chunk(json.dumps(tgi_context_body()), "m", None)
    with pytest.raises(errors.OverloadedError):
        provider.parse_chunk('{"error": "Model is overloaded", "error_type": "overloaded"}', "m", None)
    asyncio.run(provider.aclose())


def test_tgi_truncated_stream_and_timeout(fake_tgi: FakeOpenAI) -> None:
    fake_tgi.inject("truncate")
    with pytest.raises(errors.ProviderConnectionError):
        collect(config("huggingface", fake_tgi.url, api_key=HF_TOKEN))
    fake_tgi.inject("hang")
    error = generate_error(config("huggingface", fake_tgi.url, api_key=HF_TOKEN, timeout=0.3))
    assert type(error) is errors.ProviderTimeoutError


def test_tgi_health(fake_tgi: FakeOpenAI) -> None:
    assert run(config("huggingface", fake_tgi.url, api_key=HF_TOKEN), lambda p: p.health_check()) is True
    assert run(config("huggingface", fake_tgi.url, api_key="hf_bad"), lambda p: p.health_check()) is False


def test_pipeline_mode_returns_the_in_process_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[ProviderConfig] = []

    class StandIn:  # stands in for llmq.worker.providers.hf_local, which another module owns
        def __init__(self, entry: ProviderConfig) -> None:
            built.append(entry)

    module = types.ModuleType("llmq.worker.providers.hf_local")
    module.TransformersPipelineProvider = StandIn  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llmq.worker.providers.hf_local", module)
    entry = config("huggingface", None, options={"mode": "pipeline"})
    provider = HuggingFaceProvider(entry)
    assert isinstance(provider, StandIn) and built == [entry]
    assert isinstance(create_provider(entry), StandIn)



# --- capabilities and embeddings of the OpenAI-compatible locals ------------------------------


@pytest.mark.parametrize(("kind", "tools", "json_object", "json_schema"), [
    ("vllm", False, True, True), ("lmstudio", True, False, True), ("localai", True, True, True),
])
def test_local_capabilities_follow_each_servers_documentation(kind: str, tools: bool, json_object: bool,
                                                              json_schema: bool) -> None:
    entry = config(kind, None)
    found = capabilities_for(entry, "llama-3.1-8b")
    assert (found.tools, found.json_object, found.json_schema, found.vision, found.embeddings) == (
        tools, json_object, json_schema, False, False)
    assert capabilities_for(entry, "Qwen2-VL-7B-Instruct").vision and capabilities_for(entry, "llava-1.6").vision
    embedding = capabilities_for(entry, "nomic-embed-text-v1.5")
    assert embedding.embeddings and not (embedding.chat or embedding.tools)


@pytest.mark.parametrize(("kind", "adapter", "default_url"), LOCAL_TYPES)
def test_local_embeddings_ask_for_float_vectors(fake_local: FakeOpenAI, kind: str, adapter: type,
                                                default_url: str) -> None:
    request = EmbeddingRequest(input=["mine iron ore"], model="nomic-embed-text-v1.5")
    response = run(config(kind, fake_local.url + "/v1"), lambda provider: provider.embed(request))
    assert fake_local.requests[-1].body == {"model": "nomic-embed-text-v1.5", "input": ["mine iron ore"],
                                            "encoding_format": "float"}
    assert response.embeddings == [fake_vector("mine iron ore", 8)]
