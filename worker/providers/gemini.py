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
- Answer metadata: `finish_reason` (stop / length / tool_calls / content_filter / lower-cased
  other), `native_finish_reason`, `response_id`, `served_model` (`modelVersion`), `thought_parts`.

Request features (the mapping lives in `gemini_format` and `gemini_schema`):

- tools: `tools: [{functionDeclarations: [{name, description, parameters}]}]`, the parameters
  converted from JSON Schema to Gemini's OpenAPI subset (`gemini_schema`, which says what it
  drops); `tool_choice` as `toolConfig.functionCallingConfig` (auto AUTO, none NONE, required
  ANY, one function ANY with `allowedFunctionNames`)
- calls: answers' `functionCall` parts become `tool_calls` (Gemini's id when it sends one, else
  an id made from the response id, position and name); an assistant message's calls go back as
  `functionCall` parts, and `tool` messages as `functionResponse` parts named after the call
  they answer (`{"output": text}`), in the calls' order. Thought signatures cannot travel in
  OpenAI's shape, so a replayed call carries Google's documented stand-in
  (`gemini_format.SKIP_THOUGHT_SIGNATURE`)
- JSON: `responseMimeType: application/json`, with the schema as `responseJsonSchema` (JSON
  Schema as given) on models that take it (gemini-2.5 and later), else as `responseSchema`
  (converted); option `structured_output` chooses
- images: data: URLs as `inlineData`, https URLs as `fileData`
- `stop` -> `stopSequences`, `seed`, `top_p` -> `topP`; `provider_options`: `safetySettings`
  (top level), `topK`, `presencePenalty`, `frequencyPenalty` (in `generationConfig`); for
  embeddings `taskType` and `title`
- cache breakpoints: Gemini caches prompt prefixes implicitly (2.5 and later) and reports the
  hits as `cachedContentTokenCount`; explicit `cachedContent` resources are not used
- embeddings: `POST /models/{model}:batchEmbedContents`, one request per input text

