"""Provider adapters: one small module per wire format, found through one registry.

- `base.py`: the `LLMProvider` interface, capabilities as class attributes.
- `http.py`: `HTTPProvider`, the named hooks and the calls written once over them.
- `registry.py`: `type:` name -> class, from the `llmq.providers` entry points.
- one module per wire format (openai, anthropic, gemini, bedrock, ollama, ...), and the
  in-process ones (mock, hf_local). docs/providers.md says what each speaks.
"""

from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.http import HTTPProvider
from llmq.worker.providers.registry import (
    adapter_class,
    adapter_types,
    create_provider,
    register,
)

__all__ = ["HTTPProvider", "LLMProvider", "adapter_class", "adapter_types", "create_provider", "register"]
