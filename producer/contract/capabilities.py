"""What each model of a provider entry can do, and what a request needs of it.

Defaults come from the table `producer/data/capabilities.yaml`, keyed by adapter type (or
`<type>:<options.mode>`, where a mode changes what the adapter can do) and model family (data, not code: the contract reads it without importing any adapter); a
config entry lays its own `capabilities:` over them, per model name or fnmatch pattern
(`"*"` for every model). Routing and fallback skip a hop whose model lacks what the
request needs, or whose context window surely cannot hold it (the prompt's fewest possible
tokens, `llmq.contract.token_floor`, plus max_tokens where the window counts the answer), and a
request no hop can serve is refused at submit.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.token_floor import prompt_token_floor

if TYPE_CHECKING:
    from llmq.contract.config import ProviderConfig
    from llmq.contract.models import JobRequest

TABLE_PATH = Path(__file__).parents[1] / "data" / "capabilities.yaml"
#: The features a model has or lacks, in the order `llmq models` shows them.
FEATURES = ("chat", "tools", "json_object", "json_schema", "vision", "prompt_cache", "embeddings")


class CapabilityOverride(BaseModel):
    """Capabilities a config entry sets for its models (any subset); the rest keep their defaults."""

    model_config = ConfigDict(extra="forbid")

    chat: bool | None = None
    tools: bool | None = None
    json_object: bool | None = None
    json_schema: bool | None = None
    vision: bool | None = None
    prompt_cache: bool | None = None
    embeddings: bool | None = None
    reasoning: bool | None = None
    native_json_schema: bool | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    window_includes_output: bool | None = None


class Capabilities(BaseModel):
    """What one model of one provider entry can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: bool = True
    tools: bool = False
    json_object: bool = False
    json_schema: bool = False
    vision: bool = False
    #: Honours prompt-cache breakpoints or caches prompts on its own (informational: never required).
    prompt_cache: bool = False
    embeddings: bool = False
    #: A reasoning model: takes max_completion_tokens and refuses sampling settings (OpenAI o-series, gpt-5).
    reasoning: bool = False
    #: Constrains its answer to a JSON schema by itself (Anthropic's `output_config.format`, Bedrock's
    #: `outputConfig.textFormat`); without it, adapters that have one ask for JSON by a forced tool call.
    #: Read by adapters, never required by routing.
    native_json_schema: bool = False
    context_window: int | None = None
    max_output_tokens: int | None = None
    #: The answer's max_tokens counts against context_window (OpenAI, vLLM). False where the window
    #: is the prompt's limit alone (Gemini) or the provider lowers max_tokens to fit (older Claude).
    window_includes_output: bool = True

    def lacks(self, needs: Needs) -> list[str]:
        """What of `needs` this model cannot give, in words for a refusal."""
        if needs.features == _CHAT_ONLY and self.chat:  # the plain request: only the room to check
            missing = []
        else:
            missing = [feature for feature in needs.features if not getattr(self, feature)]
        if self.max_output_tokens is not None and needs.output_tokens > self.max_output_tokens:
            missing.append(f"max_tokens {needs.output_tokens} (at most {self.max_output_tokens})")
        if self.context_window is not None and needs.prompt_tokens_floor:
            missing += self._lacks_room(needs, self.context_window)
        return missing

    def _lacks_room(self, needs: Needs, context_window: int) -> list[str]:
        """Room, when the window surely cannot hold the prompt (and the answer, where it counts)."""
        output_tokens = needs.output_tokens if self.window_includes_output else 0
        if needs.prompt_tokens_floor + output_tokens <= context_window:
            return []
        answer = f" plus max_tokens {output_tokens}" if output_tokens else ""
        return [f"room: its context window of {context_window} tokens cannot hold a prompt of at least "
                f"{needs.prompt_tokens_floor} tokens{answer}"]

    def summary(self) -> str:
        """One line for `llmq models`: the features it has, then its limits."""
        features = [feature for feature in FEATURES if getattr(self, feature)] + (["reasoning"] if self.reasoning else [])
        limits = [f"{name} {value}" for name, value in (
            ("context", self.context_window), ("max_output", self.max_output_tokens)) if value is not None]
        return ", ".join(features + limits)


@dataclass(frozen=True, slots=True)
class Needs:
    """What a request needs of a model: features, and room for its prompt and output (a dataclass:
    routing builds one per request)."""

    features: tuple[str, ...]
    output_tokens: int = 0
    #: The fewest tokens the prompt can take (`token_floor`); 0 for embeddings, whose window is per input.
    prompt_tokens_floor: int = 0


@cache
def _table() -> dict[str, Any]:
    return yaml.safe_load(TABLE_PATH.read_text())


@cache
def default_capabilities(adapter_type: str, model: str) -> Capabilities:
    """The table's capabilities for a model of an adapter type; text chat only for a type it lacks."""
    row = _table().get(adapter_type)
    if row is None:
        return Capabilities()
    values = dict(row.get("defaults") or {})
    for pattern, family in (row.get("families") or {}).items():
        if fnmatch.fnmatchcase(model, pattern):
            values.update(family)
            break
    return Capabilities(**values)


def table_row(entry: ProviderConfig) -> str:
    """The table's row for an entry: `<type>:<options.mode>` where the table has one (an adapter
    whose mode changes what it can do: the huggingface pipeline), else its type."""
    mode = entry.options.get("mode")
    if isinstance(mode, str) and f"{entry.adapter_type}:{mode}" in _table():
        return f"{entry.adapter_type}:{mode}"
    return entry.adapter_type


def capabilities_for(entry: ProviderConfig, model: str) -> Capabilities:
    """A model's capabilities on one config entry: the table's, then the entry's `capabilities:`
    (`"*"` first, then the first other pattern that matches the model)."""
    found = default_capabilities(table_row(entry), model)
    if not entry.capabilities:
        return found
    updates: dict[str, Any] = {}
    for pattern in sorted(entry.capabilities, key=lambda key: key != "*"):
        if pattern == "*" or fnmatch.fnmatchcase(model, pattern):
            updates.update(entry.capabilities[pattern].model_dump(exclude_none=True))
            if pattern != "*":
                break
    return found.model_copy(update=updates) if updates else found


def needs_of(request: JobRequest) -> Needs:
    """What a request needs: embeddings for an embedding job (an embedding model's window holds each
    input apart, and some truncate: routing leaves it to the call); for chat, each feature it uses and
    room for the prompt's fewest tokens and max_tokens."""
    from llmq.contract.models import JobKind

    if request.kind is JobKind.EMBEDDING:
        return Needs(features=("embeddings",))
    features = ["chat"]
    messages = request.messages  # type: ignore[union-attr]
    plain = all(type(message.content) is str and message.role != "tool" and not message.tool_calls for message in messages)
    if request.tools is not None or (not plain and request.uses_tools):  # type: ignore[union-attr]
        features.append("tools")
    response_format = request.response_format  # type: ignore[union-attr]
    if response_format is not None and response_format.wants_json:
        features.append(response_format.type)
    if not plain and any(message.images for message in messages):
        features.append("vision")
    return Needs(features=tuple(features), output_tokens=request.max_tokens,
                 prompt_tokens_floor=prompt_token_floor(messages))


_CHAT_ONLY = ("chat",)
