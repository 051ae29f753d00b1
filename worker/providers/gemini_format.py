"""Gemini's wire format as plain functions: turns, candidates, usage, stream records, error details.

The adapter (`llmq.worker.providers.gemini`) calls these; none of them does I/O
except `stream_records`, which only reads lines of a response already open.
Sources: https://ai.google.dev/api/generate-content, https://ai.google.dev/api/models,
and google.rpc's error details.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.messages import ImagePart, ImageURL, ToolCall
from llmq.contract.models import Message, Usage
from llmq.worker.providers.features import (
    arguments_object,
    calls_by_id,
    finish_reason,
    stable_tool_call_id,
    tool_call,
)
from llmq.worker.providers.gemini_schema import gemini_schema
from llmq.worker.providers.http import StreamState

#: Finish reasons meaning a filter stopped the answer (Candidate.FinishReason).
FILTER_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
#: Finish reasons of a function call Gemini could not make: no answer, worth asking again.
FAILED_CALL_FINISH_REASONS = frozenset({"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL"})
#: Google's documented stand-in for the thought signature of a function call replayed without
#: it (https://ai.google.dev/gemini-api/docs/thought-signatures): OpenAI's tool-call shape has no
#: place to carry the real one to the next turn, and Gemini 3 refuses a replayed call without one.
SKIP_THOUGHT_SIGNATURE = "skip_thought_signature_validator"
#: google.rpc.Code names -> HTTP status, for error objects that arrive without a code (in a stream).
STATUS_CODES = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
#: Lines that frame a JSON array of records rather than belong to one.
_ARRAY_PUNCTUATION = frozenset({"[", "]", ","})


def gemini_contents(messages: list[Message]) -> list[dict[str, Any]]:
    """Gemini `contents`: system messages left out (they go to `systemInstruction`), consecutive
    turns of one role merged, and a run of tool results as `functionResponse` parts in the order
    of the calls they answer (Gemini matches results to calls by name and order, not by id)."""
    calls = calls_by_id(messages)
    contents: list[dict[str, Any]] = []
    results: list[tuple[int, dict[str, Any]]] = []
    for message in messages:
        if message.role == "tool":
            site = calls[str(message.tool_call_id)]
            results.append((site.index, {"functionResponse": {"name": site.name, "response": {"output": message.text}}}))
            continue
        if results:
            _append_turn(contents, "user", [part for _, part in sorted(results, key=lambda result: result[0])])
            results = []
        if message.role != "system":
            _append_turn(contents, "model" if message.role == "assistant" else "user", message_parts(message))
    if results:
        _append_turn(contents, "user", [part for _, part in sorted(results, key=lambda result: result[0])])
    return contents


def _append_turn(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def message_parts(message: Message) -> list[dict[str, Any]]:
    """A user or assistant message's parts: text, images, and the assistant's function calls."""
    parts: list[dict[str, Any]] = []
    if isinstance(message.content, list):
        parts = [image_part(part.image_url) if isinstance(part, ImagePart) else {"text": part.text}
                 for part in message.content]
    elif message.content or not message.tool_calls:
        parts = [{"text": message.content or ""}]
    for number, call in enumerate(message.tool_calls or ()):
        part: dict[str, Any] = {"functionCall": {"name": call.function.name, "args": arguments_object(call)}}
        if number == 0:  # a step's signature travels on its first call
            part["thoughtSignature"] = SKIP_THOUGHT_SIGNATURE
        parts.append(part)
    return parts


def image_part(image: ImageURL) -> dict[str, Any]:
    """A data: image as `inlineData`, an https one as `fileData` (its type guessed from the path;
    `mimeType` is optional there)."""
    inline = image.inline
    if inline is not None:
        return {"inlineData": {"mimeType": inline.media_type, "data": inline.data_base64}}
    file_data = {"fileUri": image.url}
    media_type = mimetypes.guess_type(urlsplit(image.url).path)[0]
    if media_type and media_type.startswith("image/"):
        file_data["mimeType"] = media_type
    return {"fileData": file_data}


def candidate_text(candidate: dict[str, Any]) -> tuple[str, int]:
    """The answer text of a candidate and the number of thought parts left out of it."""
    texts: list[str] = []
    thoughts = 0
    for part in _parts(candidate):
        if part.get("thought") is True:
            thoughts += 1
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts), thoughts


def function_calls(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidate's `functionCall` objects, in order."""
    return [part["functionCall"] for part in _parts(candidate) if isinstance(part.get("functionCall"), dict)]


def call_of(function_call: dict[str, Any], response_id: str | None, index: int) -> ToolCall:
    """A functionCall in OpenAI's shape; Gemini's own id when it sent one, else one made from the answer."""
    name = str(function_call.get("name") or "")
    call_id = function_call.get("id") or stable_tool_call_id(response_id, index, name)
    return tool_call(str(call_id), name, function_call.get("args") or {})


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    parts = (candidate.get("content") or {}).get("parts") or []
    return [part for part in parts if isinstance(part, dict)]


