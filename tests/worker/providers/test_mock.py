"""The in-process mock provider: deterministic, labelled as simulated, with seeded failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.mock import SIMULATED_LABEL, MockProvider
from llmq.worker.providers.registry import create_provider
from llmq.worker.tokens import estimate_prompt_tokens, estimate_tokens

T = TypeVar("T")


def mock(**options: Any) -> MockProvider:
    provider = create_provider(ProviderConfig(name="demo_mock", type="mock", models=["mock-small"], options=options))
    assert isinstance(provider, MockProvider)
    return provider


def request(**overrides: Any) -> LLMRequest:
    fields: dict[str, Any] = {"messages": [{"role": "user", "content": "Plan my next Minecraft task"}],
                              "model": "mock-small"}
    return LLMRequest(**{**fields, **overrides})


def run(action: Awaitable[T]) -> T:
    return asyncio.run(action)  # type: ignore[arg-type]


async def collect(provider: MockProvider, req: LLMRequest, into: list[LLMResponse] | None = None) -> list[LLMResponse]:
    chunks = into if into is not None else []
    async for chunk in provider.stream_generate(req):
        chunks.append(chunk)
    return chunks


def outcomes(provider: MockProvider, calls: int) -> list[str]:
    async def main() -> list[str]:
        results = []
        for _ in range(calls):
            try:
                await provider.generate(request())
                results.append("ok")
            except errors.ServerError:
                results.append("fail")
        return results

    return run(main())


def test_output_is_deterministic_and_labelled_simulated() -> None:
    first = run(mock().generate(request()))
    second = run(mock().generate(request()))
    assert first == second
    assert first.content.startswith(SIMULATED_LABEL)
    assert "Plan my next Minecraft task" in first.content and "\nTask: " in first.content
    assert first.metadata == {"simulated": True, "finish_reason": "stop"}
    assert (first.provider, first.model) == ("demo_mock", "mock-small")


def test_usage_estimates_prompt_and_completion() -> None:
    req = request()
    response = run(mock().generate(req))
    messages: list[object] = list(req.messages)
    assert response.usage.prompt_tokens == estimate_prompt_tokens(messages)
    assert response.usage.completion_tokens == estimate_tokens(response.content)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completion_tokens_option_is_capped_by_max_tokens() -> None:
    assert run(mock(completion_tokens=120).generate(request())).usage.completion_tokens == 120
    assert run(mock(completion_tokens=120).generate(request(max_tokens=30))).usage.completion_tokens == 30


def test_latency_delays_generate_and_stream() -> None:
    started = time.monotonic()
    run(mock(latency_s=0.2).generate(request()))
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    run(collect(mock(latency_s=0.2), request()))
    assert time.monotonic() - started >= 0.19  # spread over the chunks


def test_failure_rate_is_repeatable_for_a_seed() -> None:
    first = outcomes(mock(failure_rate=0.5, seed=7), 30)
    assert first == outcomes(mock(failure_rate=0.5, seed=7), 30)
    assert {"ok", "fail"} == set(first)
    assert first != outcomes(mock(failure_rate=0.5, seed=8), 30)
    assert set(outcomes(mock(failure_rate=1.0), 5)) == {"fail"}
    assert set(outcomes(mock(), 5)) == {"ok"}


def test_fail_with_names_the_error_class() -> None:
    with pytest.raises(errors.RateLimitedError) as caught:
        run(mock(failure_rate=1.0, fail_with="RateLimitedError").generate(request()))
    assert caught.value.provider == "demo_mock" and caught.value.model == "mock-small"
    assert "simulated" in caught.value.message
    with pytest.raises(errors.JobCancelledError):  # not a ProviderError: raised with its message alone
        run(mock(failure_rate=1.0, fail_with="JobCancelledError").generate(request()))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="fail_with"):
        mock(fail_with="NoSuchError")
    with pytest.raises(ValidationError, match="latency"):
        mock(latency=1)
    with pytest.raises(ValidationError):
        mock(failure_rate=1.5)


def test_stream_chunks_join_to_the_generate_content() -> None:
    full = run(mock().generate(request()))
    *pieces, final = run(collect(mock(), request()))
    assert len(pieces) > 1
    assert "".join(chunk.content for chunk in pieces) == full.content
    assert all(chunk.metadata.get("simulated") and not chunk.metadata.get("final") for chunk in pieces)
    assert final.content == "" and final.metadata["final"] is True and final.metadata["simulated"] is True
    assert final.usage == full.usage and final.metadata["finish_reason"] == "stop"


def test_stream_failure_comes_part_way_not_as_a_short_answer() -> None:
    received: list[LLMResponse] = []
    with pytest.raises(errors.ServerError):
        run(collect(mock(failure_rate=1.0), request(), received))
    assert received and not any(chunk.metadata.get("final") for chunk in received)


def test_models_and_health() -> None:
    provider = mock()
    assert run(provider.get_available_models()) == ["mock-small"]
    assert run(provider.health_check()) is True
    assert provider.local and provider.simulated and not provider.requires_api_key


# --- request features, simulated ------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "mine", "parameters": {
    "type": "object", "properties": {"block": {"type": "string", "enum": ["iron", "coal"]}, "count": {"type": "integer",
                                                                                                    "minimum": 1}},
    "required": ["block", "count"]}}}


def test_tools_round_trip_call_then_answer() -> None:
    provider = mock()
    first = run(provider.generate(request(tools=[TOOL])))
    assert first.finish_reason == "tool_calls" and first.metadata["simulated"]
    assert first.tool_calls is not None and first.tool_calls[0].parsed_arguments() == {"block": "iron", "count": 1}
    followup = request(tools=[TOOL], messages=[
        {"role": "user", "content": "Plan my next Minecraft task"},
        {"role": "assistant", "tool_calls": [first.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "mined 1 iron"},
    ])
    final = run(provider.generate(followup))
    assert final.finish_reason == "stop" and final.tool_calls is None and "mined 1 iron" in final.content
    assert run(provider.generate(request(tools=[TOOL]))).tool_calls == first.tool_calls  # deterministic


def test_streamed_tool_calls_come_as_deltas_and_end_whole() -> None:
    chunks = run(collect(mock(), request(tools=[TOOL])))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert deltas[0].id and deltas[0].function.name == "mine"
    final = chunks[-1]
    assert final.tool_calls and final.tool_calls[0].function.arguments == "".join(
        delta.function.arguments or "" for delta in deltas)


def test_json_answers_match_the_schema_every_time() -> None:
    from jsonschema import Draft202012Validator

    schema = {"type": "object", "properties": {
        "steps": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/step"}},
        "when": {"type": "string", "format": "date-time"}, "score": {"type": "number", "exclusiveMinimum": 0},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 20}]}},
        "required": ["steps", "when", "score", "note"], "additionalProperties": False,
        "$defs": {"step": {"type": "object", "properties": {"action": {"type": "string", "maxLength": 5}}}}}
    req = request(response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": schema}})
    answer = run(mock().generate(req))
    Draft202012Validator(schema).validate(json.loads(answer.content))
    assert answer.content == run(mock().generate(req)).content and answer.metadata["simulated"]
    assert json.loads(run(mock().generate(request(response_format={"type": "json_object"}))).content)["answer"]


def test_embeddings_are_deterministic_unit_vectors_labelled_simulated() -> None:
    from llmq.contract.models import EmbeddingRequest

    embed = EmbeddingRequest(input=["iron", "coal"], model="mock-small", dimensions=6)
    response = run(mock().embed(embed))
    assert len(response.embeddings) == 2 and all(len(vector) == 6 for vector in response.embeddings)
    assert all(abs(sum(value * value for value in vector) - 1) < 1e-9 for vector in response.embeddings)
    assert response.embeddings == run(mock().embed(embed)).embeddings and response.metadata["simulated"]
    assert response.usage.prompt_tokens == 2
