"""How the LangChain classes reach llmq: the fields both take (`ServiceFields`), and the client
they share: one `LLMService` per (config, Redis URL), on the event loop thread of a
`SyncLLMService`, reached from plain threads and from any event loop.

Why one loop: the service's Redis pool belongs to the loop that opened it. LangChain calls a
model from worker threads (`batch`), from the caller's event loop (`ainvoke`) and from a fresh
loop per test; running every call on the service's own loop lets them all share one pool.
Why shared: applications build many model objects (one per chain, per `bind`, per copy); each
would otherwise start a thread and a pool of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmq.client import SyncLLMService
from llmq.contract.config import resolve_config_path
from llmq.contract.queueing import redis_url as resolve_redis_url

T = TypeVar("T")

#: What langchain-openai's classes take that llmq's do not, and what to do instead.
NOT_TAKEN = {
    "api_key": "llmq's workers hold the provider keys (their config and environment); a caller sends none",
    "openai_api_key": "llmq's workers hold the provider keys (their config and environment); a caller sends none",
    "base_url": "requests go through llmq's queue: give config_path and redis_url (or LLMQ_CONFIG, LLMQ_REDIS_URL)",
    "openai_api_base": "requests go through llmq's queue: give config_path and redis_url (or LLMQ_CONFIG, "
                       "LLMQ_REDIS_URL)",
    "organization": "the provider account is the workers' config entry; pin one with provider=",
    "max_retries": "llmq's workers retry and fall back (the service config's retry and fallback_chain)",
    "model_kwargs": "pass a provider's own parameters as provider_options",
}


#: Both classes' pydantic config: OpenAI's names where llmq has others, and no unknown field.
SERVICE_FIELDS_CONFIG = ConfigDict(populate_by_name=True, extra="forbid")


class ServiceFields(BaseModel):
    """What the chat model and the embeddings both take: the model, where llmq is, and the
    request fields llmq adds to OpenAI's (provider, the caller and metadata, provider_options)."""

    model_config = SERVICE_FIELDS_CONFIG

    model: str = Field(min_length=1, alias="model_name")
    """The model asked for; routing finds the provider entries that serve it."""
    provider: str | None = None
    """Pin one provider entry of the service config (None: routing and fallback decide)."""
    caller: str | None = None
    """Who is asking: llmq's `metadata.caller`, which budgets and the ledger count by."""
    request_metadata: dict[str, Any] = Field(default_factory=dict)
    """llmq's request `metadata` (16 KB of JSON at most): kept on the job, never sent to a provider.
    (LangChain's own `metadata` field is for traces.)"""
    provider_options: dict[str, Any] = Field(default_factory=dict)
    """A provider's own parameters llmq has no field for (`frequency_penalty`, `reasoning_effort`, ...)."""
    timeout_s: float | None = Field(default=None, gt=0, alias="timeout")
    """Seconds to wait for an answer before `TimeoutError` (the job itself goes on); None: as long as it takes."""
    config_path: str | None = None
    """The service config (llm_service.yaml); None: `LLMQ_CONFIG` or the default, as `llmq` finds it."""
    redis_url: str | None = None
    """llmq's Redis; None: `LLMQ_REDIS_URL` or the config's, as `llmq` finds it."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_openai_only_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name in values.keys() & NOT_TAKEN.keys():
                raise ValueError(f"{name}: {NOT_TAKEN[name]}; remove it")
        return values

    def shared(self) -> SharedService:
        return shared_service(self.config_path, self.redis_url)

    def request_fields(self) -> dict[str, Any]:
        """provider, metadata (with the caller) and provider_options, where set."""
        metadata = {**self.request_metadata, **({"caller": self.caller} if self.caller else {})}
        fields = {"provider": self.provider, "metadata": metadata, "provider_options": self.provider_options}
        return {name: value for name, value in fields.items() if value}


class SharedService(SyncLLMService):
    """`SyncLLMService` whose loop can also be awaited from another event loop, and whose async
    iterators (a job's stream) can be read from a plain thread or from another loop."""

    def run(self, coroutine: Coroutine[object, object, T]) -> T:
        """Run on the service's loop; block this thread for the result."""
        return self._run(coroutine)  # type: ignore[no-any-return]

    async def arun(self, coroutine: Coroutine[object, object, T]) -> T:
        """Run on the service's loop; await the result on the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Read an async iterator of the service's loop from a plain thread; closed when left early."""
        try:
            while (item := self._run(_next(items))) is not _END:
                yield item
        finally:
            self._run(_close(items))

    async def aiterate(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Read an async iterator of the service's loop from another event loop; closed when left early."""
        try:
            while (item := await self.arun(_next(items))) is not _END:
                yield item
        finally:
            await self.arun(_close(items))


#: What `_next` returns after the last item (StopAsyncIteration does not cross loops well).
_END: Any = object()


async def _next(items: AsyncIterator[T]) -> T:
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _END


async def _close(items: AsyncIterator[object]) -> None:
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


_services: dict[tuple[str, str], SharedService] = {}
_services_lock = threading.Lock()


def shared_service(config_path: str | None, redis_url: str | None) -> SharedService:
    """The service for this config file and Redis URL (None: the environment's, as `llmq` finds them,
    read now: a changed environment gets a service of its own)."""
    key = (str(resolve_config_path(config_path).resolve()), resolve_redis_url(redis_url))
    with _services_lock:
        service = _services.get(key)
        if service is None:
            service = _services[key] = SharedService(key[0], redis_url=key[1])
        return service


def close_services() -> None:
    """Close every shared service (its Redis pool and loop thread). A later call opens a new one."""
    with _services_lock:
        services = list(_services.values())
        _services.clear()
    for service in services:
        service.close()
