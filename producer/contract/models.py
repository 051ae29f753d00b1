"""The request contract: what callers send, what they get back, and job records.

`LLMRequest` and `LLMResponse` carry exactly the fields of ADR-0015. They are
validated at the edge (before anything is enqueued) so a bad request fails in
the caller's process with a message that names the field and the fix.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Roles every adapter knows how to carry.
Role = Literal["system", "user", "assistant"]

MAX_METADATA_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 2_000_000
MAX_MESSAGES = 10_000
MAX_OUTPUT_TOKENS = 1_000_000
#: All message text of one request together; larger input is refused, never truncated.
MAX_REQUEST_CHARS = 8 * 1024 * 1024
#: Objects and lists inside metadata, nested deeper than this, are refused (Redis's Lua JSON stops at 1000).
MAX_METADATA_DEPTH = 64

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def id_problem(value: str) -> str | None:
    """Why a string cannot be an id (custom_id, job_id, batch_id, a metadata key), or None.

    Ids are keys in Redis and in SQL: a NUL there is refused (PostgreSQL cannot store
    it, and a key that differs only after a NUL is a trap), as is text that is not
    valid Unicode. NUL in prompts and answers is fine: the ledger stores it escaped.
    """
    if "\x00" in value:
        return "must not contain a NUL character (\\u0000)"
    if _LONE_SURROGATE.search(value):
        return "must be valid Unicode text (it holds a lone surrogate)"
    return None


def replace_lone_surrogates(value: Any) -> Any:
    """A lone surrogate (from a `\\ud800` escape in a provider's JSON) as U+FFFD, in every string of a JSON value;
    a high and a low surrogate side by side become the character they encode.

    A string with surrogates cannot be encoded as UTF-8, so it could not be written to Redis or SQL.
    """
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value) is None:
            return value
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, dict):
        return {replace_lone_surrogates(key): replace_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(item) for item in value]
    return value


def _metadata_shape_problem(value: Any, depth: int = 1) -> str | None:
    """Keys that cannot be stored, or nesting too deep to carry (checked before json.dumps recurses)."""
    if depth > MAX_METADATA_DEPTH:
        return f"nests more than {MAX_METADATA_DEPTH} levels deep; flatten it"
    children: list[Any] = []
    if isinstance(value, dict):
        for key, item in value.items():
            problem = id_problem(key) if isinstance(key, str) else None
            if problem:
                return f"key {key!r} {problem}"
            children.append(item)
    elif isinstance(value, list):
        children = value
    for child in children:
        if isinstance(child, dict | list):
            problem = _metadata_shape_problem(child, depth + 1)
            if problem:
                return problem
    return None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class LLMRequest(BaseModel):
    """One generation request (ADR-0015's `LLMRequest`)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(default=2000, ge=1, le=MAX_OUTPUT_TOKENS)
    stream: bool = False
    provider: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must name a model, e.g. 'gpt-4o-mini'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_json_and_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = _metadata_shape_problem(value)
        if problem:
            raise ValueError(problem)
        try:
            # pydantic refuses lone surrogates in str fields; inside metadata they must be caught here.
            encoded = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
            encoded.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("metadata must be valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metadata must be JSON-serializable (strings, numbers, booleans, lists, objects): {exc}"
            ) from None
        if len(encoded.encode()) > MAX_METADATA_BYTES:
            raise ValueError(
                f"metadata is {len(encoded.encode())} bytes as JSON; keep it under "
                f"{MAX_METADATA_BYTES} bytes (store large payloads elsewhere and pass a reference)"
            )
        return value

    @field_validator("messages")
    @classmethod
    def _request_bounded(cls, value: list[Message]) -> list[Message]:
        total = sum(len(message.content) for message in value)
        if total > MAX_REQUEST_CHARS:
            raise ValueError(
                f"messages hold {total} characters in all; the limit is {MAX_REQUEST_CHARS} "
                "(shorten the prompt or split the work into several requests)"
            )
        return value

    def prompt_text(self) -> str:
        """All message contents joined: what token estimators and cache keys read."""
        return "\n".join(message.content for message in self.messages)


class Usage(BaseModel):
    """Token counts for one call. Behaves like the ADR's `Dict[str, int]` for reads."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)
    #: Prompt tokens served from the provider's prompt cache (billed cheaper).
    cached_read_tokens: int = Field(default=0, ge=0)
    #: Prompt tokens written to the provider's prompt cache (billed dearer).
    cache_write_tokens: int = Field(default=0, ge=0)
    #: Completion tokens spent on hidden reasoning (part of completion_tokens).
    reasoning_tokens: int = Field(default=0, ge=0)

    @classmethod
    def of(cls, prompt_tokens: int = 0, completion_tokens: int = 0, **extra: int) -> Usage:
        """Build usage, deriving the total when the provider does not send one."""
        total = extra.pop("total_tokens", None) or prompt_tokens + completion_tokens
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total,
            **extra,
        )

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def get(self, key: str, default: int | None = None) -> int | None:
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        return list(type(self).model_fields)


class LLMResponse(BaseModel):
    """One answer, or one chunk of a streamed answer (ADR-0015's `LLMResponse`).

    Streaming yields chunks whose `content` is the new text only; the last chunk
    has `metadata["final"] = True` and carries the usage of the whole call.
    """

    model_config = ConfigDict(extra="forbid")

    content: str
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("content", "model", "provider", "metadata")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # Providers' answers are kept as they come, control characters and NUL included;
        # only a lone surrogate, which is not text, becomes U+FFFD.
        return replace_lone_surrogates(value)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    RATE_LIMITED = "rate_limited"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Hop(BaseModel):
    """One step of a job's route: which provider entry runs it, with which model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    model: str


class JobRecord(BaseModel):
    """What `poll` returns: a job's state, route, attempts and result or error."""

    job_id: str
    state: JobState
    request: LLMRequest
    route: list[Hop]
    route_index: int = 0
    attempt: int = 0
    batch_id: str | None = None
    custom_id: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    result: LLMResponse | None = None
    error: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state.terminal


class BatchRecord(BaseModel):
    """A batch's counts by state, like the big providers' batch APIs."""

    batch_id: str
    total: int
    counts: dict[JobState, int]
    created_at: float | None = None
    cancelled: bool = False

    @property
    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in TERMINAL_STATES)

    @property
    def done(self) -> bool:
        return self.finished >= self.total
