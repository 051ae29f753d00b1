"""OpenAI's Embeddings body <-> llmq's embedding job, in both directions.

`embedding_request` maps a `/v1/embeddings` body (or an embeddings line of a batch) onto
the contract's `EmbeddingRequest`, field for field: `input`, `model`, `dimensions`,
`encoding_format`, and llmq's own `provider` and `provider_options`; `user` and
`metadata` become the job's metadata as for a chat (bodies.py). The job runs like a chat
job (routes.py): submitted with the key's budget and the front's deadline, named in the
`x-llmq-job-id` header, cancelled when the caller leaves; `LLMService.embed` is that same
submit-then-wait, without those.

`embeddings_body` writes OpenAI's answer: `{"object": "list", "data": [{"object":
"embedding", "index", "embedding"}], "model", "usage"}`, each vector as numbers, or with
`encoding_format: "base64"` (what the OpenAI SDKs ask for unless told otherwise) as the
base64 of its little-endian float32 values, as OpenAI sends it.
"""

from __future__ import annotations

from typing import Any

from llmq.contract.embeddings import EmbeddingRequest, EmbeddingResponse, encode_vector
from llmq.http.bodies import body_object, job_metadata, split_body, unrecognized, validated
from llmq.http.errors import InvalidRequestError

FRONT_FIELDS = frozenset({"metadata", "user"})
CONTRACT_FIELDS = frozenset(EmbeddingRequest.model_fields) - FRONT_FIELDS


def embedding_request(body: Any, *, caller: str) -> EmbeddingRequest:
    """The one mapping from an OpenAI embeddings body to an `EmbeddingRequest`."""
    body = body_object(body)
    fields, others = split_body(body, CONTRACT_FIELDS, FRONT_FIELDS)
    if others:
        raise unrecognized(next(iter(others)))
    texts = fields.get("input")
    if isinstance(texts, list) and any(not isinstance(text, str) for text in texts):
        # OpenAI also takes token ids; they are one tokenizer's, and llmq routes by model, not tokenizer.
        raise InvalidRequestError("input must be a string or a list of strings: token ids are not taken, send the texts",
                                  param="input")
    fields["metadata"] = job_metadata(body, caller)
    return validated(EmbeddingRequest, fields)


def embeddings_body(response: EmbeddingResponse, encoding_format: str | None) -> dict[str, Any]:
    """OpenAI's embeddings list for one answer, its vectors encoded as the body asked."""
    base64 = encoding_format == "base64"
    data = [{"object": "embedding", "index": index, "embedding": encode_vector(vector) if base64 else vector}
            for index, vector in enumerate(response.embeddings)]
    tokens = response.usage.prompt_tokens
    return {"object": "list", "data": data, "model": response.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": response.usage.total_tokens or tokens}}
