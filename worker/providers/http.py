"""The base of every adapter that speaks HTTP: named hooks, and the calls written once.

`generate`, `stream_generate` and `health_check` live here; an adapter fills in
hooks that have the same names in every adapter. Each one implements:

- `request_path(model, stream=)`: where a call goes, relative to base_url
- `build_body(request, stream=)`: the JSON body
- `parse_response(request, body, response)`: a 2xx body -> `LLMResponse`
- `new_stream_state(request, request_id)`: what a stream remembers between events
- `parse_stream_event(event, state)`: one event -> its new answer text; the rest into `state`
- `finish_stream(state)`: the final chunk, once the stream is known complete
  (with `state.tool_calls.calls()`, the whole tool calls, when the answer made any)
- `probe()`: the cheapest authenticated call, for `health_check`

and, for a provider with an embeddings API, the three hooks `embed` is written over:
`embeddings_path(model)`, `build_embeddings_body(request)` and
`parse_embeddings(request, body, response)` (without them `embed` refuses the job).
A stream's tool calls arrive in pieces: `parse_stream_event` hands each to
`state.tool_calls.add(...)` (or `add_delta` for OpenAI's shape) and puts the delta it
returns in `state.deltas`; the chunk that follows carries them to the caller.

and overrides, where its provider differs from the default:

- `build_headers(model, job_id)`: the key as `Authorization: Bearer`, and the job id
  under `client_request_id_header`
- `stream_events(response, state)`: the stream's framing; server-sent events
- `map_error(status_code, body, message)`: the error class; by HTTP status
- `error_message(body)`, `error_from_body(body, ...)` (an error inside a 200),
  `stream_chunk(state, text)` (metadata on partial chunks), `resolve_base_url()`

Transport failures are translated once, in `translate_errors`; non-2xx answers in
`error_from_response`, through `map_error`. Nothing here retries.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import httpx

from llmq.contract.config import ProviderConfig
from llmq.contract.messages import ToolCallDelta
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider, retry_after_seconds
from llmq.worker.providers.features import ToolCallAssembler
from llmq.worker.providers.transport import AiohttpTransport

#: OpenAI and Azure refuse a call whose client request id is not ASCII or is longer than this.
MAX_CLIENT_REQUEST_ID = 512


@dataclass
class StreamState:
    """What a stream has told so far; adapters subclass it with the fields their format carries."""

    request: LLMRequest
    request_id: str | None = None
    #: The provider's end-of-answer marker arrived: stop reading.
    finished: bool = False
    #: Tool calls streamed so far, assembled by index.
    tool_calls: ToolCallAssembler = field(default_factory=ToolCallAssembler)
    #: Tool-call pieces of the current event, for the next chunk to carry.
    deltas: list[ToolCallDelta] = field(default_factory=list)


StateT = TypeVar("StateT", bound=StreamState)


class HTTPProvider(LLMProvider, Generic[StateT]):
    """An adapter that speaks HTTP through one shared `httpx.AsyncClient`."""

    default_base_url: ClassVar[str | None] = None
    #: Headers that carry the provider's id for a request, first match wins.
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-request-id", "request-id")
    #: Header carrying the job id so the provider can trace a call we lost; None to send none.
    client_request_id_header: ClassVar[str | None] = None
    #: Connection pool size: one worker process keeps hundreds of calls in flight.
    max_connections: ClassVar[int] = 1000

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config)
        base_url = self.resolve_base_url()
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

    def resolve_base_url(self) -> str | None:
        """The server to call; runs after the options are checked, so it may read them."""
        return self.config.base_url or self.default_base_url

    async def aclose(self) -> None:
        await self.client.aclose()

    @property
    def api_key(self) -> str | None:
        key = self.config.api_key
        return key.get_secret_value() if key is not None and key.get_secret_value() else None

    def require_api_key(self, model: str | None) -> str:
        key = self.api_key
        if key is None:
            raise errors.AuthenticationError(
                f"provider {self.name!r} has no api_key configured; set api_key in its config entry, "
                'e.g. api_key: "${PROVIDER_API_KEY}"',
                provider=self.name, model=model,
            )
        return key

    # --- the hooks --------------------------------------------------------------

    @abstractmethod
    def request_path(self, model: str, *, stream: bool) -> str:
        """The path of a generation call, relative to base_url."""

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        """Per-call headers: the key as a bearer token, and the job id where the provider takes one."""
        key = self.require_api_key(model) if self.requires_api_key else self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return headers | self.client_request_id(job_id)

    @abstractmethod
    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body of a generation call; raises BadRequestError for what the provider cannot do."""

    @abstractmethod
    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        """A 2xx answer's parsed JSON as an `LLMResponse`; raises a typed error for an error inside it."""

    @abstractmethod
    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> StateT:
        """A fresh state for one stream."""

    def stream_events(self, response: httpx.Response, state: StateT) -> AsyncIterator[Any]:
        """The stream cut into the events `parse_stream_event` takes; default: server-sent events."""
        return sse_events(response)

    @abstractmethod
    def parse_stream_event(self, event: Any, state: StateT) -> str | None:
        """Fold one event into `state`; return the new answer text it carries, if any."""

    def stream_chunk(self, state: StateT, text: str) -> LLMResponse:
        """A partial chunk of answer text."""
        return self.response(state.request, text, Usage())

    @abstractmethod
    def finish_stream(self, state: StateT) -> LLMResponse:
        """The final chunk; raises MalformedResponseError when the stream ended early."""

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        """The error class for a failure; adapters refine it from the body (context window, filters)."""
        return errors.error_for_status(status_code)

    @abstractmethod
    async def probe(self) -> None:
        """The cheapest call that proves the provider answers and takes our credentials; raises if not."""

    # --- the calls, written once ------------------------------------------------

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        body = self.build_body(request, stream=False)
        headers = self.build_headers(request.model, job_id)
        path = self.request_path(request.model, stream=False)
        payload, response = await self.post_json(path, body, model=request.model, headers=headers)
        return self.parse_response(request, payload, response)

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        body = self.build_body(request, stream=True)
        headers = self.build_headers(request.model, job_id)
        path = self.request_path(request.model, stream=True)
        # open_stream translates errors raised inside this block too: a connection can break mid-stream.
        async with self.open_stream(path, body, model=request.model, headers=headers) as response:
            state = self.new_stream_state(request, self.request_id(response))
            async for event in self.stream_events(response, state):
                text = self.parse_stream_event(event, state)
                if state.deltas:
                    chunk = self.stream_chunk(state, text or "")
                    yield chunk.model_copy(update={"tool_call_deltas": state.deltas})
                    state.deltas = []
                elif text:
                    yield self.stream_chunk(state, text)
                if state.finished:
                    break
        yield self.finish_stream(state)

    async def embed(self, request: EmbeddingRequest, *, job_id: str | None = None) -> EmbeddingResponse:
        path = self.embeddings_path(request.model)
        if path is None:
            return await super().embed(request, job_id=job_id)
        body = self.build_embeddings_body(request)
        headers = self.build_headers(request.model, job_id)
        payload, response = await self.post_json(path, body, model=request.model, headers=headers)
        return self.parse_embeddings(request, payload, response)

    # --- embeddings hooks (a provider without an embeddings API keeps these) ---------

    def embeddings_path(self, model: str) -> str | None:
        """The path of an embeddings call, relative to base_url; None: the provider has none."""
        return None

    def build_embeddings_body(self, request: EmbeddingRequest) -> dict[str, Any]:
        raise NotImplementedError

    def parse_embeddings(self, request: EmbeddingRequest, body: Any, response: httpx.Response) -> EmbeddingResponse:
        raise NotImplementedError

    async def health_check(self) -> bool:
        try:
            await self.probe()
        except Exception:  # a health check reports, it never raises
            return False
        return True

    # --- requests ---------------------------------------------------------------

    def client_request_id(self, job_id: str | None) -> dict[str, str]:
        header = self.client_request_id_header
        if header and job_id and job_id.isascii() and len(job_id) <= MAX_CLIENT_REQUEST_ID:
            return {header: job_id}
        return {}

    def observe(self, model: str | None, response: httpx.Response) -> None:
        if self.header_observer is not None:
            try:
                self.header_observer(model, response.headers)
            except Exception:  # telemetry never breaks a call
                pass

    async def post_json(
        self, url: str, body: dict[str, Any], *, model: str | None, headers: dict[str, str] | None = None
    ) -> tuple[Any, httpx.Response]:
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

    def parse_event_json(
        self, data: str, model: str | None, request_id: str | None, what: str = "stream event"
    ) -> dict[str, Any]:
        """One stream event's JSON object; anything else is a malformed stream."""
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            raise self.malformed(f"{what} is not JSON: {data[:200]!r}", model, request_id) from exc
        if not isinstance(payload, dict):
            raise self.malformed(f"{what} is not an object: {data[:200]!r}", model, request_id)
        return payload

    def malformed(
        self, message: str, model: str | None, request_id: str | None = None
    ) -> errors.MalformedResponseError:
        return errors.MalformedResponseError(message, provider=self.name, model=model, request_id=request_id)

    # --- errors -----------------------------------------------------------------

    def error_from_response(self, response: httpx.Response, model: str | None) -> errors.ProviderError:
        """Map a non-2xx response to the error tree, with the provider's message and ids."""
        body = json_or_none(response)
        message = self.redact(self.error_message(body) or response.text[:300] or response.reason_phrase)
        error_class = self.map_error(response.status_code, body, message)
        return error_class(
            message,
            provider=self.name,
            model=model,
            status_code=response.status_code,
            request_id=self.request_id(response),
            retry_after_s=retry_after_seconds(response.headers),
        )

    def error_from_body(self, body: Any, model: str | None, request_id: str | None = None) -> errors.ProviderError:
        """An error object that arrived after a 200 (in its body or mid-stream): the model failed while running."""
        message = self.redact(self.error_message(body) or f"unexpected reply: {json.dumps(body)[:200]}")
        return self.map_error(500, body, message)(message, provider=self.name, model=model, request_id=request_id)

    def error_message(self, body: Any) -> str | None:
        """The human message in a provider error body; adapters override for their shape."""
        if isinstance(body, dict):
            error = body.get("error", body)
            if isinstance(error, dict):
                return str(error.get("message") or error.get("msg") or "") or None
            if isinstance(error, str):
                return error
        return None

    def request_id(self, response: httpx.Response) -> str | None:
        for header in self.request_id_headers:
            if header in response.headers:
                return response.headers[header]
        return None

    def redact(self, text: str) -> str:
        key = self.api_key
        return text.replace(key, "[redacted]") if key else text


def json_or_none(response: httpx.Response) -> Any:
    """An error response's JSON body; None when it has none (a proxy's HTML page, an empty body)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


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
