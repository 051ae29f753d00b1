"""The flex tier: synchronous calls at batch prices that the provider may refuse for capacity.

OpenAI (`service_tier: "flex"`, https://platform.openai.com/docs/guides/flex-processing) answers a
refusal with 429 "Resource Unavailable", not billed; Gemini (`service_tier: "FLEX"`,
https://ai.google.dev/gemini-api/docs/flex-inference) sheds flex traffic with 503 UNAVAILABLE.
An adapter of such a provider mixes in `FlexTier` and names the class its refusals map to
(`flex_refusals`); only a call that asked for flex is turned into `FlexCapacityError`, which
the engine retries at once at the standard tier when the job allows it (worker/engine.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors


class FlexTier:
    """Mixed in before the adapter's base: `class OpenAIProvider(FlexTier, HTTPProvider[...])`."""

    supports_flex: ClassVar[bool] = True
    #: The error classes a refused flex call arrives as, before it is told apart.
    flex_refusals: ClassVar[tuple[type[errors.ProviderError], ...]] = ()

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        try:
            return await super().generate(request, job_id=job_id)  # type: ignore[misc]
        except self.flex_refusals as error:
            raise _refused(request, error) from error

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        try:
            async for chunk in super().stream_generate(request, job_id=job_id):  # type: ignore[misc]
                yield chunk
        except self.flex_refusals as error:
            raise _refused(request, error) from error


def _refused(request: LLMRequest, error: errors.ProviderError) -> errors.ProviderError:
    if request.service_tier != "flex":
        return error
    details: dict[str, Any] = {
        "provider": error.provider, "model": error.model, "status_code": error.status_code,
        "request_id": error.request_id, "retry_after_s": error.retry_after_s,
    }
    return errors.FlexCapacityError(f"flex tier refused the call for capacity: {error.message}", **details)
