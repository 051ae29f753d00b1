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
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Message, Usage
from llmq.worker import errors
from llmq.worker.providers.base import HTTPProvider

#: Finish reasons meaning a filter stopped the answer (Candidate.FinishReason).
FILTER_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
#: Google's finish reasons in the vocabulary the rest of llmq uses.
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", **{reason: "content_filter" for reason in FILTER_FINISH_REASONS}
}
#: google.rpc.Code names -> HTTP status, for error objects that arrive without a code (in a stream).
STATUS_CODES = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_CONTEXT_WINDOW_MESSAGE = re.compile(r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
#: Lines that frame a JSON array of records rather than belong to one.
_ARRAY_PUNCTUATION = frozenset({"[", "]", ","})
#: Pages of `models.list` read before giving up (1000 models a page is the documented maximum).
MAX_MODEL_PAGES = 20


class GeminiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_thoughts: bool = False
    thinking_budget: int | None = Field(default=None, ge=-1)


class GeminiProvider(HTTPProvider):
    type_name = "gemini"
    description = "Google Gemini API (generativelanguage.googleapis.com); also `type: google` / `palm`"
    requires_api_key = True
    supports_streaming = True
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.options = GeminiOptions.model_validate(config.options)
        super().__init__(config, transport=transport)

    # --- requests -------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        key = self.api_key
        return {"x-goog-api-key": key} if key else {}

    def model_path(self, model: str, method: str) -> str:
        # "gemini-2.0-flash", "models/gemini-2.0-flash" and "tunedModels/x" all name a resource.
        resource = model if "/" in model else f"models/{model}"
        return f"/{resource}:{method}"

    def build_body(self, request: LLMRequest) -> dict[str, Any]:
        system_parts = [{"text": message.content} for message in request.messages if message.role == "system"]
        contents = _merged_contents(request.messages)
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

    # --- generation -----------------------------------------------------------

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        url = self.model_path(request.model, "generateContent")
        body, _ = await self.post_json(url, self.build_body(request), model=request.model, headers=self.headers())
        if not isinstance(body, dict):
            raise self.malformed(f"expected a GenerateContentResponse object, got {type(body).__name__}", request.model)
        self.raise_for_body(body, request.model)
        candidate = self.first_candidate(body, request.model)
        text, thought_parts = candidate_text(candidate)
        native_finish = candidate.get("finishReason")
        self.raise_if_filtered(native_finish, text, request.model)
        return self.response(
            request, text, usage_from_metadata(body.get("usageMetadata")),
            **self.answer_metadata(native_finish, body.get("responseId"), body.get("modelVersion"), thought_parts),
        )

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        url = self.model_path(request.model, "streamGenerateContent") + "?alt=sse"
        state = _StreamState()
        body = self.build_body(request)
        async with self.open_stream(url, body, model=request.model, headers=self.headers()) as response:
            async with self.translate_errors(request.model):
                async for record in stream_records(response):
                    for chunk in self.parse_stream_record(record, request.model):
                        text = state.take(chunk)
                        if text:
                            yield self.response(request, text, Usage())
        if state.native_finish is None:
            raise self.malformed("the stream ended before Gemini sent a finishReason (cut short)", request.model)
        self.raise_if_filtered(state.native_finish, state.text_seen, request.model)
        yield self.final_chunk(
            request, usage_from_metadata(state.usage_metadata),
            **self.answer_metadata(state.native_finish, state.response_id, state.model_version, state.thought_parts),
        )

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

    def answer_metadata(
        self, native_finish: str | None, response_id: str | None, model_version: str | None, thought_parts: int
    ) -> dict[str, Any]:
        return {
            "finish_reason": FINISH_REASONS.get(native_finish or "", (native_finish or "").lower() or None),
            "native_finish_reason": native_finish,
            "response_id": response_id,
            "served_model": model_version,
            "thought_parts": thought_parts or None,
        }

    def malformed(self, message: str, model: str | None) -> errors.MalformedResponseError:
        return errors.MalformedResponseError(message, provider=self.name, model=model, status_code=200)

    # --- errors ---------------------------------------------------------------

    def error_message(self, body: Any) -> str | None:
        return super().error_message(_unwrap(body))

    def classify_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        error = _error_object(body)
        status = str(error.get("status") or "")
        if "API_KEY_INVALID" in _detail_reasons(error):
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
            try:
                error.retry_after_s = retry_delay_seconds(response.json())
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        return error

    def error_from_body(self, body: Any, model: str | None) -> errors.ProviderError:
        """An error object that arrived inside a 200 (mid-stream): same classes as an HTTP error."""
        error = _error_object(body)
        code = error.get("code")
        status_code = code if isinstance(code, int) else STATUS_CODES.get(str(error.get("status")), 500)
        message = self.redact(self.error_message(body) or f"error inside the response: {json.dumps(body)[:200]}")
        error_class = self.classify_error(status_code, body, message)
        return error_class(
            message, provider=self.name, model=model, status_code=status_code, retry_after_s=retry_delay_seconds(body)
        )

    # --- discovery ------------------------------------------------------------

    async def get_available_models(self) -> list[str]:
        names: list[str] = []
        page_token: str | None = None
        for _ in range(MAX_MODEL_PAGES):
            query = {"pageSize": 1000, **({"pageToken": page_token} if page_token else {})}
            page = await self.get_json(f"/models?{urlencode(query)}", headers=self.headers())
            if not isinstance(page, dict):
                raise self.malformed("models.list did not return an object", None)
            names += list(_generate_content_models(page.get("models") or []))
            page_token = page.get("nextPageToken")
            if not page_token:
                break
        return names

    async def health_check(self) -> bool:
        try:
            await self.get_json("/models?pageSize=1", headers=self.headers())
        except Exception:  # health checks report, never raise
            return False
        return True


class _StreamState:
    """What a stream has told so far: text seen, the latest usage, the finish reason."""

    def __init__(self) -> None:
        self.text_seen = False
        self.thought_parts = 0
        self.native_finish: str | None = None
        self.usage_metadata: dict[str, Any] | None = None
        self.response_id: str | None = None
        self.model_version: str | None = None

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


# --- helpers ----------------------------------------------------------------------------


def _merged_contents(messages: list[Message]) -> list[dict[str, Any]]:
    """Gemini `contents`: consecutive turns of one role become one turn with several parts."""
    contents: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "model" if message.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": message.content})
        else:
            contents.append({"role": role, "parts": [{"text": message.content}]})
    return contents


def candidate_text(candidate: dict[str, Any]) -> tuple[str, int]:
    """The answer text of a candidate and the number of thought parts left out of it."""
    parts = (candidate.get("content") or {}).get("parts") or []
    texts: list[str] = []
    thoughts = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("thought") is True:
            thoughts += 1
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts), thoughts


