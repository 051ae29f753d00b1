"""Pieces every request and response kind shares: the job kind, token usage, and the
checks of the fields every request carries (model, metadata, provider_options)."""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_METADATA_BYTES = 16 * 1024
#: Objects and lists inside metadata, nested deeper than this, are refused (Redis's Lua JSON stops at 1000).
MAX_METADATA_DEPTH = 64
#: provider_options never reach these: the adapter owns the URL, the credentials and the model.
RESERVED_PROVIDER_OPTIONS = frozenset({
    "model", "messages", "stream", "url", "base_url", "api_base", "endpoint", "api_key", "api-key", "key",
    "headers", "extra_headers", "authorization", "auth", "deployment", "region", "project", "organization",
})


class JobKind(str, enum.Enum):
    """What a job asks for: a chat answer, or embeddings. Stored on the job record."""

    CHAT = "chat"
    EMBEDDING = "embedding"


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


def _shape_problem(value: Any, depth: int = 1) -> str | None:
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
            problem = _shape_problem(child, depth + 1)
            if problem:
                return problem
    return None


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    problem = _shape_problem(value)
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


def check_provider_options(value: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(RESERVED_PROVIDER_OPTIONS & {key.lower() for key in value})
    if reserved:
        raise ValueError(
            f"provider_options may not set {reserved[0]!r}: the URL, credentials and model come from the "
            "provider's config entry (use the request's own field, or the config)"
        )
    return check_metadata(value)


def check_model_name(value: str) -> str:
    if not value.strip():
        raise ValueError("model must name a model, e.g. 'gpt-4o-mini'")
    return value


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


class RequestChecks(BaseModel):
    """The checks of the fields every kind of request has (`model`, `metadata`, `provider_options`),
    written once; each request model declares the fields themselves."""

    @field_validator("model", check_fields=False)
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("metadata", check_fields=False)
    @classmethod
    def _metadata_json_and_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(value)

    @field_validator("provider_options", check_fields=False)
    @classmethod
    def _provider_options_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_provider_options(value) if value else value
