"""What the fake Anthropic does with request features, the way the Messages API does.

- Refuses, with the API's 400 messages, what the API refuses cheaply checked: a tool without
  an object `input_schema`, `tool_choice` without tools or naming an unknown tool, an empty
  text block, an image of another media type or with bad base64, a `tool_use` whose
  `tool_result` is not at the start of the next user turn, a `tool_result` answering no call,
  more than 4 `cache_control` breakpoints, and `output_config.format` on a model without
  structured outputs.
- Calls a tool when it has tools (and `tool_choice` is not `none`) and the last user turn holds
  no `tool_result`: the named tool, else the first; its input made from the tool's schema.
  After a tool result it answers in text that quotes the result.
- Answers `output_config.format` with JSON made from the schema.
- Counts prompt tokens as words (a flat 85 per image), and prompt caching as Anthropic reports
  it: the prompt up to the last breakpoint (tools, then system, then messages) is written to
  the cache the first time it is seen and read from it after; `input_tokens` is the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from tests.support.fakes.base import count_words
from tests.support.fakes.openai import value_for_schema

IMAGE_TOKENS = 85
MAX_CACHE_BREAKPOINTS = 4
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def blocks_of(content: Any) -> list[dict[str, Any]]:
    """A turn's or a tool result's content as blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [block for block in content or [] if isinstance(block, dict)]


def block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text") or "")
    if block.get("type") == "tool_result":
        return " ".join(block_text(inner) for inner in blocks_of(block.get("content") or ""))
    if block.get("type") == "tool_use":
        return f"{block.get('name')} {json.dumps(block.get('input'))}"
    return ""


def body_problem(body: dict[str, Any], *, structured_output_models: set[str]) -> str | None:
    """The message of the 400 the API gives for a feature misused in `body`, if any."""
    return (
        _tools_problem(body) or _blocks_problem(body) or _pairing_problem(body["messages"])
        or _cache_problem(body) or _output_problem(body, structured_output_models)
    )


