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
- Tools, tool results, images, cache breakpoints and structured outputs as the API takes and
  answers them (`anthropic_features`); a tool call streams as `content_block_start` (tool_use)
  and `input_json_delta` pieces, the first one empty, as the API sends them.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from tests.support.fakes.anthropic_features import (
    body_problem,
    json_answer,
    last_user_text,
    prompt_and_prefix,
    tool_input,
    tool_to_call,
    tool_use_id,
)
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
MODELS = ("claude-3-5-sonnet-20241022", "claude-3-5-haiku-20241022", "claude-3-opus-20240229", "claude-sonnet-4-5-20250929")
#: Models with structured outputs (`output_config.format`); the others refuse it.
STRUCTURED_OUTPUT_MODELS = frozenset({"claude-sonnet-4-5-20250929"})

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
        self.structured_output_models = set(STRUCTURED_OUTPUT_MODELS)
        #: Answers to send instead of made-up JSON: the text under output_config, or a forced tool's input.
        self.json_answers: list[str] = []
        #: Text the model writes before a tool call it chooses itself (Claude often explains first).
        self.tool_preamble: str | None = None
        #: Prompt prefixes written to the cache so far (the next identical one is read from it).
        self.cached_prefixes: set[str] = set()
        self._ids = itertools.count(1)

    def reset(self) -> None:
        super().reset()
        self.context_window_tokens = None
        self.cache_read_tokens = self.cache_write_tokens = 0
        self.thinking = False
        self.stop_reason = "end_turn"
        self.drop_events = set()
        self.max_models_page = 1000
        self.structured_output_models = set(STRUCTURED_OUTPUT_MODELS)
        self.json_answers = []
        self.tool_preamble = None
        self.cached_prefixes = set()

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
        prompt = self.prompt_usage(body)
        if body.get("stream"):
            return StreamReply(self._stream_chunks(body, prompt), headers=self.headers())
        return Reply(200, self.message(body, prompt), headers=self.headers())

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
        problem = body_problem(body, structured_output_models=self.structured_output_models)
        return bad(problem) if problem else None

    # --- replies ----------------------------------------------------------------

    def input_tokens(self, body: dict[str, Any]) -> int:
        """The whole prompt's tokens: words, and a flat figure per image."""
        return prompt_and_prefix(body)[0]

    def prompt_usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Anthropic's prompt counts: `input_tokens` after the last breakpoint, the prefix up to it
        written to the cache or read from it (and the knobs' counts on top)."""
        total, prefix, key = prompt_and_prefix(body)
        read = write = 0
        if key is not None:
            read, write = (prefix, 0) if key in self.cached_prefixes else (0, prefix)
            self.cached_prefixes.add(key)
        return {"input_tokens": total - prefix, "cache_creation_input_tokens": write + self.cache_write_tokens,
                "cache_read_input_tokens": read + self.cache_read_tokens}

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, int]:
        """(content blocks, stop_reason, output tokens), text cut at max_tokens the way the API does."""
        prompt = last_user_text(body)
        tool = tool_to_call(body)
        if tool is not None:
            call = {"type": "tool_use", "id": tool_use_id(body), "name": tool["name"],
                    "input": tool_input(body, tool, prompt, self.json_answers)}
            chose = (body.get("tool_choice") or {}).get("type", "auto") == "auto"
            preamble = [{"type": "text", "text": self.tool_preamble}] if self.tool_preamble and chose else []
            words = sum(count_words(block.get("text") or json.dumps(block.get("input"))) for block in [*preamble, call])
            return [*preamble, call], "tool_use", words
        text = json_answer(body, prompt, self.json_answers) or fake_reply_text(prompt, self.name)
        words = text.split(" ")
        if len(words) > body["max_tokens"]:
            return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens", body["max_tokens"]
        thinking = count_words(THINKING_TEXT) if self.thinking else 0
        return [{"type": "text", "text": text}], self.stop_reason, len(words) + thinking

    def usage(self, prompt: dict[str, int], output_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {**prompt, "output_tokens": output_tokens, "service_tier": "standard"}
        if self.thinking:
            usage["output_tokens_details"] = {"thinking_tokens": count_words(THINKING_TEXT)}
        return usage

    def message(self, body: dict[str, Any], prompt: dict[str, int] | None = None) -> dict[str, Any]:
        content, stop_reason, output_tokens = self.answer(body)
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
            "usage": self.usage(prompt or self.prompt_usage(body), output_tokens),
        }

    def _stream_chunks(self, body: dict[str, Any], prompt: dict[str, int] | None = None) -> list[bytes]:
        prompt = prompt or self.prompt_usage(body)
        content, stop_reason, output_tokens = self.answer(body)
        start = {"id": f"msg_fake{next(self._ids):06d}", "type": "message", "role": "assistant", "model": body["model"],
                 "content": [], "stop_reason": None, "stop_sequence": None, "usage": self.usage(prompt, 1)}
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
        blocks = ([{"type": "thinking"}] if self.thinking else []) + content
        for index, block in enumerate(blocks):
            events += _block_events(index, block)
        events.insert(2, ("ping", {"type": "ping"}))  # after the first content_block_start, as the docs show
        final_usage = {key: value for key, value in self.usage(prompt, output_tokens).items() if key != "service_tier"}
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


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One content block as the stream sends it: start (empty), its deltas, stop."""
    if block["type"] == "thinking":  # its text arrives as thinking_delta, then a signature_delta
        opened: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
        deltas: list[dict[str, Any]] = [{"type": "thinking_delta", "thinking": THINKING_TEXT},
                                        {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}]
    elif block["type"] == "tool_use":  # the input arrives as JSON text in pieces, the first one empty
        opened = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        arguments = json.dumps(block["input"])
        deltas = [{"type": "input_json_delta", "partial_json": arguments[start : start + 9]}
                  for start in range(0, len(arguments), 9)]
        deltas.insert(0, {"type": "input_json_delta", "partial_json": ""})
    else:
        opened = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in split_words(block["text"], 4)]
    return [
        ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opened}),
        *[("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas],
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]
