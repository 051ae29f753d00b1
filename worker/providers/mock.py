"""An in-process provider for demos and tests. Its output is simulated, and says so.

Options (under `options:` in the provider's config entry):

- `latency_s` (float, default 0): seconds before the answer (spread over chunks when streaming)
- `failure_rate` (0..1, default 0): share of calls that fail, drawn from a seeded generator
- `fail_with` (error class name from llmq.worker.errors, default "ServerError")
- `completion_tokens` (int, default: from the prompt): tokens in each answer
- `seed` (int, default 0): makes the failure sequence repeatable
- `embedding_dimensions` (int, default 16): length of its vectors when a request names none

It simulates every request feature, deterministically (the same request, the same answer):
with `tools` (and `tool_choice` not "none") it calls one, the named one or the first, with
arguments made from the tool's parameter schema, until the last message is a tool result,
which it then answers; with `response_format` it answers JSON that matches the schema
(strings say "[simulated]" where the schema lets them); images count as tokens; embeddings
are unit vectors drawn from a hash of each text. Every response is marked simulated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, ToolCall, Usage
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.features import ToolCallAssembler, tool_call
from llmq.worker.tokens import estimate_request_prompt_tokens, estimate_tokens

SIMULATED_LABEL = "[simulated by llmq mock provider]"

_TASK_IDEAS = (
    "Mine 3 iron ore", "Craft 1 stone pickaxe", "Smelt 2 iron ingots", "Collect 5 oak logs",
    "Craft 1 furnace", "Kill 1 zombie", "Craft 4 torches", "Cook 2 mutton", "Build 1 shelter",
    "Craft 1 bucket", "Mine 5 coal ore", "Craft 1 crafting table",
)


class MockOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    fail_with: str = "ServerError"
    completion_tokens: int | None = Field(default=None, ge=1)
    seed: int = 0
    embedding_dimensions: int = Field(default=16, ge=1, le=8192)


class MockProvider(LLMProvider):
    type_name = "mock"
    description = "in-process simulated provider for demos and tests"
    local = True
    simulated = True
    supports_streaming = True
    options_model = MockOptions

    chunks_per_answer: ClassVar[int] = 8

    options: MockOptions

    def __init__(self, config: ProviderConfig, **_: object) -> None:
        super().__init__(config)
        if self.options.fail_with not in errors.ERRORS_BY_NAME:
            raise ValueError(f"mock option fail_with: unknown error {self.options.fail_with!r}")
        self._random = random.Random(self.options.seed)

    def _maybe_fail(self, request: LLMRequest | EmbeddingRequest) -> None:
        if self.options.failure_rate and self._random.random() < self.options.failure_rate:
            error_class = errors.ERRORS_BY_NAME[self.options.fail_with]
            message = f"simulated {error_class.__name__} from mock provider {self.name!r}"
            if issubclass(error_class, errors.ProviderError):
                raise error_class(message, provider=self.name, model=request.model, status_code=500)
            raise error_class(message)

    def _answer(self, request: LLMRequest) -> tuple[str, list[ToolCall] | None, Usage]:
        digest = hashlib.sha256(f"{request.model}\n{request.prompt_text()}".encode()).digest()
        calls = self._tool_calls(request, digest)
        if calls:
            text = ""
        elif request.response_format is not None and request.response_format.wants_json:
            schema = request.response_format.schema_dict
            value = example_for(schema, schema) if schema is not None else {"answer": self._text(request, digest)}
            text = json.dumps(value)
        else:
            text = self._text(request, digest)
        prompt_tokens = estimate_request_prompt_tokens(request)
        completion = self.options.completion_tokens or estimate_tokens(text or json.dumps([c.model_dump() for c in calls or ()]))
        completion = min(completion, request.max_tokens)
        return text, calls, Usage.of(prompt_tokens, completion)

    @staticmethod
    def _text(request: LLMRequest, digest: bytes) -> str:
        idea = _TASK_IDEAS[digest[0] % len(_TASK_IDEAS)]
        last = request.messages[-1]
        head = last.text.splitlines()[0][:60] if last.text else ""
        if last.role == "tool":
            return f"{SIMULATED_LABEL} The tool answered '{head}'.\nTask: {idea}"
        return f"{SIMULATED_LABEL} Reasoning: deterministic reply to '{head}'.\nTask: {idea}"

    @staticmethod
    def _tool_calls(request: LLMRequest, digest: bytes) -> list[ToolCall] | None:
        """One call while the last message is not a tool's result (so a round trip ends)."""
        if not request.tools or request.tool_choice == "none" or request.messages[-1].role == "tool":
            return None
        choice = request.tool_choice
        name = choice.function.name if choice is not None and not isinstance(choice, str) else request.tools[0].function.name
        tool = next(tool for tool in request.tools if tool.function.name == name)
        schema = tool.function.parameters or {"type": "object", "properties": {}}
        return [tool_call(f"call_mock_{digest[:6].hex()}", name, example_for(schema, schema))]

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        if self.options.latency_s:
            await asyncio.sleep(self.options.latency_s)
        self._maybe_fail(request)
        text, calls, usage = self._answer(request)
        return self.response(request, text, usage, tool_calls=calls, finish_reason="tool_calls" if calls else "stop")

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        text, calls, usage = self._answer(request)
        pieces = _split(text, self.chunks_per_answer) if text else []
        for index, piece in enumerate(pieces):
            if self.options.latency_s:
                await asyncio.sleep(self.options.latency_s / len(pieces))
            if index == len(pieces) // 2:
                self._maybe_fail(request)
            yield self.response(request, piece, Usage())
        assembler = ToolCallAssembler()
        for index, call in enumerate(calls or ()):
            # As OpenAI streams a call: its id and name first, then the arguments in pieces.
            first = assembler.add(index, call_id=call.id, name=call.function.name)
            yield self.response(request, "", Usage()).model_copy(update={"tool_call_deltas": [first]})
            for piece in _split(call.function.arguments, 2):
                delta = assembler.add(index, arguments=piece)
                yield self.response(request, "", Usage()).model_copy(update={"tool_call_deltas": [delta]})
        yield self.final_chunk(request, usage, tool_calls=assembler.calls(), finish_reason="tool_calls" if calls else "stop")

    async def embed(self, request: EmbeddingRequest, *, job_id: str | None = None) -> EmbeddingResponse:
        if self.options.latency_s:
            await asyncio.sleep(self.options.latency_s)
        self._maybe_fail(request)
        dimensions = request.dimensions or self.options.embedding_dimensions
        vectors = [_unit_vector(f"{request.model}\n{text}", dimensions) for text in request.texts]
        tokens = sum(estimate_tokens(text) for text in request.texts)
        return self.embedding_response(request, vectors, Usage.of(tokens, 0))

    async def health_check(self) -> bool:
        return True


