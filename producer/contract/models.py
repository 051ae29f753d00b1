"""The request contract: what callers send, what they get back, and job records.

`LLMRequest` keeps ADR-0015's fields and defaults and adds OpenAI's optional ones
(response_format, tools, tool_choice, stop, seed, top_p), under OpenAI's names so an
OpenAI request body maps onto it field for field. Messages and their parts are in
`llmq.contract.messages`, embeddings in `llmq.contract.embeddings`. Requests are
validated at the edge (before anything is enqueued), so a bad one fails in the
caller's process with a message that names the field and the fix.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from llmq.contract.common import (
    MAX_METADATA_BYTES,
    RESERVED_PROVIDER_OPTIONS,
    JobKind,
    RequestChecks,
    Usage,
    replace_lone_surrogates,
)
from llmq.contract.embeddings import EmbeddingRequest, EmbeddingResponse
from llmq.contract.messages import (
    MAX_MESSAGE_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOOLS,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    response_format_for_model,
)
from llmq.contract.tiers import ServiceTier

__all__ = [
    "MAX_MESSAGE_CHARS", "MAX_METADATA_BYTES", "RESERVED_PROVIDER_OPTIONS", "EmbeddingRequest", "EmbeddingResponse",
    "JobKind", "JobState", "LLMRequest", "LLMResponse", "Message", "ToolCall", "Usage",
]

MAX_MESSAGES = 10_000
MAX_OUTPUT_TOKENS = 1_000_000
#: All message text of one request together; larger input is refused, never truncated.
MAX_REQUEST_CHARS = 8 * 1024 * 1024
#: Why a finish: the same four words from every provider (adapters map their own).
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class LLMRequest(RequestChecks):
    """One chat request (ADR-0015's `LLMRequest`, grown by OpenAI's optional fields).

    `response_format` also takes a pydantic model class from Python: it is sent as that
    class's JSON schema, and `LLMService` hands the answer's `parsed` back as an instance.
    OpenAI's `max_completion_tokens` is read as `max_tokens`; adapters send whichever the model takes.
    """

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[JobKind] = JobKind.CHAT

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(default=2000, ge=1, le=MAX_OUTPUT_TOKENS)
    stream: bool = False
    provider: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, Any] = Field(default_factory=dict)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Provider parameters llmq has no field for (frequency_penalty, reasoning_effort, ...), sent
    #: as they are; each adapter refuses the names it does not allow.
    provider_options: dict[str, Any] = Field(default_factory=dict)
    #: OpenAI's newer name for max_tokens: read into max_tokens, never stored.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS, exclude=True)
    #: "flex": the provider's flex tier (OpenAI, Gemini: batch prices, slower, sometimes refused);
    #: "standard": never flex. None: the provider entry's `service_tier` (contract/tiers.py).
    service_tier: ServiceTier | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _model_class_to_schema(cls, value: Any) -> Any:
        # Runs only when response_format is given: a plain request pays nothing for it.
        return response_format_for_model(value) if isinstance(value, type) and issubclass(value, BaseModel) else value

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_STOP_SEQUENCES:
            raise ValueError(f"stop holds {len(value)} sequences; give 1 to {MAX_STOP_SEQUENCES}")
        if any(not item for item in ([value] if isinstance(value, str) else value or [])):
            raise ValueError("a stop sequence must not be empty")
        return value

    @field_validator("messages")
    @classmethod
    def _request_bounded(cls, value: list[Message]) -> list[Message]:
        total = sum(len(message.content) if type(message.content) is str else message.size_chars() for message in value)
        if total > MAX_REQUEST_CHARS:
            raise ValueError(
                f"messages hold {total} characters in all; the limit is {MAX_REQUEST_CHARS} "
                "(shorten the prompt or split the work into several requests)"
            )
        return value

    @model_validator(mode="after")
    def _one_max_tokens_and_tools_consistent(self) -> LLMRequest:
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set:
                raise ValueError("give max_tokens or max_completion_tokens, not both (they mean the same here)")
            self.max_tokens, self.max_completion_tokens = self.max_completion_tokens, None
        if self.tools is None and self.tool_choice is None and all(message.role != "tool" for message in self.messages):
            return self  # the plain text request: nothing more to check
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools share a name; give each function its own name")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise ValueError("tool_choice is set but tools is empty; add tools or drop tool_choice")
        if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among tools ({', '.join(names)})")
        _check_tool_answers(self.messages)
        return self

    @property
    def response_model(self) -> type[BaseModel] | None:
        """The pydantic class the caller gave as response_format, in the caller's process only."""
        return self.response_format.model_class if self.response_format is not None else None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(message.tool_calls or message.role == "tool" for message in self.messages)

    def prompt_text(self) -> str:
        """All message text joined, tool calls' names and arguments included: what the model reads
        as text (images aside). Token estimators and the mock read it."""
        parts: list[str] = []
        for message in self.messages:
            parts.append(message.text)
            parts += [f"{call.function.name}({call.function.arguments})" for call in message.tool_calls or ()]
        return "\n".join(parts)


