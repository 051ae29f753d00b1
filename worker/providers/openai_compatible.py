"""Local servers that speak OpenAI's Chat Completions: LM Studio, LocalAI, vLLM.

Each is the OpenAI adapter with other class attributes: its own default base
URL (ending in `/v1`, so chat is `/v1/chat/completions` and discovery is
`/v1/models`), no key required (a configured key is still sent as Bearer, for
servers started with one, e.g. `vllm serve --api-key`), and no OpenAI-only
headers. Options: `max_tokens_field`, `stream_usage`, `send_temperature`.

Request features map as for OpenAI; what each server has is said in the capability table
(producer/data/capabilities.yaml) from its documentation, and can be changed per entry under
`capabilities:`, never faked here:

- vLLM: `response_format` json_object and json_schema (guided decoding); tools only when the
  server was started with `--enable-auto-tool-choice` and a `--tool-call-parser` (so not by
  default); images for multimodal models; `/v1/embeddings` for pooling (embedding) models
- LM Studio: tools; structured output by json_schema only (no json_object); images for vision
  models; `/v1/embeddings` for embedding models
- LocalAI: tools and json_object/json_schema as llama.cpp grammars; images for vision
  (llava-style) models; `/v1/embeddings` for embedding models

Vision and embeddings depend on the model loaded: the table guesses them from the model's name
(`*-VL*`, `*llava*`, `*vision*`; `*embed*`, `*bge-*`, `*gte-*`, `*MiniLM*`). Vectors are asked
for as floats (not every compatible server encodes base64).
"""

from __future__ import annotations

from typing import ClassVar

from llmq.worker.providers.openai import ChatCompletionsOptions, OpenAIProvider


class OpenAICompatibleProvider(OpenAIProvider):
    """A server on the team's own machines that copies OpenAI's wire format."""

    requires_api_key = False
    supports_flex = False
    local = True
    options_model: ClassVar[type[ChatCompletionsOptions]] = ChatCompletionsOptions
    # OpenAI's client request id means nothing to these servers.
    client_request_id_header: ClassVar[str | None] = None
    # Sampling parameters these servers take beyond OpenAI's.
    allowed_provider_options: ClassVar[frozenset[str]] = OpenAIProvider.allowed_provider_options | {
        "top_k", "min_p", "repetition_penalty",
    }
    # Not every compatible server encodes vectors as base64.
    embeddings_encoding: ClassVar[str] = "float"


class LMStudioProvider(OpenAICompatibleProvider):
    type_name = "lmstudio"
    description = "LM Studio local server (OpenAI-compatible)"
    default_base_url = "http://localhost:1234/v1"


class LocalAIProvider(OpenAICompatibleProvider):
    type_name = "localai"
    description = "LocalAI server (OpenAI-compatible)"
    default_base_url = "http://localhost:8080/v1"


class VLLMProvider(OpenAICompatibleProvider):
    type_name = "vllm"
    description = "vLLM OpenAI-compatible server"
    default_base_url = "http://localhost:8000/v1"
