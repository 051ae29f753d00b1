"""OpenAI Chat Completions, and the base every OpenAI-compatible server subclasses.

`POST {base_url}/chat/completions` with `Authorization: Bearer <key>`; the model
list is `GET {base_url}/models`. A server that speaks the same dialect (LM Studio,
LocalAI, vLLM, TGI, Azure) is a subclass that changes class attributes and, where
its wire format really differs, one hook (`chat_path`, `auth_headers`,
`classify_error`, `stream_error_status`).

Options (under `options:`), checked by `OpenAIOptions` (extra keys are refused):

- `organization`, `project`: sent as `OpenAI-Organization` / `OpenAI-Project`
- `max_tokens_field` ("max_tokens" | "max_completion_tokens", default "max_tokens"):
  newer OpenAI models (o-series, gpt-5) accept only `max_completion_tokens`
- `stream_usage` (bool, default true): ask for the usage chunk when streaming
- `send_temperature` (bool, default true): reasoning models refuse any value but the default
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import HTTPProvider, sse_events

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
#: OpenAI: X-Client-Request-Id must be ASCII and at most 512 characters, else the call fails with 400.
_MAX_CLIENT_REQUEST_ID = 512
_STATUS_FOR_ERROR_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "requests": 429, "tokens": 429, "rate_limit_error": 429,
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "server_error": 500,
    "service_unavailable_error": 503, "overloaded_error": 503,
}


class ChatCompletionsOptions(BaseModel):
    """Options every Chat Completions dialect shares."""

    model_config = ConfigDict(extra="forbid")

    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    stream_usage: bool = True
    send_temperature: bool = True


class OpenAIOptions(ChatCompletionsOptions):
    organization: str | None = None
    project: str | None = None


@dataclass
class _StreamState:
    done: bool = False
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    response_id: str | None = None


class OpenAIProvider(HTTPProvider):
    type_name = "openai"
    description = "OpenAI Chat Completions API"
    default_base_url = "https://api.openai.com/v1"
    requires_api_key = True
    supports_streaming = True
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-request-id",)

    options_model: ClassVar[type[ChatCompletionsOptions]] = OpenAIOptions
    #: Relative to base_url (httpx appends it to the base path).
    chat_completions_path: ClassVar[str] = "/chat/completions"
    models_path: ClassVar[str] = "/models"
    #: Header carrying the job id so the provider can trace a call we lost; None to send nothing.
    client_request_id_header: ClassVar[str | None] = "X-Client-Request-Id"

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config, transport=transport)
        try:
            self.options = self.options_model.model_validate(config.options)
        except ValueError as exc:
            raise errors.BadRequestError(
                f"provider {self.name!r}: invalid options for type {self.type_name!r}: {exc}", provider=self.name
            ) from exc

    # --- the LLMProvider interface ------------------------------------------------

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        self.require_api_key(request.model)
        body, response = await self.post_json(
            self.chat_path(request.model), self.request_body(request, stream=False),
            model=request.model, headers=self.request_headers(job_id),
        )
        return self.parse_completion(request, body, self.request_id(response))

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        self.require_api_key(request.model)
        state = _StreamState()
        async with self.open_stream(
            self.chat_path(request.model), self.request_body(request, stream=True),
            model=request.model, headers=self.request_headers(job_id),
        ) as response:
            request_id = self.request_id(response)
            async for _event, data in sse_events(response):
                if data.strip() == "[DONE]":
                    state.done = True
                    break
                text = self.absorb_chunk(state, self.parse_chunk(data, request.model, request_id), request, request_id)
                if text:
                    yield self.response(request, text, Usage())
        if not state.done:
            raise errors.MalformedResponseError(
                "stream ended before its [DONE] marker: the answer is incomplete",
                provider=self.name, model=request.model, request_id=request_id,
            )
        yield self.final_chunk(
            request, state.usage, finish_reason=state.finish_reason, request_id=request_id,
            response_id=state.response_id, served_model=state.served_model,
        )

    async def get_available_models(self) -> list[str]:
        self.require_api_key(None)
        body = await self.get_json(self.models_path, headers=self.request_headers(None))
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise errors.MalformedResponseError(
                f"model list has no 'data' array: {str(body)[:200]!r}", provider=self.name
            )
        return [str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")]

    async def health_check(self) -> bool:
        try:
            await self.get_available_models()
        except Exception:  # a health check reports, it never raises
            return False
        return True

    # --- requests -----------------------------------------------------------------

    def chat_path(self, model: str) -> str:
        return self.chat_completions_path

    def request_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": message.role, "content": message.content} for message in request.messages],
            self.options.max_tokens_field: request.max_tokens,
            "stream": stream,
        }
        if self.options.send_temperature:
            body["temperature"] = request.temperature
        if stream and self.options.stream_usage:
            # The usage then arrives in one last chunk whose `choices` is empty, before [DONE].
            body["stream_options"] = {"include_usage": True}
        return body

    def auth_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if isinstance(self.options, OpenAIOptions):
            if self.options.organization:
                headers["OpenAI-Organization"] = self.options.organization
            if self.options.project:
                headers["OpenAI-Project"] = self.options.project
        return headers

    def request_headers(self, job_id: str | None) -> dict[str, str]:
        headers = self.auth_headers()
        header = self.client_request_id_header
        if header and job_id and job_id.isascii() and len(job_id) <= _MAX_CLIENT_REQUEST_ID:
            headers[header] = job_id
        return headers

    def require_api_key(self, model: str | None) -> None:
        if self.requires_api_key and not self.api_key:
            raise errors.AuthenticationError(
                f"provider {self.name!r} has no api_key configured", provider=self.name, model=model
            )

    # --- responses ----------------------------------------------------------------

    def parse_completion(self, request: LLMRequest, body: Any, request_id: str | None) -> LLMResponse:
        if isinstance(body, dict) and self.is_error_payload(body):
            raise self.stream_error(body, request.model, request_id)
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
        return self.response(
            request, str(message.get("content") or ""), usage_from(body.get("usage")),
            finish_reason=finish_reason, request_id=request_id,
            response_id=body.get("id") or None, served_model=body.get("model") or None,
        )

    def parse_chunk(self, data: str, model: str, request_id: str | None) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as exc:
            raise errors.MalformedResponseError(
                f"stream chunk is not JSON: {data[:200]!r}", provider=self.name, model=model, request_id=request_id
            ) from exc
        if not isinstance(chunk, dict):
            raise errors.MalformedResponseError(
                f"stream chunk is not an object: {data[:200]!r}", provider=self.name, model=model, request_id=request_id
            )
        if self.is_error_payload(chunk):
            raise self.stream_error(chunk, model, request_id)
        return chunk

    def absorb_chunk(
        self, state: _StreamState, chunk: dict[str, Any], request: LLMRequest, request_id: str | None
    ) -> str:
        """Fold one chunk into the stream state; the new text it carries."""
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
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
                self.check_finish_reason(state.finish_reason, request.model, request_id)
        return text

    def check_finish_reason(self, finish_reason: Any, model: str, request_id: str | None) -> None:
        """A filtered answer is not an answer: raise rather than hand back what got through."""
        if finish_reason == "content_filter":
            raise errors.ContentFilteredError(
                "the provider's content filter stopped the answer (finish_reason=content_filter)",
                provider=self.name, model=model, request_id=request_id,
            )

    # --- errors -------------------------------------------------------------------

    def classify_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
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

    def stream_error(self, payload: dict[str, Any], model: str, request_id: str | None) -> errors.ProviderError:
        message = self.redact(self.error_message(payload) or "the provider reported an error inside the stream")
        error_class = self.classify_error(self.stream_error_status(payload), payload, message)
        return error_class(f"error inside a 200 response: {message}", provider=self.name, model=model,
                           request_id=request_id)

    def redact(self, text: str) -> str:
        return _MASKED_SECRET.sub("[redacted]", super().redact(text))


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
