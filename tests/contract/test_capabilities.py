"""Capabilities per model (table defaults, config overrides) and routing by capability."""

from __future__ import annotations

from typing import Any

import pytest

from llmq.contract.capabilities import capabilities_for, default_capabilities, needs_of
from llmq.contract.config import parse_config
from llmq.contract.embeddings import EmbeddingRequest
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.routing import RoutingError, can_serve, plan_route

CONFIG = """
llm_service:
  fallback_chain: [local, cloud, helper]
  providers:
    local:
      type: vllm
      models: [llama3, qwen-vl]
      stand_ins: {gpt-4o: llama3}
      capabilities:
        "qwen-vl": {vision: true}
    cloud:
      type: openai
      api_key: sk-test
      models: [gpt-4o, gpt-3.5-turbo, text-embedding-3-small]
    helper:
      type: mock
      models: [gpt-4o]
      capabilities:
        "*": {tools: false, embeddings: false}
"""
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


@pytest.fixture
def config() -> Any:
    return parse_config(CONFIG)


def chat(model: str = "gpt-4o", **fields: Any) -> LLMRequest:
    return LLMRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "model": model, **fields})


def test_defaults_come_from_the_table_by_adapter_and_model_family() -> None:
    assert default_capabilities("openai", "gpt-4o-mini").vision
    assert not default_capabilities("openai", "gpt-4").json_schema
    embedding = default_capabilities("openai", "text-embedding-3-small")
    assert embedding.embeddings and not embedding.chat
    assert default_capabilities("azure_openai", "o3-mini").reasoning
    assert not default_capabilities("vllm", "anything").tools
    assert default_capabilities("mock", "mock-small").embeddings
    # An adapter the table does not know (an outside package's): text chat only, until its config says more.
    assert default_capabilities("example", "x").model_dump(exclude_none=True) == {
        "chat": True, "tools": False, "json_object": False, "json_schema": False, "vision": False,
        "prompt_cache": False, "embeddings": False, "reasoning": False, "native_json_schema": False,
        "window_includes_output": True,
    }


def test_config_overrides_lay_over_the_defaults(config: Any) -> None:
    local = config.providers["local"]
    assert capabilities_for(local, "qwen-vl").vision and not capabilities_for(local, "llama3").vision
    assert not capabilities_for(config.providers["helper"], "gpt-4o").tools


def test_needs_name_each_feature_a_request_uses() -> None:
    assert needs_of(chat()).features == ("chat",)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]
    assert needs_of(chat(messages=image, tools=[TOOL], response_format={"type": "json_object"})).features == (
        "chat", "tools", "json_object", "vision")
    assert needs_of(EmbeddingRequest(input="x", model="m")).features == ("embeddings",)


def test_a_plain_request_keeps_its_route(config: Any) -> None:
    assert plan_route(chat(), config) == [
        Hop(provider="cloud", model="gpt-4o"), Hop(provider="helper", model="gpt-4o"), Hop(provider="local", model="llama3"),
    ]


def test_a_tools_request_skips_every_hop_without_tools_stand_ins_included(config: Any) -> None:
    assert plan_route(chat(tools=[TOOL]), config) == [Hop(provider="cloud", model="gpt-4o")]


def test_an_image_request_skips_a_model_without_vision(config: Any) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]
    assert plan_route(chat("qwen-vl", messages=image), config) == [Hop(provider="local", model="qwen-vl")]


def test_an_embedding_request_goes_only_to_embedding_models(config: Any) -> None:
    request = EmbeddingRequest(input="x", model="text-embedding-3-small")
    assert plan_route(request, config) == [Hop(provider="cloud", model="text-embedding-3-small")]
    with pytest.raises(RoutingError, match="needs embeddings"):
        plan_route(EmbeddingRequest(input="x", model="gpt-4o"), config)


def test_an_impossible_request_is_refused_naming_what_is_missing_and_every_entry_considered(config: Any) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(RoutingError) as caught:
        plan_route(chat("gpt-3.5-turbo", response_format=schema, tools=[TOOL]), config)
    message = str(caught.value)
    assert "needs chat, tools, json_schema" in message
    assert "cloud/gpt-3.5-turbo lacks json_schema" in message
    assert "fix:" in message


def test_a_pinned_provider_that_cannot_serve_is_refused(config: Any) -> None:
    with pytest.raises(RoutingError, match="'helper' model 'gpt-4o' cannot serve this request: it lacks tools"):
        plan_route(chat(provider="helper", tools=[TOOL]), config)


def test_max_tokens_beyond_a_models_output_limit_skips_it(config: Any) -> None:
    assert not can_serve(Hop(provider="cloud", model="gpt-3.5-turbo"), chat("gpt-3.5-turbo", max_tokens=5000), config)
    with pytest.raises(RoutingError, match="max_tokens 5000 \\(at most 4096\\)"):
        plan_route(chat("gpt-3.5-turbo", max_tokens=5000), config)
