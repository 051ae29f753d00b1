"""The provider interface (ADR-0015's `LLMProvider`) every adapter implements.

An adapter is one small class. What it can do is said by class attributes, which
the engine, pricing and `llmq providers` read from the class alone, without
building an instance. Adapters that speak HTTP build on
`llmq.worker.providers.http.HTTPProvider`, which writes `generate`,
`stream_generate` and `health_check` once over a few named hooks. Adapters
never retry: they translate every failure once into `llmq.worker.errors` and the
task decides what happens next.
"""

from __future__ import annotations

import email.utils
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel

from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, ToolCall, Usage
from llmq.worker import errors
from llmq.worker.providers.features import CANONICAL_FINISH_REASONS


class LLMProvider(ABC):
    """One configured provider entry, served by one adapter class."""

    #: The `type:` name in config that selects this adapter: its name in the `llmq.providers` entry points.
    type_name: ClassVar[str]
    #: Shown in `llmq providers`.
    description: ClassVar[str] = ""
    requires_api_key: ClassVar[bool] = False
    supports_streaming: ClassVar[bool] = True
    #: Runs on the team's own machines: its calls cost nothing (unless the entry's `pricing:` says otherwise).
    local: ClassVar[bool] = False
    #: Output is made up (the mock): labelled as simulated wherever it appears.
    simulated: ClassVar[bool] = False
    #: `health_check()` makes a tiny request of its own: a half-open circuit probes with it
    #: instead of letting a (possibly poisonous) job through.
    health_probe: ClassVar[bool] = True
    #: The provider's id in genai-prices' table ("openai", "aws", ...). None: the `type:` name,
    #: when the table has a provider of that name (an outside adapter named groq or mistral).
    price_provider_id: ClassVar[str | None] = None
    #: Sells a flex tier (`service_tier: flex`: batch prices, may refuse): worker/providers/flex.py.
    supports_flex: ClassVar[bool] = False
    #: The pydantic model (extra="forbid") that checks the entry's `options:`; None: it takes none.
    options_model: ClassVar[type[BaseModel] | None] = None
    #: The names a request's `provider_options` may carry to this provider (sent as given).
    #: What each model can do (tools, JSON schema, vision, embeddings) is data the contract
    #: reads without importing adapters: producer/data/capabilities.yaml, keyed by `type_name`.
    allowed_provider_options: ClassVar[frozenset[str]] = frozenset()

    #: The entry's `options:`, checked by `options_model`.
    options: Any

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name or self.type_name
        self.options = self.parse_options(config.options)

    def parse_options(self, options: dict[str, Any]) -> Any:
        """The entry's `options:` checked by `options_model`; raises when the adapter is built, before any call."""
        if self.options_model is None:
            if options:
                raise ValueError(f"provider {self.name!r}: type {self.type_name!r} takes no options")
            return None
        return self.options_model.model_validate(options)

    @classmethod
    def price_table_key(cls, model: str) -> tuple[str, str] | None:
        """(price-table provider id, model id) to price a call of `model` with; None when the table cannot."""
        return cls.price_provider_id or cls.type_name, model

    @abstractmethod
    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        """One complete answer."""

    @abstractmethod
    def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        """Chunks as the provider sends them; the last has metadata['final'] and the usage.

        Implemented as an async generator. Raises a typed error if the stream breaks
        part-way; never ends quietly with a short answer.
        """

    async def embed(self, request: EmbeddingRequest, *, job_id: str | None = None) -> EmbeddingResponse:
        """Vectors for `request.texts`, in order. Adapters of providers with an embeddings API override it."""
        raise errors.BadRequestError(
            f"provider {self.name!r} (type {self.type_name!r}) has no embeddings; route embedding jobs elsewhere",
            provider=self.name, model=request.model,
        )

    def provider_options_of(
        self, request: LLMRequest | EmbeddingRequest, *, allowed: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """The request's `provider_options`, each checked against `allowed_provider_options` (or
        `allowed`, for an adapter whose chat and embedding calls take different ones)."""
        options = request.provider_options
        names = self.allowed_provider_options if allowed is None else allowed
        unknown = sorted(set(options) - names)
        if unknown:
            allowed_names = ", ".join(sorted(names)) or "none"
            raise errors.BadRequestError(
                f"provider_options.{unknown[0]} is not taken by provider type {self.type_name!r} (it takes: {allowed_names})",
                provider=self.name, model=request.model,
            )
        return options

    async def get_available_models(self) -> list[str]:
        """Models the provider offers now; adapters with a discovery endpoint ask it, others trust the config."""
        return list(self.config.models)

    @abstractmethod
    async def health_check(self) -> bool:
        """True when the provider answers; never raises."""

    async def aclose(self) -> None:
        """Release connections."""

    def response(
        self, request: LLMRequest, content: str, usage: Usage, *, tool_calls: list[ToolCall] | None = None,
        **metadata: Any,
    ) -> LLMResponse:
        """Build a response that names this provider entry (not the adapter type).

        A `finish_reason` already in llmq's four words becomes the response's field (it also
        stays in metadata, as adapters have always reported it); map a native one with
        `features.finish_reason` first.
        """
        if self.simulated:
            metadata["simulated"] = True
        reason = metadata.get("finish_reason")
        return LLMResponse(
            content=content,
            model=metadata.pop("model", None) or request.model,
            provider=self.name,
            usage=usage,
            metadata={key: value for key, value in metadata.items() if value is not None},
            tool_calls=tool_calls or None,
            finish_reason=reason if reason in CANONICAL_FINISH_REASONS else None,
        )

    def embedding_response(
        self, request: EmbeddingRequest, vectors: list[list[float]], usage: Usage, **metadata: Any
    ) -> EmbeddingResponse:
        """Vectors in input order, naming this provider entry; refuses a count that does not match the inputs."""
        if len(vectors) != len(request.texts):
            raise errors.MalformedResponseError(
                f"{len(vectors)} vectors came back for {len(request.texts)} inputs",
                provider=self.name, model=request.model,
            )
        if self.simulated:
            metadata["simulated"] = True
        return EmbeddingResponse(
            embeddings=vectors, model=metadata.pop("model", None) or request.model, provider=self.name, usage=usage,
            metadata={key: value for key, value in metadata.items() if value is not None},
        )

    def final_chunk(
        self, request: LLMRequest, usage: Usage, *, tool_calls: list[ToolCall] | None = None, **metadata: Any
    ) -> LLMResponse:
        return self.response(request, "", usage, final=True, tool_calls=tool_calls, **metadata)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, then `retry-after` (seconds or an HTTP date), as seconds (lower-case keys or httpx.Headers).

    Here rather than in the HTTP base because the shared limiter reads the same headers.
    """
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())