def _check_tool_answers(messages: list[Message]) -> None:
    """A tool message must answer a call made by an earlier assistant message (OpenAI refuses it otherwise)."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        called.update(call.id for call in message.tool_calls or ())
        if message.role == "tool" and message.tool_call_id not in called:
            raise ValueError(
                f"messages[{index}].tool_call_id {message.tool_call_id!r} answers no tool call of an earlier "
                "assistant message; send the assistant message with its tool_calls first"
            )


class LLMResponse(BaseModel):
    """One answer, or one chunk of a streamed answer (ADR-0015's `LLMResponse`).

    `tool_calls` are the calls the model made (OpenAI's shape), `finish_reason` why it
    stopped, in the same four words for every provider, and `parsed` the answer's JSON
    when JSON was asked for (checked against the schema when one was given; an instance
    of the caller's pydantic class when one was given). Streaming yields chunks whose
    `content` is the new text only and whose `tool_call_deltas` are the new pieces of tool
    calls; the last chunk has `metadata["final"] = True`, the usage and the whole calls.
    """

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[JobKind] = JobKind.CHAT

    content: str
    model: str
    provider: str
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, Any] = Field(default_factory=dict)
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None
    parsed: Any = None
    tool_call_deltas: list[ToolCallDelta] | None = None

    @field_validator("content", "model", "provider", "metadata", "parsed")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # Providers' answers are kept as they come, control characters and NUL included;
        # only a lone surrogate, which is not text (Redis and SQL cannot take it), becomes U+FFFD.
        return replace_lone_surrogates(value)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    RATE_LIMITED = "rate_limited"
    #: Waits in a provider's batch API (a completion window): its record's `provider_batch` says which.
    IN_PROVIDER_BATCH = "in_provider_batch"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Lane(str, enum.Enum):
    """How a job waits for a provider: `interactive` jobs (one call someone is waiting on) go before
    every waiting `batch` job, in the broker and in the shared limits; batch jobs share what is left
    fairly by caller."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class Hop(BaseModel):
    """One step of a job's route: which provider entry runs it, with which model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    model: str
    #: The pool this hop's provider entry belongs to: the hops of one pool stand side by side on the
    #: route, and a worker runs the job on whichever member has the most room (docs/configuration.md).
    pool: str | None = None


#: Which request and response models a job of each kind reads and writes: the one list.
REQUEST_MODELS: dict[JobKind, type[LLMRequest] | type[EmbeddingRequest]] = {
    JobKind.CHAT: LLMRequest, JobKind.EMBEDDING: EmbeddingRequest,
}
RESPONSE_MODELS: dict[JobKind, type[LLMResponse] | type[EmbeddingResponse]] = {
    JobKind.CHAT: LLMResponse, JobKind.EMBEDDING: EmbeddingResponse,
}
JobRequest = LLMRequest | EmbeddingRequest
JobResponse = LLMResponse | EmbeddingResponse


class JobRecord(BaseModel):
    """What `poll` returns: a job's kind, state, route, attempts and result or error."""

    job_id: str
    state: JobState
    request: JobRequest
    kind: JobKind = JobKind.CHAT
    route: list[Hop]
    route_index: int = 0
    attempt: int = 0
    batch_id: str | None = None
    custom_id: str | None = None
    lane: Lane = Lane.BATCH
    created_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    result: JobResponse | None = None
    error: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    #: The provider batch the job waits in (state in_provider_batch, or ended while it waited).
    provider_batch: str | None = None
    #: The completion window the job was submitted with, in seconds.
    completion_window_s: float | None = None

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
