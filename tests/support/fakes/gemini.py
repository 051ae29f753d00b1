"""A fake Gemini API (generativelanguage.googleapis.com/v1beta) speaking Google's wire format.

Paths: `POST /v1beta/models/{model}:generateContent`, `POST /v1beta/models/{model}:streamGenerateContent`
(`?alt=sse` for server-sent events, else one JSON array) and `GET /v1beta/models` (paged with
`pageSize` / `pageToken`). The key is checked in `x-goog-api-key` (or `?key=`): a wrong key gets
Google's real 400 API_KEY_INVALID body, a missing one the real 403.

What a test can steer:

- prompt markers: `BLOCKED_PROMPT_MARKER` (promptFeedback.blockReason, no candidates),
  `UNSAFE_REPLY_MARKER` (finishReason SAFETY with no content)
- `maxOutputTokens` smaller than the reply: reply cut, finishReason MAX_TOKENS
- `context_window_tokens`: prompts above it get the real token-limit 400
- `cached_tokens`, `thinking_tokens`: reported in usageMetadata (thought parts only when
  the request asks for `includeThoughts`, as Google does)
- `retry_delay_s`: the RetryInfo delay in 429 bodies
- `stream_error_framing`: "raw" (a pretty-printed error object, as the official SDK expects
  after a 200) or "sse" (`data: {"error": ...}`)
- `page_size_cap`: models per page, to exercise pagination
- `drop_finish_reason`: streams end cleanly without a finishReason
- features (`gemini_features`): with `tools` the answer is a `functionCall` (ids only when
  `function_call_ids`, as Gemini 3 sends them) until the last turn is a `functionResponse`, whose
  output it answers; `responseMimeType: application/json` gets JSON made from the schema, unless
  `json_answers` holds replies to send instead; images count 258 prompt tokens;
  `POST /v1beta/models/{model}:batchEmbedContents` answers vectors (`usageMetadata` only with
  `embedding_usage`); the 400s Gemini gives for schemas, parts and function responses it refuses
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

from tests.support.fakes import gemini_features as features
from tests.support.fakes.base import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    StreamReply,
    count_words,
    fake_reply_text,
    split_words,
)

API_PREFIX = "/v1beta"
BLOCKED_PROMPT_MARKER = "[[blocked-prompt]]"
UNSAFE_REPLY_MARKER = "[[unsafe-reply]]"
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
GENERATE_METHODS = ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]

#: google.rpc.Code name and a message Google sends for each HTTP status.
STATUS_BODIES: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token, "
          "login cookie or other valid authentication credential."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing details. "
          "For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
          "https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
_REQUEST_FIELDS = {"contents", "systemInstruction", "generationConfig", "safetySettings", "tools", "toolConfig",
                   "cachedContent", "labels"}
_GENERATION_FIELDS = {"temperature", "maxOutputTokens", "topP", "topK", "candidateCount", "stopSequences", "seed",
                      "responseMimeType", "responseSchema", "responseJsonSchema", "thinkingConfig", "presencePenalty", "frequencyPenalty",
                      "responseLogprobs", "logprobs"}
_MODEL_PATH = re.compile(
    r"/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent|batchEmbedContents)"
)


def google_error(status: int, message: str, status_name: str | None = None, details: list[Any] | None = None) -> Any:
    """Google's error body: {"error": {"code", "message", "status", "details"?}}."""
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name or STATUS_BODIES[status][0]}
    if details:
        error["details"] = details
    return {"error": error}


def api_key_invalid_body() -> Any:
    message = "API key not valid. Please pass a valid API key."
    return google_error(400, message, "INVALID_ARGUMENT", [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
    ])


def failed_precondition_body() -> Any:
    return google_error(400, "User location is not supported for the API use.", "FAILED_PRECONDITION")


def token_limit_body(input_tokens: int, limit_tokens: int) -> Any:
    return google_error(
        400, f"The input token count ({input_tokens}) exceeds the maximum number of tokens allowed ({limit_tokens}).",
        "INVALID_ARGUMENT",
    )


