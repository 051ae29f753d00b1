"""The provider interface (ADR-0015's `LLMProvider`) and the HTTP plumbing adapters share.

An adapter is one small class: capabilities as class attributes, a request
builder, a response parser, a stream parser and an error classifier. Adapters
never retry: they translate every failure once into `llmq.worker.errors` and the
task decides what happens next.
"""

from __future__ import annotations

import email.utils
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.transport import AiohttpTransport


class LLMProvider(ABC):
    """One configured provider entry, served by one adapter class."""

    #: The `type:` name in config that selects this adapter.
    type_name: ClassVar[str]
    #: Shown in `llmq providers`.
    description: ClassVar[str] = ""
    requires_api_key: ClassVar[bool] = False
    supports_streaming: ClassVar[bool] = True
    #: Runs on the team's own machines: its calls cost nothing.
    local: ClassVar[bool] = False
    #: Output is made up (the mock): labelled as simulated wherever it appears.
    simulated: ClassVar[bool] = False
    #: `health_check()` makes a tiny request of its own: a half-open circuit probes with it
    #: instead of letting a (possibly poisonous) job through.
    health_probe: ClassVar[bool] = True
    default_base_url: ClassVar[str | None] = None

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name or self.type_name

    @abstractmethod
    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        """One complete answer."""

    @abstractmethod
    def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        """Chunks as the provider sends them; the last has metadata['final'] and the usage.

        Implemented as an async generator. Raises a typed error if the stream breaks
        part-way; never ends quietly with a short answer.
        """

    @abstractmethod
    async def get_available_models(self) -> list[str]:
        """Models the provider offers now (live discovery where it has an endpoint)."""

    @abstractmethod
    async def health_check(self) -> bool:
        """True when the provider answers; never raises."""

    async def aclose(self) -> None:
        """Release connections."""

    def response(self, request: LLMRequest, content: str, usage: Usage, **metadata: Any) -> LLMResponse:
        """Build a response that names this provider entry (not the adapter type)."""
        if self.simulated:
            metadata["simulated"] = True
        return LLMResponse(
            content=content,
            model=metadata.pop("model", None) or request.model,
            provider=self.name,
            usage=usage,
            metadata={key: value for key, value in metadata.items() if value is not None},
        )

    def final_chunk(self, request: LLMRequest, usage: Usage, **metadata: Any) -> LLMResponse:
        return self.response(request, "", usage, final=True, **metadata)


class HTTPProvider(LLMProvider):
    """An adapter that speaks HTTP through one shared `httpx.AsyncClient`."""

    #: Headers that carry the provider's id for a request, first match wins.
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-request-id", "request-id")
    #: Connection pool size: one worker process keeps hundreds of calls in flight.
    max_connections: ClassVar[int] = 1000

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config)
        base_url = config.base_url or self.default_base_url
        if not base_url:
            raise errors.BadRequestError(f"provider {self.name!r} needs base_url in its config", provider=self.name)
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            # httpx's API over aiohttp's connection pool (worker/providers/transport.py).
            transport=transport or AiohttpTransport(max_connections=self.max_connections),
            headers={"user-agent": "llmq/0.1"},
        )
        #: Called with the headers of every provider response (success or error), so the
        #: shared limiter can read rate-limit headers without adapters knowing of it.
        self.header_observer: Callable[[str | None, httpx.Headers], None] | None = None

    def observe(self, model: str | None, response: httpx.Response) -> None:
        if self.header_observer is not None:
            try:
                self.header_observer(model, response.headers)
            except Exception:  # telemetry never breaks a call
                pass

    async def aclose(self) -> None:
        await self.client.aclose()

    @property
    def api_key(self) -> str | None:
        key = self.config.api_key
        return key.get_secret_value() if key is not None and key.get_secret_value() else None

    # --- requests -------------------------------------------------------------

    async def post_json(
        self, url: str, body: dict[str, Any], *, model: str | None, headers: dict[str, str] | None = None
    ) -> tuple[dict[str, Any], httpx.Response]:
        async with self.translate_errors(model):
            response = await self.client.post(url, json=body, headers=headers)
        self.observe(model, response)
        if response.status_code >= 400:
            raise self.error_from_response(response, model)
        return self.parse_json(response, model), response

    async def get_json(self, url: str, *, model: str | None = None, headers: dict[str, str] | None = None) -> Any:
        async with self.translate_errors(model):
            response = await self.client.get(url, headers=headers)
        if response.status_code >= 400:
            raise self.error_from_response(response, model)
        return self.parse_json(response, model)

    @asynccontextmanager
    async def open_stream(
        self, url: str, body: dict[str, Any], *, model: str | None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """POST and hold the response open; a non-2xx status raises before any chunk."""
        async with self.translate_errors(model):
            async with self.client.stream("POST", url, json=body, headers=headers) as response:
                self.observe(model, response)
                if response.status_code >= 400:
                    await response.aread()
                    raise self.error_from_response(response, model)
                yield response

    @asynccontextmanager
    async def translate_errors(self, model: str | None) -> AsyncIterator[None]:
        """Turn transport failures (also those part-way through a stream) into typed errors."""
        try:
            yield
        except errors.LLMQError:
            raise
        except httpx.TimeoutException as exc:
            raise errors.ProviderTimeoutError(
                f"no answer within {self.config.timeout_s:g}s ({type(exc).__name__})", provider=self.name, model=model
            ) from exc
        except httpx.RemoteProtocolError as exc:
            raise errors.ProviderConnectionError(
                f"connection broke before the response was complete: {exc}", provider=self.name, model=model
            ) from exc
        except httpx.TransportError as exc:
            raise errors.ProviderConnectionError(
                f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}", provider=self.name, model=model
            ) from exc

    def parse_json(self, response: httpx.Response, model: str | None) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise errors.MalformedResponseError(
                f"response body is not JSON: {response.text[:200]!r}",
                provider=self.name, model=model, status_code=response.status_code,
                request_id=self.request_id(response),
            ) from exc

    # --- errors ---------------------------------------------------------------

    def error_from_response(self, response: httpx.Response, model: str | None) -> errors.ProviderError:
        """Map a non-2xx response to the error tree, with the provider's message and ids."""
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        message = self.redact(self.error_message(body) or response.text[:300] or response.reason_phrase)
        error_class = self.classify_error(response.status_code, body, message)
        return error_class(
            message,
            provider=self.name,
            model=model,
            status_code=response.status_code,
            request_id=self.request_id(response),
            retry_after_s=retry_after_seconds(response.headers),
        )

    def error_message(self, body: Any) -> str | None:
        """The human message in a provider error body; adapters override for their shape."""
        if isinstance(body, dict):
            error = body.get("error", body)
            if isinstance(error, dict):
                return str(error.get("message") or error.get("msg") or "") or None
            if isinstance(error, str):
                return error
        return None

    def classify_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        """The error class for a response; adapters refine it from the body (context window, filters)."""
        return errors.error_for_status(status_code)

    def request_id(self, response: httpx.Response) -> str | None:
        for header in self.request_id_headers:
            if header in response.headers:
                return response.headers[header]
        return None

    def redact(self, text: str) -> str:
        key = self.api_key
        return text.replace(key, "[redacted]") if key else text


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, then `retry-after` (seconds or an HTTP date), as seconds (lower-case keys or httpx.Headers)."""
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


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event name, data), per the WHATWG event-stream rules."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


async def ndjson_lines(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.strip():
            yield line
