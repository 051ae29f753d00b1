"""`LLMQEmbeddings`: LangChain's `Embeddings` backed by llmq's embedding jobs.

    embeddings = LLMQEmbeddings(model="text-embedding-3-small")   # was OpenAIEmbeddings(...)

Texts go in jobs of `chunk_size` each, submitted together; the vectors come back in input order.
"""

from __future__ import annotations

import asyncio

from langchain_core.embeddings import Embeddings
from pydantic import Field

from llmq.client import LLMService
from llmq.contract.embeddings import MAX_INPUTS
from llmq.langchain.connection import SERVICE_FIELDS_CONFIG, ServiceFields

#: Texts per job unless told otherwise: as OpenAIEmbeddings sends them per request.
DEFAULT_CHUNK_SIZE = 1000


class LLMQEmbeddings(ServiceFields, Embeddings):
    """Embeddings backed by llmq (`pip install 'llmq[langchain]'`): each `chunk_size` texts are one
    job, through llmq's queue, limits, budgets, cache and ledger. Takes `model`, `dimensions`,
    `chunk_size` and `timeout` as `OpenAIEmbeddings` does, llmq's request fields (provider,
    caller, request_metadata, provider_options) and where llmq is (config_path, redis_url)."""

    # Stated again: a base's config (LangChain's ignores unknown fields) would win otherwise.
    model_config = SERVICE_FIELDS_CONFIG

    dimensions: int | None = Field(default=None, ge=1)
    """Shorter vectors, for models that offer them; None: the model's own length."""
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1, le=MAX_INPUTS)
    """Texts per job."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        shared = self.shared()
        return shared.run(self._embed(shared.service, texts))

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        shared = self.shared()
        return await shared.arun(self._embed(shared.service, texts))

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]

    async def _embed(self, service: LLMService, texts: list[str]) -> list[list[float]]:
        fields = self.request_fields()
        if self.dimensions is not None:
            fields["dimensions"] = self.dimensions
        chunks = [texts[start : start + self.chunk_size] for start in range(0, len(texts), self.chunk_size)]
        answers = await asyncio.gather(
            *(service.embed(chunk, model=self.model, timeout_s=self.timeout_s, **fields) for chunk in chunks)
        )
        return [vector for answer in answers for vector in answer.embeddings]
