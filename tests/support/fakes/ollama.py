"""A fake Ollama server speaking its native API (docs/api.md, docs.ollama.com/api/errors).

- `GET /` answers "Ollama is running" (plain text), as the real server does
- `GET /api/tags` lists `models` (names like "llama3:latest")
- `POST /api/chat` answers JSON with `stream: false`, else NDJSON (`application/x-ndjson`),
  `stream` defaulting to true as on the real server; counts are words (see `count_words`)
- an unknown model gets 404 `model "x" not found, try pulling it first`
- `options.num_predict` below the reply's length cuts it and says `done_reason: "length"`
- with `tools` the answer is a call of the first tool (`message.tool_calls`, arguments as an
  object made from its schema; an `id` only with `tool_call_ids`, as newer servers send), until
  the last message is a `tool` result, which it answers; streamed, the call comes whole in one
  line and `done_reason` stays "stop", as Ollama does; a model in `models_without_tools` gets
  Ollama's 400 "does not support tools"
- `format` ("json" or a schema) gets JSON made from it, unless `json_answers` holds replies
- `images`: base64 without a data: prefix (else Ollama's 400 "illegal base64 data"), 576 prompt
  tokens each
- `POST /api/embed`: `input` (a string or a list), `embeddings` and `prompt_eval_count` back
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

from tests.support.fakes.base import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    StreamReply,
    count_words,
    fake_reply_text,
    split_words,
)
from tests.support.fakes.openai import fake_vector, value_for_schema

NDJSON = "application/x-ndjson"
#: Ollama answers with gin's JSON content type.
JSON = "application/json; charset=utf-8"
CREATED_AT = "2024-07-22T20:47:51.147561Z"
#: Prompt tokens an image costs (a llava-style vision encoder's 576 patches).
IMAGE_TOKENS = 576

ERROR_MESSAGES: dict[int, str] = {
    400: "invalid character '}' looking for beginning of value",
    401: "unauthorized",
    403: "forbidden",
    404: 'model "{model}" not found, try pulling it first',
    429: "too many requests",
    500: "llama runner process has terminated: exit status 2",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}


class FakeOllama(FakeProviderServer):
    name = "ollama"

    def __init__(self, *, models: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.built_models = models if models is not None else ["llama3:latest", "qwen2.5:0.5b"]
        self.reset_knobs()
        self._server.handle_error = _quiet_on_client_reset(self._server.handle_error)  # type: ignore[method-assign,assignment]

    def reset(self) -> None:
        super().reset()
        self.reset_knobs()

    def reset_knobs(self) -> None:
        self.models = list(self.built_models)
        #: Contents to answer the next JSON requests with, first in first out (then: from the format).
        self.json_answers: list[str] = []
        #: Give tool calls an `id`, as newer Ollama servers do.
        self.tool_call_ids = False
        #: Models whose template has no tools: Ollama refuses a request with tools for them.
        self.models_without_tools: set[str] = set()

    def known(self, model: str) -> bool:
        return model in self.models or f"{model}:latest" in self.models

    # --- routes -----------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        if request.method == "GET" and request.path == "/":
            return Reply(200, raw=b"Ollama is running", content_type="text/plain; charset=utf-8")
        if request.method == "GET" and request.path == "/api/tags":
            return Reply(200, {"models": [self.tag(name) for name in self.models]}, content_type=JSON)
        if request.method == "POST" and request.path == "/api/chat":
            return self.chat(request)
        if request.method == "POST" and request.path == "/api/embed":
            return self.embed(request)
        return Reply(404, raw=b"404 page not found", content_type="text/plain")

    def chat(self, request: RecordedRequest) -> Reply | StreamReply:
        body = request.body or {}
        model = body.get("model") or ""
        if not model:
            return Reply(400, {"error": "model is required"}, content_type=JSON)
        if not self.known(model):
            return self.error_reply(404, request)
        refused = self.refusal(body)
        if refused is not None:
            return Reply(400, {"error": refused}, content_type=JSON)
        call = self.tool_call(body)
        text, done_reason = ("", "stop") if call is not None else self.answer(body)
        images = sum(len(message.get("images") or ()) for message in body.get("messages", []))
        counts = {"prompt_eval_count": count_words(self.prompt(body)) + IMAGE_TOKENS * images,
                  "eval_count": count_words(json.dumps(call) if call else text)}
        final = {"model": model, "created_at": CREATED_AT, "done": True, "done_reason": done_reason, **counts,
                 **DURATIONS}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if call is not None:
            message["tool_calls"] = [call]
        if body.get("stream", True) is False:
            return Reply(200, {**final, "message": message}, content_type=JSON)
        lines = [self.line(model, piece) for piece in split_words(text, 4)] if text else []
        if call is not None:
            lines.append(_ndjson({"model": model, "created_at": CREATED_AT, "done": False, "message": message}))
        lines.append(_ndjson({**final, "message": {"role": "assistant", "content": ""}}))
        return StreamReply(lines, content_type=NDJSON)

    def refusal(self, body: dict[str, Any]) -> str | None:
        """Ollama's 400 message for a body it refuses, else None."""
        if body.get("tools") and body["model"] in self.models_without_tools | {m.removesuffix(":latest")
                                                                               for m in self.models_without_tools}:
            return f"registry.ollama.ai/library/{body['model']} does not support tools"
        for message in body.get("messages", []):
            for image in message.get("images") or ():
                try:
                    base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    return "illegal base64 data at input byte 4"
        return None

    def tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The call a model makes: the first tool offered, until the last message is a tool's result."""
        tools, messages = body.get("tools") or [], body.get("messages") or [{}]
        if not tools or messages[-1].get("role") == "tool":
            return None
        function = tools[0]["function"]
        arguments = value_for_schema(function.get("parameters") or {"type": "object"}, messages[-1].get("content", ""))
        call: dict[str, Any] = {"function": {"index": 0, "name": function["name"], "arguments": arguments}}
        if self.tool_call_ids:
            call["id"] = "call_" + hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:8]
        return call

    def embed(self, request: RecordedRequest) -> Reply:
        body = request.body or {}
        if not self.known(str(body.get("model") or "")):
            return self.error_reply(404, request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts:
            return Reply(400, {"error": "invalid input type"}, content_type=JSON)
        dimensions = int(body.get("dimensions") or 8)
        return Reply(200, {"model": body["model"], "embeddings": [fake_vector(text, dimensions) for text in texts],
                           "total_duration": 14143917, "load_duration": 1019500,
                           "prompt_eval_count": sum(count_words(text) for text in texts)}, content_type=JSON)

    # --- wire shapes ------------------------------------------------------------

    @staticmethod
    def prompt(body: dict[str, Any]) -> str:
        return "\n".join(message.get("content", "") for message in body.get("messages", []))

    def answer(self, body: dict[str, Any]) -> tuple[str, str]:
        last = (body.get("messages") or [{}])[-1].get("content", "")
        text = fake_reply_text(last, self.name)
        wanted = body.get("format")
        if wanted:
            made = json.dumps(value_for_schema(wanted, text) if isinstance(wanted, dict) else {"answer": text})
            return (self.json_answers.pop(0) if self.json_answers else made), "stop"
        limit = (body.get("options") or {}).get("num_predict")
        words = text.split(" ")
        if isinstance(limit, int) and 0 < limit < len(words):
            return " ".join(words[:limit]), "length"
        return text, "stop"

    @staticmethod
    def line(model: str, piece: str) -> bytes:
        return _ndjson({"model": model, "created_at": CREATED_AT,
                        "message": {"role": "assistant", "content": piece}, "done": False})

    @staticmethod
    def tag(name: str) -> dict[str, Any]:
        return {
            "name": name, "model": name, "modified_at": CREATED_AT, "size": 3825819519,
            "digest": "fe938a131f40e6f6d40083c9f0f430a515233eb2edaa6d72eb85c50d64f2300e",
            "details": {"format": "gguf", "family": "llama", "families": None, "parameter_size": "7B",
                        "quantization_level": "Q4_0"},
        }

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        # Ollama's errors carry only {"error": "..."}: no code, no request id header.
        body = request.body if request.raw_body else {}
        model = body.get("model", "") if isinstance(body, dict) else ""
        message = ERROR_MESSAGES.get(status, "internal server error").replace("{model}", model)
        return Reply(status, {"error": message}, content_type=JSON)

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        model = (request.body or {}).get("model", "")
        lines = [self.line(model, "Task:"), self.line(model, " fake")]
        lines.append(_ndjson({"error": "an error was encountered while running the model"}))
        return StreamReply(lines, content_type=NDJSON)


DURATIONS = {"total_duration": 1162761250, "load_duration": 6683708, "prompt_eval_duration": 201222000,
             "eval_duration": 953997000}


def _quiet_on_client_reset(report: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A client that stops reading a stream (as the adapter does on an error line) resets the
    kept-alive connection; that is expected here, so it is not printed as a server failure."""

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            report(request, client_address)

    return handle_error


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()
