"""What a chat request is made of, in OpenAI's Chat Completions shapes: messages and their
content parts, tool definitions and tool calls, response formats.

OpenAI's shapes are canonical because batch files, SDKs and other gateways already speak
them; every adapter translates from these. Each model refuses unknown keys, and every
refusal names the field and the fix.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_MESSAGE_CHARS = 2_000_000
#: OpenAI's limits: tools per request, stop sequences, parts per message.
MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 4
MAX_PARTS = 500
#: A name OpenAI accepts for a function or a JSON schema.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
#: Image types every vision provider llmq speaks to takes inline.
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_DATA_URL = re.compile(r"^data:(?P<media_type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheControl(_Part):
    """A prompt-cache breakpoint: the prompt up to and including this part may be cached
    (Anthropic `cache_control`, Bedrock `cachePoint`); providers that cache on their own ignore it."""

    type: Literal["ephemeral"] = "ephemeral"
    #: Anthropic's choice of lifetime; others ignore it.
    ttl: Literal["5m", "1h"] | None = None


class TextPart(_Part):
    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_MESSAGE_CHARS)
    cache_control: CacheControl | None = None


class ImageURL(_Part):
    #: `https://...`, or `data:image/png;base64,...` (png, jpeg, gif, webp).
    url: str = Field(min_length=1)
    #: "original" keeps the image's own resolution (OpenAI's newest models).
    detail: Literal["auto", "low", "high", "original"] | None = None

    @field_validator("url")
    @classmethod
    def _https_or_data(cls, value: str) -> str:
        if value.startswith("https://"):
            return value
        if not value.startswith("data:"):
            raise ValueError(
                "an image must be an https:// URL or a data: URL (data:image/png;base64,...); "
                "plain http and file paths are refused (upload the image or inline it as base64)"
            )
        match = _DATA_URL.match(value)
        if match is None:
            raise ValueError("a data: image URL must read data:<media type>;base64,<data>")
        if match["media_type"] not in IMAGE_MEDIA_TYPES:
            raise ValueError(f"image type {match['media_type']!r} is not taken; use one of {', '.join(IMAGE_MEDIA_TYPES)}")
        try:
            base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the data: image URL's data is not valid base64") from None
        return value

    @property
    def inline(self) -> InlineImage | None:
        """The media type and bytes of a data: URL; None for an https URL."""
        match = _DATA_URL.match(self.url)
        if match is None:
            return None
        return InlineImage(media_type=match["media_type"], data_base64=match["data"])


class InlineImage(BaseModel):
    """An image carried in the request, as providers with inline image blocks want it."""

    media_type: str
    data_base64: str

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.data_base64)


class ImagePart(_Part):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL
    cache_control: CacheControl | None = None


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Part):
    name: str = Field(pattern=NAME_PATTERN)
    #: The arguments as a JSON string, exactly as the model wrote them (it may not parse).
    arguments: str


class ToolCall(_Part):
    """A call the model made (OpenAI's shape), on an answer or on an assistant message sent back."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def parsed_arguments(self) -> Any:
        """The arguments as JSON; raises ValueError when the model wrote something else."""
        return json.loads(self.function.arguments or "{}")


class FunctionDeltaPart(_Part):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Part):
    """A piece of a streamed tool call (OpenAI's `delta.tool_calls[]`): the first piece of call
    `index` has its id and name; the rest add to its arguments."""

    index: int = Field(ge=0)
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDeltaPart = Field(default_factory=FunctionDeltaPart)


class FunctionDefinition(_Part):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    #: A JSON Schema of the arguments; None: the function takes none.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_a_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class Tool(_Part):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Part):
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(_Part):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this one."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JSONSchemaFormat(_Part):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # "schema" shadows a BaseModel attribute: kept under another name, read and written as "schema".
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(value)
        return value


class ResponseFormat(_Part):
    """`{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {name, schema, strict}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    #: The pydantic class it was made from (`response_format_for_model`): lives in this process only.
    _model_class: type[BaseModel] | None = PrivateAttr(default=None)

    @property
    def model_class(self) -> type[BaseModel] | None:
        return self._model_class

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only read with type "json_schema" (got type {self.type!r})')
        return self

    @property
    def wants_json(self) -> bool:
        return self.type != "text"

    @property
    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match; None for json_object and text."""
        return self.json_schema.schema_ if self.json_schema is not None else None