def model_entry(name: str, methods: list[str] | None = None) -> dict[str, Any]:
    """A `Model` resource as models.list returns it."""
    return {
        "name": f"models/{name}", "version": "001", "displayName": name.replace("-", " ").title(),
        "description": f"Fake {name}", "inputTokenLimit": 1_048_576, "outputTokenLimit": 8192,
        "supportedGenerationMethods": methods if methods is not None else GENERATE_METHODS,
        "temperature": 1, "topP": 0.95, "topK": 40, "maxTemperature": 2,
    }


DEFAULT_MODELS = [
    model_entry("gemini-2.0-flash"),
    model_entry("gemini-2.5-flash"),
    model_entry("gemini-2.5-pro"),
    model_entry("text-embedding-004", ["embedContent"]),
]


class FakeGemini(FakeProviderServer):
    name = "gemini"

    def __init__(self, *, api_key: str = "fake-gemini-key", models: list[dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key
        self.built_models = list(models if models is not None else DEFAULT_MODELS)
        self.reset_knobs()

    def reset(self) -> None:
        super().reset()
        self.reset_knobs()

    def reset_knobs(self) -> None:
        self.models = list(self.built_models)
        self.page_size_cap = 1000
        self.context_window_tokens = 1_048_576
        self.cached_tokens = 0
        self.thinking_tokens = 0
        self.retry_delay_s = 37
        self.stream_error_framing = "raw"
        #: End streams cleanly but without a finishReason (a stream closed early by a proxy).
        self.drop_finish_reason = False
        #: Contents to answer the next JSON requests with, first in first out (then: from the schema).
        self.json_answers: list[str] = []
        #: Give function calls an `id`, as Gemini 3 does.
        self.function_call_ids = False
        #: Report usageMetadata in batchEmbedContents answers.
        self.embedding_usage = False

    @property
    def base_url(self) -> str:
        return self.url + API_PREFIX

    # --- routing --------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        refused = self.refuse_key(request)
        if refused is not None:
            return refused
        path = request.path.removeprefix(API_PREFIX)
        if request.method == "GET" and path == "/models":
            return self.list_models(request)
        match = _MODEL_PATH.fullmatch(path)
        if request.method != "POST" or match is None:
            return _reply(404, google_error(404, f"Method not found: {request.method} {request.path}"))
        model, method = match["model"], match["method"]
        if method == "batchEmbedContents":
            return self.embed(model, request)
        if not any(entry["name"] == f"models/{model}" and "generateContent" in entry["supportedGenerationMethods"]
                   for entry in self.models):
            return _reply(404, google_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                                 "supported for generateContent. Call ListModels to see the list of "
                                                 "available models and their supported methods."))
        body = request.body
        problem = _invalid_request(body) or features.check_features(body, model)
        if problem is not None:
            return _reply(400, google_error(400, problem))
        prompt_tokens = _prompt_tokens(body)
        if prompt_tokens > self.context_window_tokens:
            return _reply(400, token_limit_body(prompt_tokens, self.context_window_tokens))
        chunks = self.answer_chunks(model, body, streaming=method == "streamGenerateContent")
        if method == "generateContent":
            return _reply(200, chunks[0])
        if request.query.get("alt") == ["sse"]:
            return StreamReply([_sse_record(chunk) for chunk in chunks], headers={"x-content-type-options": "nosniff"})
        return _reply(200, chunks)  # without alt=sse Google streams one JSON array

    def embed(self, model: str, request: RecordedRequest) -> Reply:
        if not any(entry["name"] == f"models/{model}" and "embedContent" in entry["supportedGenerationMethods"]
                   for entry in self.models):
            return _reply(404, google_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                                 "supported for embedContent."))
        status, body = features.embeddings_reply(request.body, model, with_usage=self.embedding_usage)
        return _reply(status, body)

    def refuse_key(self, request: RecordedRequest) -> Reply | None:
        key = request.header("x-goog-api-key") or (request.query.get("key") or [None])[0]
        if key is None:
            return _reply(403, google_error(403, "Method doesn't allow unregistered callers (callers without "
                                                 "established identity). Please use API Key or other form of API "
                                                 "consumer identity to call this API."))
        if key != self.api_key:
            return _reply(400, api_key_invalid_body())
        return None

    # --- answers ----------------------------------------------------------------------

    def answer_chunks(self, model: str, body: dict[str, Any], *, streaming: bool) -> list[dict[str, Any]]:
        """The GenerateContentResponse chunks of one answer (one chunk when not streaming)."""
        common = {"modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
        prompt_tokens = _prompt_tokens(body)
        texts = _all_texts(body)
        if any(BLOCKED_PROMPT_MARKER in text for text in texts):
            return [{"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": _ratings("HIGH")},
                     "usageMetadata": self.usage(prompt_tokens, 0, 0), **common}]
        if any(UNSAFE_REPLY_MARKER in text for text in texts):
            candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": _ratings("HIGH")}
            return [{"candidates": [candidate], "usageMetadata": self.usage(prompt_tokens, 0, 0), **common}]
        call = features.function_call(body, with_ids=self.function_call_ids)
        if call is not None:
            return self.call_chunks(call, prompt_tokens, common, streaming=streaming)
        reply, finish = self.reply_text(body)
        pieces = list(split_words(reply, 4)) if streaming else [reply]
        thought = (body.get("generationConfig") or {}).get("thinkingConfig", {}).get("includeThoughts")
        parts_per_chunk = [[{"text": piece}] for piece in pieces]
        if thought and self.thinking_tokens:
            parts_per_chunk[0].insert(0, {"text": "**Planning the task**\nWorking out the steps.", "thought": True})
        chunks = []
        for index, parts in enumerate(parts_per_chunk):
            last = index == len(parts_per_chunk) - 1
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if last and not (streaming and self.drop_finish_reason):
                candidate["finishReason"] = finish
            usage = (self.usage(prompt_tokens, count_words(reply), self.thinking_tokens) if last
                     else {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens})
            chunks.append({"candidates": [candidate], "usageMetadata": usage, **common})
        return chunks

    def call_chunks(self, call: dict[str, Any], prompt_tokens: int, common: dict[str, Any], *,
                    streaming: bool) -> list[dict[str, Any]]:
        """A function call answer: the call in its own part (and, streamed, its own chunk), finishReason STOP."""
        usage = self.usage(prompt_tokens, count_words(json.dumps(call["args"])), 0)
        candidate = {"content": {"parts": [{"functionCall": call}], "role": "model"}, "index": 0}
        if not streaming:
            return [{"candidates": [{**candidate, "finishReason": "STOP"}], "usageMetadata": usage, **common}]
        last = {"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP", "index": 0}
        return [{"candidates": [candidate], "usageMetadata": {"promptTokenCount": prompt_tokens}, **common},
                {"candidates": [last], "usageMetadata": usage, **common}]

    def reply_text(self, body: dict[str, Any]) -> tuple[str, str]:
        user_turns = [content for content in body["contents"] if content.get("role", "user") == "user"]
        texts = [part["text"] for part in user_turns[-1]["parts"] if "text" in part] if user_turns else []
        prompt = texts[-1] if texts else ""
        reply = fake_reply_text(features.function_output(body) or prompt, self.name)
        made_json = features.json_text(body, reply)
        if made_json is not None:
            return (self.json_answers.pop(0) if self.json_answers else made_json), "STOP"
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        words = reply.split(" ")
        if isinstance(limit, int) and limit < len(words):
            return " ".join(words[:limit]), "MAX_TOKENS"
        return reply, "STOP"

    def usage(self, prompt_tokens: int, candidate_tokens: int, thought_tokens: int) -> dict[str, Any]:
        cached = min(self.cached_tokens, prompt_tokens)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "totalTokenCount": prompt_tokens + candidate_tokens + thought_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if candidate_tokens:
            usage["candidatesTokenCount"] = candidate_tokens
        if thought_tokens:
            usage["thoughtsTokenCount"] = thought_tokens
        if cached:
            usage["cachedContentTokenCount"] = cached
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
        return usage

    # --- models -----------------------------------------------------------------------

    def list_models(self, request: RecordedRequest) -> Reply:
        page_size = min(int((request.query.get("pageSize") or ["50"])[0]), 1000, self.page_size_cap)
        token = (request.query.get("pageToken") or [None])[0]
        try:
            start = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        except (ValueError, UnicodeDecodeError):
            return _reply(400, google_error(400, "Invalid page token."))
        body: dict[str, Any] = {"models": self.models[start : start + page_size]}
        if start + page_size < len(self.models):
            body["nextPageToken"] = base64.urlsafe_b64encode(str(start + page_size).encode()).decode()
        return _reply(200, body)

    # --- errors -----------------------------------------------------------------------

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        status_name, message = STATUS_BODIES.get(status, ("UNKNOWN", "Unknown error."))
        details = None
        if status == 429:
            details = [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"}, "quotaValue": "15"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{self.retry_delay_s}s"},
            ]
        return _reply(status, google_error(status, message, status_name, details))

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        body = request.body if isinstance(request.body, dict) else {"contents": []}
        model = _MODEL_PATH.fullmatch(request.path.removeprefix(API_PREFIX))
        chunks = self.answer_chunks(model["model"] if model else "gemini-2.0-flash", body, streaming=True)[:2]
        for chunk in chunks:
            chunk["candidates"][0].pop("finishReason", None)
        error = google_error(503, STATUS_BODIES[503][1])
        tail = (json.dumps(error, indent=2).replace("\n", "\r\n") + "\r\n").encode() \
            if self.stream_error_framing == "raw" else _sse_record(error)
        return StreamReply([_sse_record(chunk) for chunk in chunks] + [tail])

    def tokens_for(self, request: RecordedRequest) -> int:
        body = request.body if request.raw_body else {}
        if not isinstance(body, dict):
            return 0
        return _prompt_tokens(body) + int((body.get("generationConfig") or {}).get("maxOutputTokens") or 0)


