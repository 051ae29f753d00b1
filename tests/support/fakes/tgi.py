"""A fake Text Generation Inference server (its Messages API) and Text Embeddings Inference.

`FakeOpenAI` with `flavor="tgi"` answers plain chat, errors and streams as TGI does; this adds
the features, as TGI's router serves them (router/src/lib.rs, chat.rs, validation.rs):

- `response_format`: TGI's grammar, `{"type": "json" | "json_object", "value": <schema>}`, and
  (TGI 3.3 on) OpenAI's `{"type": "json_schema", "json_schema": {...}}`; without `value` it is
  TGI's 422 deserialization error; with `tools` too, TGI's "Grammar and tools are mutually
  exclusive"
- `stop` must be a list, `top_p` strictly between 0 and 1 (TGI's 422s)
- tool calls as TGI sends them: id "0", `description: null` beside the name, `arguments` a JSON
  string (an object with `arguments_as_object`, as TGI 2 did), no `content`, finish_reason "stop";
  streamed as TGI streams them: every piece with id "", the name only in the first, whose
  arguments are "{", then the rest of the arguments as generated
- `POST /v1/embeddings`: TEI's OpenAI-compatible route (floats, `usage`), as `FakeOpenAI` serves it
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from tests.support.fakes.base import RecordedRequest, Reply, StreamReply, count_words, split_words, sse
from tests.support.fakes.openai import FakeOpenAI, prompt_tokens


def tgi_error(message: str, error_type: str = "validation") -> dict[str, Any]:
    return {"error": message, "error_type": error_type}


class FakeTGI(FakeOpenAI):
    name = "tgi"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(flavor="tgi", **kwargs)

    def reset_knobs(self) -> None:
        super().reset_knobs()
        #: Send a call's arguments as an object, as TGI 2.x did.
        self.arguments_as_object = False

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        if request.method != "POST" or request.path != "/v1/chat/completions" or not isinstance(request.body, dict):
            return super().route(request)
        denied = self._check_bearer(request)
        if denied is not None:
            return denied
        body = request.body
        problem = refusal(body)
        if problem is not None:
            return Reply(422, problem, self._headers(request))
        call = self._tool_call(body) if body.get("tools") else None
        if call is not None:
            return self.call_reply(request, call)
        # Past TGI's own checks, the grammar answers as OpenAI's response_format does in the base fake.
        grammar = body.get("response_format")
        if isinstance(grammar, dict) and grammar.get("type") in ("json", "json_object"):
            schema = {"name": "grammar", "schema": grammar["value"]}
            body = {**body, "response_format": {"type": "json_schema", "json_schema": schema}}
        return super().route(dataclasses.replace(request, raw_body=json.dumps(body).encode()))

    def call_reply(self, request: RecordedRequest, call: dict[str, Any]) -> Reply | StreamReply:
        body = request.body
        arguments = call["function"]["arguments"]
        usage = {"prompt_tokens": prompt_tokens(body["messages"]), "completion_tokens": count_words(arguments)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = list(self.call_chunks(request, call, usage if include_usage else None))
            return StreamReply(chunks, headers=self._headers(request))
        function = {"description": None, "name": call["function"]["name"],
                    "arguments": json.loads(arguments) if self.arguments_as_object else arguments}
        message = {"role": "assistant", "tool_calls": [{"id": "0", "type": "function", "function": function}]}
        completion = {**self._envelope(request, "chat.completion"), "usage": usage,
                      "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}
        return Reply(200, completion, self._headers(request))

    def call_chunks(self, request: RecordedRequest, call: dict[str, Any], usage: dict[str, Any] | None) -> Iterator[bytes]:
        envelope = self._envelope(request, "chat.completion.chunk")
        rest = call["function"]["arguments"].removeprefix("{")
        pieces = [("{", call["function"]["name"]), *((piece, None) for piece in split_words(rest, 3))]
        for number, (arguments, name) in enumerate(pieces):
            piece = {"index": 0, "id": "", "type": "function", "function": {"name": name, "arguments": arguments}}
            finish = "stop" if number == len(pieces) - 1 else None
            delta = {"role": "assistant", "tool_calls": [piece]}
            yield sse({**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                       "usage": None})
        if usage is not None:
            yield sse({**envelope, "choices": [], "usage": usage})
        yield sse("[DONE]")


def refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """TGI's 422 body for a chat request it refuses, else None."""
    if isinstance(body.get("stop"), str):
        return tgi_error("Failed to deserialize the JSON body into the target type: stop: invalid type: string "
                         f"{json.dumps(body['stop'])}, expected a sequence", "validation")
    top_p = body.get("top_p")
    if top_p is not None and not 0.0 < top_p < 1.0:
        return tgi_error("Input validation error: `top_p` must be > 0.0 and < 1.0")
    grammar = body.get("response_format")
    if grammar is None:
        return None
    if grammar.get("type") in ("json", "json_object") and "value" not in grammar:
        return tgi_error("Failed to deserialize the JSON body into the target type: response_format: missing field "
                         "`value`", "validation")
    if grammar.get("type") not in ("json", "json_object", "regex", "json_schema"):
        return tgi_error("Failed to deserialize the JSON body into the target type: response_format: unknown variant "
                         f"`{grammar.get('type')}`, expected one of `json`, `json_object`, `regex`, `json_schema`")
    if body.get("tools"):
        return tgi_error("Grammar and tools are mutually exclusive", "tool_error")
    return None