Role = Literal["system", "user", "assistant", "tool"]
#: Text, or a list of parts; told apart before validation so a bad part's error names the part.
Content = Annotated[
    Annotated[str, Field(max_length=MAX_MESSAGE_CHARS), Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
    Discriminator(lambda value: "parts" if isinstance(value, list) else "text"),
]


class Message(BaseModel):
    """One chat message. `content` is text or a list of parts; an assistant message may carry
    `tool_calls` (and no content), a `tool` message answers one of them by `tool_call_id`.
    OpenAI's `developer` role is read as `system`, the name every provider knows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    # Before content, whose check reads them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    # Checked even when absent: only an assistant message with tool_calls may leave it out.
    content: Content | None = Field(default=None, validate_default=True)
    name: str | None = Field(default=None, max_length=256)

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, value: Any) -> Any:
        return "system" if value == "developer" else value

    @field_validator("content")
    @classmethod
    def _shape_fits_role(cls, value: Any, info: ValidationInfo) -> Any:
        """Every check of how a message's parts fit its role, in one call (it runs for every message)."""
        role, data = info.data.get("role"), info.data
        if type(value) is str and role in ("user", "system", "assistant") and data.get("tool_call_id") is None \
                and data.get("tool_calls") is None:
            return value  # the plain text message
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PARTS:
            raise ValueError(f"content holds {len(value)} parts; give between 1 and {MAX_PARTS}")
        if value is None and not (role == "assistant" and data.get("tool_calls")):
            raise ValueError(f"content is missing; give the {role or 'message'}'s text (only an assistant message "
                             "with tool_calls may leave it out)")
        if isinstance(value, list) and role not in ("user", None) and any(isinstance(part, ImagePart) for part in value):
            raise ValueError(f"image parts belong in user messages, not in a {role} message")
        if role == "tool" and data.get("tool_call_id") is None:
            raise ValueError("a tool message needs tool_call_id: the id of the tool call it answers")
        if role != "tool" and data.get("tool_call_id") is not None:
            raise ValueError(f"tool_call_id belongs on a tool message, not on a {role} message")
        if data.get("tool_calls") is not None and role != "assistant":
            raise ValueError(f"tool_calls belong on an assistant message, not on a {role} message")
        return value

    @property
    def text(self) -> str:
        """The message's text: the string, or its text parts joined (images left out)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImageURL]:
        if isinstance(self.content, list):
            return [part.image_url for part in self.content if isinstance(part, ImagePart)]
        return []

    def size_chars(self) -> int:
        """Characters this message carries (text, image URLs, tool-call arguments): what the request bound counts."""
        if isinstance(self.content, str):
            size = len(self.content)
        elif self.content is None:
            size = 0
        else:
            size = sum(len(part.text) if isinstance(part, TextPart) else len(part.image_url.url) for part in self.content)
        return size + sum(len(call.function.arguments) for call in self.tool_calls or ())


@cache
def _validator_class() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator


def check_json_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not valid JSON Schema (draft 2020-12), naming where it is wrong."""
    from jsonschema.exceptions import SchemaError

    try:
        _validator_class().check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path) or "(top level)"
        raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model's JSON schema made fit for OpenAI's strict mode: every object closed
    (`additionalProperties: false`) with every property required, as the openai SDK does."""
    if isinstance(schema, dict):
        schema = {key: strict_schema(value) for key, value in schema.items()}
        if schema.get("type") == "object" and isinstance(schema.get("properties"), dict):
            schema["additionalProperties"] = False
            schema["required"] = list(schema["properties"])
        return schema
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]  # type: ignore[return-value]
    return schema


def response_format_for_model(model_class: type[BaseModel]) -> ResponseFormat:
    """`response_format=MyModel` from Python: the class's JSON schema, strict, named after it."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", model_class.__name__)[:64]
    made = ResponseFormat(
        type="json_schema",
        json_schema=JSONSchemaFormat(name=name, schema=strict_schema(model_class.model_json_schema()), strict=True),
    )
    made._model_class = model_class
    return made