def _split(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[index : index + size] for index in range(0, len(text), size)]


def _unit_vector(text: str, dimensions: int) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    draw = random.Random(seed)
    values = [draw.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


def example_for(schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """A value that matches `schema` (draft 2020-12 as OpenAI's structured outputs use it), made
    the same way every time: a schema's default, const or first enum value; an object with every
    property; one item per array (or minItems); the smallest allowed number; "[simulated]" text."""
    if not isinstance(schema, dict) or depth > 20:
        return None
    if "$ref" in schema:
        return example_for(_resolve(schema["$ref"], root), root, depth + 1)
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [option for option in schema[key] if option.get("type") != "null"] or schema[key]
            return example_for(options[0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part["$ref"], root) if "$ref" in part else part)
        return example_for(merged, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "null")
    return _EXAMPLES.get(kind, lambda *_: None)(schema, root, depth)


def _resolve(reference: str, root: dict[str, Any]) -> Any:
    found: Any = root
    for part in reference.removeprefix("#/").split("/"):
        found = found.get(part, {}) if isinstance(found, dict) else {}
    return found


def _example_string(schema: dict[str, Any], root: dict[str, Any], depth: int) -> str:
    formats = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "email": "simulated@example.com",
               "uri": "https://example.com/simulated", "uuid": "00000000-0000-4000-8000-000000000000"}
    text = formats.get(schema.get("format", ""), "[simulated]")
    text = text.ljust(int(schema.get("minLength", 0)), "x")
    return text[: int(schema["maxLength"])] if "maxLength" in schema else text


def _example_number(schema: dict[str, Any], root: dict[str, Any], depth: int) -> float | int:
    value: float = schema.get("minimum", 0)
    if "exclusiveMinimum" in schema:
        value = schema["exclusiveMinimum"] + 1
    if "maximum" in schema:
        value = min(value, schema["maximum"])
    return int(value) if schema.get("type") == "integer" else value


_EXAMPLES: dict[str, Any] = {
    "object": lambda schema, root, depth: {
        name: example_for(child, root, depth + 1) for name, child in (schema.get("properties") or {}).items()
    },
    "array": lambda schema, root, depth: [
        example_for(schema.get("items", {}), root, depth + 1) for _ in range(max(1, int(schema.get("minItems", 1))))
    ],
    "string": _example_string,
    "integer": _example_number,
    "number": _example_number,
    "boolean": lambda *_: True,
    "null": lambda *_: None,
}
