"""Gemini's wire format as plain functions: turns, candidates, usage, stream records, error details.

The adapter (`llmq.worker.providers.gemini`) calls these; none of them does I/O
except `stream_records`, which only reads lines of a response already open.
Sources: https://ai.google.dev/api/generate-content, https://ai.google.dev/api/models,
and google.rpc's error details.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from llmq.contract.models import Message, Usage

#: Finish reasons meaning a filter stopped the answer (Candidate.FinishReason).
FILTER_FINISH_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
#: Google's finish reasons in the vocabulary the rest of llmq uses.
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", **{reason: "content_filter" for reason in FILTER_FINISH_REASONS}
}
#: google.rpc.Code names -> HTTP status, for error objects that arrive without a code (in a stream).
STATUS_CODES = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
#: Lines that frame a JSON array of records rather than belong to one.
_ARRAY_PUNCTUATION = frozenset({"[", "]", ","})


def merged_contents(messages: list[Message]) -> list[dict[str, Any]]:
    """Gemini `contents`: consecutive turns of one role become one turn with several parts."""
    contents: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "model" if message.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": message.text})
        else:
            contents.append({"role": role, "parts": [{"text": message.text}]})
    return contents


def candidate_text(candidate: dict[str, Any]) -> tuple[str, int]:
    """The answer text of a candidate and the number of thought parts left out of it."""
    parts = (candidate.get("content") or {}).get("parts") or []
    texts: list[str] = []
    thoughts = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("thought") is True:
            thoughts += 1
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts), thoughts


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
    native_finish: str | None, response_id: str | None, model_version: str | None, thought_parts: int
) -> dict[str, Any]:
    """The metadata of an answer: llmq's finish reason and Google's own, ids, thought parts left out."""
    return {
        "finish_reason": FINISH_REASONS.get(native_finish or "", (native_finish or "").lower() or None),
        "native_finish_reason": native_finish,
        "response_id": response_id,
        "served_model": model_version,
        "thought_parts": thought_parts or None,
    }