Options (under `options:` in the provider's config entry):

- `include_thoughts` (bool, default false): ask for thought summaries; they are counted, never
  returned as content
- `thinking_budget` (int >= -1, default unset): cap on thinking tokens (-1 lets the model decide,
  0 turns thinking off on models that allow it)
- `structured_output` ("response_json_schema" | "response_schema"; default by model): which
  field carries a JSON schema
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlencode

import httpx

from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.features import embedding_usage
from llmq.worker.providers.flex import FlexTier
from llmq.worker.providers.gemini_format import (
    FAILED_CALL_FINISH_REASONS,
    FILTER_FINISH_REASONS,
    STATUS_CODES,
    GeminiOptions,
    GeminiStreamState,
    answer_metadata,
    call_of,
    calling_config,
    candidate_text,
    detail_reasons,
    error_object,
    function_calls,
    function_declaration,
    gemini_contents,
    generate_content_models,
    model_resource,
    retry_delay_seconds,
    stream_records,
    unwrap,
    usage_from_metadata,
)
from llmq.worker.providers.gemini_schema import gemini_schema
from llmq.worker.providers.http import HTTPProvider, json_or_none

_CONTEXT_WINDOW_MESSAGE = re.compile(r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
#: Pages of `models.list` read before giving up (1000 models a page is the documented maximum).
MAX_MODEL_PAGES = 20
#: Models that take `responseJsonSchema` (JSON Schema itself): gemini-2.5 and later.
JSON_SCHEMA_MODELS = re.compile(r"^(models/)?gemini-(2\.5|[3-9])")
#: tool_choice -> functionCallingConfig.mode.
#: provider_options that go into generationConfig; the rest of the allowed ones go to the top level.
GENERATION_OPTIONS = frozenset({"topK", "presencePenalty", "frequencyPenalty"})
#: provider_options an embedding request takes, per input.
EMBEDDING_OPTIONS = frozenset({"taskType", "title"})


class GeminiProvider(FlexTier, HTTPProvider[GeminiStreamState]):
    type_name = "gemini"
    description = "Google Gemini API (generativelanguage.googleapis.com); also `type: google` / `palm`"
    requires_api_key = True
    supports_streaming = True
    price_provider_id = "google"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"
    options_model = GeminiOptions
    flex_refusals = (errors.OverloadedError,)
    allowed_provider_options: ClassVar[frozenset[str]] = frozenset({"safetySettings"}) | GENERATION_OPTIONS \
        | EMBEDDING_OPTIONS

    options: GeminiOptions

    # --- requests -------------------------------------------------------------

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        # A missing key is not refused here: Google answers 403 "unregistered callers", a
        # PermissionDeniedError that sends the job to the next provider all the same.
        key = self.api_key
        return {"x-goog-api-key": key} if key else {}

    def request_path(self, model: str, *, stream: bool) -> str:
        resource = model_resource(model)
        return f"/{resource}:streamGenerateContent?alt=sse" if stream else f"/{resource}:generateContent"

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        system_parts = [{"text": message.text} for message in request.messages if message.role == "system"]
        contents = gemini_contents(request.messages)
        if not contents:
            raise errors.BadRequestError(
                "Gemini needs at least one user or assistant message besides the system prompt",
                provider=self.name, model=request.model,
            )
        options = self.chat_options(request)
        body: dict[str, Any] = {"contents": contents, "generationConfig": self.generation_config(request, options)}
        if system_parts:
            body["systemInstruction"] = {"parts": system_parts}
        if request.tools is not None:
            body["tools"] = [{"functionDeclarations": [function_declaration(tool.function) for tool in request.tools]}]
        if request.tool_choice is not None:
            body["toolConfig"] = {"functionCallingConfig": calling_config(request.tool_choice)}
        body.update({name: value for name, value in options.items() if name not in GENERATION_OPTIONS})
        if request.service_tier == "flex":
            body["service_tier"] = "FLEX"  # as the REST reference spells it
        return body

    def chat_options(self, request: LLMRequest) -> dict[str, Any]:
        options = self.provider_options_of(request)
        for name in EMBEDDING_OPTIONS & set(options):
            raise errors.BadRequestError(
                f"provider_options.{name} is for embedding requests; a chat request to Gemini takes "
                f"{', '.join(sorted(self.allowed_provider_options - EMBEDDING_OPTIONS))}",
                provider=self.name, model=request.model,
            )
        return options

    def generation_config(self, request: LLMRequest, options: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {"temperature": request.temperature, "maxOutputTokens": request.max_tokens}
        if request.stop is not None:
            config["stopSequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        if request.seed is not None:
            config["seed"] = request.seed
        if request.top_p is not None:
            config["topP"] = request.top_p
        response_format = request.response_format
        if response_format is not None and response_format.wants_json:
            config["responseMimeType"] = "application/json"
            schema = response_format.schema_dict
            if schema is not None:
                if self.takes_json_schema(request.model):
                    config["responseJsonSchema"] = schema
                else:
                    config["responseSchema"] = gemini_schema(schema)
        thinking = self.thinking_config()
        if thinking:
            config["thinkingConfig"] = thinking
        config.update({name: value for name, value in options.items() if name in GENERATION_OPTIONS})
        return config

    def takes_json_schema(self, model: str) -> bool:
        if self.options.structured_output is not None:
            return self.options.structured_output == "response_json_schema"
        return JSON_SCHEMA_MODELS.match(model) is not None

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
        calls = [call_of(call, body.get("responseId"), index) for index, call in enumerate(function_calls(candidate))]
        native_finish = candidate.get("finishReason")
        self.raise_if_unanswered(native_finish, bool(text or calls), request.model)
        return self.response(
            request, text, usage_from_metadata(body.get("usageMetadata")), tool_calls=calls,
            **answer_metadata(native_finish, body.get("responseId"), body.get("modelVersion"), thought_parts,
                              called=bool(calls)),
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
        calls = state.tool_calls.calls()
        self.raise_if_unanswered(state.native_finish, state.text_seen or bool(calls), model)
        return self.final_chunk(
            state.request, usage_from_metadata(state.usage_metadata), tool_calls=calls,
            **answer_metadata(state.native_finish, state.response_id, state.model_version, state.thought_parts,
                              called=bool(calls)),
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

    def raise_if_unanswered(self, native_finish: str | None, answered: bool, model: str) -> None:
        """A filter that left nothing, or a function call Gemini could not make, is no answer."""
        if answered:
            # A filter that stopped the answer part-way leaves usable text: that is returned, labelled.
            return
        if native_finish in FILTER_FINISH_REASONS:
            raise errors.ContentFilteredError(
                f"Gemini withheld the answer (finishReason={native_finish})",
                provider=self.name, model=model, status_code=200,
            )
        if native_finish in FAILED_CALL_FINISH_REASONS:
            raise self.malformed(f"Gemini could not make the function call it chose (finishReason={native_finish})",
                                 model)

    def malformed(
        self, message: str, model: str | None, request_id: str | None = None
    ) -> errors.MalformedResponseError:
        # Everything malformed here came with a 200 (Google documents no request id header).
        return errors.MalformedResponseError(message, provider=self.name, model=model, status_code=200)

    # --- embeddings -------------------------------------------------------------

    def embeddings_path(self, model: str) -> str | None:
        return f"/{model_resource(model)}:batchEmbedContents"

    def build_embeddings_body(self, request: EmbeddingRequest) -> dict[str, Any]:
        options = self.provider_options_of(request)
        for name in set(options) - EMBEDDING_OPTIONS:
            raise errors.BadRequestError(
                f"provider_options.{name} is not taken by Gemini's batchEmbedContents (it takes: "
                f"{', '.join(sorted(EMBEDDING_OPTIONS))})", provider=self.name, model=request.model,
            )
        common: dict[str, Any] = {"model": model_resource(request.model), **options}
        if request.dimensions is not None:
            common["outputDimensionality"] = request.dimensions
        return {"requests": [{**common, "content": {"parts": [{"text": text}]}} for text in request.texts]}

    def parse_embeddings(self, request: EmbeddingRequest, body: Any, response: httpx.Response) -> EmbeddingResponse:
        embeddings = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(embeddings, list) or not all(
                isinstance(item, dict) and isinstance(item.get("values"), list) for item in embeddings):
            raise self.malformed(f"batchEmbedContents answer has no embeddings: {str(body)[:200]!r}", request.model)
        # The Gemini API does not count embedding tokens in every answer: then llmq's estimate is the usage.
        usage, said = embedding_usage(request.texts, int((body.get("usageMetadata") or {}).get("promptTokenCount") or 0))
        return self.embedding_response(request, [item["values"] for item in embeddings], usage, **said)

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
