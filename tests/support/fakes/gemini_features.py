"""The request features of the fake Gemini API, as Google's API serves and checks them.

- `check_features(body, model)`: the 400s Gemini gives for a body it refuses: an unknown key in
  a part, a schema keyword its OpenAPI subset lacks (`additionalProperties`, ...), an OBJECT
  function parameter without properties, function responses that do not answer the previous
  turn's calls one for one and in order, and (Gemini 3) a replayed call without a thought signature
- `function_call(body, with_ids)`: the call a model makes while tools are on and the last turn
  is not a function response: the allowed (or first) function, arguments made from its schema
- `json_text(body, text)`: an answer made from `responseJsonSchema` / `responseSchema`
- `image_tokens(body)`: 258 prompt tokens per image part, Gemini's count for an image up to 384 px
- `embeddings_reply(body, model)`: `batchEmbedContents`
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from tests.support.fakes.openai import fake_vector, value_for_schema

PART_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought", "thoughtSignature"}
#: Keywords of Gemini's Schema object; any other is an "Unknown name" 400.
SCHEMA_KEYS = {
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "anyOf", "propertyOrdering", "default", "example",
}
TOKENS_PER_IMAGE = 258


def check_features(body: dict[str, Any], model: str) -> str | None:
    """Google's 400 message for a feature the body gets wrong, else None."""
    for where, schema in _schemas(body):
        problem = _schema_problem(schema, where)
        if problem:
            return problem
    for content in body.get("contents") or []:
        for part in content.get("parts") or []:
            problem = _part_problem(part, model)
            if problem:
                return problem
    return _responses_problem(body.get("contents") or [], model)


def _schemas(body: dict[str, Any]) -> list[tuple[str, Any]]:
    found = []
    config = body.get("generationConfig") or {}
    if "responseSchema" in config:
        found.append(("generation_config.response_schema", config["responseSchema"]))
    for tool in body.get("tools") or []:
        for number, declaration in enumerate(tool.get("functionDeclarations") or []):
            if "parameters" in declaration:
                where = f"tools[0].function_declarations[{number}].parameters"
                parameters = declaration["parameters"]
                if parameters.get("type") == "OBJECT" and not parameters.get("properties"):
                    return [(where, {"properties": None})]
                found.append((where, parameters))
    return found


def _schema_problem(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict):
        return None
    if schema.get("properties", {}) is None:
        return f"* GenerateContentRequest.{where}.properties: should be non-empty for OBJECT type\n"
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            return f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field."
        children = value.values() if key == "properties" else value if key == "anyOf" else [value] if key == "items" else []
        for child in children:
            problem = _schema_problem(child, where)
            if problem:
                return problem
    return None


def _part_problem(part: dict[str, Any], model: str) -> str | None:
    unknown = sorted(set(part) - PART_KEYS)
    if unknown:
        return f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'contents[0].parts[0]': Cannot find field."
    if "inlineData" in part:
        blob = part["inlineData"]
        if not blob.get("mimeType"):
            return "* GenerateContentRequest.contents[0].parts[0].inline_data.mime_type: mime_type is not specified\n"
        try:
            base64.b64decode(blob.get("data", ""), validate=True)
        except (binascii.Error, ValueError):
            return "Invalid value at 'contents[0].parts[0].inline_data.data' (TYPE_BYTES), Base64 decoding failed"
    if "fileData" in part and not part["fileData"].get("fileUri"):
        return "* GenerateContentRequest.contents[0].parts[0].file_data.file_uri: file_uri is not specified\n"
    return None


def _responses_problem(contents: list[dict[str, Any]], model: str) -> str | None:
    for index, content in enumerate(contents):
        calls = [part["functionCall"] for part in content.get("parts") or [] if "functionCall" in part]
        if content.get("role") != "model" or not calls:
            continue
        first_call = next(part for part in content["parts"] if "functionCall" in part)
        if model.startswith("gemini-3") and "thoughtSignature" not in first_call:
            return f"Function call is missing a thought_signature in functionCall parts. Position {index}."
        following = contents[index + 1]["parts"] if index + 1 < len(contents) else []
        answers = [part["functionResponse"] for part in following if "functionResponse" in part]
        if answers and [answer.get("name") for answer in answers] != [call.get("name") for call in calls]:
            return ("Please ensure that the number of function response parts is equal to the number of function "
                    "call parts of the function call turn.")
    return None


def function_call(body: dict[str, Any], *, with_ids: bool) -> dict[str, Any] | None:
    declarations = [declaration for tool in body.get("tools") or [] for declaration in tool.get("functionDeclarations") or []]
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    last = (body.get("contents") or [{}])[-1]
    if not declarations or config.get("mode") == "NONE" or any("functionResponse" in part for part in last.get("parts") or []):
        return None
    allowed = config.get("allowedFunctionNames") or [declaration["name"] for declaration in declarations]
    declaration = next(declaration for declaration in declarations if declaration["name"] == allowed[0])
    text = "".join(str(part.get("text", "")) for part in last.get("parts") or [])
    call: dict[str, Any] = {"name": declaration["name"],
                            "args": value_for_schema(lowered(declaration.get("parameters") or {"type": "object"}), text)}
    if with_ids:
        call["id"] = "fc-" + hashlib.sha256(json.dumps(body["contents"]).encode()).hexdigest()[:8]
    return call


def function_output(body: dict[str, Any]) -> str | None:
    """The output of the last turn's function response, which the model then answers."""
    for part in reversed((body.get("contents") or [{}])[-1].get("parts") or []):
        if "functionResponse" in part:
            return str((part["functionResponse"].get("response") or {}).get("output", ""))
    return None


def json_text(body: dict[str, Any], text: str) -> str | None:
    config = body.get("generationConfig") or {}
    if config.get("responseMimeType") != "application/json":
        return None
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    return json.dumps(value_for_schema(lowered(schema), text) if schema else {"answer": text})


def image_tokens(body: dict[str, Any]) -> int:
    parts = [part for content in body.get("contents") or [] for part in content.get("parts") or []]
    return TOKENS_PER_IMAGE * sum("inlineData" in part or "fileData" in part for part in parts)


def lowered(schema: Any) -> Any:
    """A Gemini schema with JSON Schema's lower-case type names, for `value_for_schema`."""
    if isinstance(schema, dict):
        return {key: (value.lower() if key == "type" and isinstance(value, str) else lowered(value))
                for key, value in schema.items()}
    if isinstance(schema, list):
        return [lowered(item) for item in schema]
    return schema


def embeddings_reply(body: Any, model: str, *, with_usage: bool) -> tuple[int, dict[str, Any]]:
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        return 400, {"error": {"code": 400, "message": "* BatchEmbedContentsRequest.requests: requests is required\n",
                               "status": "INVALID_ARGUMENT"}}
    vectors, tokens = [], 0
    for number, request in enumerate(requests):
        if request.get("model") != f"models/{model}":
            return 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                   f"Model in requests[{number}] does not match the model in the URL."}}
        text = "".join(part.get("text", "") for part in (request.get("content") or {}).get("parts") or [])
        vectors.append({"values": fake_vector(text, int(request.get("outputDimensionality") or 8))})
        tokens += len(text.split())
    reply: dict[str, Any] = {"embeddings": vectors}
    if with_usage:
        reply["usageMetadata"] = {"promptTokenCount": tokens, "totalTokenCount": tokens}
    return 200, reply
