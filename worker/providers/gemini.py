"""Google's Gemini API (generativelanguage.googleapis.com), the adapter for `type: gemini`.

PaLM is retired; config entries with `type: google` or `type: palm` are served here
(see `llmq.contract.config.PROVIDER_TYPE_ALIASES`).

Wire format (https://ai.google.dev/api/generate-content, https://ai.google.dev/api/models):

- `POST {base}/models/{model}:generateContent` and `...:streamGenerateContent?alt=sse`;
  the key travels in the `x-goog-api-key` header, never in `?key=`, so it stays out of URL logs.
- Roles: user -> "user", assistant -> "model"; system messages -> top-level `systemInstruction`.
- Usage: `promptTokenCount` already includes `cachedContentTokenCount`; `candidatesTokenCount`
  excludes `thoughtsTokenCount`. Google bills thoughts as output
  (https://ai.google.dev/gemini-api/docs/pricing: "output price, including thinking tokens"),
  so `completion_tokens = candidatesTokenCount + thoughtsTokenCount` and `reasoning_tokens`
  is the thought share of it, as `llmq.contract.models.Usage` documents.
- Errors carry `{"error": {"code", "message", "status", "details": [...]}}`; no request-id
  header is documented, so successful answers report `responseId` instead.
- Answer metadata: `finish_reason` (stop / length / content_filter / lower-cased other),
  `native_finish_reason`, `response_id`, `served_model` (`modelVersion`), `thought_parts`.

Options (under `options:` in the provider's config entry):

- `include_thoughts` (bool, default false): ask for thought summaries; they are counted, never
  returned as content
- `thinking_budget` (int >= -1, default unset): cap on thinking tokens (-1 lets the model decide,
  0 turns thinking off on models that allow it)
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.gemini_format import (
    FILTER_FINISH_REASONS,
    STATUS_CODES,
    answer_metadata,
    candidate_text,
    detail_reasons,
    error_object,
    generate_content_models,
    merged_contents,
    retry_delay_seconds,
    stream_records,
    unwrap,
    usage_from_metadata,
)
from llmq.worker.providers.http import HTTPProvider, StreamState, json_or_none

_CONTEXT_WINDOW_MESSAGE = re.compile(r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
#: Pages of `models.list` read before giving up (1000 models a page is the documented maximum).
MAX_MODEL_PAGES = 20


class GeminiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_thoughts: bool = False
    thinking_budget: int | None = Field(default=None, ge=-1)


@dataclass
class GeminiStreamState(StreamState):
    """What a stream has told so far: text seen, the latest usage, the finish reason."""

    text_seen: bool = False
    thought_parts: int = 0
    native_finish: str | None = None
    usage_metadata: dict[str, Any] | None = None
    response_id: str | None = None
    model_version: str | None = None

    def take(self, chunk: dict[str, Any]) -> str:
        """Record one chunk; return its new answer text."""
        # usageMetadata is cumulative in each chunk, so the last one holds the totals.
        self.usage_metadata = chunk.get("usageMetadata") or self.usage_metadata
        self.response_id = chunk.get("responseId") or self.response_id
        self.model_version = chunk.get("modelVersion") or self.model_version
        candidates = chunk.get("candidates") or []
        if not candidates or not isinstance(candidates[0], dict):
            return ""
        text, thoughts = candidate_text(candidates[0])
        self.thought_parts += thoughts
        self.native_finish = candidates[0].get("finishReason") or self.native_finish
        self.text_seen = self.text_seen or bool(text)
        return text


class GeminiProvider(HTTPProvider[GeminiStreamState]):
    type_name = "gemini"
    description = "Google Gemini API (generativelanguage.googleapis.com); also `type: google` / `palm`"
    requires_api_key = True
    supports_streaming = True
    price_provider_id = "google"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"
    options_model = GeminiOptions

    options: GeminiOptions

    # --- requests -------------------------------------------------------------

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        # A missing key is not refused here: Google answers 403 "unregistered callers", a
        # PermissionDeniedError that sends the job to the next provider all the same.
        key = self.api_key
        return {"x-goog-api-key": key} if key else {}

    def request_path(self, model: str, *, stream: bool) -> str:
        # "gemini-2.0-flash", "models/gemini-2.0-flash" and "tunedModels/x" all name a resource.
        resource = model if "/" in model else f"models/{model}"
        return f"/{resource}:streamGenerateContent?alt=sse" if stream else f"/{resource}:generateContent"

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        system_parts = [{"text": message.text} for message in request.messages if message.role == "system"]
        contents = merged_contents(request.messages)
        if not contents:
            raise errors.BadRequestError(
                "Gemini needs at least one user or assistant message besides the system prompt",
                provider=self.name, model=request.model,
            )
        generation_config: dict[str, Any] = {"temperature": request.temperature, "maxOutputTokens": request.max_tokens}
        thinking = self.thinking_config()
        if thinking:
            generation_config["thinkingConfig"] = thinking
        body: dict[str, Any] = {"contents": contents, "generationConfig": generation_config}
        if system_parts:
            body["systemInstruction"] = {"parts": system_parts}
        return body

    def thinking_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.options.include_thoughts:
            config["includeThoughts"] = True
        if self.options.thinking_budget is not None:
            config["thinkingBudget"] = self.options.thinking_budget
        return config

    # --- answers --------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        if not isinstance(body, dict):
            raise self.malformed(f"expected a GenerateContentResponse object, got {type(body).__name__}", request.model)
        self.raise_for_body(body, request.model)
        candidate = self.first_candidate(body, request.model)
        text, thought_parts = candidate_text(candidate)
        native_finish = candidate.get("finishReason")
        self.raise_if_filtered(native_finish, text, request.model)
        return self.response(
            request, text, usage_from_metadata(body.get("usageMetadata")),
            **answer_metadata(native_finish, body.get("responseId"), body.get("modelVersion"), thought_parts),
        )

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> GeminiStreamState:
        return GeminiStreamState(request, request_id)

    async def stream_events(self, response: httpx.Response, state: GeminiStreamState) -> AsyncIterator[dict[str, Any]]:
        """GenerateContentResponse chunks; a record is checked whole before any of its chunks counts."""
        async for record in stream_records(response):
            for chunk in self.parse_stream_record(record, state.request.model):
                yield chunk

    def parse_stream_record(self, record: str, model: str) -> list[dict[str, Any]]:
        """One SSE record as GenerateContentResponse chunks; error objects raise."""
        try:
            parsed = json.loads(record)
        except json.JSONDecodeError as exc:
            raise self.malformed(f"stream record is not JSON: {record[:200]!r}", model) from exc
        chunks = parsed if isinstance(parsed, list) else [parsed]
        for chunk in chunks:
            if not isinstance(chunk, dict):
                raise self.malformed(f"stream record is not an object: {record[:200]!r}", model)
            self.raise_for_body(chunk, model)
        return chunks

    def parse_stream_event(self, event: dict[str, Any], state: GeminiStreamState) -> str | None:
        # Read to the end: Gemini has no end marker, the finishReason comes with the last chunks.
        return state.take(event)

    def finish_stream(self, state: GeminiStreamState) -> LLMResponse:
        model = state.request.model
        if state.native_finish is None:
            raise self.malformed("the stream ended before Gemini sent a finishReason (cut short)", model)
        self.raise_if_filtered(state.native_finish, state.text_seen, model)
        return self.final_chunk(
            state.request, usage_from_metadata(state.usage_metadata),
            **answer_metadata(state.native_finish, state.response_id, state.model_version, state.thought_parts),
        )

    # --- response checks --------------------------------------------------------

    def raise_for_body(self, body: dict[str, Any], model: str) -> None:
        """An error object or a blocked prompt inside a 200 body."""
        if "error" in body:
            raise self.error_from_body(body, model)
        block_reason = (body.get("promptFeedback") or {}).get("blockReason")
        if block_reason:
            raise errors.ContentFilteredError(
                f"Gemini blocked the prompt (promptFeedback.blockReason={block_reason})",
                provider=self.name, model=model, status_code=200,
            )

    def first_candidate(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        candidates = body.get("candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            raise self.malformed("the response has no candidates and no promptFeedback.blockReason", model)
        return candidates[0]

    def raise_if_filtered(self, native_finish: str | None, has_text: bool | str, model: str) -> None:
        # A filter that stopped the answer part-way leaves usable text: that is returned, labelled.
        if native_finish in FILTER_FINISH_REASONS and not has_text:
            raise errors.ContentFilteredError(
                f"Gemini withheld the answer (finishReason={native_finish})",
                provider=self.name, model=model, status_code=200,
            )

    def malformed(
        self, message: str, model: str | None, request_id: str | None = None
    ) -> errors.MalformedResponseError:
        # Everything malformed here came with a 200 (Google documents no request id header).
        return errors.MalformedResponseError(message, provider=self.name, model=model, status_code=200)

    # --- errors ---------------------------------------------------------------

    def error_message(self, body: Any) -> str | None:
        return super().error_message(unwrap(body))

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        error = error_object(body)
        status = str(error.get("status") or "")
        if "API_KEY_INVALID" in detail_reasons(error):
            return errors.AuthenticationError  # Google answers a bad key with 400 INVALID_ARGUMENT
        if status_code == 400 and _CONTEXT_WINDOW_MESSAGE.search(message):
            return errors.ContextWindowExceededError
        if status == "FAILED_PRECONDITION":
            # Region without free tier or billing not enabled: the account cannot use the
            # API, so asking again fails the same way, while another provider may answer.
            return errors.PermissionDeniedError
        if status == "DEADLINE_EXCEEDED" or status_code == 504:
            return errors.ProviderTimeoutError
        return errors.error_for_status(status_code)

    def error_from_response(self, response: httpx.Response, model: str | None) -> errors.ProviderError:
        error = super().error_from_response(response, model)
        if error.retry_after_s is None:
            error.retry_after_s = retry_delay_seconds(json_or_none(response))
        return error

    def error_from_body(self, body: Any, model: str | None, request_id: str | None = None) -> errors.ProviderError:
        """An error object that arrived inside a 200 (mid-stream): same classes as an HTTP error."""
        error = error_object(body)
        code = error.get("code")
        status_code = code if isinstance(code, int) else STATUS_CODES.get(str(error.get("status")), 500)
        message = self.redact(self.error_message(body) or f"error inside the response: {json.dumps(body)[:200]}")
        error_class = self.map_error(status_code, body, message)
        return error_class(
            message, provider=self.name, model=model, status_code=status_code, retry_after_s=retry_delay_seconds(body)
        )

    # --- discovery ------------------------------------------------------------

    async def get_available_models(self) -> list[str]:
        names: list[str] = []
        page_token: str | None = None
        for _ in range(MAX_MODEL_PAGES):
            query = {"pageSize": 1000, **({"pageToken": page_token} if page_token else {})}
            page = await self.get_json(f"/models?{urlencode(query)}", headers=self.build_headers(None, None))
            if not isinstance(page, dict):
                raise self.malformed("models.list did not return an object", None)
            names += list(generate_content_models(page.get("models") or []))
            page_token = page.get("nextPageToken")
            if not page_token:
                break
        return names

    async def probe(self) -> None:
        await self.get_json("/models?pageSize=1", headers=self.build_headers(None, None))
