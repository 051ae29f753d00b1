"""A fake of Anthropic's Messages API that speaks its real wire format over real HTTP.

What it reproduces (from Anthropic's api/messages, api/errors, api/models-list,
api/rate-limits and build-with-claude/streaming pages):

- `POST /v1/messages`: 401 `authentication_error` unless `x-api-key` matches, 400 when
  `anthropic-version` is missing, 400 for a "system" role in `messages`, a missing
  `max_tokens` or a temperature outside 0..1, 404 for an unknown model, and 400
  "prompt is too long: N tokens > M maximum" past `context_window_tokens`.
- Replies with content blocks, `stop_reason` and usage (incl. cache tokens and, when
  `thinking` is on, a thinking block and `output_tokens_details.thinking_tokens`).
- Streams every event in the documented order: message_start, content_block_start,
  ping, content_block_delta..., content_block_stop, message_delta, message_stop.
- `GET /v1/models` with `limit` / `after_id` / `before_id` pagination.
- Every reply carries `request-id` and the `anthropic-ratelimit-*` headers (resets as
  RFC 3339); a 429 adds `retry-after`; error bodies carry `request_id` too.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
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

API_KEY = "sk-ant-fake-key"
MODELS = ("claude-3-5-sonnet-20241022", "claude-3-5-haiku-20241022", "claude-3-opus-20240229")

#: Status -> (error.type, message), as Anthropic sends them.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "messages: field required"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
THINKING_TEXT = "The player wants a first step; wood comes first."


class FakeAnthropic(FakeProviderServer):
    name = "anthropic"

    def __init__(self, *, api_key: str = API_KEY, models: tuple[str, ...] = MODELS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key
        self.models = list(models)
        self.context_window_tokens: int | None = None
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.thinking = False
        self.stop_reason = "end_turn"
        #: Stream event types to leave out (e.g. {"message_stop"} for a stream that ends early).
        self.drop_events: set[str] = set()
        #: Largest page `GET /v1/models` returns, whatever `limit` asks for.
        self.max_models_page = 1000
        self._ids = itertools.count(1)

    def reset(self) -> None:
        super().reset()
        self.context_window_tokens = None
        self.cache_read_tokens = self.cache_write_tokens = 0
        self.thinking = False
        self.stop_reason = "end_turn"
        self.drop_events = set()
        self.max_models_page = 1000

    # --- routing ----------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        problem = self._check_headers(request)
        if problem is not None:
            return problem
        if request.method == "GET" and request.path == "/v1/models":
            return self._models(request)
        if request.method == "POST" and request.path == "/v1/messages":
            return self._messages(request)
        return self._error(404, request, "not_found_error", f"Not found: {request.method} {request.path}")

    def _check_headers(self, request: RecordedRequest) -> Reply | None:
        if request.header("x-api-key") != self.api_key:
            return self._error(401, request, "authentication_error", "invalid x-api-key")
        if not request.header("anthropic-version"):
            return self._error(400, request, "invalid_request_error", "anthropic-version: header is required")
        return None

    def _messages(self, request: RecordedRequest) -> Reply | StreamReply:
        try:
            body = request.body
        except json.JSONDecodeError:
            return self._error(400, request, "invalid_request_error", "There was an issue with your request body: invalid JSON")
        problem = self._check_body(request, body)
        if problem is not None:
            return problem
        prompt_tokens = self.input_tokens(body)
        if self.context_window_tokens is not None and prompt_tokens > self.context_window_tokens:
            message = f"prompt is too long: {prompt_tokens} tokens > {self.context_window_tokens} maximum"
            return self._error(400, request, "invalid_request_error", message)
        if body.get("stream"):
            return StreamReply(self._stream_chunks(body), headers=self.headers())
        return Reply(200, self.message(body), headers=self.headers())

    def _check_body(self, request: RecordedRequest, body: Any) -> Reply | None:
        def bad(message: str) -> Reply:
            return self._error(400, request, "invalid_request_error", message)

        if not isinstance(body, dict):
            return bad("request body must be a JSON object")
        if not isinstance(body.get("max_tokens"), int):
            return bad("max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return bad("messages: at least one message is required")
        for index, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant"):
                return bad(
                    f'messages.{index}.role: Unexpected role "{message.get("role")}". The Messages API accepts a '
                    'top-level `system` parameter, not "system" as an input message role.'
                )
        temperature = body.get("temperature", 1.0)
        if not 0.0 <= float(temperature) <= 1.0:
            return bad("temperature: range: 0..1")
        if body.get("model") not in self.models:
            return self._error(404, request, "not_found_error", f"model: {body.get('model')}")
        return None

    # --- replies ----------------------------------------------------------------

    def input_tokens(self, body: dict[str, Any]) -> int:
        """Prompt tokens after the cache (Anthropic's `input_tokens` excludes cached ones)."""
        texts = [str(body.get("system") or "")] + [str(message.get("content")) for message in body["messages"]]
        return sum(count_words(text) for text in texts if text)

    def answer(self, body: dict[str, Any]) -> tuple[str, str, int]:
        """(text, stop_reason, output tokens), cut at max_tokens the way the API does."""
        last_user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        text = fake_reply_text(str(last_user), self.name)
        words = text.split(" ")
        if len(words) > body["max_tokens"]:
            return " ".join(words[: body["max_tokens"]]), "max_tokens", body["max_tokens"]
        return text, self.stop_reason, len(words) + (count_words(THINKING_TEXT) if self.thinking else 0)

    def usage(self, body: dict[str, Any], output_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens(body),
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        if self.thinking:
            usage["output_tokens_details"] = {"thinking_tokens": count_words(THINKING_TEXT)}
        return usage

    def message(self, body: dict[str, Any]) -> dict[str, Any]:
        text, stop_reason, output_tokens = self.answer(body)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if self.thinking:
            content.insert(0, {"type": "thinking", "thinking": THINKING_TEXT, "signature": "EqQBCgIYAhIM"})
        return {
            "id": f"msg_fake{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": self.usage(body, output_tokens),
        }

    def _stream_chunks(self, body: dict[str, Any]) -> list[bytes]:
        text, stop_reason, output_tokens = self.answer(body)
        start = self.message(body) | {"content": [], "stop_reason": None, "usage": self.usage(body, 1)}
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
        index = 0
        if self.thinking:
            events += _thinking_block_events(index)
            index += 1
        text_block = {"type": "text", "text": ""}
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": text_block}))
        events.append(("ping", {"type": "ping"}))
        for piece in split_words(text, 4):
            text_delta = {"type": "text_delta", "text": piece}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": text_delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        final_usage = {key: value for key, value in self.usage(body, output_tokens).items() if key != "service_tier"}
        delta = {"stop_reason": stop_reason, "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return [sse(data, event=name) for name, data in events if name not in self.drop_events]

    def _models(self, request: RecordedRequest) -> Reply:
        limit = min(int(request.query.get("limit", ["20"])[0]), self.max_models_page)
        ids = list(self.models)
        if "after_id" in request.query:
            ids = ids[ids.index(request.query["after_id"][0]) + 1 :]
        elif "before_id" in request.query:
            ids = ids[: ids.index(request.query["before_id"][0])]
        page = ids[:limit]
        data = [
            {"type": "model", "id": model_id, "display_name": model_id.replace("-", " ").title(),
             "created_at": "2024-10-22T00:00:00Z"}
            for model_id in page
        ]
        body = {
            "data": data,
            "has_more": len(ids) > limit,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
        return Reply(200, body, headers=self.headers())

    # --- errors and headers -----------------------------------------------------

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        error_type, message = ERRORS.get(status, ("api_error", "Internal server error"))
        return self._error(status, request, error_type, message)

    def _error(self, status: int, request: RecordedRequest, error_type: str, message: str) -> Reply:
        headers = self.headers()
        if status == 429:
            headers["retry-after"] = "7"
        body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": headers["request-id"]}
        return Reply(status, body, headers=headers)

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        """A 200 stream that starts, then breaks with `event: error` (the docs' overloaded example)."""
        body = request.body
        chunks = self._stream_chunks(body)[:4]  # message_start, block start, ping, one delta
        chunks.append(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, event="error"))
        return StreamReply(chunks, headers=self.headers())

    def headers(self) -> dict[str, str]:
        """`request-id` and the rate-limit headers Anthropic puts on every response."""
        requests_left, tokens_left = self.limits.remaining() if self.limits else (None, None)
        requests_limit = self.limits.requests_per_minute if self.limits and self.limits.requests_per_minute else 4000
        tokens_limit = self.limits.tokens_per_minute if self.limits and self.limits.tokens_per_minute else 400000
        reset = (datetime.now(timezone.utc) + timedelta(seconds=60)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        headers = {"request-id": f"req_fake{next(self._ids):012d}"}
        for kind, limit, left in (
            ("requests", requests_limit, requests_left),
            ("tokens", tokens_limit, tokens_left),
            ("input-tokens", tokens_limit, tokens_left),
            ("output-tokens", tokens_limit // 5, None),
        ):
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(limit if left is None else max(0, left))
            headers[f"anthropic-ratelimit-{kind}-reset"] = reset
        return headers

    def tokens_for(self, request: RecordedRequest) -> int:
        body = request.body if request.raw_body else None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 0
        return self.input_tokens(body) + int(body.get("max_tokens") or 0)


def _thinking_block_events(index: int) -> list[tuple[str, dict[str, Any]]]:
    """An extended-thinking block: its text arrives as thinking_delta, then a signature_delta."""
    block = {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [
        {"type": "thinking_delta", "thinking": THINKING_TEXT},
        {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
    ]
    return [
        ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}),
        *[("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas],
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]
