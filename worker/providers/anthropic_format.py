"""llmq's request as Anthropic's Messages API takes it: turns of content blocks, the system
prompt, tools and the tool choice, JSON output.

Shapes checked against the official `anthropic` SDK's request types (`MessageCreateParams`,
`TextBlockParam`, `ImageBlockParam` with `Base64ImageSourceParam` / `URLImageSourceParam`,
`ToolUseBlockParam`, `ToolResultBlockParam`, `ToolParam`, `ToolChoice*Param`,
`CacheControlEphemeralParam`, `OutputConfigParam`) and the build-with-claude pages
(tool use, vision, prompt caching, structured outputs):

- No "system" role: system messages become the top-level `system`, a string, or a list of
  text blocks when one of them carries a cache breakpoint.
- Roles alternate: consecutive turns of one role are merged, and a `tool` message is a
  `tool_result` block in a user turn, so consecutive tool results share one user turn, as
  Anthropic requires (the results first, any text after them).
- A plain text turn stays a string, as it always was on the wire.
"""

from __future__ import annotations

from typing import Any

from llmq.contract.messages import ImagePart, Message, TextPart
from llmq.worker.providers.features import ToolChoiceSpec, ToolPlan, arguments_object, constrained_schema


def to_anthropic_messages(
    messages: list[Message], *, cache: bool = True
) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(system, turns): the system prompt split out, turns merged by role. With `cache` false (a
    model without prompt caching), breakpoints are left out."""
    system_blocks = [
        block for message in messages if message.role == "system" for block in content_blocks(message, cache)
    ]
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        blocks = message_blocks(message, cache)
        if not blocks:
            continue  # an empty turn adds nothing, and the API refuses empty content
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # Tool results open their user turn; sorted() keeps every other block in its order.
        turn["content"] = collapsed(sorted(turn["content"], key=lambda block: block["type"] != "tool_result"))
    if any("cache_control" in block for block in system_blocks):
        return system_blocks, turns
    return "\n\n".join(block["text"] for block in system_blocks) or None, turns


def message_blocks(message: Message, cache: bool) -> list[dict[str, Any]]:
    """One message's blocks: a tool message is its `tool_result`; an assistant's calls are `tool_use` blocks."""
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        blocks = content_blocks(message, cache)
        if blocks:
            result["content"] = collapsed(blocks)
        return [result]
    blocks = content_blocks(message, cache)
    for call in message.tool_calls or ():
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments_object(call)})
    return blocks


def content_blocks(message: Message, cache: bool) -> list[dict[str, Any]]:
    """Text and image blocks of a message's content, with their cache breakpoints."""
    content = message.content
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, TextPart):
            if not part.text:
                continue  # Anthropic refuses empty text blocks
            block: dict[str, Any] = {"type": "text", "text": part.text}
        else:
            block = image_block(part)
        if cache and part.cache_control is not None:
            block["cache_control"] = part.cache_control.model_dump(exclude_none=True)
        blocks.append(block)
    return blocks


def image_block(part: ImagePart) -> dict[str, Any]:
    """An inline image as a base64 source, an https one as a url source (Anthropic fetches it)."""
    inline = part.image_url.inline
    if inline is None:
        return {"type": "image", "source": {"type": "url", "url": part.image_url.url}}
    return {"type": "image", "source": {"type": "base64", "media_type": inline.media_type, "data": inline.data_base64}}


def collapsed(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Plain text blocks as one string (the shape a text turn always had); anything else as blocks."""
    if blocks and all(block.keys() == {"type", "text"} for block in blocks):
        return "\n\n".join(block["text"] for block in blocks)
    return blocks


def tool_fields(plan: ToolPlan, *, strict: bool) -> dict[str, Any]:
    """`tools` and `tool_choice`; `strict` tool inputs only where the model constrains them (`strict`)."""
    fields: dict[str, Any] = {}
    if plan.tools:
        fields["tools"] = [
            {"name": tool.name, **({"description": tool.description} if tool.description else {}),
             "input_schema": tool.parameters, **({"strict": True} if strict and tool.strict else {})}
            for tool in plan.tools
        ]
    if plan.choice is not None:
        fields["tool_choice"] = tool_choice(plan.choice)
    return fields


def tool_choice(choice: ToolChoiceSpec) -> dict[str, Any]:
    return {"type": "tool", "name": choice.name} if choice.kind == "tool" else {"type": choice.kind}


def output_format(schema: dict[str, Any]) -> dict[str, Any]:
    """`output_config` asking for an answer constrained to `schema` (structured outputs)."""
    return {"format": {"type": "json_schema", "schema": constrained_schema(schema)}}
