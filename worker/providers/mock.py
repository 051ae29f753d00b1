"""An in-process provider for demos and tests. Its output is simulated, and says so.

Options (under `options:` in the provider's config entry):

- `latency_s` (float, default 0): seconds before the answer (spread over chunks when streaming)
- `failure_rate` (0..1, default 0): share of calls that fail, drawn from a seeded generator
- `fail_with` (error class name from llmq.worker.errors, default "ServerError")
- `completion_tokens` (int, default: from the prompt): tokens in each answer
- `seed` (int, default 0): makes the failure sequence repeatable
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider
from llmq.worker.tokens import estimate_prompt_tokens, estimate_tokens

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

    def _maybe_fail(self, request: LLMRequest) -> None:
        if self.options.failure_rate and self._random.random() < self.options.failure_rate:
            error_class = errors.ERRORS_BY_NAME[self.options.fail_with]
            message = f"simulated {error_class.__name__} from mock provider {self.name!r}"
            if issubclass(error_class, errors.ProviderError):
                raise error_class(message, provider=self.name, model=request.model, status_code=500)
            raise error_class(message)

    def _answer(self, request: LLMRequest) -> tuple[str, Usage]:
        digest = hashlib.sha256(f"{request.model}\n{request.prompt_text()}".encode()).digest()
        idea = _TASK_IDEAS[digest[0] % len(_TASK_IDEAS)]
        last = request.messages[-1].content.splitlines()[0][:60] if request.messages[-1].content else ""
        text = f"{SIMULATED_LABEL} Reasoning: deterministic reply to '{last}'.\nTask: {idea}"
        prompt_tokens = estimate_prompt_tokens(request.messages)
        completion = self.options.completion_tokens or estimate_tokens(text)
        completion = min(completion, request.max_tokens)
        return text, Usage.of(prompt_tokens, completion)

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        if self.options.latency_s:
            await asyncio.sleep(self.options.latency_s)
        self._maybe_fail(request)
        text, usage = self._answer(request)
        return self.response(request, text, usage, finish_reason="stop")

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        text, usage = self._answer(request)
        pieces = _split(text, self.chunks_per_answer)
        for index, piece in enumerate(pieces):
            if self.options.latency_s:
                await asyncio.sleep(self.options.latency_s / len(pieces))
            if index == len(pieces) // 2:
                self._maybe_fail(request)
            yield self.response(request, piece, Usage())
        yield self.final_chunk(request, usage, finish_reason="stop")

    async def health_check(self) -> bool:
        return True


def _split(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[index : index + size] for index in range(0, len(text), size)]
