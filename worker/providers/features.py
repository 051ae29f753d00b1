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

For providers whose tools are blocks with their own ids (Anthropic `tool_use`, Bedrock `toolUse`):

- `tool_plan(request, native_json=)`: the tools to send and the tool choice, in the words those
  providers share (auto, any, none, tool); when JSON is asked for and the model has no JSON mode
  of its own, a forced `json_answer` tool whose input is the answer (`JSONAnswerTool`;
  `answer_tool_for(config, request)` finds it again when the answer comes back)
- `ToolBlocks`: tool-use blocks, streamed or whole, by block index, into OpenAI's calls and
  deltas; the answer tool's input comes out as answer text instead of a call
- `constrained_schema(schema)`: a JSON schema in the subset constrained decoding takes
  (Anthropic structured outputs, Bedrock `textFormat`)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmq.contract.capabilities import capabilities_for
from llmq.contract.config import ProviderConfig
from llmq.contract.messages import FunctionCall, Message, ResponseFormat, ToolCall, ToolCallDelta
from llmq.contract.models import FinishReason, LLMRequest, Usage
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


def reported_finish_reason(native: Any) -> str | None:
    """What an adapter reports in metadata: llmq's word for a native stop reason, else the native one
    (`pause_turn`, `malformed_tool_use`), which the response's `finish_reason` field leaves out."""
    return finish_reason(native) or (native if isinstance(native, str) and native else None)


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


# --- tools as blocks, and JSON by a forced tool (Anthropic, Bedrock Converse) ---------

