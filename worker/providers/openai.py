"""OpenAI Chat Completions, and the base every OpenAI-compatible server subclasses.

`POST {base_url}/chat/completions` with `Authorization: Bearer <key>`; the model
list is `GET {base_url}/models`. A server that speaks the same dialect (LM Studio,
LocalAI, vLLM, TGI, Azure) is a subclass that changes class attributes and, where
its wire format really differs, one hook of `llmq.worker.providers.http.HTTPProvider`
(`request_path`, `build_headers`, `map_error`) or `stream_error_status`.

Options (under `options:`), checked by `OpenAIOptions` (extra keys are refused):

- `organization`, `project`: sent as `OpenAI-Organization` / `OpenAI-Project`
- `max_tokens_field` ("max_tokens" | "max_completion_tokens"; default: by model, from the
  capability table: `max_completion_tokens` for reasoning models (o-series, gpt-5), which
  accept only that, else `max_tokens`, which every compatible server knows)
- `stream_usage` (bool, default true): ask for the usage chunk when streaming
- `send_temperature` (bool; default: by model, not for reasoning models, which refuse any
  value but their own)

Every request feature maps one to one, since llmq's request is Chat Completions' own shape:
content parts (text, `image_url`; `cache_control` is dropped, as OpenAI caches prompts by
itself), `tools`, `tool_choice`, assistant `tool_calls` and `tool` messages, `response_format`,
`stop`, `seed`, `top_p`, and the `provider_options` in `allowed_provider_options`.
Answers carry `tool_calls`; streams carry `delta.tool_calls` pieces and end with the whole
calls; a structured-output `refusal` is a `ContentFilteredError`. Embeddings:
`POST {base_url}/embeddings`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict

from llmq.contract.capabilities import capabilities_for
from llmq.contract.embeddings import decode_vector
from llmq.contract.messages import Message, ToolCall
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.flex import FlexTier
from llmq.worker.providers.http import HTTPProvider, StreamState

#: Billing errors OpenAI sends as 429 (error.type "insufficient_quota", or one of these codes).
#: Waiting does not restore access (OpenAI "Error codes" guide), so they are not rate limits.
QUOTA_CODES = frozenset({
    "insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded", "organization_usage_limit_exceeded",
})
CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
#: Compatible servers (vLLM, TGI, LM Studio) send no `context_length_exceeded` code, only text.
CONTEXT_OVERFLOW = re.compile(
    r"maximum context length|context length exceeded|exceeds? the context window|context window|"
    r"`inputs` tokens \+ `max_new_tokens` must be|`inputs` must have less than",
    re.IGNORECASE,
)
#: OpenAI shows a wrong key as "sk-proj-****...wxyz"; even the fragment stays out of our errors.
_MASKED_SECRET = re.compile(r"\S*\*{4,}\S*")
_STATUS_FOR_ERROR_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "requests": 429, "tokens": 429, "rate_limit_error": 429,
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "server_error": 500,
    "service_unavailable_error": 503, "overloaded_error": 503,
}


class ChatCompletionsOptions(BaseModel):
    """Options every Chat Completions dialect shares."""

    model_config = ConfigDict(extra="forbid")

    #: None: by model (max_completion_tokens for reasoning models).
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    stream_usage: bool = True
    #: None: by model (not for reasoning models).
    send_temperature: bool | None = None


class OpenAIOptions(ChatCompletionsOptions):
    organization: str | None = None
    project: str | None = None


@dataclass
class ChatStreamState(StreamState):
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    response_id: str | None = None


class OpenAIProvider(FlexTier, HTTPProvider[ChatStreamState]):
    type_name = "openai"
    description = "OpenAI Chat Completions API"
    default_base_url = "https://api.openai.com/v1"
    requires_api_key = True
    supports_streaming = True
    price_provider_id = "openai"
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-request-id",)
    client_request_id_header: ClassVar[str | None] = "X-Client-Request-Id"
    flex_refusals = (errors.RateLimitedError,)

    options_model: ClassVar[type[ChatCompletionsOptions]] = OpenAIOptions
    #: Chat Completions parameters llmq has no field for, taken from a request's provider_options.
    allowed_provider_options: ClassVar[frozenset[str]] = frozenset({
        "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
        "service_tier", "reasoning_effort", "verbosity", "parallel_tool_calls", "store", "metadata", "prediction",
        "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "web_search_options",
    })
    #: Relative to base_url (httpx appends it to the base path).
    chat_completions_path: ClassVar[str] = "/chat/completions"
    models_path: ClassVar[str] = "/models"
    embeddings_endpoint: ClassVar[str | None] = "/embeddings"
    #: How vectors come back: base64 float32 (a quarter of the bytes), or "float" for servers without it.
    embeddings_encoding: ClassVar[str] = "base64"

    options: ChatCompletionsOptions

    def parse_options(self, options: dict[str, Any]) -> ChatCompletionsOptions:
        try:
            return self.options_model.model_validate(options)
        except ValueError as exc:
            raise errors.BadRequestError(
                f"provider {self.name!r}: invalid options for type {self.type_name!r}: {exc}", provider=self.name
            ) from exc

    async def get_available_models(self) -> list[str]:
        body = await self.get_json(self.models_path, headers=self.build_headers(None, None))
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise errors.MalformedResponseError(
                f"model list has no 'data' array: {str(body)[:200]!r}", provider=self.name
            )
        return [str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")]

    async def probe(self) -> None:
        await self.get_available_models()

    # --- requests -----------------------------------------------------------------

    def request_path(self, model: str, *, stream: bool) -> str:
        return self.chat_completions_path

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        reasoning = capabilities_for(self.config, request.model).reasoning
        max_tokens_field = self.options.max_tokens_field or ("max_completion_tokens" if reasoning else "max_tokens")
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [chat_message(message) for message in request.messages],
            max_tokens_field: request.max_tokens,
            "stream": stream,
        }
        if self.options.send_temperature if self.options.send_temperature is not None else not reasoning:
            body["temperature"] = request.temperature
        if request.service_tier == "flex":
            body["service_tier"] = "flex"
        if stream and self.options.stream_usage:
            # The usage then arrives in one last chunk whose `choices` is empty, before [DONE].
            body["stream_options"] = {"include_usage": True}
        if request.tools is not None or request.response_format is not None or request.provider_options:
            body.update(self.feature_fields(request))
        for name in ("stop", "seed", "top_p"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        return body

    def feature_fields(self, request: LLMRequest) -> dict[str, Any]:
        """tools, tool_choice, response_format and the allowed provider_options, as Chat Completions takes them."""
        fields: dict[str, Any] = dict(self.provider_options_of(request))
        if request.tools is not None:
            fields["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
        if request.tool_choice is not None:
            choice = request.tool_choice
            fields["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
        if request.response_format is not None:
            fields["response_format"] = request.response_format.model_dump(exclude_none=True, by_alias=True)
        return fields

    # --- embeddings ---------------------------------------------------------------

    def embeddings_path(self, model: str) -> str | None:
        return self.embeddings_endpoint

    def build_embeddings_body(self, request: EmbeddingRequest) -> dict[str, Any]:
        options = self.provider_options_of(request)
        body: dict[str, Any] = {"model": request.model, "input": request.texts, "encoding_format": self.embeddings_encoding}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        return {**options, **body}

    def parse_embeddings(self, request: EmbeddingRequest, body: Any, response: httpx.Response) -> EmbeddingResponse:
        request_id = self.request_id(response)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(item, dict) and "embedding" in item for item in data):
            raise self.malformed(f"embeddings answer has no data array: {str(body)[:200]!r}", request.model, request_id)
        ordered = sorted(data, key=lambda item: int(item.get("index") or 0))
        vectors = [
            decode_vector(item["embedding"]) if isinstance(item["embedding"], str) else item["embedding"]
            for item in ordered
        ]
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        return self.embedding_response(
            request, vectors, Usage.of(prompt_tokens, 0, total_tokens=int(usage.get("total_tokens") or 0)),
            request_id=request_id, served_model=body.get("model") or None,
        )

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        headers = super().build_headers(model, job_id)
        if isinstance(self.options, OpenAIOptions):
            if self.options.organization:
                headers["OpenAI-Organization"] = self.options.organization
            if self.options.project:
                headers["OpenAI-Project"] = self.options.project
        return headers

    # --- responses ----------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        request_id = self.request_id(response)
        if isinstance(body, dict) and self.is_error_payload(body):
            raise self.error_from_body(body, request.model, request_id)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise errors.MalformedResponseError(
                f"completion has no choices: {str(body)[:200]!r}",
                provider=self.name, model=request.model, status_code=200, request_id=request_id,
            )
        choice = choices[0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        finish_reason = choice.get("finish_reason")
        self.check_finish_reason(finish_reason, request.model, request_id)
        self.check_refusal(message.get("refusal"), request.model, request_id)
        return self.response(
            request, str(message.get("content") or ""), usage_from(body.get("usage")),
            tool_calls=self.tool_calls_of(message, request.model, request_id),
            finish_reason=finish_reason, request_id=request_id,
            response_id=body.get("id") or None, served_model=body.get("model") or None,
        )

    def tool_calls_of(self, message: dict[str, Any], model: str, request_id: str | None) -> list[ToolCall] | None:
        raw = message.get("tool_calls")
        if not raw:
            return None
        try:
            return [ToolCall.model_validate(call) for call in raw]
        except ValueError as exc:
            raise self.malformed(f"tool_calls not in OpenAI's shape: {str(raw)[:200]!r}", model, request_id) from exc

    def check_refusal(self, refusal: Any, model: str, request_id: str | None) -> None:
        """A structured-output refusal is the model declining to answer, not an answer."""
        if refusal:
            raise errors.ContentFilteredError(
                f"the model refused: {str(refusal)[:300]}", provider=self.name, model=model, request_id=request_id
            )

    # --- streams ------------------------------------------------------------------

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> ChatStreamState:
        return ChatStreamState(request, request_id)

    def parse_stream_event(self, event: tuple[str | None, str], state: ChatStreamState) -> str | None:
        _, data = event
        if data.strip() == "[DONE]":
            state.finished = True
            return None
        chunk = self.parse_chunk(data, state.request.model, state.request_id)
        state.response_id = state.response_id or chunk.get("id") or None
        state.served_model = state.served_model or chunk.get("model") or None
        if chunk.get("usage"):
            state.usage = usage_from(chunk["usage"])
        text = ""
        for choice in chunk.get("choices") or []:  # empty on Azure's filter chunk and on the usage chunk
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            text += str(delta.get("content") or "")
            for piece in delta.get("tool_calls") or ():
                if isinstance(piece, dict):
                    state.deltas.append(state.tool_calls.add_delta(self.tool_call_piece(piece, state)))
            self.check_refusal(delta.get("refusal"), state.request.model, state.request_id)
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
                self.check_finish_reason(state.finish_reason, state.request.model, state.request_id)
        return text

    def tool_call_piece(self, piece: dict[str, Any], state: ChatStreamState) -> dict[str, Any]:
        """One entry of a chunk's `delta.tool_calls`, before it is assembled; a dialect whose pieces
        differ from OpenAI's (TGI: no real id) mends it here."""
        return piece

    def parse_chunk(self, data: str, model: str, request_id: str | None) -> dict[str, Any]:
        chunk = self.parse_event_json(data, model, request_id, what="stream chunk")
        if self.is_error_payload(chunk):
            raise self.error_from_body(chunk, model, request_id)
        return chunk

    def finish_stream(self, state: ChatStreamState) -> LLMResponse:
        if not state.finished:
            raise self.malformed(
                "stream ended before its [DONE] marker: the answer is incomplete", state.request.model, state.request_id
            )
        return self.final_chunk(
            state.request, state.usage, tool_calls=state.tool_calls.calls(),
            finish_reason=state.finish_reason, request_id=state.request_id,
            response_id=state.response_id, served_model=state.served_model,
        )

    def check_finish_reason(self, finish_reason: Any, model: str, request_id: str | None) -> None:
        """A filtered answer is not an answer: raise rather than hand back what got through."""
        if finish_reason == "content_filter":
            raise errors.ContentFilteredError(
                "the provider's content filter stopped the answer (finish_reason=content_filter)",
                provider=self.name, model=model, request_id=request_id,
            )

    # --- errors -------------------------------------------------------------------

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        error = error_object(body)
        code, kind = str(error.get("code") or ""), str(error.get("type") or "")
        if code == "context_length_exceeded" or (status_code in (400, 413, 422) and CONTEXT_OVERFLOW.search(message)):
            return errors.ContextWindowExceededError
        if code in CONTENT_FILTER_CODES:
            return errors.ContentFilteredError
        if status_code == 429 and (kind in QUOTA_CODES or code in QUOTA_CODES):
            # Out of credit or over a spend limit: retrying never helps, another provider may.
            return errors.PermissionDeniedError
        return errors.error_for_status(status_code)

    def is_error_payload(self, payload: dict[str, Any]) -> bool:
        """OpenAI sends `{"error": {...}}` inside a 200 stream; vLLM's older form is `{"object": "error"}`."""
        return bool(payload.get("error")) or payload.get("object") == "error"

    def stream_error_status(self, payload: dict[str, Any]) -> int:
        """The HTTP status an in-stream error would have had, from its code or type."""
        error = error_object(payload)
        code = error.get("code")
        if isinstance(code, int) and 400 <= code < 600:
            return code
        return _STATUS_FOR_ERROR_TYPE.get(str(error.get("type") or ""), 500)

    def error_from_body(self, body: Any, model: str | None, request_id: str | None = None) -> errors.ProviderError:
        message = self.redact(self.error_message(body) or "the provider reported an error inside the stream")
        error_class = self.map_error(self.stream_error_status(body), body, message)
        return error_class(f"error inside a 200 response: {message}", provider=self.name, model=model,
                           request_id=request_id)

    def redact(self, text: str) -> str:
        return _MASKED_SECRET.sub("[redacted]", super().redact(text))


def chat_message(message: Message) -> dict[str, Any]:
    """One message as Chat Completions takes it; a plain text message stays two keys."""
    content = message.content
    if isinstance(content, list):
        # OpenAI caches prompt prefixes by itself and refuses keys it does not know: no cache_control.
        content = [part.model_dump(exclude_none=True, exclude={"cache_control"}) for part in content]
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def error_object(body: Any) -> dict[str, Any]:
    """The `error` object of an OpenAI-style error body ({} when there is none)."""
    if not isinstance(body, dict):
        return {}
    error = body.get("error")
    if isinstance(error, dict):
        return error
    return body if body.get("object") == "error" else {}


def usage_from(raw: Any) -> Usage:
    """Chat Completions `usage`, with cached prompt tokens and hidden reasoning tokens."""
    if not isinstance(raw, dict):
        return Usage()
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage.of(
        int(raw.get("prompt_tokens") or 0),
        int(raw.get("completion_tokens") or 0),
        total_tokens=int(raw.get("total_tokens") or 0),
        cached_read_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )
