"""llmq's request as Bedrock's Converse API takes it: messages of content blocks, the system
prompt, `toolConfig`, `outputConfig`, `inferenceConfig`.

Shapes checked against botocore's bedrock-runtime service model (2023-09-30: `ConverseRequest`,
`ContentBlock`, `ImageBlock`, `ToolUseBlock`, `ToolResultBlock`, `CachePointBlock`,
`ToolConfiguration`, `ToolChoice`, `OutputConfig`, `InferenceConfiguration`) and the Bedrock
user guide (tool use, prompt caching, structured output):

- Blocks are objects with one member: `{"text"}`, `{"image": {"format", "source": {"bytes"}}}`
  (the bytes base64 in the JSON wire form), `{"toolUse": {"toolUseId", "name", "input"}}`,
  `{"toolResult": {"toolUseId", "content": [{"text"}]}}`, `{"cachePoint": {"type": "default"}}`.
- A cache breakpoint is a `cachePoint` block placed right after the block it closes (in the
  system prompt too).
- Images are bytes or S3 locations only: an https image cannot be sent (`UnsupportedRequest`).
- Turns alternate: same-role turns merge, a `tool` message is a `toolResult` block in a user
  turn, the tool results first.
- Converse requires `toolConfig` whenever the conversation holds toolUse or toolResult blocks,
  and has no `none` tool choice: with such blocks the tools go with the default (`auto`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmq.contract.messages import ImagePart, Message, TextPart
from llmq.contract.models import LLMRequest, Usage
from llmq.worker import errors
from llmq.worker.providers.features import ToolBlocks, ToolCallAssembler, ToolPlan, arguments_object, constrained_schema
from llmq.worker.providers.http import StreamState

#: Media types Converse's ImageBlock takes, as its `format` names them.
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}


class UnsupportedRequest(ValueError):
    """The request asks for something Converse cannot carry; the adapter refuses it as a bad request."""


def converse_messages(messages: list[Message], *, cache: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, messages). With `cache` false (a model without prompt caching) no cachePoint is sent."""
    system = [block for message in messages if message.role == "system" for group in content_groups(message, cache)
              for block in group]
    turns: list[tuple[str, list[list[dict[str, Any]]]]] = []
    for message in messages:
        if message.role == "system":
            continue
        groups = message_groups(message, cache)
        if not groups:
            continue  # Converse refuses a message without content
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(groups)
        else:
            turns.append((role, groups))
    return system, [
        # A group is a block and the cachePoint after it: sorting groups keeps each breakpoint in place.
        {"role": role, "content": [block for group in sorted(groups, key=lambda group: "toolResult" not in group[0])
                                   for block in group]}
        for role, groups in turns
    ]


def message_groups(message: Message, cache: bool) -> list[list[dict[str, Any]]]:
    if message.role == "tool":
        content = [block for group in content_groups(message, cache=False) for block in group] or [{"text": ""}]
        result = [{"toolResult": {"toolUseId": message.tool_call_id, "content": content}}]
        marked = next((part.cache_control for part in _parts(message) if part.cache_control), None)
        return [result + ([cache_point(marked.ttl)] if cache and marked else [])]
    groups = content_groups(message, cache)
    for call in message.tool_calls or ():
        groups.append([{"toolUse": {"toolUseId": call.id, "name": call.function.name, "input": arguments_object(call)}}])
    return groups


def content_groups(message: Message, cache: bool) -> list[list[dict[str, Any]]]:
    """Each text or image block of a message, followed by its cachePoint when it closes a cached prefix."""
    if isinstance(message.content, str) or message.content is None:
        return [[{"text": message.content}]] if message.content else []
    groups: list[list[dict[str, Any]]] = []
    for part in message.content:
        if isinstance(part, TextPart) and not part.text:
            continue  # Converse refuses blank text
        block = {"text": part.text} if isinstance(part, TextPart) else image_block(part)
        groups.append([block, cache_point(part.cache_control.ttl)] if cache and part.cache_control else [block])
    return groups


def _parts(message: Message) -> list[Any]:
    return list(message.content) if isinstance(message.content, list) else []


def image_block(part: ImagePart) -> dict[str, Any]:
    inline = part.image_url.inline
    if inline is None:
        raise UnsupportedRequest(
            "Bedrock Converse takes images as bytes, not by URL: send the image inline as a data: URL "
            "(data:image/png;base64,...)"
        )
    return {"image": {"format": IMAGE_FORMATS[inline.media_type], "source": {"bytes": inline.data_base64}}}


def cache_point(ttl: str | None) -> dict[str, Any]:
    return {"cachePoint": {"type": "default", **({"ttl": ttl} if ttl else {})}}


def has_tool_blocks(messages: list[dict[str, Any]]) -> bool:
    return any("toolUse" in block or "toolResult" in block for message in messages for block in message["content"])


def tool_config(plan: ToolPlan, *, history_has_tools: bool, strict: bool) -> dict[str, Any] | None:
    """`toolConfig`, or None when no tool may be called and none was."""
    if not plan.tools:
        if history_has_tools:
            raise UnsupportedRequest(
                "Bedrock Converse needs the tools' definitions when the conversation holds tool calls or "
                "results: send `tools` with this request"
            )
        return None
    if plan.choice is not None and plan.choice.kind == "none" and not history_has_tools:
        return None  # without tools the model cannot call one: Converse's way of saying none
    config: dict[str, Any] = {"tools": [
        {"toolSpec": {"name": tool.name, **({"description": tool.description} if tool.description else {}),
                      "inputSchema": {"json": tool.parameters}, **({"strict": True} if strict and tool.strict else {})}}
        for tool in plan.tools
    ]}
    if plan.choice is not None and plan.choice.kind != "none":
        kind = plan.choice.kind
        config["toolChoice"] = {"tool": {"name": plan.choice.name}} if kind == "tool" else {kind: {}}
    return config


def output_config(request: LLMRequest) -> dict[str, Any]:
    """`outputConfig` asking for an answer constrained to the request's JSON schema."""
    named = request.response_format.json_schema if request.response_format is not None else None
    assert named is not None
    definition: dict[str, Any] = {"schema": json.dumps(constrained_schema(named.schema_)), "name": named.name}
    if named.description:
        definition["description"] = named.description
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": definition}}}


def inference_config(request: LLMRequest, *, sampling: bool) -> dict[str, Any]:
    """maxTokens, stopSequences, and temperature or topP (models that refuse sampling settings get neither)."""
    config: dict[str, Any] = {"maxTokens": request.max_tokens}
    if sampling and request.top_p is not None:
        config["topP"] = request.top_p  # newer Claude models refuse temperature and top_p together
    elif sampling:
        config["temperature"] = request.temperature
    if request.stop:
        config["stopSequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    return config


#: ValidationException texts that mean the prompt does not fit the model.
CONTEXT_WINDOW_MARKERS = ("input is too long", "too many input tokens", "prompt is too long", "context window")
#: The ValidationException Bedrock gives for a model id it does not know.
UNKNOWN_MODEL_MARKERS = ("model identifier is invalid",)


@dataclass
class ConverseStreamState(StreamState):
    """What a ConverseStream has said so far; complete once messageStop and metadata came."""

    has_content: bool = False
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    latency_ms: int | None = None
    blocks: ToolBlocks = field(default_factory=lambda: ToolBlocks(ToolCallAssembler()))

    @property
    def complete(self) -> bool:
        return self.stop_reason is not None and self.usage is not None

    def take(self, event_type: str, payload: dict[str, Any]) -> str:
        """Fold one ConverseStream event in; the new answer text, if any."""
        index = int(payload.get("contentBlockIndex") or 0)
        if event_type == "contentBlockStart":
            start = payload.get("start") if isinstance(payload.get("start"), dict) else {}
            tool_use = start.get("toolUse")
            if isinstance(tool_use, dict):
                self.has_content = True
                self.pass_on(self.blocks.start(index, tool_use.get("toolUseId"), str(tool_use.get("name") or "")))
        elif event_type == "contentBlockDelta":
            delta = payload.get("delta") if isinstance(payload.get("delta"), dict) else {}
            text, tool_use = delta.get("text"), delta.get("toolUse")
            if isinstance(text, str) and text:
                self.has_content = True
                return text
            if isinstance(tool_use, dict):
                answer, call_delta = self.blocks.add(index, str(tool_use.get("input") or ""))
                self.pass_on(call_delta)
                return answer
        elif event_type == "contentBlockStop":
            return self.blocks.stop(index)
        elif event_type == "messageStop":
            self.stop_reason = str(payload.get("stopReason") or "")
        elif event_type == "metadata":
            usage = payload.get("usage")
            self.usage = usage if isinstance(usage, dict) else None
            metrics = payload.get("metrics")
            self.latency_ms = metrics.get("latencyMs") if isinstance(metrics, dict) else None
        # messageStart, reasoning deltas and unknown future events carry no answer text.
        return ""

    def pass_on(self, delta: Any) -> None:
        if delta is not None:
            self.deltas.append(delta)


def refine(error_class: type[errors.ProviderError], message: str) -> type[errors.ProviderError]:
    """ValidationException covers prompts too long and unknown models: give them their own class."""
    if error_class is not errors.BadRequestError:
        return error_class
    lowered = message.lower()
    if any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
        return errors.ContextWindowExceededError
    if any(marker in lowered for marker in UNKNOWN_MODEL_MARKERS):
        return errors.ModelNotFoundError
    return error_class


def bedrock_usage(usage: dict[str, Any]) -> Usage:
    """Bedrock's TokenUsage as llmq's Usage, prompt_tokens counting cached tokens too."""
    cache_read = _count(usage, "cacheReadInputTokens")
    cache_write = _count(usage, "cacheWriteInputTokens")
    prompt = _count(usage, "inputTokens") + cache_read + cache_write
    completion = _count(usage, "outputTokens")
    return Usage.of(
        prompt, completion, total_tokens=max(_count(usage, "totalTokens"), prompt + completion),
        cached_read_tokens=cache_read, cache_write_tokens=cache_write,
    )


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0
