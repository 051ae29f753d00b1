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
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import HTTPProvider, ndjson_lines

#: Ollama reports these in nanoseconds; they go into response metadata under `<name>_ns`.
DURATION_FIELDS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
#: Ollama's words for a prompt longer than the loaded context (400, 413 or 500 by version).
CONTEXT_WINDOW_MARKERS = ("exceeds the context length", "context length exceeded")


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_ctx: int | None = Field(default=None, ge=1)
    keep_alive: str | int | None = None


class OllamaProvider(HTTPProvider):
    type_name = "ollama"
    description = "Ollama's native API (/api/chat) on a local or LAN server"
    local = True
    requires_api_key = False
    supports_streaming = True
    default_base_url = "http://localhost:11434"
    request_id_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config, transport=transport)
        self.options = OllamaOptions.model_validate(config.options)

    # --- requests -------------------------------------------------------------

    def headers(self) -> dict[str, str] | None:
        # Plain Ollama needs no key; one configured is sent for a proxy (or ollama.com) in front.
        key = self.api_key
        return {"authorization": f"Bearer {key}"} if key else None

    def request_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": request.temperature, "num_predict": request.max_tokens}
        if self.options.num_ctx is not None:
            options["num_ctx"] = self.options.num_ctx
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": message.role, "content": message.content} for message in request.messages],
            "stream": stream,
            "options": options,
        }
        if self.options.keep_alive is not None:
            body["keep_alive"] = self.options.keep_alive
        return body

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        body = self.request_body(request, stream=False)
        reply, _ = await self.post_json("/api/chat", body, model=request.model, headers=self.headers())
        if not isinstance(reply, dict) or "error" in reply:
            raise self.in_band_error(reply, request.model)
        message = reply.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not reply.get("done"):
            raise errors.MalformedResponseError(
                f"reply lacks message.content or done: true: {json.dumps(reply)[:200]}",
                provider=self.name, model=request.model,
            )
        return self.response(request, message["content"], self.usage(reply), **self.final_metadata(reply))

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        body = self.request_body(request, stream=True)
        opened = self.open_stream("/api/chat", body, model=request.model, headers=self.headers())
        # translate_errors again inside: the connection can break while lines are read.
        async with opened as response, self.translate_errors(request.model):
            async for line in ndjson_lines(response):
                event = self.parse_line(line, request.model)
                if "error" in event:
                    raise self.in_band_error(event, request.model)
                message = event.get("message")
                text = (message.get("content") or "") if isinstance(message, dict) else ""
                if text:
                    yield self.response(request, text, Usage(), model=event.get("model"))
                if event.get("done"):
                    yield self.final_chunk(request, self.usage(event), **self.final_metadata(event))
                    return
        raise errors.MalformedResponseError(
            "stream ended before the line with done: true", provider=self.name, model=request.model
        )

    # --- parsing --------------------------------------------------------------

    def parse_line(self, line: str, model: str) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise errors.MalformedResponseError(
                f"stream line is not JSON: {line[:200]!r}", provider=self.name, model=model
            ) from exc
        if not isinstance(event, dict):
            raise errors.MalformedResponseError(
                f"stream line is not an object: {line[:200]!r}", provider=self.name, model=model
            )
        return event

    def usage(self, reply: dict[str, Any]) -> Usage:
        return Usage.of(int(reply.get("prompt_eval_count") or 0), int(reply.get("eval_count") or 0))

    def final_metadata(self, reply: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {"finish_reason": reply.get("done_reason") or "stop", "model": reply.get("model")}
        for field in DURATION_FIELDS:
            if isinstance(reply.get(field), int):
                metadata[f"{field}_ns"] = reply[field]
        return metadata

    # --- errors ---------------------------------------------------------------

    def in_band_error(self, body: Any, model: str) -> errors.ProviderError:
        """An `{"error": ...}` object after a 200 (mid-stream): the model failed while running."""
        message = self.redact(self.error_message(body) or f"unexpected reply: {json.dumps(body)[:200]}")
        error_class = self.classify_error(500, body, message)
        return error_class(message, provider=self.name, model=model)

    def classify_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        lowered = message.lower()
        if any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
            return errors.ContextWindowExceededError
        if status_code == 404:
            return errors.ModelNotFoundError
        return errors.error_for_status(status_code)

    # --- discovery ------------------------------------------------------------

    async def get_available_models(self) -> list[str]:
        """Pulled models as Ollama names them ("llama3:latest"), plus the bare name of each `:latest`."""
        reply = await self.get_json("/api/tags", headers=self.headers())
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

    async def health_check(self) -> bool:
        try:
            response = await self.client.get("/", headers=self.headers())
            if response.status_code == 200 and "ollama is running" in response.text.lower():
                return True
            await self.get_available_models()
            return True
        except Exception:  # health is a yes/no answer; the reason shows up on the next real call
            return False