# --- helpers ----------------------------------------------------------------------------


def _reply(status: int, body: Any) -> Reply:
    return Reply(status, body, content_type=JSON_CONTENT_TYPE, headers={"server": "scaffolding on HTTPServer2"})


def _sse_record(chunk: Any) -> bytes:
    # Google separates events with CRLF pairs.
    return f"data: {json.dumps(chunk)}\r\n\r\n".encode()


def _ratings(blocked_probability: str) -> list[dict[str, Any]]:
    return [
        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": blocked_probability, "blocked": True},
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
    ]


def _all_texts(body: dict[str, Any]) -> list[str]:
    contents = list(body.get("contents") or [])
    if isinstance(body.get("systemInstruction"), dict):
        contents.append(body["systemInstruction"])
    return [str(part["text"]) for content in contents for part in content.get("parts") or [] if "text" in part]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(count_words(text) for text in _all_texts(body)) + features.image_tokens(body)


def _invalid_request(body: Any) -> str | None:
    """Google's 400 message for a request body it would refuse, else None."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received. Expected an object."
    for name in body:
        if name not in _REQUEST_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
    for name in body.get("generationConfig") or {}:
        if name not in _GENERATION_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}" at \'generation_config\': Cannot find field.'
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified\n"
    for content in contents:
        if content.get("role", "user") not in ("user", "model"):
            return "Please use a valid role: user, model."
        if not content.get("parts"):
            return "* GenerateContentRequest.contents.parts: contents.parts must not be empty.\n"
    system = body.get("systemInstruction")
    if system is not None and not (isinstance(system, dict) and system.get("parts")):
        return "* GenerateContentRequest.system_instruction.parts: must not be empty.\n"
    return None
