"""A fake of the OpenAI Chat Completions family: OpenAI, Azure OpenAI, and TGI's Messages API.

One server speaks three dialects, chosen by path and `flavor`:

- `POST /v1/chat/completions`, `GET /v1/models`: OpenAI (and vLLM / LM Studio / LocalAI,
  which copy it); with `flavor="tgi"` the same paths answer with Text Generation
  Inference's error bodies (`{"error": "...", "error_type": "..."}`).
- `POST /openai/deployments/{deployment}/chat/completions?api-version=...` and
  `GET /openai/models?api-version=...`: Azure OpenAI, with its `api-key` header and
  its own error bodies and request-id headers.
- `POST /v1/embeddings` and `POST /openai/deployments/{deployment}/embeddings`: vectors
  as floats or base64 float32 (`encoding_format`), `dimensions` honoured.

Request features, as OpenAI serves them: with `tools` (and `tool_choice` not "none") the
answer is a call of the named or first tool, arguments made from its parameter schema,
until the last message is a `tool` result, which it answers (a tool round trip); a
`response_format` gets JSON made from the schema (or `{"answer": ...}` for json_object),
unless `json_answers` holds replies to send instead (to test answers that do not match);
image parts count 85 prompt tokens each; streams carry `delta.tool_calls` pieces. Bodies
are checked as OpenAI checks them: unknown keys in content parts (`cache_control`), an
image outside a user message, and `max_tokens` or `temperature` on a reasoning model
(o-series, gpt-5) get OpenAI's 400s.

Bodies, stream chunks, error bodies and headers follow the providers' documented
shapes (OpenAI API reference "Debugging requests" and "Error codes"; Azure OpenAI
REST reference; TGI router `ErrorResponse`). Construct with a fixed key the fake
checks: `FakeOpenAI(api_key="sk-...")`; a wrong key gets OpenAI's real
"Incorrect API key provided" 401, with the key masked the way OpenAI masks it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from tests.support.fakes.base import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    StreamReply,
    count_words,
    fake_reply_text,
    split_words,
    sse,
)

DEFAULT_API_KEY = "sk-proj-fakeKEY0123456789abcdefghijklmnopqrstuvwxyzAB"
SUPPORTED_AZURE_API_VERSIONS = ("2024-06-01", "2024-10-21", "2025-04-01-preview")
AZURE_CONTENT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read "
    "our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)


def mask_key(key: str) -> str:
    """OpenAI shows the first 8 and last 4 characters of a wrong key, stars between."""
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def openai_error(message: str, kind: str | None, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def context_length_body(model: str = "gpt-4o-mini", limit: int = 128000, requested: int = 130512) -> dict[str, Any]:
    message = (
        f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
        f"{requested} tokens. Please reduce the length of the messages."
    )
    return openai_error(message, "invalid_request_error", "context_length_exceeded", "messages")


def insufficient_quota_body() -> dict[str, Any]:
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
    )
    return openai_error(message, "insufficient_quota", "insufficient_quota")


def azure_content_filter_body() -> dict[str, Any]:
    severities = {"hate": "safe", "self_harm": "medium", "sexual": "safe", "violence": "safe"}
    result: dict[str, Any] = {
        name: {"filtered": severity != "safe", "severity": severity} for name, severity in severities.items()
    }
    result["jailbreak"] = {"filtered": False, "detected": False}
    return {
        "error": {
            "message": AZURE_CONTENT_FILTER_MESSAGE, "type": None, "param": "prompt", "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result},
        }
    }


def tgi_context_body(limit: int = 4096, prompt_tokens: int = 4000, max_new_tokens: int = 200) -> dict[str, Any]:
    message = (
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
        f"Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
    )
    return {"error": message, "error_type": "validation"}


_OPENAI_ERRORS: dict[int, dict[str, Any]] = {
    400: openai_error(
        "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an "
        "integer instead.", "invalid_request_error", "invalid_type", "messages[0].content",
    ),
    403: openai_error("Country, region, or territory not supported", "request_forbidden",
                      "unsupported_country_region_territory"),
    404: openai_error("The model `gpt-9` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found"),
    429: openai_error(
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits "
        "to learn more.", "requests", "rate_limit_exceeded",
    ),
    500: openai_error("The server had an error while processing your request. Sorry about that!",
                      "server_error", None),
    503: openai_error("The server is overloaded or not ready yet.", "service_unavailable_error",
                      "server_is_overloaded"),
}

_AZURE_ERRORS: dict[int, dict[str, Any]] = {
    400: openai_error("Invalid value for 'temperature': must be between 0 and 2.", "invalid_request_error",
                      None, "temperature"),
    401: {"error": {"code": "401", "message": (
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
        "key for an active subscription and use a correct regional API endpoint for your resource.")}},
    403: {"error": {"code": "403", "message": "Access denied due to Virtual Network/Firewall rules."}},
    404: {"error": {"code": "DeploymentNotFound", "message": (
        "The API deployment for this resource does not exist. If you created the deployment within the "
        "last 5 minutes, please wait a moment and try again.")}},
    429: {"error": {"code": "429", "message": (
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
        "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. "
        "Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default "
        "rate limit.")}},
    500: {"error": {"code": "InternalServerError", "message": "The server had an error processing your request."}},
    503: {"error": {"code": "ServiceUnavailable", "message": (
        "The service is temporarily unable to process your request. Please try again later.")}},
}

_TGI_ERRORS: dict[int, dict[str, Any]] = {
    400: {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"},
    401: {"error": "Authorization header is correct, but the token seems invalid"},
    403: {"error": "You don't have access to this endpoint"},
    404: {"error": "Not Found"},
    422: {"error": "Input validation error: `max_new_tokens` must be <= 4096. Given: 5000",
          "error_type": "validation"},
    424: {"error": "Request failed during generation: Server error: CUDA out of memory.",
          "error_type": "generation"},
    429: {"error": "Model is overloaded", "error_type": "overloaded"},
    500: {"error": "Incomplete generation", "error_type": "incomplete_generation"},
    503: {"error": "Service Unavailable: the endpoint is scaled to zero and is starting", "error_type": "overloaded"},
}


class FakeOpenAI(FakeProviderServer):
    """OpenAI-family fake. Knobs beyond the base: `cached_tokens`, `reasoning_tokens`,
    `finish_reason` (forces one, e.g. "content_filter"), `models`, `deployments`, and
    `answer`: the reply's text from the last message's content instead of the usual
    fake text (e.g. `json.loads`, so a prompt can ask for any reply, lone surrogates,
    NUL and megabytes included; the reply goes out JSON-escaped, as a provider's does)."""

    name = "openai"

    def __init__(self, *, api_key: str | None = DEFAULT_API_KEY, flavor: str = "openai", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert flavor in {"openai", "tgi"}, flavor
        self.built_api_key = api_key
        self.flavor = flavor
        self.models = ["gpt-4o-mini", "gpt-4o", "o3-mini"]
        self.reset_knobs()

    def reset(self) -> None:
        super().reset()
        self.reset_knobs()

    def reset_knobs(self) -> None:
        """Back to the key it was built with and no forced usage, finish or deployments, so a
        server shared by several tests starts each one the same."""
        self.api_key = self.built_api_key
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.answer: Callable[[str], str] | None = None
        #: Azure deployments that exist; empty means every name exists.
        self.deployments: set[str] = set()
        #: Contents to answer the next JSON requests with, first in first out (then: from the schema).
        self.json_answers: list[str] = []

    # --- routing ------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        if request.path.startswith("/openai/"):
            return self._route_azure(request)
        denied = self._check_bearer(request)
        if denied is not None:
            return denied
        if request.method == "GET" and request.path == "/v1/models":
            return Reply(200, self._model_list(), self._headers(request))
        if request.method == "POST" and request.path == "/v1/chat/completions":
            return self._chat(request)
        if request.method == "POST" and request.path == "/v1/embeddings":
            return self._embeddings(request)
        return self.error_reply(404, request)

    def _route_azure(self, request: RecordedRequest) -> Reply | StreamReply:
        version = (request.query.get("api-version") or [None])[0]
        if version is None:
            return Reply(404, {"error": {"code": "404", "message": "Resource not found"}}, self._headers(request))
        if version not in SUPPORTED_AZURE_API_VERSIONS:
            body = {"error": {"code": "BadRequest", "message": "API version not supported"}}
            return Reply(400, body, self._headers(request))
        if not self._azure_key_ok(request):
            return self.error_reply(401, request)
        if request.method == "GET" and request.path == "/openai/models":
            return Reply(200, self._model_list(), self._headers(request))
        parts = request.path.split("/")
        if len(parts) >= 5 and parts[2] == "deployments" and parts[4:] in (["chat", "completions"], ["embeddings"]):
            if self.deployments and parts[3] not in self.deployments:
                return self.error_reply(404, request)
            return self._chat(request) if parts[4] == "chat" else self._embeddings(request)
        return Reply(404, {"error": {"code": "404", "message": "Resource not found"}}, self._headers(request))

    def _check_bearer(self, request: RecordedRequest) -> Reply | None:
        if self.api_key is None:
            return None
        header = request.header("authorization") or ""
        presented = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if presented == self.api_key:
            return None
        if self.flavor == "tgi":
            return self.error_reply(401, request)
        if presented is None:
            body = openai_error(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
                "username) if you're accessing the API from your browser and are prompted for a username and "
                "password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
                "invalid_request_error", None,
            )
            return Reply(401, body, self._headers(request))
        return Reply(401, self._incorrect_key_body(presented), self._headers(request))

    def _azure_key_ok(self, request: RecordedRequest) -> bool:
        if self.api_key is None:
            return True
        bearer = (request.header("authorization") or "").removeprefix("Bearer ")
        return self.api_key in (request.header("api-key"), bearer)

    @staticmethod
    def _incorrect_key_body(presented: str) -> dict[str, Any]:
        message = (
            f"Incorrect API key provided: {mask_key(presented)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return openai_error(message, "invalid_request_error", "invalid_api_key")

    def _model_list(self) -> dict[str, Any]:
        created = int(time.time()) - 86400
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": created, "owned_by": "system"} for model in self.models
            ],
        }

    # --- completions --------------------------------------------------------------

    def _answer(self, request: RecordedRequest) -> tuple[str, str, dict[str, Any]]:
        body = request.body or {}
        messages = body.get("messages") or [{"content": ""}]
        prompt = message_text(messages[-1])
        text = self.answer(prompt) if self.answer is not None else fake_reply_text(prompt, self._dialect(request))
        if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            text = self._json_answer(body["response_format"], text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if limit is not None and count_words(text) > int(limit):
            text, finish = " ".join(text.split(" ")[: int(limit)]), "length"
        if self.finish_reason is not None:
            finish = self.finish_reason
            text = "" if finish == "content_filter" else text
        return text, finish, self._usage(prompt_tokens(messages), count_words(text) if text else 0)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens + self.reasoning_tokens,
            "total_tokens": prompt_tokens + completion_tokens + self.reasoning_tokens,
        }
        if self.flavor == "openai":
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens, "audio_tokens": 0}
            usage["completion_tokens_details"] = {
                "reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
            }
        return usage

    def tokens_for(self, request: RecordedRequest) -> int:
        """OpenAI counts a request against tokens/min at admission as its prompt tokens plus
        max_tokens (max_completion_tokens), and keeps counting that whatever the reply uses."""
        body = request.body if request.raw_body else None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 0
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        return prompt_tokens(body["messages"]) + int(limit)

    def _dialect(self, request: RecordedRequest) -> str:
        if request.path.startswith("/openai/"):
            return "azure_openai"
        return "huggingface" if self.flavor == "tgi" else "openai"

    def _json_answer(self, response_format: dict[str, Any], text: str) -> str:
        if self.json_answers:
            return self.json_answers.pop(0)
        if response_format["type"] == "json_object":
            return json.dumps({"answer": text})
        return json.dumps(value_for_schema(response_format["json_schema"]["schema"], text))

    def _tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The call a model makes: the named (or first) tool, until the last message is a tool's result."""
        tools, choice = body.get("tools") or [], body.get("tool_choice", "auto")
        if not tools or choice == "none" or body["messages"][-1].get("role") == "tool":
            return None
        name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
        tool = next(tool for tool in tools if tool["function"]["name"] == name)
        arguments = value_for_schema(tool["function"].get("parameters") or {"type": "object"}, message_text(body["messages"][-1]))
        digest = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:24]
        return {"id": f"call_{digest}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}

    def _chat(self, request: RecordedRequest) -> Reply | StreamReply:
        body = request.body or {}
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self.error_reply(400, request)
        refused = self._refuse_body(body)
        if refused is not None:
            return Reply(400, refused, self._headers(request))
        text, finish, usage = self._answer(request)
        call = self._tool_call(body)
        if call is not None:
            text, finish = "", "tool_calls"
            usage = self._usage(prompt_tokens(body["messages"]), count_words(call["function"]["arguments"]))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = list(self._chunks(request, text, finish, usage if include_usage else None, call))
            return StreamReply(chunks, headers=self._headers(request))
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if call is not None:
            message["tool_calls"] = [call]
        completion = {
            **self._envelope(request, "chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
        if request.path.startswith("/openai/"):
            completion["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
        return Reply(200, completion, self._headers(request))

    def _envelope(self, request: RecordedRequest, kind: str) -> dict[str, Any]:
        model = (request.body or {}).get("model") or "tgi"
        return {
            "id": "" if self.flavor == "tgi" else "chatcmpl-" + secrets.token_hex(12),
            "object": kind, "created": int(time.time()),
            "model": f"{model}-2024-07-18" if self.flavor == "openai" else model,
            "system_fingerprint": "3.0.1-native" if self.flavor == "tgi" else "fp_" + secrets.token_hex(5),
        }

    def _refuse_body(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The 400s OpenAI gives for a body it does not take (its real messages)."""
        model = str(body.get("model") or "")
        reasoning = model.startswith(("o1", "o3", "o4", "gpt-5"))
        if reasoning and "max_tokens" in body:
            return openai_error(
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
                "instead.", "invalid_request_error", "unsupported_parameter", "max_tokens",
            )
        if reasoning and body.get("temperature", 1) != 1:
            return openai_error(
                "Unsupported value: 'temperature' does not support 0.2 with this model. Only the default (1) value "
                "is supported.", "invalid_request_error", "unsupported_value", "temperature",
            )
        for index, message in enumerate(body["messages"]):
            for number, part in enumerate(message.get("content") if isinstance(message.get("content"), list) else ()):
                extra = sorted(set(part) - {"type", "text", "image_url"})
                if extra:
                    where = f"messages[{index}].content[{number}].{extra[0]}"
                    return openai_error(f"Unrecognized request argument supplied: {where}", "invalid_request_error",
                                        None, where)
                if part.get("type") == "image_url" and message.get("role") != "user":
                    return openai_error(
                        f"Invalid 'messages[{index}]'. Image URLs are only allowed for messages with role 'user', "
                        f"but this message with role '{message.get('role')}' contains an image URL.",
                        "invalid_request_error", "invalid_value", f"messages[{index}]",
                    )
        return None

    def _embeddings(self, request: RecordedRequest) -> Reply:
        body = request.body or {}
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
            body = openai_error("'$.input' is invalid. Please check the API reference: "
                                "https://platform.openai.com/docs/api-reference.", "invalid_request_error", None)
            return Reply(400, body, self._headers(request))
        dimensions = int(body.get("dimensions") or 8)
        data = []
        for index, text in enumerate(texts):
            vector = fake_vector(text, dimensions)
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(count_words(text) for text in texts)
        reply = {"object": "list", "data": data, "model": body.get("model"),
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Reply(200, reply, self._headers(request))

    def _chunks(
        self, request: RecordedRequest, text: str, finish: str, usage: dict[str, Any] | None,
        call: dict[str, Any] | None = None,
    ) -> Iterator[bytes]:
        envelope = self._envelope(request, "chat.completion.chunk")
        if request.path.startswith("/openai/"):
            # Azure opens with a chunk that carries only the prompt filter results.
            yield sse({**envelope, "id": "", "model": "", "choices": [],
                       "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
        empty_usage: dict[str, Any] = {"usage": None} if usage is not None else {}
        first = {"role": "assistant", "content": "", "refusal": None}
        yield sse({**envelope, "choices": [_choice(first, None)], **empty_usage})
        for piece in split_words(text, 4) if text else []:
            yield sse({**envelope, "choices": [_choice({"content": piece}, None)], **empty_usage})
        if call is not None:
            # As OpenAI streams a call: id, type and name with empty arguments, then the arguments in pieces.
            head = {"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            yield sse({**envelope, "choices": [_choice({"tool_calls": [head]}, None)], **empty_usage})
            arguments = call["function"]["arguments"]
            for start in range(0, len(arguments), 7):
                piece = {"index": 0, "function": {"arguments": arguments[start : start + 7]}}
                yield sse({**envelope, "choices": [_choice({"tool_calls": [piece]}, None)], **empty_usage})
        yield sse({**envelope, "choices": [_choice({}, finish)], **empty_usage})
        if usage is not None:
            yield sse({**envelope, "choices": [], "usage": usage})
        yield sse("[DONE]")

    # --- errors -------------------------------------------------------------------

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        if request.path.startswith("/openai/"):
            table = _AZURE_ERRORS
        elif self.flavor == "tgi":
            table = _TGI_ERRORS
        else:
            table = _OPENAI_ERRORS
        if status == 401 and table is _OPENAI_ERRORS:
            body = self._incorrect_key_body("sk-wrong-" + "x" * 40 + "9Zq1")
        else:
            body = table.get(status) or table.get(500 if status >= 500 else 400) or {}
        headers = self._headers(request)
        if status == 429:
            headers["retry-after"] = "20" if table is _OPENAI_ERRORS else "6"
            if table is _AZURE_ERRORS:
                headers["retry-after-ms"] = "6000"
        return Reply(status, body, headers)

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        envelope = self._envelope(request, "chat.completion.chunk")
        start = sse({**envelope, "choices": [_choice({"role": "assistant", "content": "Task: half"}, None)]})
        if self.flavor == "tgi" and not request.path.startswith("/openai/"):
            error: dict[str, Any] = {"error": "Request failed during generation: Server error: CUDA out of memory.",
                                     "error_type": "generation"}
        else:
            error = _OPENAI_ERRORS[500]
        return StreamReply([start, sse(error)], headers=self._headers(request))

    def _headers(self, request: RecordedRequest) -> dict[str, str]:
        if request.path.startswith("/openai/"):
            remaining_requests, remaining_tokens = self._remaining()
            return {
                "apim-request-id": str(uuid.uuid4()), "x-request-id": str(uuid.uuid4()),
                "x-ms-region": "Sweden Central",
                "x-ratelimit-remaining-requests": str(remaining_requests),
                "x-ratelimit-remaining-tokens": str(remaining_tokens),
            }
        if self.flavor == "tgi":
            return {"x-request-id": str(uuid.uuid4()), "x-compute-type": "1-nvidia-l4"}
        remaining_requests, remaining_tokens = self._remaining()
        headers = {
            "x-request-id": "req_" + secrets.token_hex(16),
            "openai-processing-ms": "87", "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "160000",
            "x-ratelimit-remaining-requests": str(remaining_requests),
            "x-ratelimit-remaining-tokens": str(remaining_tokens),
            "x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s",
        }
        if self.limits is not None:
            # Under an enforced limit, report it as OpenAI does: the limits, and the time until each is whole again.
            reset = f"{self.limits.reset_s():.3f}s"
            for name, limit in (("requests", self.limits.requests_per_minute), ("tokens", self.limits.tokens_per_minute)):
                if limit is not None:
                    headers[f"x-ratelimit-limit-{name}"] = str(limit)
                    headers[f"x-ratelimit-reset-{name}"] = reset
        return headers

    def _remaining(self) -> tuple[int, int]:
        if self.limits is None:
            return 4999, 159976
        requests, tokens = self.limits.remaining()
        return (requests if requests is not None else 4999), (tokens if tokens is not None else 159976)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The fake's prompt token count, as its usage reports it: the words of every message, 85 an image."""
    total = 0
    for message in messages:
        if isinstance(message, dict):
            parts = message.get("content") if isinstance(message.get("content"), list) else []
            total += count_words(message_text(message)) + 85 * sum(part.get("type") == "image_url" for part in parts)
    return total


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def fake_vector(text: str, dimensions: int) -> list[float]:
    """The fake's embedding of a text: the same numbers every time, exact in float32."""
    digest = hashlib.sha256(text.encode()).digest()
    return [((digest[index % len(digest)] - 128) / 128.0) for index in range(dimensions)]


def value_for_schema(schema: dict[str, Any], text: str) -> Any:
    """A JSON value that fits a simple schema (objects, arrays, enums, scalars), strings from `text`."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: value_for_schema(child, text) for name, child in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [value_for_schema(schema.get("items") or {}, text)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text[:40] or "text")


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
