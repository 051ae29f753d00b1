"""What the fake Bedrock does with request features, the way Converse and InvokeModel do.

- Checks a Converse body as the service does, with its ValidationException messages: known
  top-level keys, alternating turns, one member per content block, images (format, bytes),
  toolUse/toolResult only with `toolConfig`, each toolUse answered by a toolResult in the next
  turn, and only for models that have the feature: tools, `toolChoice` any/tool, images,
  `cachePoint`, `outputConfig.textFormat` (`MODEL_FEATURES`).
- Calls a tool when it has tools and the last user turn holds no toolResult: the named one,
  else the first, its input made from the tool's schema; answers `outputConfig.textFormat`
  with JSON made from the schema (the schema arrives as a JSON string, as the service takes it).
- Counts prompt tokens as words (85 an image), and caching as Bedrock reports it: the prompt
  up to the last `cachePoint` is written the first time and read after; `inputTokens` is the rest.
- Embeddings for Titan Text Embeddings (one `inputText`) and Cohere Embed (`texts`, `input_type`
  required), with the `X-Amzn-Bedrock-Input-Token-Count` header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from tests.support.fakes.base import count_words
from tests.support.fakes.openai import fake_vector, value_for_schema

CLAUDE_3 = "anthropic.claude-3-haiku-20240307-v1:0"
CLAUDE_4_5 = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
NOVA_MICRO = "amazon.nova-micro-v1:0"
LLAMA_3 = "meta.llama3-8b-instruct-v1:0"
#: What Converse lets each fake model do (the Bedrock user guide's model feature table).
MODEL_FEATURES: dict[str, frozenset[str]] = {
    CLAUDE_3: frozenset({"tools", "tool_choice", "vision"}),
    CLAUDE_4_5: frozenset({"tools", "tool_choice", "vision", "cache", "structured_output"}),
    NOVA_MICRO: frozenset({"tools", "tool_choice", "cache"}),
    LLAMA_3: frozenset(),
}
TITAN_V2 = "amazon.titan-embed-text-v2:0"
COHERE_V3 = "cohere.embed-english-v3"
EMBEDDING_MODELS = (TITAN_V2, COHERE_V3)
IMAGE_TOKENS = 85
TOP_LEVEL_KEYS = frozenset({
    "messages", "system", "inferenceConfig", "toolConfig", "outputConfig", "additionalModelRequestFields",
    "additionalModelResponseFieldPaths", "guardrailConfig", "performanceConfig", "requestMetadata", "serviceTier",
})
BLOCK_MEMBERS = frozenset({"text", "image", "toolUse", "toolResult", "cachePoint", "document", "reasoningContent"})

MUST_START_WITH_USER = (
    "A conversation must start with a user message. Try again with a conversation that starts with a user message."
)
MUST_ALTERNATE = (
    "A conversation must alternate between user and assistant roles. Make sure the conversation alternates "
    "between user and assistant roles and try again."
)
EMPTY_CONTENT = (
    "The content field in the Message object is empty. Add a ContentBlock object to the content field and try again."
)
NEEDS_TOOL_CONFIG = "The toolConfig field must be defined when using toolUse and toolResult content blocks."


def unsupported(field: str) -> str:
    return f"This model doesn't support the {field} field. Remove {field} and try again."


def converse_problem(body: Any, model: str) -> str | None:
    """The ValidationException message Converse gives for this body, if any."""
    if not isinstance(body, dict):
        return "Malformed input request, please reformat your input and try again."
    unknown = set(body) - TOP_LEVEL_KEYS
    if unknown:
        return f"Malformed input request: extraneous key [{sorted(unknown)[0]}] is not permitted"
    features = MODEL_FEATURES.get(model, frozenset())
    return (
        _turns_problem(body) or _system_problem(body) or _blocks_problem(body, features)
        or _tools_problem(body, features) or _output_problem(body, features)
        or (None if not set(body.get("inferenceConfig", {})) - {"maxTokens", "temperature", "topP", "stopSequences"}
            else "Malformed input request: unknown key in inferenceConfig")
    )


def _turns_problem(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return MUST_START_WITH_USER
    for index, message in enumerate(messages):
        if message.get("role") != ("user" if index % 2 == 0 else "assistant"):
            return MUST_ALTERNATE
        if not message.get("content"):
            return EMPTY_CONTENT
    return None


def _system_problem(body: dict[str, Any]) -> str | None:
    for block in body.get("system", []):
        if not isinstance(block, dict) or len(block) != 1 or not (isinstance(block.get("text"), str) or "cachePoint" in block):
            return "Malformed input request: system must be a list of SystemContentBlock"
    return None


def _blocks_problem(body: dict[str, Any], features: frozenset[str]) -> str | None:
    for index, message in enumerate(body["messages"]):
        for number, block in enumerate(message["content"]):
            where = f"messages.{index}.content.{number}"
            if not isinstance(block, dict) or len(block) != 1 or not set(block) <= BLOCK_MEMBERS:
                return f"Malformed input request: {where} must set exactly one ContentBlock member"
            if "text" in block and not block["text"].strip():
                return f"The text field in the ContentBlock object at {where} is blank. Add text to the text field, and try again."
            if "image" in block:
                problem = _image_problem(block["image"], features)
                if problem:
                    return problem
            if "cachePoint" in block and (number == 0 or "cache" not in features):
                return unsupported("cachePoint") if "cache" not in features else f"A cachePoint at {where} must follow a content block."
    if any("cachePoint" in block for block in body.get("system", [])) and "cache" not in features:
        return unsupported("cachePoint")
    return None


def _image_problem(image: dict[str, Any], features: frozenset[str]) -> str | None:
    if "vision" not in features:
        return "This model doesn't support the image content block that you provided. Try again with a supported model."
    if image.get("format") not in ("png", "jpeg", "gif", "webp"):
        return "Malformed input request: image.format must be one of png, jpeg, gif, webp"
    try:
        base64.b64decode(str((image.get("source") or {}).get("bytes", "")), validate=True)
    except (binascii.Error, ValueError):
        return "Malformed input request: image.source.bytes is not valid base64"
    return None


def _tools_problem(body: dict[str, Any], features: frozenset[str]) -> str | None:
    config = body.get("toolConfig")
    used = any("toolUse" in block or "toolResult" in block for message in body["messages"] for block in message["content"])
    if config is None:
        return NEEDS_TOOL_CONFIG if used else None
    if "tools" not in features:
        return "This model doesn't support tool use."
    choice = config.get("toolChoice") or {}
    for kind in ("any", "tool"):
        if kind in choice and "tool_choice" not in features:
            return unsupported(f"toolConfig.toolChoice.{kind}")
    names = {tool["toolSpec"]["name"] for tool in config.get("tools", [])}
    if "tool" in choice and choice["tool"].get("name") not in names:
        return f"The tool {choice['tool'].get('name')} in toolConfig.toolChoice is not defined in toolConfig.tools."
    return _pairing_problem(body["messages"])


def _pairing_problem(messages: list[dict[str, Any]]) -> str | None:
    for index, message in enumerate(messages):
        called = [block["toolUse"]["toolUseId"] for block in message["content"] if "toolUse" in block]
        answered = [block["toolResult"]["toolUseId"] for block in message["content"] if "toolResult" in block]
        previous = [block["toolUse"]["toolUseId"] for block in messages[index - 1]["content"] if "toolUse" in block] if index else []
        if len(answered) > len(previous) or not set(answered) <= set(previous):
            return (f"The number of toolResult blocks at messages.{index}.content exceeds the number of toolUse blocks "
                    "of previous turn.")
        following = messages[index + 1]["content"] if index + 1 < len(messages) else None
        if called and following is not None:
            missing = [call for call in called if call not in [block.get("toolResult", {}).get("toolUseId") for block in following]]
            if missing:
                return f"Expected toolResult blocks at messages.{index + 1}.content for the following Ids: {', '.join(missing)}"
    return None


def _output_problem(body: dict[str, Any], features: frozenset[str]) -> str | None:
    text_format = (body.get("outputConfig") or {}).get("textFormat")
    if text_format is None:
        return None
    if "structured_output" not in features:
        return unsupported("outputConfig.textFormat")
    schema = ((text_format.get("structure") or {}).get("jsonSchema") or {}).get("schema")
    if text_format.get("type") != "json_schema" or not isinstance(schema, str):
        return "Malformed input request: outputConfig.textFormat.structure.jsonSchema.schema must be a string"
    return None


# --- what the prompt costs ----------------------------------------------------------------


def block_tokens(block: dict[str, Any]) -> int:
    if "text" in block:
        return count_words(block["text"])
    if "image" in block:
        return IMAGE_TOKENS
    if "toolUse" in block:
        return count_words(json.dumps(block["toolUse"]["input"]))
    if "toolResult" in block:
        return sum(block_tokens(inner) for inner in block["toolResult"]["content"])
    if "toolSpec" in block:
        return count_words(json.dumps(block["toolSpec"]))
    return 0


def prompt_usage(body: dict[str, Any], cached: set[str]) -> dict[str, int]:
    """inputTokens after the last cachePoint, and the prefix before it written to or read from the cache."""
    blocks = [*(body.get("toolConfig") or {}).get("tools", []), *body.get("system", []),
              *[block for message in body["messages"] for block in message["content"]]]
    costs = [block_tokens(block) for block in blocks]
    marked = [index for index, block in enumerate(blocks) if "cachePoint" in block]
    if not marked:
        return {"inputTokens": sum(costs), "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0}
    prefix = sum(costs[: marked[-1]])
    key = hashlib.sha256(json.dumps(blocks[: marked[-1]], sort_keys=True).encode()).hexdigest()
    read = key in cached
    cached.add(key)
    return {"inputTokens": sum(costs) - prefix, "cacheReadInputTokens": prefix if read else 0,
            "cacheWriteInputTokens": 0 if read else prefix}


# --- what the model answers ---------------------------------------------------------------


def last_text(body: dict[str, Any]) -> str:
    """The text the answer responds to: the last text (or tool result) of the last user turn."""
    for block in reversed(body["messages"][-1]["content"]):
        if "text" in block:
            return str(block["text"])
        if "toolResult" in block:
            return " ".join(str(inner.get("text", "")) for inner in block["toolResult"]["content"])
    return ""


def tool_use(body: dict[str, Any], json_answers: list[str]) -> dict[str, Any] | None:
    """The toolUse block the model answers with, if it calls a tool now."""
    config = body.get("toolConfig")
    if not config or any("toolResult" in block for block in body["messages"][-1]["content"]):
        return None
    choice = config.get("toolChoice") or {}
    tools = [tool["toolSpec"] for tool in config["tools"]]
    spec = next(tool for tool in tools if tool["name"] == choice["tool"]["name"]) if "tool" in choice else tools[0]
    forced = "tool" in choice and json_answers
    tool_input = json.loads(json_answers.pop(0)) if forced else value_for_schema(spec["inputSchema"]["json"], last_text(body))
    digest = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:22]
    return {"toolUse": {"toolUseId": f"tooluse_{digest}", "name": spec["name"], "input": tool_input}}


def json_text(body: dict[str, Any], json_answers: list[str]) -> str | None:
    """The answer under outputConfig.textFormat: JSON made from its schema (or the next of json_answers)."""
    text_format = (body.get("outputConfig") or {}).get("textFormat")
    if text_format is None:
        return None
    if json_answers:
        return json_answers.pop(0)
    schema = json.loads(text_format["structure"]["jsonSchema"]["schema"])
    return json.dumps(value_for_schema(schema, last_text(body)))


# --- embeddings ---------------------------------------------------------------------------


def embedding_problem(model: str, body: Any) -> str | None:
    if not isinstance(body, dict):
        return "Malformed input request, please reformat your input and try again."
    if model.startswith("amazon.titan-embed"):
        extra = set(body) - {"inputText", "dimensions", "normalize", "embeddingTypes"}
        if extra or not isinstance(body.get("inputText"), str) or not body["inputText"]:
            return f"Malformed input request: #: extraneous key [{sorted(extra)[0]}] is not permitted" if extra else \
                "Malformed input request: #: required key [inputText] not found"
        if body.get("dimensions", 1024) not in (256, 512, 1024):
            return f"Malformed input request: #/dimensions: {body.get('dimensions')} is not a valid enum value"
        return None
    texts = body.get("texts")
    if not isinstance(texts, list) or not 1 <= len(texts) <= 96:
        return "Malformed input request: #/texts: expected between 1 and 96 texts"
    if body.get("input_type") not in ("search_document", "search_query", "classification", "clustering"):
        return "Malformed input request: #: required key [input_type] not found"
    return None


def embedding_reply(model: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the InvokeModel answer, the input tokens its header reports)."""
    if model.startswith("amazon.titan-embed"):
        vector = fake_vector(body["inputText"], int(body.get("dimensions", 1024)) // 64)  # short vectors keep tests fast
        tokens = count_words(body["inputText"])
        return {"embedding": vector, "inputTextTokenCount": tokens, "embeddingsByType": {"float": vector}}, tokens
    vectors = [fake_vector(text, 16) for text in body["texts"]]
    tokens = sum(count_words(text) for text in body["texts"])
    embeddings: Any = {"float": vectors} if body.get("embedding_types") else vectors
    reply = {"id": "emb-" + hashlib.sha256(json.dumps(body).encode()).hexdigest()[:12], "texts": body["texts"],
             "embeddings": embeddings, "response_type": "embeddings_by_type" if body.get("embedding_types") else "embeddings_floats"}
    return reply, tokens