#: The tool a JSON answer is asked for by, on a model without a JSON mode of its own.
ANSWER_TOOL_NAME = "json_answer"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool as providers with `input_schema`-style definitions take it."""

    name: str
    description: str | None
    #: A JSON Schema of an object: tool inputs are objects.
    parameters: dict[str, Any]
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolChoiceSpec:
    """A tool choice in the words Anthropic and Bedrock share: `auto`, `any` (some tool), `none`,
    or `tool` (the one named)."""

    kind: Literal["auto", "any", "none", "tool"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class JSONAnswerTool:
    """The tool whose input is the answer, when JSON is asked for by a forced call."""

    spec: ToolSpec
    #: The schema's root is not an object, which a tool input must be: the answer sits under "value".
    wrapped: bool = False

    def answer_text(self, arguments: str) -> str:
        """The answer as JSON text, from the call's arguments (a JSON string)."""
        if not self.wrapped:
            return arguments
        try:
            value = json.loads(arguments or "{}")
        except ValueError:
            return arguments  # not JSON: the engine says so with an OutputValidationError
        return arguments_json(value.get("value") if isinstance(value, dict) else value)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What to send: the tools (the caller's, and the answer tool when JSON goes by a tool), the choice."""

    tools: list[ToolSpec]
    choice: ToolChoiceSpec | None
    answer_tool: JSONAnswerTool | None = None


def tool_plan(request: LLMRequest, *, native_json: bool) -> ToolPlan:
    """The tools and tool choice for a provider whose tools are blocks; JSON by a forced tool
    unless the model constrains JSON by itself (`native_json`, for a json_schema)."""
    tools = [
        ToolSpec(tool.function.name, tool.function.description,
                 tool.function.parameters or {"type": "object", "properties": {}}, bool(tool.function.strict))
        for tool in request.tools or ()
    ]
    choice = _choice_spec(request.tool_choice)
    response_format = request.response_format
    native = native_json and response_format is not None and response_format.type == "json_schema"
    if response_format is None or not response_format.wants_json or native:
        return ToolPlan(tools, choice)
    answer = json_answer_tool(response_format, taken={tool.name for tool in tools})
    if choice is not None and choice.kind in ("any", "tool"):
        return ToolPlan(tools, choice)  # a call is required first; the JSON answer comes on a later turn
    if tools and (choice is None or choice.kind == "auto"):
        forced = ToolChoiceSpec("any")  # a tool of the caller's, or the answer
    else:
        forced = ToolChoiceSpec("tool", answer.spec.name)
    return ToolPlan([*tools, answer.spec], forced, answer)


def answer_tool_for(config: ProviderConfig, request: LLMRequest) -> JSONAnswerTool | None:
    """The forced tool a request's JSON answer comes through on this entry's model, if it goes by one."""
    if request.response_format is None:
        return None
    return tool_plan(request, native_json=capabilities_for(config, request.model).native_json_schema).answer_tool


def _choice_spec(choice: Any) -> ToolChoiceSpec | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return ToolChoiceSpec("any" if choice == "required" else choice)  # type: ignore[arg-type]
    return ToolChoiceSpec("tool", choice.function.name)


def json_answer_tool(response_format: ResponseFormat, *, taken: frozenset[str] | set[str] = frozenset()) -> JSONAnswerTool:
    """The forced tool for a JSON answer: its input schema is the response's schema (an object)."""
    name = ANSWER_TOOL_NAME
    while name in taken:  # never shadow one of the caller's tools
        name = "_" + name
    named, schema = response_format.json_schema, response_format.schema_dict
    description = "Give your final answer by calling this tool: its input is the answer"
    if named is not None:
        description += f" ({named.name}{': ' + named.description if named.description else ''})"
    if schema is None:
        return JSONAnswerTool(ToolSpec(name, description, {"type": "object"}))
    if schema.get("type") == "object":
        return JSONAnswerTool(ToolSpec(name, description, schema))
    wrapped = {"type": "object", "properties": {"value": schema}, "required": ["value"]}
    return JSONAnswerTool(ToolSpec(name, description, wrapped), wrapped=True)


@dataclass
class ToolBlocks:
    """Tool-use blocks by the provider's block index (Anthropic `tool_use`, Converse `toolUse`), whole
    or streamed as a start and input fragments: calls in OpenAI's shape (by call ordinal, in `calls`),
    except the answer tool's, whose input is answer text."""

    calls: ToolCallAssembler
    answer_tool: JSONAnswerTool | None = None
    answered: bool = False
    _ordinals: dict[int, int] = field(default_factory=dict)
    _answer_block: int | None = None
    _answer_parts: list[str] = field(default_factory=list)

    def start(self, block: int, call_id: str | None, name: str) -> ToolCallDelta | None:
        """A tool-use block opens: the delta that names the call (None for the answer tool)."""
        if self.answer_tool is not None and name == self.answer_tool.spec.name:
            self._answer_block, self.answered = block, True
            return None
        ordinal = self._ordinals.setdefault(block, len(self._ordinals))
        return self.calls.add(ordinal, call_id=call_id, name=name)

    def add(self, block: int, fragment: str) -> tuple[str, ToolCallDelta | None]:
        """A piece of a block's input JSON: (answer text, call delta), either may be empty."""
        if not fragment:
            return "", None
        if block == self._answer_block:
            if self.answer_tool is not None and self.answer_tool.wrapped:
                self._answer_parts.append(fragment)  # unwrapped once whole, at stop
                return "", None
            return fragment, None
        if block not in self._ordinals:
            return "", None  # input of a block that never started as a tool call
        return "", self.calls.add(self._ordinals[block], arguments=fragment)

    def stop(self, block: int) -> str:
        """A block closes: the answer text held back until now (a wrapped answer), if any."""
        if block != self._answer_block or not self._answer_parts or self.answer_tool is None:
            return ""
        text, self._answer_parts = self.answer_tool.answer_text("".join(self._answer_parts)), []
        return text

    def whole(self, block: int, call_id: str | None, name: str, tool_input: Any) -> str:
        """A whole block (a non-streamed answer): the answer text it carries, if it is the answer tool."""
        self.start(block, call_id, name)
        text, _ = self.add(block, arguments_json(tool_input))
        return text + self.stop(block)

    def finish_reason(self, native: Any) -> str | None:
        """The finish reason to report: an answer given through the answer tool alone is a `stop`."""
        reported = reported_finish_reason(native)
        return "stop" if reported == "tool_calls" and self.answered and not self.calls else reported


#: What constrained decoding takes as it is (Anthropic's structured outputs, as its SDK's
#: `transform_schema` sends it; Bedrock `textFormat`); other keywords go into the description.
_CONSTRAINED_KEYWORDS = frozenset({"type", "required", "enum", "const", "description", "title", "$ref"})
_CONSTRAINED_FORMATS = frozenset({
    "date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid",
})


def constrained_schema(schema: Any) -> Any:
    """A schema in the subset constrained decoding takes: every object closed (`additionalProperties:
    false`), `oneOf` as `anyOf`, and what it lacks (`minimum`, `pattern`, ...) moved into the
    description as a hint. The engine still checks the answer against the caller's own schema."""
    if not isinstance(schema, dict):
        return schema
    kept: dict[str, Any] = {}
    hints: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            kept[key] = {name: constrained_schema(child) for name, child in value.items()}
        elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
            kept["allOf" if key == "allOf" else "anyOf"] = [constrained_schema(child) for child in value]
        elif key == "items":
            kept[key] = constrained_schema(value)
        elif key in _CONSTRAINED_KEYWORDS or (key == "format" and value in _CONSTRAINED_FORMATS) \
                or (key == "minItems" and value in (0, 1)):
            kept[key] = value
        elif key != "additionalProperties":
            hints[key] = value
    if kept.get("type") == "object" or "properties" in kept:
        kept["additionalProperties"] = False
    if hints:
        hint = "{" + ", ".join(f"{key}: {value}" for key, value in hints.items()) + "}"
        kept["description"] = f"{kept['description']}\n\n{hint}" if kept.get("description") else hint
    return kept
