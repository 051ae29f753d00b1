"""Request features through the OpenAI and Azure OpenAI adapters, against the fake over real HTTP:
tools (call, tool result, final answer; streamed as deltas), JSON schema, image parts,
reasoning models' fields, provider_options, and embeddings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.providers.openai import OpenAIProvider
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI, fake_vector
from tests.support.harness import run_adapter

# A 1x1 transparent PNG.
PNG_1X1 = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False},
    },
}
PLAN_SCHEMA = {
    "type": "object",
    "properties": {"steps": {"type": "array", "items": {"type": "string"}}, "done": {"type": "boolean"}},
    "required": ["steps", "done"], "additionalProperties": False,
}


def entry(fake: FakeOpenAI, flavor: str, **overrides: Any) -> ProviderConfig:
    if flavor == "openai":
        values: dict[str, Any] = {"type": "openai", "api_key": DEFAULT_API_KEY, "base_url": fake.url + "/v1"}
    else:
        values = {"type": "azure_openai", "api_key": DEFAULT_API_KEY, "base_url": fake.url}
    values.update(timeout=5, **overrides)
    made = ProviderConfig.model_validate(values)
    made.name = f"{flavor}_main"
    return made


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "model": "gpt-4o-mini",
                              "temperature": 0, "max_tokens": 64}
    return LLMRequest.model_validate({**values, **fields})


def generate(config: ProviderConfig, request: LLMRequest) -> LLMResponse:
    return run_adapter(config, OpenAIProvider, lambda provider: provider.generate(request))


def stream(config: ProviderConfig, request: LLMRequest) -> list[LLMResponse]:
    async def action(provider: OpenAIProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request)]

    return run_adapter(config, OpenAIProvider, action)


FLAVORS = pytest.mark.parametrize("flavor", ["openai", "azure"])


@FLAVORS
def test_tools_round_trip_call_then_tool_result_then_final_answer(fake_openai: FakeOpenAI, flavor: str) -> None:
    config = entry(fake_openai, flavor)
    first = generate(config, chat(tools=[WEATHER_TOOL], tool_choice="auto"))
    assert first.finish_reason == "tool_calls" and first.content == ""
    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.function.name == "get_weather" and call.parsed_arguments() == {"city": "Weather in Oslo?"}
    sent = fake_openai.requests[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "auto"

    followup = chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ])
    final = generate(config, followup)
    assert final.finish_reason == "stop" and final.tool_calls is None
    assert "sunny, 21 C" in final.content
    messages = fake_openai.requests[-1].body["messages"]
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}


@FLAVORS
def test_a_named_tool_choice_is_sent_and_obeyed(fake_openai: FakeOpenAI, flavor: str) -> None:
    other = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    choice = {"type": "function", "function": {"name": "lookup"}}
    answer = generate(entry(fake_openai, flavor), chat(tools=[WEATHER_TOOL, other], tool_choice=choice))
    assert fake_openai.requests[-1].body["tool_choice"] == choice
    assert answer.tool_calls is not None and answer.tool_calls[0].function.name == "lookup"


@FLAVORS
def test_streamed_tool_calls_arrive_as_deltas_and_end_whole(fake_openai: FakeOpenAI, flavor: str) -> None:
    chunks = stream(entry(fake_openai, flavor), chat(tools=[WEATHER_TOOL]))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and all(delta.index == 0 for delta in deltas)
    streamed_arguments = "".join(delta.function.arguments or "" for delta in deltas)
    final = chunks[-1]
    assert final.metadata["final"] and final.finish_reason == "tool_calls"
    assert final.tool_calls is not None and final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].function.arguments == streamed_arguments == '{"city": "Weather in Oslo?"}'


@FLAVORS
def test_json_schema_is_sent_and_a_matching_answer_parses(fake_openai: FakeOpenAI, flavor: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}
    request = chat(response_format=response_format)
    answer = check_output(request, generate(entry(fake_openai, flavor), request))
    assert fake_openai.requests[-1].body["response_format"] == response_format
    assert answer.parsed == {"steps": [answer.parsed["steps"][0]], "done": True}
    assert answer.parsed["steps"][0].startswith("Task: fake")


@FLAVORS
def test_an_answer_that_misses_the_schema_is_an_output_validation_error(fake_openai: FakeOpenAI, flavor: str) -> None:
    fake_openai.json_answers = ['{"steps": "not a list", "done": true}', "not json at all"]
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}})
    config = entry(fake_openai, flavor)
    with pytest.raises(errors.OutputValidationError, match="at steps"):
        check_output(request, generate(config, request))
    with pytest.raises(errors.OutputValidationError, match="not JSON"):
        check_output(request, generate(config, request))
    assert errors.OutputValidationError.retryable and errors.OutputValidationError.fallback


@FLAVORS
def test_an_image_part_is_sent_as_openai_takes_it_without_cache_control(fake_openai: FakeOpenAI, flavor: str) -> None:
    content = [
        {"type": "text", "text": "What is in this image?", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": PNG_1X1, "detail": "low"}},
    ]
    answer = generate(entry(fake_openai, flavor), chat(model="gpt-4o", messages=[{"role": "user", "content": content}]))
    sent = fake_openai.requests[-1].body["messages"][0]["content"]
    assert sent == [{"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": PNG_1X1, "detail": "low"}}]
    assert answer.usage.prompt_tokens == 5 + 85  # the fake counts words, and 85 per image


def test_stop_seed_top_p_and_allowed_provider_options_are_sent(fake_openai: FakeOpenAI) -> None:
    request = chat(stop=["END"], seed=7, top_p=0.5, provider_options={"frequency_penalty": 0.5, "user": "u-1"})
    generate(entry(fake_openai, "openai"), request)
    sent = fake_openai.requests[-1].body
    assert (sent["stop"], sent["seed"], sent["top_p"]) == (["END"], 7, 0.5)
    assert (sent["frequency_penalty"], sent["user"]) == (0.5, "u-1")


def test_a_provider_option_the_adapter_does_not_take_is_refused_before_the_call(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(errors.BadRequestError, match="provider_options.top_k is not taken by provider type 'openai'"):
        generate(entry(fake_openai, "openai"), chat(provider_options={"top_k": 5}))
    assert fake_openai.requests == []


@pytest.mark.parametrize("model", ["o3-mini", "gpt-5-mini"])
def test_a_reasoning_model_gets_max_completion_tokens_and_no_temperature(fake_openai: FakeOpenAI, model: str) -> None:
    generate(entry(fake_openai, "openai"), chat(model=model, temperature=0.2))
    sent = fake_openai.requests[-1].body
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent and "temperature" not in sent


@FLAVORS
def test_embeddings_come_back_in_input_order_from_base64(fake_openai: FakeOpenAI, flavor: str) -> None:
    config = entry(fake_openai, flavor, options={"deployments": {"text-embedding-3-small": "embed-prod"}}
                   if flavor == "azure" else {})
    request = EmbeddingRequest(input=["alpha", "beta gamma"], model="text-embedding-3-small", dimensions=4)
    response = run_adapter(config, OpenAIProvider, lambda provider: provider.embed(request))
    assert isinstance(response, EmbeddingResponse)
    assert response.embeddings == [fake_vector("alpha", 4), fake_vector("beta gamma", 4)]
    assert response.usage.prompt_tokens == 3 and response.provider == f"{flavor}_main"
    sent = fake_openai.requests[-1]
    expected_path = "/openai/deployments/embed-prod/embeddings" if flavor == "azure" else "/v1/embeddings"
    assert sent.path == expected_path
    assert sent.body == {"model": "text-embedding-3-small", "input": ["alpha", "beta gamma"],
                         "encoding_format": "base64", "dimensions": 4}


def test_vectors_stay_compact_in_json_and_come_back_exact() -> None:
    response = EmbeddingResponse(embeddings=[fake_vector("alpha", 1536)], model="m", provider="p")
    stored = response.model_dump_json()
    assert len(stored) < 9000 < len(json.dumps(response.embeddings))
    assert EmbeddingResponse.model_validate_json(stored).embeddings == response.embeddings
