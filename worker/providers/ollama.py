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

from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.http import HTTPProvider, StreamState, ndjson_lines

#: Ollama reports these in nanoseconds; they go into response metadata under `<name>_ns`.
DURATION_FIELDS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
#: Ollama's words for a prompt longer than the loaded context (400, 413 or 500 by version).
CONTEXT_WINDOW_MARKERS = ("exceeds the context length", "context length exceeded")


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


class OllamaProvider(HTTPProvider[OllamaStreamState]):
    type_name = "ollama"
    description = "Ollama's native API (/api/chat) on a local or LAN server"
    local = True
    requires_api_key = False
    supports_streaming = True
    default_base_url = "http://localhost:11434"
    request_id_headers: ClassVar[tuple[str, ...]] = ()
    options_model = OllamaOptions

    options: OllamaOptions

    # --- requests -------------------------------------------------------------
    # Headers: the default, as plain Ollama needs no key; one configured goes as Bearer for a proxy
    # (or ollama.com) in front.

    def request_path(self, model: str, *, stream: bool) -> str:
        return "/api/chat"

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": request.temperature, "num_predict": request.max_tokens}
        if self.options.num_ctx is not None:
            options["num_ctx"] = self.options.num_ctx
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": message.role, "content": message.text} for message in request.messages],
            "stream": stream,
            "options": options,
        }
        if self.options.keep_alive is not None:
            body["keep_alive"] = self.options.keep_alive
        return body

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
        return self.response(request, message["content"], self.usage(body), **self.final_metadata(body))

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
        return (message.get("content") or "") if isinstance(message, dict) else ""

    def stream_chunk(self, state: OllamaStreamState, text: str) -> LLMResponse:
        return self.response(state.request, text, Usage(), model=state.model)

    def finish_stream(self, state: OllamaStreamState) -> LLMResponse:
        if not state.finished:
            raise self.malformed("stream ended before the line with done: true", state.request.model)
        return self.final_chunk(state.request, self.usage(state.last_line), **self.final_metadata(state.last_line))

    def usage(self, reply: dict[str, Any]) -> Usage:
        return Usage.of(int(reply.get("prompt_eval_count") or 0), int(reply.get("eval_count") or 0))

    def final_metadata(self, reply: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {"finish_reason": reply.get("done_reason") or "stop", "model": reply.get("model")}
        for name in DURATION_FIELDS:
            if isinstance(reply.get(name), int):
                metadata[f"{name}_ns"] = reply[name]
        return metadata

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
