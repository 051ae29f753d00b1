"""Embeddings on Bedrock: InvokeModel (`POST /model/{modelId}/invoke`) with each model family's
own body, from the Bedrock user guide's model parameters pages:

- Amazon Titan Text Embeddings (`amazon.titan-embed-text-v2:0`, `-v1`): one text per call,
  `{"inputText", "dimensions" (v2: 256, 512 or 1024), "normalize"}` ->
  `{"embedding": [...], "inputTextTokenCount"}`.
- Cohere Embed (`cohere.embed-english-v3`, `cohere.embed-multilingual-v3`, `cohere.embed-v4:0`):
  up to 96 texts per call, `{"texts", "input_type", "truncate", "embedding_types": ["float"],
  "output_dimension" (v4)}` -> `{"embeddings": {"float": [[...]]}}` (or, without
  embedding_types, `{"embeddings": [[...]]}`). `input_type` is required: `search_document`
  unless the request's provider_options say otherwise (`search_query` for queries).

Token counts come in the `X-Amzn-Bedrock-Input-Token-Count` header of every InvokeModel answer.
"""

from __future__ import annotations

from typing import Any

#: Texts per Cohere Embed call (its limit); Titan takes one.
COHERE_TEXTS_PER_CALL = 96
#: InvokeModel calls in flight for one embedding job (Titan needs one per text).
CONCURRENT_CALLS = 8
INPUT_TOKENS_HEADER = "x-amzn-bedrock-input-token-count"
#: The provider_options each family takes (sent as given).
TITAN_OPTIONS = frozenset({"normalize"})
COHERE_OPTIONS = frozenset({"input_type", "truncate"})
TITAN_DIMENSIONS = (256, 512, 1024)
COHERE_V4_DIMENSIONS = (256, 512, 1024, 1536)


def embedding_family(model: str) -> str | None:
    """"titan" or "cohere" for the embedding models this adapter speaks to; None for any other."""
    if "amazon.titan-embed-text" in model:
        return "titan"
    if "cohere.embed-" in model:
        return "cohere"
    return None


def dimensions_problem(model: str, family: str, dimensions: int | None) -> str | None:
    """Why a request's `dimensions` cannot be sent to this model, if it cannot."""
    if dimensions is None:
        return None
    if family == "titan":
        if "text-v1" in model or dimensions not in TITAN_DIMENSIONS:
            return f"{model} takes dimensions {', '.join(map(str, TITAN_DIMENSIONS))} (Titan Text Embeddings v2 only)"
        return None
    if "embed-v4" not in model or dimensions not in COHERE_V4_DIMENSIONS:
        return f"{model} takes dimensions {', '.join(map(str, COHERE_V4_DIMENSIONS))} (Cohere Embed v4 only)"
    return None


def titan_bodies(model: str, texts: list[str], dimensions: int | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    extra: dict[str, Any] = {**options, **({"dimensions": dimensions} if dimensions is not None else {})}
    return [{"inputText": text, **extra} for text in texts]


def cohere_bodies(model: str, texts: list[str], dimensions: int | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    extra: dict[str, Any] = {"input_type": "search_document", "embedding_types": ["float"], **options}
    if dimensions is not None:
        extra["output_dimension"] = dimensions
    return [{"texts": texts[start : start + COHERE_TEXTS_PER_CALL], **extra}
            for start in range(0, len(texts), COHERE_TEXTS_PER_CALL)]


def vectors_of(family: str, body: Any) -> list[list[float]] | None:
    """The vectors of one InvokeModel answer (one for Titan, one per text for Cohere); None if it has none."""
    if not isinstance(body, dict):
        return None
    if family == "titan":
        vector = body.get("embedding")
        return [vector] if isinstance(vector, list) else None
    embeddings = body.get("embeddings")
    if isinstance(embeddings, dict):  # response_type embeddings_by_type
        embeddings = embeddings.get("float")
    return embeddings if isinstance(embeddings, list) and all(isinstance(item, list) for item in embeddings) else None


def input_tokens(body: Any, header: str | None) -> int:
    """The call's input tokens: the header Bedrock puts on every InvokeModel answer, else Titan's count."""
    if header is not None and header.isdigit():
        return int(header)
    count = body.get("inputTextTokenCount") if isinstance(body, dict) else None
    return int(count) if isinstance(count, int) else 0
