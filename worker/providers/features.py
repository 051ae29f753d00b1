"""Helpers every adapter shares to translate llmq's request features to its wire format and back.

The request side is OpenAI's Chat Completions shapes (`llmq.contract.messages`); an adapter
whose provider speaks another format reads them through these helpers rather than by hand:

- `FINISH_REASONS` / `finish_reason(native)`: a provider's stop reason in llmq's four words
  (`stop`, `length`, `tool_calls`, `content_filter`), None when it is none of them
- `arguments_json(value)` / `arguments_object(call)`: tool-call arguments as OpenAI's JSON
  string (from a provider that sends an object: Anthropic `tool_use.input`, Gemini
  `functionCall.args`) and back (for a provider that wants an object on the way in)
- `ToolCallAssembler`: the pieces of streamed tool calls, by index, into whole calls at the
  end (OpenAI deltas, Anthropic `input_json_delta`, Gemini parts each come as pieces)
- `ImageURL.inline` (in the contract): a data: image's media type and bytes, for
  providers with inline image blocks; an https image is `image.url`
- `new_tool_call_id()`: a fresh id; `stable_tool_call_id(...)`: an id made from the answer, the
  same each time, for providers whose calls come without one (Gemini, Ollama, TGI)
- `embedding_usage(texts, counted)`: an embedding answer's usage, the provider's count or, for a
  provider that sends none (Gemini at times), llmq's estimate, said to be one
- `calls_by_id(messages)`: each earlier tool call's function name and place, for providers that
  match a tool's result to its call by name and order rather than by id (Gemini, Ollama)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmq.contract.messages import FunctionCall, Message, ToolCall, ToolCallDelta
from llmq.contract.models import FinishReason, Usage
from llmq.worker.tokens import estimate_tokens

#: Native stop reasons of every provider llmq speaks to, in llmq's words (case as the provider sends them).
FINISH_REASONS: dict[str, FinishReason] = {
    # OpenAI and every Chat Completions dialect
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
    "content_filter": "content_filter",
    # Anthropic Messages, Bedrock Converse
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
    # Gemini
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    # TGI, Ollama
    "eos_token": "stop", "eos": "stop",
}
#: What `LLMResponse.finish_reason` may hold.
CANONICAL_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "tool_calls", "content_filter"})


def finish_reason(native: Any) -> FinishReason | None:
    """A provider's stop reason in llmq's words; None when it has none or means something else."""
    return FINISH_REASONS.get(native) if isinstance(native, str) else None


def arguments_json(value: Any) -> str:
    """Tool-call arguments as OpenAI carries them: a JSON string (an object is encoded, a string kept)."""
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, separators=(",", ":"), ensure_ascii=False)


def arguments_object(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as an object, for providers that take one; text that is not a JSON
    object (a model can write that) is kept under "arguments" rather than lost."""
    try:
        value = call.parsed_arguments()
    except ValueError:
        return {"arguments": call.function.arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def stable_tool_call_id(answer_id: object, *parts: object) -> str:
    """An id for a call its provider sent without one, made from the answer's own id and what
    places the call in it (position, name): a stream's deltas and its final calls agree on it, and
    the same answer read twice gets the same id. Without an answer id, a fresh one (two answers
    must never share a call id)."""
    if not answer_id:
        return new_tool_call_id()
    digest = hashlib.sha256("\x1f".join(str(part) for part in (answer_id, *parts)).encode()).hexdigest()[:24]
    return f"call_{digest}"


def embedding_usage(texts: list[str], counted: int) -> tuple[Usage, dict[str, Any]]:
    """The usage of an embedding answer and the metadata to say so: the provider's token count,
    or llmq's estimate of the texts when it sent none (`usage_estimated`)."""
    if counted:
        return Usage.of(counted, 0), {}
    return Usage.of(sum(estimate_tokens(text) for text in texts), 0), {"usage_estimated": True}


@dataclass(frozen=True)
class CallSite:
    """Where a tool call was made: its function's name, and its place among its message's calls."""

    name: str
    index: int


def calls_by_id(messages: Iterable[Message]) -> dict[str, CallSite]:
    """The tool calls of a conversation's assistant messages, by id: what a `tool` message answers,
    for providers whose tool results name the function instead of the call (Gemini, Ollama)."""
    return {
        call.id: CallSite(call.function.name, index)
        for message in messages if message.tool_calls
        for index, call in enumerate(message.tool_calls)
    }


def tool_call(call_id: str | None, name: str, arguments: Any) -> ToolCall:
    """A whole call in OpenAI's shape, from any provider's pieces."""
    return ToolCall(id=call_id or new_tool_call_id(), function=FunctionCall(name=name, arguments=arguments_json(arguments)))


@dataclass
class _PartialCall:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class ToolCallAssembler:
    """Streamed tool-call pieces in, whole calls out. `add` takes one piece and returns the
    delta to pass on to the caller (OpenAI's shape); `calls()` gives the whole calls at the end."""

    _calls: dict[int, _PartialCall] = field(default_factory=dict)

    def add(self, index: int, *, call_id: str | None = None, name: str | None = None, arguments: str | None = None) -> ToolCallDelta:
        partial = self._calls.setdefault(index, _PartialCall())
        first = partial.id is None and call_id is not None
        if call_id:
            partial.id = partial.id or call_id
        if name:
            partial.name += name
        if arguments:
            partial.arguments.append(arguments)
        return ToolCallDelta.model_validate({
            "index": index, "id": call_id if first else None, "type": "function" if first else None,
            "function": {"name": name or None, "arguments": arguments or None},
        })

    def add_delta(self, raw: dict[str, Any]) -> ToolCallDelta:
        """One entry of OpenAI's `delta.tool_calls`."""
        function = raw.get("function") if isinstance(raw.get("function"), dict) else {}
        return self.add(
            int(raw.get("index") or 0), call_id=raw.get("id") or None, name=function.get("name") or None,
            arguments=function.get("arguments") or None,
        )

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> list[ToolCall] | None:
        if not self._calls:
            return None
        return [
            tool_call(partial.id, partial.name, "".join(partial.arguments))
            for _, partial in sorted(self._calls.items())
        ]