def _tools_problem(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    for index, tool in enumerate(tools):
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{index}.custom.input_schema.type: Input should be 'object'"
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if not tools:
        return "tool_choice may only be specified while providing tools."
    if choice.get("type") not in ("auto", "any", "none", "tool"):
        return "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"
    if choice.get("type") == "tool" and choice.get("name") not in {tool.get("name") for tool in tools}:
        return f"tool_choice: Tool '{choice.get('name')}' not found in provided tools"
    return None


def _blocks_problem(body: dict[str, Any]) -> str | None:
    system = body.get("system")
    places = [("system", block) for block in (system if isinstance(system, list) else [])]
    for index, message in enumerate(body["messages"]):
        if isinstance(message.get("content"), list):
            places += [(f"messages.{index}.content.{number}", block) for number, block in enumerate(message["content"])]
    for where, block in places:
        if block.get("type") == "text" and not block.get("text"):
            return "messages: text content blocks must be non-empty"
        if block.get("type") == "image":
            problem = _image_problem(block.get("source") or {})
            if problem:
                return f"{where}.image.source: {problem}"
    return None


def _image_problem(source: dict[str, Any]) -> str | None:
    if source.get("type") == "url":
        return None if str(source.get("url", "")).startswith("https://") else "Only HTTPS URLs are supported."
    if source.get("type") != "base64":
        return "Input tag does not match any of the expected tags: 'base64', 'url', 'file'"
    if source.get("media_type") not in IMAGE_MEDIA_TYPES:
        return f"base64.media_type: Input should be {', '.join(repr(kind) for kind in IMAGE_MEDIA_TYPES)}"
    try:
        base64.b64decode(str(source.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        return "base64.data: The image data is not valid base64."
    return None


def _pairing_problem(messages: list[dict[str, Any]]) -> str | None:
    """Each tool_use is answered by a tool_result at the start of the very next user turn, and only then."""
    for index, message in enumerate(messages):
        blocks = blocks_of(message.get("content"))
        calls = [block["id"] for block in blocks if block.get("type") == "tool_use"]
        following = blocks_of(messages[index + 1].get("content")) if index + 1 < len(messages) else []
        leading: list[str] = []
        for block in following:
            if block.get("type") != "tool_result":
                break
            leading.append(str(block.get("tool_use_id")))
        missing = [call for call in calls if call not in leading]
        if message.get("role") == "assistant" and missing and index + 1 < len(messages):
            return (f"messages.{index + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in "
                    "the next message.")
        previous = blocks_of(messages[index - 1].get("content")) if index else []
        asked = {block.get("id") for block in previous if block.get("type") == "tool_use"}
        for number, block in enumerate(blocks):
            if block.get("type") == "tool_result" and block.get("tool_use_id") not in asked:
                return (f"messages.{index}.content.{number}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message.")
    return None


def _cache_problem(body: dict[str, Any]) -> str | None:
    found = sum("cache_control" in block for block in prompt_blocks(body))
    if found > MAX_CACHE_BREAKPOINTS:
        return f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
    return None


def _output_problem(body: dict[str, Any], structured_output_models: set[str]) -> str | None:
    output_format = (body.get("output_config") or {}).get("format")
    if output_format is None:
        return None
    if body["model"] not in structured_output_models:
        return f"'{body['model']}' does not support output_config.format (structured outputs)"
    if output_format.get("type") != "json_schema" or not isinstance(output_format.get("schema"), dict):
        return "output_config.format: schema is required for type 'json_schema'"
    return None


# --- what the prompt costs --------------------------------------------------------------


def prompt_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every block of the prompt in cache order: tools, system, messages (tool results inside theirs)."""
    blocks: list[dict[str, Any]] = [{"type": "tool", **tool} for tool in body.get("tools") or []]
    blocks += blocks_of(body.get("system") or []) if body.get("system") else []
    for message in body["messages"]:
        for block in blocks_of(message.get("content")):
            blocks.append(block)
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                blocks += blocks_of(block["content"])
    return blocks


def block_tokens(block: dict[str, Any]) -> int:
    if block.get("type") == "image":
        return IMAGE_TOKENS
    if block.get("type") == "tool":
        return count_words(json.dumps(block.get("input_schema"))) + count_words(str(block.get("name")))
    if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
        return 0  # its inner blocks are counted themselves
    text = block_text(block)
    return count_words(text) if text else 0


def prompt_and_prefix(body: dict[str, Any]) -> tuple[int, int, str | None]:
    """(prompt tokens, tokens up to the last cache breakpoint, a key of that prefix)."""
    blocks = prompt_blocks(body)
    costs = [block_tokens(block) for block in blocks]
    marked = [index for index, block in enumerate(blocks) if "cache_control" in block]
    if not marked:
        return sum(costs), 0, None
    end = marked[-1] + 1
    key = hashlib.sha256(json.dumps([body["model"], blocks[:end]], sort_keys=True).encode()).hexdigest()
    return sum(costs), sum(costs[:end]), key


# --- what the model answers ---------------------------------------------------------------


def last_user_text(body: dict[str, Any]) -> str:
    """The text the answer responds to: the last user turn's text and tool results."""
    last = next((message for message in reversed(body["messages"]) if message["role"] == "user"), {"content": ""})
    return " ".join(text for text in (block_text(block) for block in blocks_of(last.get("content"))) if text)


def tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the model calls now, if any: the named one, else the first; none after a tool result."""
    tools, choice = body.get("tools") or [], body.get("tool_choice") or {"type": "auto"}
    if not tools or choice.get("type") == "none":
        return None
    last = body["messages"][-1]
    if last["role"] == "user" and any(block.get("type") == "tool_result" for block in blocks_of(last.get("content"))):
        return None
    name = choice.get("name") if choice.get("type") == "tool" else tools[0]["name"]
    return next(tool for tool in tools if tool["name"] == name)


def tool_input(body: dict[str, Any], tool: dict[str, Any], text: str, json_answers: list[str]) -> Any:
    """A call's input: made from the tool's schema, or the next of `json_answers` for a forced call."""
    if json_answers and (body.get("tool_choice") or {}).get("type") == "tool":
        return json.loads(json_answers.pop(0))
    return value_for_schema(tool["input_schema"], text)


def json_answer(body: dict[str, Any], text: str, json_answers: list[str]) -> str | None:
    """The answer under `output_config.format`: JSON made from its schema (or the next of `json_answers`)."""
    output_format = (body.get("output_config") or {}).get("format")
    if output_format is None:
        return None
    return json_answers.pop(0) if json_answers else json.dumps(value_for_schema(output_format["schema"], text))


def tool_use_id(body: dict[str, Any]) -> str:
    return "toolu_01" + hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:22]
