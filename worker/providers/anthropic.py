"""Anthropic's Messages API (`POST /v1/messages`), with streaming and model listing.

Wire format, checked against Anthropic's reference (docs.claude.com / platform.claude.com:
api/messages, api/errors, api/versioning, api/models-list, api/rate-limits,
build-with-claude/streaming, build-with-claude/prompt-caching, build-with-claude/structured-outputs,
agents-and-tools/tool-use) and the official Python SDK's types:

- Headers `x-api-key`, `anthropic-version: 2023-06-01`, `content-type: application/json`;
  ids come back in the `request-id` header (errors also carry `request_id` in the body).
- There is no "system" role: system prompts go in the top-level `system` field.
  Turns alternate user/assistant; we merge consecutive same-role turns ourselves so the
  request is valid however the caller split them. `max_tokens` is required. How each message,
  part, tool and JSON request maps: `anthropic_format`.
- `temperature` ranges 0.0..1.0 (OpenAI's reaches 2.0). A request above 1.0 is refused
  here with a BadRequestError naming the field, rather than silently clamped: the caller
  asked for something this provider cannot do and should know. With `top_p` the temperature
  is left out (the 4.5 models and later refuse both at once), and models the capability table
  marks `reasoning` (those that refuse sampling settings) get neither.
- JSON: by structured outputs (`output_config.format`) where the table says the model has
  them (`native_json_schema`), else by a forced `json_answer` tool whose input is the answer.
- No `seed`: Anthropic offers no repeatable sampling, and the field is left out (OpenAI's
  own seed is best effort).
- Errors: `{"type": "error", "error": {"type": ..., "message": ...}, "request_id": ...}`.
  A stream may also carry `event: error` after its 200 (e.g. `overloaded_error`).

Options (under `options:` in the provider's config entry):

- `api_version` (str, default "2023-06-01"): the `anthropic-version` header
- `beta` (list of str, default none): sent as the `anthropic-beta` header
- `models_page_size` (1..1000, default 1000): page size for `GET /v1/models`
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.capabilities import Capabilities, capabilities_for
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.anthropic_format import output_format, to_anthropic_messages, tool_fields
from llmq.worker.providers.features import ToolBlocks, ToolCallAssembler, answer_tool_for, tool_plan
from llmq.worker.providers.http import HTTPProvider, StreamState, json_or_none

API_VERSION = "2023-06-01"
MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"

#: The `error.type` values of Anthropic's error bodies and in-stream error events.
ERROR_TYPES: dict[str, type[errors.ProviderError]] = {
    "invalid_request_error": errors.BadRequestError,
    "authentication_error": errors.AuthenticationError,
    # Out of credit: another provider can still serve the job, retrying here cannot.
    "billing_error": errors.PermissionDeniedError,
    "permission_error": errors.PermissionDeniedError,
    "not_found_error": errors.ModelNotFoundError,
    "request_too_large": errors.ContextWindowExceededError,
    "rate_limit_error": errors.RateLimitedError,
    "api_error": errors.ServerError,
    "timeout_error": errors.ProviderTimeoutError,
    "overloaded_error": errors.OverloadedError,
}

#: The one message text that tells a too-long prompt from any other 400 (Anthropic sends
#: no distinct error type for it): "prompt is too long: 208310 tokens > 200000 maximum".
CONTEXT_WINDOW_MESSAGE = "prompt is too long"


class AnthropicOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_version: str = Field(default=API_VERSION, min_length=1)
    beta: list[str] = Field(default_factory=list)
    models_page_size: int = Field(default=1000, ge=1, le=1000)


@dataclass
class AnthropicStreamState(StreamState):
    """What a stream has told us so far: the model, the usage, the stop reason, the tool-use blocks."""

    model: str = ""
    message_id: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    blocks: ToolBlocks = field(default_factory=lambda: ToolBlocks(ToolCallAssembler()))

    def on_message_start(self, message: Mapping[str, Any]) -> None:
        self.model = str(message.get("model") or self.model)
        self.message_id = message.get("id")
        self.usage.update(_known(message.get("usage")))

    def on_block_start(self, index: int, block: Mapping[str, Any]) -> str | None:
        if block.get("type") == "tool_use":
            delta = self.blocks.start(index, block.get("id"), str(block.get("name") or ""))
            self.deltas += [delta] if delta is not None else []
            return None
        # A text block normally starts empty, but the API may put text in it.
        return str(block.get("text") or "") or None if block.get("type") == "text" else None

    def on_block_delta(self, index: int, delta: Mapping[str, Any]) -> str | None:
        # text_delta is answer text, and so is input_json_delta of the JSON answer tool; other
        # tool input is a call's arguments. thinking_delta and signature_delta belong to hidden
        # reasoning, citations_delta to sources.
        if delta.get("type") == "input_json_delta":
            text, call_delta = self.blocks.add(index, str(delta.get("partial_json") or ""))
            self.deltas += [call_delta] if call_delta is not None else []
            return text or None
        return str(delta.get("text") or "") or None if delta.get("type") == "text_delta" else None

    def on_message_delta(self, payload: Mapping[str, Any]) -> None:
        delta = payload.get("delta") or {}
        self.stop_reason = delta.get("stop_reason") or self.stop_reason
        # message_delta's usage counts are cumulative, so they replace (never add to) earlier ones.
        self.usage.update(_known(payload.get("usage")))


class AnthropicProvider(HTTPProvider[AnthropicStreamState]):
    type_name = "anthropic"
    description = "Anthropic Messages API (Claude)"
    requires_api_key = True
    supports_streaming = True
    price_provider_id = "anthropic"
    default_base_url = "https://api.anthropic.com"
    request_id_headers = ("request-id",)
    options_model = AnthropicOptions
    #: Inclusive temperature range the API accepts; routing may read it before choosing us.
    temperature_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: Messages API parameters llmq has no field for (checked against the SDK's MessageCreateParams).
    allowed_provider_options: ClassVar[frozenset[str]] = frozenset({
        "top_k", "metadata", "service_tier", "thinking", "inference_geo",
    })

    options: AnthropicOptions

    # --- requests -------------------------------------------------------------

    def request_path(self, model: str, *, stream: bool) -> str:
        return MESSAGES_PATH

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        headers = {"x-api-key": self.require_api_key(model), "anthropic-version": self.options.api_version}
        if self.options.beta:
            headers["anthropic-beta"] = ",".join(self.options.beta)
        return headers

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        capabilities = capabilities_for(self.config, request.model)
        system, turns = to_anthropic_messages(request.messages, cache=capabilities.prompt_cache)
        if not turns:
            raise errors.BadRequestError(
                "Anthropic needs at least one user or assistant message besides the system prompt; "
                "add a user message to `messages`",
                provider=self.name, model=request.model,
            )
        body: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens, "messages": turns}
        body.update(self.sampling(request, capabilities))
        if system:
            body["system"] = system
        if stream:
            body["stream"] = True
        if request.tools is not None or request.response_format is not None or request.stop or request.provider_options:
            body.update(self.feature_fields(request, capabilities))
        return body

    def sampling(self, request: LLMRequest, capabilities: Capabilities) -> dict[str, Any]:
        """temperature, or top_p when given (newer models refuse both); neither for models that refuse them."""
        if capabilities.reasoning:
            return {}
        if request.top_p is not None:
            return {"top_p": request.top_p}
        self.check_temperature(request)
        return {"temperature": request.temperature}

    def feature_fields(self, request: LLMRequest, capabilities: Capabilities) -> dict[str, Any]:
        """Stop sequences, tools and tool choice, JSON output, and the allowed provider_options."""
        fields: dict[str, Any] = dict(self.provider_options_of(request))
        if request.stop:
            fields["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        native = capabilities.native_json_schema
        fields.update(tool_fields(tool_plan(request, native_json=native), strict=native))
        schema = request.response_format.schema_dict if request.response_format is not None else None
        if native and schema is not None:
            fields["output_config"] = output_format(schema)
        return fields

    def check_temperature(self, request: LLMRequest) -> None:
        low, high = self.temperature_range
        if not low <= request.temperature <= high:
            raise errors.BadRequestError(
                f"temperature {request.temperature:g} is outside Anthropic's range {low:g}..{high:g}; "
                f"send a temperature between {low:g} and {high:g} for provider {self.name!r}",
                provider=self.name, model=request.model,
            )

    # --- answers --------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        request_id = self.request_id(response)
        if not _is_message(body):
            raise errors.MalformedResponseError(
                f"response is not an Anthropic message (needs content and usage): {str(body)[:200]!r}",
                provider=self.name, model=request.model, status_code=response.status_code, request_id=request_id,
            )
        stop_reason = body.get("stop_reason")
        self.raise_if_refused(stop_reason, request.model, request_id)
        # Thinking and other blocks are not answer text; tool_use blocks are calls, or the JSON answer.
        blocks = ToolBlocks(ToolCallAssembler(), answer_tool_for(self.config, request))
        texts: list[str] = []
        answers: list[str] = []
        for index, block in enumerate(body["content"]):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                texts.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_use":
                answers.append(blocks.whole(index, block.get("id"), str(block.get("name") or ""), block.get("input")))
        return self.response(
            request, "".join(answers) if blocks.answered else "".join(texts), anthropic_usage(body["usage"]),
            tool_calls=blocks.calls.calls(), model=body.get("model"), finish_reason=blocks.finish_reason(stop_reason),
            stop_reason=stop_reason, request_id=request_id, response_id=body.get("id"),
        )

    def raise_if_refused(self, stop_reason: Any, model: str | None, request_id: str | None) -> None:
        """A refusal arrives as a 200 with stop_reason "refusal": a filter's verdict, not an answer."""
        if stop_reason == "refusal":
            raise errors.ContentFilteredError(
                "Claude declined to answer (stop_reason 'refusal'); another provider or a reworded prompt may succeed",
                provider=self.name, model=model, request_id=request_id,
            )

    # --- streaming ------------------------------------------------------------

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> AnthropicStreamState:
        state = AnthropicStreamState(request, request_id, model=request.model)
        state.blocks = ToolBlocks(state.tool_calls, answer_tool_for(self.config, request))
        return state

    def parse_stream_event(self, event: tuple[str | None, str], state: AnthropicStreamState) -> str | None:
        name, data = event
        payload = self.parse_event_json(data, state.request.model, state.request_id)
        kind = payload.get("type") or name
        if kind == "error":
            raise self.error_from_body(payload, state.request.model, state.request_id)
        if kind == "message_start":
            state.on_message_start(payload.get("message") or {})
        elif kind == "content_block_start":
            return state.on_block_start(int(payload.get("index") or 0), payload.get("content_block") or {})
        elif kind == "content_block_delta":
            return state.on_block_delta(int(payload.get("index") or 0), payload.get("delta") or {})
        elif kind == "content_block_stop":
            return state.blocks.stop(int(payload.get("index") or 0)) or None
        elif kind == "message_delta":
            state.on_message_delta(payload)
        elif kind == "message_stop":
            state.finished = True
        # `ping` and event types added later (the versioning policy
        # allows new ones) carry nothing the answer needs.
        return None

    def stream_chunk(self, state: AnthropicStreamState, text: str) -> LLMResponse:
        return self.response(state.request, text, Usage(), model=state.model)

    def finish_stream(self, state: AnthropicStreamState) -> LLMResponse:
        request = state.request
        if not state.finished:
            raise self.malformed(
                "stream ended before message_stop; the answer is incomplete", request.model, state.request_id
            )
        self.raise_if_refused(state.stop_reason, request.model, state.request_id)
        return self.final_chunk(
            request, anthropic_usage(state.usage), tool_calls=state.tool_calls.calls(),
            model=state.model, finish_reason=state.blocks.finish_reason(state.stop_reason), stop_reason=state.stop_reason,
            request_id=state.request_id, response_id=state.message_id,
        )

    # --- models and health ----------------------------------------------------

    async def get_available_models(self) -> list[str]:
        """Every model id, newest first, following `has_more` / `last_id` pagination."""
        models: list[str] = []
        after_id: str | None = None
        while True:
            params = {"limit": str(self.options.models_page_size)}
            if after_id:
                params["after_id"] = after_id
            page = await self.get_json(
                f"{MODELS_PATH}?{httpx.QueryParams(params)}", headers=self.build_headers(None, None)
            )
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise errors.MalformedResponseError(
                    f"model list has no data array: {str(page)[:200]!r}", provider=self.name
                )
            models += [str(item["id"]) for item in page["data"] if isinstance(item, dict) and "id" in item]
            after_id = page.get("last_id")
            if not page.get("has_more") or not after_id:
                return models

    async def probe(self) -> None:
        await self.get_json(f"{MODELS_PATH}?limit=1", headers=self.build_headers(None, None))

    # --- errors ---------------------------------------------------------------

    def error_from_body(self, body: Any, model: str | None, request_id: str | None = None) -> errors.ProviderError:
        """An `event: error` inside a 200 stream, as the same typed error its HTTP status would give."""
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        error_type = str(error.get("type") or "")
        message = self.redact(str(error.get("message") or error_type or "error event in stream"))
        error_class = self.map_error(0, body, message)
        return error_class(
            f"stream broke with {error_type or 'an error'}: {message}",
            provider=self.name, model=model, request_id=request_id or body.get("request_id"),
        )

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        """The body's `error.type` where the status alone is generic; the status otherwise."""
        if CONTEXT_WINDOW_MESSAGE in message.lower() and status_code in (0, 400):
            return errors.ContextWindowExceededError
        error = body.get("error") if isinstance(body, dict) else None
        by_type = ERROR_TYPES.get(str(error.get("type"))) if isinstance(error, dict) else None
        if status_code == 0:  # an in-stream error event has no status of its own
            return by_type or errors.ServerError
        by_status = errors.error_for_status(status_code)
        if by_type is not None and by_status in (errors.BadRequestError, errors.ServerError):
            return by_type
        return by_status

    def request_id(self, response: httpx.Response) -> str | None:
        header_id = super().request_id(response)
        if header_id or response.status_code < 400:
            return header_id
        body = json_or_none(response)  # error bodies repeat the id, which survives proxies that drop headers
        return str(body["request_id"]) if isinstance(body, dict) and body.get("request_id") else None


def anthropic_usage(usage: Mapping[str, Any]) -> Usage:
    """Anthropic's usage object as llmq's Usage.

    Anthropic's `input_tokens` counts only the prompt tokens after the last cache
    breakpoint; the whole prompt is input + cache_read + cache_creation (prompt-caching
    docs, "Tracking cache performance"). prompt_tokens holds that whole, like every other
    provider's, so cost math prices (prompt - cached_read - cache_write) at the base rate
    and each cache share at its own rate, with nothing counted twice or missed.
    """
    input_tokens = _count(usage, "input_tokens")
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    details = usage.get("output_tokens_details")
    thinking = _count(details, "thinking_tokens") if isinstance(details, Mapping) else 0
    return Usage.of(
        input_tokens + cache_read + cache_write,
        _count(usage, "output_tokens"),
        cached_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=thinking,
    )


def _is_message(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("content"), list)
        and isinstance(payload.get("usage"), dict)
    )


def _known(usage: Any) -> dict[str, Any]:
    """The counts a usage object states (null means "not reported here", not zero)."""
    return {key: value for key, value in usage.items() if value is not None} if isinstance(usage, dict) else {}


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0
