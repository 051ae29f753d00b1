"""Which batch API serves which adapter type: llmq's own, one module per provider family.

The contract's `PROVIDER_BATCH_DEFAULTS` lists the same types (the client decides at submit
which jobs may wait in a provider batch, without importing the worker); a test keeps the two
lists equal.
"""

from __future__ import annotations

from llmq.worker.batches.anthropic import AnthropicBatches
from llmq.worker.batches.base import ProviderBatchAPI
from llmq.worker.batches.gemini import GeminiBatches
from llmq.worker.batches.openai import AzureOpenAIBatches, OpenAIBatches
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.http import HTTPProvider

BATCH_APIS: dict[str, type[ProviderBatchAPI]] = {
    api.type_name: api for api in (OpenAIBatches, AzureOpenAIBatches, AnthropicBatches, GeminiBatches)
}


def batch_api_for(adapter: LLMProvider) -> ProviderBatchAPI | None:
    """The batch API of a provider entry's adapter, if its type has one."""
    api = BATCH_APIS.get(adapter.type_name)
    if api is None or not isinstance(adapter, HTTPProvider):
        return None
    return api(adapter)
