"""Ollama's native API: `POST /api/chat`, NDJSON streaming, `GET /api/tags`.

Wire format (docs/api.md and docs.ollama.com/api/errors in ollama/ollama):

- request: `{model, messages: [{role: system|user|assistant, content}], stream, options}`;
  `stream` defaults to true on the server, so it is always sent explicitly.
- reply: `message.content`, `done`, `done_reason`, `prompt_eval_count` (prompt tokens),
  `eval_count` (completion tokens) and `*_duration` fields in nanoseconds.
- stream: `application/x-ndjson`, one object per line; the last has `done: true` and the
  counts. An error after the 200 arrives as a line `{"error": "..."}` (status unchanged).
- errors: `{"error": "..."}`; 404 `model "x" not found, try pulling it first`,
  503 when the server's queue is full. Ollama sends no request id header.

Request features:

- tools: `tools` in OpenAI's shape, as Ollama takes them. Ollama has no `tool_choice`: "none"
  leaves the tools out, a named function is sent as the only tool, and "required" cannot be
  enforced (the model may still answer in text)
- calls: `message.tool_calls` (`{function: {name, arguments: <object>}}`, and `id` from newer
  servers) become `tool_calls`, with an id made from the answer when Ollama gives none; streamed,
  each call comes whole in one line. An assistant message's calls go back with their arguments
  as an object; a `tool` message carries `tool_name` (the function it answers) and `tool_call_id`
- JSON: `format: "json"` for json_object, `format: <schema>` for json_schema
- images: a data: image's base64 in the message's `images` (without the data: prefix); Ollama
  cannot fetch an https image, so one is refused (BadRequestError) rather than dropped
- `stop`, `seed`, `top_p` go into `options`; `provider_options`: Ollama's sampling options
  (`top_k`, `min_p`, `repeat_penalty`, ...) into `options`, and `think` at the top level
- cache breakpoints: none (Ollama keeps the last prompt's KV cache by itself)
- embeddings: `POST /api/embed` with `input` (one text or a list), `embeddings` back

Options (under `options:` in the provider's config entry):

- `num_ctx` (int): context window to load the model with (Ollama's default is small and it
  silently drops the start of longer prompts)
- `keep_alive` (str, e.g. "5m", "-1"): how long Ollama keeps the model loaded after a call
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.messages import Message, ToolCall
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.features import (
    arguments_object,
    calls_by_id,
    embedding_usage,
    finish_reason,
    stable_tool_call_id,
    tool_call,
)
from llmq.worker.providers.http import HTTPProvider, StreamState, ndjson_lines

#: Ollama reports these in nanoseconds; they go into response metadata under `<name>_ns`.
DURATION_FIELDS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
#: Ollama's words for a prompt longer than the loaded context (400, 413 or 500 by version).
CONTEXT_WINDOW_MARKERS = ("exceeds the context length", "context length exceeded")
#: provider_options that are Ollama's model options (they go into `options`); `think` goes to the top level.
OLLAMA_OPTIONS = frozenset({
    "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
    "num_keep", "mirostat", "mirostat_tau", "mirostat_eta",
})


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_ctx: int | None = Field(default=None, ge=1)
    keep_alive: str | int | None = None


@dataclass
class OllamaStreamState(StreamState):
    #: The model named by the latest line.
    model: str | None = None
    #: The line with `done: true`: it carries the counts and durations.
    last_line: dict[str, Any] = field(default_factory=dict)
    calls_made: int = 0


class OllamaProvider(HTTPProvider[OllamaStreamState]):
    type_name = "ollama"
    description = "Ollama's native API (/api/chat) on a local or LAN server"
    local = True
    requires_api_key = False
    supports_streaming = True
    default_base_url = "http://localhost:11434"
    request_id_headers: ClassVar[tuple[str, ...]] = ()
    options_model = OllamaOptions
    allowed_provider_options: ClassVar[frozenset[str]] = OLLAMA_OPTIONS | {"think"}

    options: OllamaOptions

    # --- requests -------------------------------------------------------------
    # Headers: the default, as plain Ollama needs no key; one configured goes as Bearer for a proxy
    # (or ollama.com) in front.

    def request_path(self, model: str, *, stream: bool) -> str:
        return "/api/chat"

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        extra = self.provider_options_of(request)
        options: dict[str, Any] = {"temperature": request.temperature, "num_predict": request.max_tokens}
        if self.options.num_ctx is not None:
            options["num_ctx"] = self.options.num_ctx
        if request.stop is not None:
            options["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        for name in ("seed", "top_p"):
            if getattr(request, name) is not None:
                options[name] = getattr(request, name)
        options.update({name: value for name, value in extra.items() if name in OLLAMA_OPTIONS})
        calls = calls_by_id(request.messages) if request.uses_tools else {}
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [self.chat_message(message, calls, request.model) for message in request.messages],
            "stream": stream,
            "options": options,
        }
        tools = offered_tools(request)
        if tools:
            body["tools"] = tools
        if request.response_format is not None and request.response_format.wants_json:
            schema = request.response_format.schema_dict
            body["format"] = schema if schema is not None else "json"
        if self.options.keep_alive is not None:
            body["keep_alive"] = self.options.keep_alive
        body.update({name: value for name, value in extra.items() if name not in OLLAMA_OPTIONS})
        return body

    def chat_message(self, message: Message, calls: dict[str, Any], model: str) -> dict[str, Any]:
        """One message in Ollama's shape: text, inline images, calls with object arguments, tool results by name."""
        out: dict[str, Any] = {"role": message.role, "content": message.text}
        images = message.images
        if images:
            out["images"] = [self.inline_image(image.inline, model) for image in images]
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": call.id, "function": {"index": index, "name": call.function.name, "arguments": arguments_object(call)}}
                for index, call in enumerate(message.tool_calls)
            ]
        if message.role == "tool":
            site = calls.get(str(message.tool_call_id))
            out["tool_call_id"] = message.tool_call_id
            if site is not None:
                out["tool_name"] = site.name
        return out

    def inline_image(self, inline: Any, model: str) -> str:
        if inline is None:
            raise errors.BadRequestError(
                "Ollama takes images inline only and cannot fetch an https URL: send the image as a data: URL "
                "(data:image/png;base64,...)", provider=self.name, model=model,
            )
        return str(inline.data_base64)

    # --- answers --------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        if not isinstance(body, dict) or "error" in body:
            raise self.error_from_body(body, request.model)
        message = body.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not body.get("done"):
            raise errors.MalformedResponseError(
                f"reply lacks message.content or done: true: {json.dumps(body)[:200]}",
                provider=self.name, model=request.model,
            )
        calls = [self.call_of(raw, body, index) for index, raw in enumerate(message.get("tool_calls") or [])]
        return self.response(request, message["content"], self.usage(body), tool_calls=calls,
                             **self.final_metadata(body, called=bool(calls)))

    def call_of(self, raw: Any, line: dict[str, Any], index: int) -> ToolCall:
        """One of Ollama's calls in OpenAI's shape (arguments come as an object; an id only from newer servers)."""
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise self.malformed(f"tool call without a function name: {str(raw)[:200]!r}", line.get("model"))
        answer_id = f"{line.get('model')}@{line['created_at']}" if line.get("created_at") else None
        call_id = raw.get("id") or stable_tool_call_id(answer_id, index, function["name"])
        return tool_call(str(call_id), function["name"], function.get("arguments") or {})

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> OllamaStreamState:
        return OllamaStreamState(request, request_id)

    def stream_events(self, response: httpx.Response, state: OllamaStreamState) -> AsyncIterator[str]:
        return ndjson_lines(response)

    def parse_stream_event(self, event: str, state: OllamaStreamState) -> str | None:
        line = self.parse_event_json(event, state.request.model, None, what="stream line")
        if "error" in line:
            raise self.error_from_body(line, state.request.model)
        state.model = line.get("model")
        if line.get("done"):
            state.finished, state.last_line = True, line
        message = line.get("message")
        if not isinstance(message, dict):
            return ""
        for raw in message.get("tool_calls") or ():  # each call comes whole, in one line
            call = self.call_of(raw, line, state.calls_made)
            state.deltas.append(state.tool_calls.add(
                state.calls_made, call_id=call.id, name=call.function.name, arguments=call.function.arguments))
            state.calls_made += 1
        return message.get("content") or ""

    def stream_chunk(self, state: OllamaStreamState, text: str) -> LLMResponse:
        return self.response(state.request, text, Usage(), model=state.model)

    def finish_stream(self, state: OllamaStreamState) -> LLMResponse:
        if not state.finished:
            raise self.malformed("stream ended before the line with done: true", state.request.model)
        calls = state.tool_calls.calls()
        return self.final_chunk(state.request, self.usage(state.last_line), tool_calls=calls,
                                **self.final_metadata(state.last_line, called=bool(calls)))

    def usage(self, reply: dict[str, Any]) -> Usage:
        return Usage.of(int(reply.get("prompt_eval_count") or 0), int(reply.get("eval_count") or 0))

    def final_metadata(self, reply: dict[str, Any], *, called: bool = False) -> dict[str, Any]:
        # Ollama says "stop" after a tool call too.
        native = reply.get("done_reason") or "stop"
        reason = "tool_calls" if called else finish_reason(native) or native
        metadata: dict[str, Any] = {"finish_reason": reason, "model": reply.get("model")}
        for name in DURATION_FIELDS:
            if isinstance(reply.get(name), int):
                metadata[f"{name}_ns"] = reply[name]
        return metadata

    # --- embeddings -------------------------------------------------------------

    def embeddings_path(self, model: str) -> str | None:
        return "/api/embed"

    def build_embeddings_body(self, request: EmbeddingRequest) -> dict[str, Any]:
        extra = self.provider_options_of(request)
        body: dict[str, Any] = {"model": request.model, "input": request.texts}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        options = {name: value for name, value in extra.items() if name in OLLAMA_OPTIONS}
        if self.options.num_ctx is not None:
            options["num_ctx"] = self.options.num_ctx
        if options:
            body["options"] = options
        if self.options.keep_alive is not None:
            body["keep_alive"] = self.options.keep_alive
        return body

    def parse_embeddings(self, request: EmbeddingRequest, body: Any, response: httpx.Response) -> EmbeddingResponse:
        if isinstance(body, dict) and "error" in body:
            raise self.error_from_body(body, request.model)
        vectors = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(vectors, list) or not all(isinstance(vector, list) for vector in vectors):
            raise self.malformed(f"/api/embed answer has no embeddings: {str(body)[:200]!r}", request.model)
        usage, said = embedding_usage(request.texts, int(body.get("prompt_eval_count") or 0))
        return self.embedding_response(request, vectors, usage, model=body.get("model"), **said)

    # --- errors ---------------------------------------------------------------
    # An `{"error": ...}` after a 200 (mid-stream) is the model failing while it runs: the
    # base's `error_from_body` maps it as a 500, refined by the text below.

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        lowered = message.lower()
        if any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
            return errors.ContextWindowExceededError
        if status_code == 404:
            return errors.ModelNotFoundError
        return errors.error_for_status(status_code)

    # --- discovery ------------------------------------------------------------

    async def get_available_models(self) -> list[str]:
        """Pulled models as Ollama names them ("llama3:latest"), plus the bare name of each `:latest`."""
        reply = await self.get_json("/api/tags", headers=self.build_headers(None, None))
        entries = reply.get("models") if isinstance(reply, dict) else None
        if not isinstance(entries, list):
            raise errors.MalformedResponseError("/api/tags reply lacks a models list", provider=self.name)
        names: list[str] = []
        for entry in entries:
            name = (entry.get("name") or entry.get("model")) if isinstance(entry, dict) else None
            if not isinstance(name, str):
                continue
            bare = name.removesuffix(":latest")
            names.extend(candidate for candidate in (name, bare) if candidate not in names)
        return names

    async def probe(self) -> None:
        # Ollama's root answers "Ollama is running" without touching a model; older builds or a
        # proxy in front may not, so the model list is the second way to tell.
        response = await self.client.get("/", headers=self.build_headers(None, None))
        if response.status_code != 200 or "ollama is running" not in response.text.lower():
            await self.get_available_models()


def offered_tools(request: LLMRequest) -> list[dict[str, Any]]:
    """The tools to send: Ollama has no tool_choice, so "none" sends none and a named function
    is the only one sent."""
    choice = request.tool_choice
    if request.tools is None or choice == "none":
        return []
    tools = request.tools
    if choice is not None and not isinstance(choice, str):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    return [tool.model_dump(exclude_none=True) for tool in tools]