def usage_from_metadata(metadata: dict[str, Any] | None) -> Usage:
    """Usage with thoughts inside completion_tokens, since Google bills them as output."""
    metadata = metadata or {}
    prompt = int(metadata.get("promptTokenCount") or 0) + int(metadata.get("toolUsePromptTokenCount") or 0)
    thoughts = int(metadata.get("thoughtsTokenCount") or 0)
    completion = int(metadata.get("candidatesTokenCount") or 0) + thoughts
    return Usage.of(
        prompt,
        completion,
        total_tokens=int(metadata.get("totalTokenCount") or 0) or prompt + completion,
        cached_read_tokens=int(metadata.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


async def stream_records(response: httpx.Response) -> AsyncIterator[str]:
    """JSON records of a `?alt=sse` stream.

    Each `data:` line is one GenerateContentResponse. An error that happens after the
    200 can arrive as a bare, pretty-printed JSON object spread over several lines (the
    official SDK buffers those by brace balance, google/genai/_api_client.py), so
    non-`data:` lines are gathered the same way.
    """
    pending: list[str] = []
    depth = 0
    async for line in response.aiter_lines():
        if not pending:
            if line.startswith("data:"):
                yield line[5:].strip()
                continue
            if _framing_only(line):
                continue
        pending.append(line)
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            yield "\n".join(pending)
            pending, depth = [], 0
    if pending:
        yield "\n".join(pending)  # an object cut short: fails to parse, so it raises


def _framing_only(line: str) -> bool:
    """A blank line, an SSE comment or field other than data, or JSON array punctuation."""
    stripped = line.strip()
    return not stripped or stripped in _ARRAY_PUNCTUATION or line.startswith((":", "event:", "id:", "retry:"))


def _unwrap(body: Any) -> Any:
    # Some Google front ends wrap the error object in a one-element list.
    return body[0] if isinstance(body, list) and body else body


def _error_object(body: Any) -> dict[str, Any]:
    body = _unwrap(body)
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _details(error: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for detail in error.get("details") or []:
        if isinstance(detail, dict):
            yield detail


def _detail_reasons(error: dict[str, Any]) -> set[str]:
    return {str(detail.get("reason")) for detail in _details(error) if detail.get("reason")}


def retry_delay_seconds(body: Any) -> float | None:
    """`retryDelay` of a google.rpc.RetryInfo detail ("37s", "0.5s"), as seconds."""
    for detail in _details(_error_object(body)):
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _generate_content_models(models: list[Any]) -> Iterator[str]:
    for model in models:
        if not isinstance(model, dict) or "generateContent" not in (model.get("supportedGenerationMethods") or []):
            continue
        name = str(model.get("name") or "")
        if name:
            yield name.removeprefix("models/")