def usage_from_metadata(metadata: dict[str, Any] | None) -> Usage:
    """Usage with thoughts inside completion_tokens, since Google bills them as output."""
    metadata = metadata or {}
    prompt = int(metadata.get("promptTokenCount") or 0) + int(metadata.get("toolUsePromptTokenCount") or 0)
    thoughts = int(metadata.get("thoughtsTokenCount") or 0)
    completion = int(metadata.get("candidatesTokenCount") or 0) + thoughts
    return Usage.of(
        prompt,
        completion,
        total_tokens=int(metadata.get("totalTokenCount") or 0) or prompt + completion,
        cached_read_tokens=int(metadata.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


async def stream_records(response: httpx.Response) -> AsyncIterator[str]:
    """JSON records of a `?alt=sse` stream.

    Each `data:` line is one GenerateContentResponse. An error that happens after the
    200 can arrive as a bare, pretty-printed JSON object spread over several lines (the
    official SDK buffers those by brace balance, google/genai/_api_client.py), so
    non-`data:` lines are gathered the same way.
    """
    pending: list[str] = []
    depth = 0
    async for line in response.aiter_lines():
        if not pending:
            if line.startswith("data:"):
                yield line[5:].strip()
                continue
            if _framing_only(line):
                continue
        pending.append(line)
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            yield "\n".join(pending)
            pending, depth = [], 0
    if pending:
        yield "\n".join(pending)  # an object cut short: fails to parse, so it raises


def _framing_only(line: str) -> bool:
    """A blank line, an SSE comment or field other than data, or JSON array punctuation."""
    stripped = line.strip()
    return not stripped or stripped in _ARRAY_PUNCTUATION or line.startswith((":", "event:", "id:", "retry:"))


def unwrap(body: Any) -> Any:
    # Some Google front ends wrap the error object in a one-element list.
    return body[0] if isinstance(body, list) and body else body


def error_object(body: Any) -> dict[str, Any]:
    body = unwrap(body)
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _details(error: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for detail in error.get("details") or []:
        if isinstance(detail, dict):
            yield detail


def detail_reasons(error: dict[str, Any]) -> set[str]:
    return {str(detail.get("reason")) for detail in _details(error) if detail.get("reason")}


def retry_delay_seconds(body: Any) -> float | None:
    """`retryDelay` of a google.rpc.RetryInfo detail ("37s", "0.5s"), as seconds."""
    for detail in _details(error_object(body)):
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def generate_content_models(models: list[Any]) -> Iterator[str]:
    for model in models:
        if not isinstance(model, dict) or "generateContent" not in (model.get("supportedGenerationMethods") or []):
            continue
        name = str(model.get("name") or "")
        if name:
            yield name.removeprefix("models/")


def answer_metadata(
    native_finish: str | None, response_id: str | None, model_version: str | None, thought_parts: int,
    *, called: bool = False,
) -> dict[str, Any]:
    """The metadata of an answer: llmq's finish reason (`tool_calls` when it called functions, which
    Gemini reports as STOP) and Google's own, ids, thought parts left out."""
    reason = "tool_calls" if called else finish_reason(native_finish) or (native_finish or "").lower() or None
    return {
        "finish_reason": reason,
        "native_finish_reason": native_finish,
        "response_id": response_id,
        "served_model": model_version,
        "thought_parts": thought_parts or None,
    }



class GeminiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_thoughts: bool = False
    thinking_budget: int | None = Field(default=None, ge=-1)
    #: None: responseJsonSchema for the models that take it, else responseSchema.
    structured_output: Literal["response_json_schema", "response_schema"] | None = None


@dataclass
class GeminiStreamState(StreamState):
    """What a stream has told so far: text seen, the latest usage, the finish reason."""

    text_seen: bool = False
    thought_parts: int = 0
    native_finish: str | None = None
    usage_metadata: dict[str, Any] | None = None
    response_id: str | None = None
    model_version: str | None = None
    calls_made: int = 0

    def take(self, chunk: dict[str, Any]) -> str:
        """Record one chunk; return its new answer text. Its function calls (Gemini streams each
        call whole, in a part of its own) go to `tool_calls`, their deltas to `deltas`."""
        # usageMetadata is cumulative in each chunk, so the last one holds the totals.
        self.usage_metadata = chunk.get("usageMetadata") or self.usage_metadata
        self.response_id = chunk.get("responseId") or self.response_id
        self.model_version = chunk.get("modelVersion") or self.model_version
        candidates = chunk.get("candidates") or []
        if not candidates or not isinstance(candidates[0], dict):
            return ""
        text, thoughts = candidate_text(candidates[0])
        for function_call in function_calls(candidates[0]):
            index = self.calls_made
            call = call_of(function_call, self.response_id, index)
            self.deltas.append(self.tool_calls.add(
                index, call_id=call.id, name=call.function.name, arguments=call.function.arguments))
            self.calls_made += 1
        self.thought_parts += thoughts
        self.native_finish = candidates[0].get("finishReason") or self.native_finish
        self.text_seen = self.text_seen or bool(text)
        return text


#: `tool_choice` words as Gemini's functionCallingConfig modes.
CALLING_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def model_resource(model: str) -> str:
    """"gemini-2.0-flash", "models/gemini-2.0-flash" and "tunedModels/x" all name a resource."""
    return model if "/" in model else f"models/{model}"


def function_declaration(function: Any) -> dict[str, Any]:
    """A tool as a FunctionDeclaration; parameters in Gemini's schema (left out when there are none:
    Gemini refuses an OBJECT without properties)."""
    declaration: dict[str, Any] = {"name": function.name}
    if function.description:
        declaration["description"] = function.description
    parameters = gemini_schema(function.parameters) if function.parameters else None
    if parameters and parameters.get("properties"):
        declaration["parameters"] = parameters
    return declaration


def calling_config(choice: Any) -> dict[str, Any]:
    """`tool_choice` as functionCallingConfig."""
    if isinstance(choice, str):
        return {"mode": CALLING_MODES[choice]}
    return {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}
