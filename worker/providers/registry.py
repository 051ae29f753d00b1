"""Which adapter class serves which `type:`.

Built-ins are listed here explicitly (imported on first use, so the Bedrock
extra is only needed by those who use Bedrock). Outside packages add adapters
through the `llmq.providers` entry point group: `name = "package.module:Class"`.
"""

from __future__ import annotations

import importlib
from importlib import metadata as importlib_metadata
from typing import Any

from llmq.contract.config import (
    BUILTIN_PROVIDER_TYPES,
    ENTRY_POINT_GROUP,
    ProviderConfig,
)
from llmq.worker.providers.base import LLMProvider

BUILTIN_ADAPTERS: dict[str, str] = {
    "openai": "llmq.worker.providers.openai:OpenAIProvider",
    "azure_openai": "llmq.worker.providers.azure_openai:AzureOpenAIProvider",
    "anthropic": "llmq.worker.providers.anthropic:AnthropicProvider",
    "gemini": "llmq.worker.providers.gemini:GeminiProvider",
    "bedrock": "llmq.worker.providers.bedrock:BedrockProvider",
    "ollama": "llmq.worker.providers.ollama:OllamaProvider",
    "lmstudio": "llmq.worker.providers.openai_compatible:LMStudioProvider",
    "localai": "llmq.worker.providers.openai_compatible:LocalAIProvider",
    "vllm": "llmq.worker.providers.openai_compatible:VLLMProvider",
    "huggingface": "llmq.worker.providers.huggingface:HuggingFaceProvider",
    "mock": "llmq.worker.providers.mock:MockProvider",
}
assert tuple(BUILTIN_ADAPTERS) == BUILTIN_PROVIDER_TYPES, "keep llmq.contract.config's list in step"

_registered: dict[str, type[LLMProvider]] = {}


def register(type_name: str, adapter: type[LLMProvider]) -> None:
    """Register an adapter class under a `type:` name (overrides a built-in of that name)."""
    _registered[type_name] = adapter


def _load(target: str) -> type[LLMProvider]:
    module_name, _, attribute = target.partition(":")
    adapter = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(adapter, type) and issubclass(adapter, LLMProvider)):
        raise TypeError(f"{target} is not an LLMProvider subclass")
    return adapter


def adapter_class(type_name: str) -> type[LLMProvider]:
    if type_name in _registered:
        return _registered[type_name]
    if type_name in BUILTIN_ADAPTERS:
        adapter = _load(BUILTIN_ADAPTERS[type_name])
    else:
        points = {entry.name: entry for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if type_name not in points:
            raise KeyError(f"no adapter for provider type {type_name!r}")
        adapter = points[type_name].load()
    _registered[type_name] = adapter
    return adapter


def adapter_types() -> list[str]:
    names = list(BUILTIN_ADAPTERS)
    names += [entry.name for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP) if entry.name not in names]
    names += [name for name in _registered if name not in names]
    return names


def create_provider(config: ProviderConfig, **kwargs: Any) -> LLMProvider:
    """An adapter instance for one config entry (kwargs reach the adapter, e.g. an httpx transport)."""
    return adapter_class(config.adapter_type)(config, **kwargs)
