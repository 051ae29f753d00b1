"""Provider adapters: one small module per wire format."""

from llmq.worker.providers.base import HTTPProvider, LLMProvider
from llmq.worker.providers.registry import (
    adapter_class,
    adapter_types,
    create_provider,
    register,
)

__all__ = ["HTTPProvider", "LLMProvider", "adapter_class", "adapter_types", "create_provider", "register"]
