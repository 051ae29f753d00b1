"""Embeddings, the second kind of job: `EmbeddingRequest` in, `EmbeddingResponse` out.

The request is OpenAI's `/v1/embeddings` body (`input`, `model`, `dimensions`,
`encoding_format`) plus llmq's `provider`, `metadata` and `provider_options`. It runs
through the same queues, limits, budgets, cache and ledger as a chat job; the job
record's `kind` says which it is.

Vectors are kept compact wherever they are stored as JSON (the job record and the
response cache in Redis): each vector is the base64 of its little-endian float32 values,
the format OpenAI's `encoding_format: "base64"` returns. That is a quarter of the size
of the same vector as JSON numbers (1,536 dimensions: about 8 KB instead of about 32 KB)
and loses nothing, since providers compute embeddings in float32 or narrower. In Python
a vector is a list of floats; `model_dump(mode="json", context=VECTORS_AS_FLOATS)` writes
numbers, as result files do.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    field_validator,
)

from llmq.contract.common import JobKind, RequestChecks, Usage

#: OpenAI's limits: inputs per request, and characters we let one input carry.
MAX_INPUTS = 2048
MAX_INPUT_CHARS = 200_000
#: Serialization context that writes vectors as JSON numbers instead of base64 float32.
VECTORS_AS_FLOATS = {"vectors": "floats"}
_BIG_ENDIAN = sys.byteorder == "big"


def encode_vector(vector: list[float]) -> str:
    values = array("f", vector)
    if _BIG_ENDIAN:
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def decode_vector(text: str) -> list[float]:
    values = array("f")
    values.frombytes(base64.b64decode(text))
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


def _read_vectors(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_vector(item) if isinstance(item, str) else item for item in value]
    return value


def _write_vectors(vectors: list[list[float]], info: SerializationInfo) -> Any:
    if info.mode_is_json() and (info.context or {}).get("vectors") != "floats":
        return [encode_vector(vector) for vector in vectors]
    return vectors


Vectors = Annotated[list[list[float]], BeforeValidator(_read_vectors), PlainSerializer(_write_vectors)]


class EmbeddingRequest(RequestChecks):
    """Embed one text or many (OpenAI's `/v1/embeddings` body, plus llmq's routing fields)."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[JobKind] = JobKind.EMBEDDING
    # What the engine reads of every job's request: an embedding never streams, has no
    # output budget, and is deterministic (so the response cache may keep it).
    stream: ClassVar[bool] = False
    max_tokens: ClassVar[int] = 0
    temperature: ClassVar[float] = 0.0

    input: str | list[str]
    model: str = Field(min_length=1, max_length=256)
    #: Length of the vectors, for models that can shorten them (text-embedding-3-*).
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    #: Accepted for OpenAI bodies; vectors always come back to Python as floats.
    encoding_format: Literal["float", "base64"] | None = None
    provider: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, Any] = Field(default_factory=dict)
    provider_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input")
    @classmethod
    def _inputs_bounded(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not 1 <= len(texts) <= MAX_INPUTS:
            raise ValueError(f"input holds {len(texts)} texts; give 1 to {MAX_INPUTS} (split larger sets)")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"input[{index}] is empty; every text to embed needs some content")
            if len(text) > MAX_INPUT_CHARS:
                raise ValueError(f"input[{index}] has {len(text)} characters; the limit is {MAX_INPUT_CHARS}")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def prompt_text(self) -> str:
        return "\n".join(self.texts)


class EmbeddingResponse(BaseModel):
    """The vectors, one per input text in input order, and the tokens the provider counted."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[JobKind] = JobKind.EMBEDDING

    embeddings: Vectors
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, Any] = Field(default_factory=dict)
