"""`POST /v1/embeddings`: OpenAI's Embeddings body <-> `LLMService.embed`, when the service has it.

Embeddings are a second kind of job that llmq's contract gains in issue 12
(`LLMService.embed(input, model=...)`, returning the vectors and the usage). Until the
running service has `embed`, the endpoint answers 501 `embeddings_not_served`; once it has,
the body is mapped here and the answer written in OpenAI's shape (`encoding_format:
"base64"`, which the OpenAI SDKs ask for by default, packs float32 little-endian).
"""

from __future__ import annotations

import base64
import inspect
import struct
from typing import Any

from llmq.client.service import LLMService
from llmq.http.errors import InvalidRequestError, NotServedError

ACCEPTED_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


def embed_method(service: LLMService) -> Any:
    embed = getattr(service, "embed", None)
    if embed is None:
        raise NotServedError(
            "embeddings are not served by this deployment yet (llmq's request contract gains them in issue 12)",
            code="embeddings_not_served",
        )
    return embed


def embedding_call(body: Any) -> dict[str, Any]:
    """Check an embeddings body; returns its fields (input, model, encoding_format, dimensions)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    for name in body:
        if name not in ACCEPTED_FIELDS:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
    for name in ("input", "model"):
        if not body.get(name):
            raise InvalidRequestError(f"'{name}' is required", param=name)
    if not isinstance(body["model"], str):
        raise InvalidRequestError("'model' must be a string", param="model")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError("encoding_format must be 'float' or 'base64'", param="encoding_format")
    return {**body, "encoding_format": encoding}


async def run_embedding(service: LLMService, call: dict[str, Any], caller: str) -> dict[str, Any]:
    embed = embed_method(service)
    options: dict[str, Any] = {"model": call["model"]}
    parameters = inspect.signature(embed).parameters
    if "metadata" in parameters:
        options["metadata"] = {"caller": caller}
    if call.get("dimensions") is not None and "dimensions" in parameters:
        options["dimensions"] = call["dimensions"]
    result = await embed(call["input"], **options)
    return embeddings_body(result, call["model"], call["encoding_format"])


def embeddings_body(result: Any, model: str, encoding_format: str) -> dict[str, Any]:
    vectors = _field(result, "embeddings", "vectors", "data")
    if vectors is None:
        vectors = result
    usage = _field(result, "usage")
    prompt_tokens = int(_field(usage, "prompt_tokens", "total_tokens") or 0) if usage is not None else 0
    data = [
        {"object": "embedding", "index": index, "embedding": _encode(_vector(vector), encoding_format)}
        for index, vector in enumerate(vectors)
    ]
    return {
        "object": "list", "data": data, "model": _field(result, "model") or model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _field(value: Any, *names: str) -> Any:
    for name in names:
        found = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
        if found is not None:
            return found
    return None


def _vector(item: Any) -> list[float]:
    found = _field(item, "embedding", "vector")
    return list(found if found is not None else item)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
