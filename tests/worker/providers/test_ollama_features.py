"""Request features through the Ollama adapter, against the fake Ollama over real HTTP: tools
(calls with object arguments, tool results by name, NDJSON-streamed calls), `format` with a
schema, images, sampling options, and /api/embed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.providers.ollama import OllamaProvider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.ollama import IMAGE_TOKENS, FakeOllama
from tests.support.fakes.openai import fake_vector
from tests.support.harness import run_adapter
from tests.worker.providers.test_gemini_features import LOOKUP_TOOL
from tests.worker.providers.test_openai_features import PLAN_SCHEMA, PNG_1X1, WEATHER_TOOL

T = TypeVar("T")


@pytest.fixture
def fake(fake_ollama: FakeOllama) -> FakeOllama:
    """The package's shared FakeOllama server (conftest.py), reset for this test."""
    return fake_ollama


def run(fake: FakeOllama, action: Callable[[OllamaProvider], Awaitable[T]], **overrides: Any) -> T:
    entry = ProviderConfig(name="ollama", base_url=fake.url, timeout=5.0, **overrides)
    return run_adapter(entry, OllamaProvider, action)


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "model": "llama3",
                              "temperature": 0, "max_tokens": 64}
    return LLMRequest.model_validate({**values, **fields})


def generate(fake: FakeOllama, request: LLMRequest, **overrides: Any) -> LLMResponse:
    return run(fake, lambda provider: provider.generate(request), **overrides)


def stream(fake: FakeOllama, request: LLMRequest) -> list[LLMResponse]:
    async def action(provider: OllamaProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request)]

    return run(fake, action)


def test_tools_round_trip_call_then_tool_result_then_final_answer(fake: FakeOllama) -> None:
    first = generate(fake, chat(tools=[WEATHER_TOOL]))
    assert fake.requests[-1].body["tools"] == [WEATHER_TOOL]
    assert first.finish_reason == "tool_calls" and first.content == ""
    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert call.parsed_arguments() == {"city": "Weather in Oslo?"}  # Ollama's object, as OpenAI's JSON string

    final = generate(fake, chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]))
    messages = fake.requests[-1].body["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Weather in Oslo?"}}}]}
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id,
                           "tool_name": "get_weather"}
    assert final.finish_reason == "stop" and final.tool_calls is None
    assert final.content == fake_reply_text("sunny, 21 C", "ollama")


def test_a_call_keeps_the_id_a_newer_ollama_gives_it(fake: FakeOllama) -> None:
    fake.tool_call_ids = True
    answer = generate(fake, chat(tools=[WEATHER_TOOL]))
    assert answer.tool_calls is not None and answer.tool_calls[0].id.startswith("call_")
    assert answer.tool_calls[0].id == fake.tool_call(fake.requests[-1].body)["id"]  # type: ignore[index]


@pytest.mark.parametrize(("choice", "sent"), [("none", None), ({"type": "function", "function": {"name": "lookup"}},
                                                                 ["lookup"]), ("required", ["get_weather", "lookup"])])
def test_tool_choice_without_an_ollama_field_is_mapped_to_the_tools_sent(fake: FakeOllama, choice: Any,
                                                                          sent: list[str] | None) -> None:
    generate(fake, chat(tools=[WEATHER_TOOL, LOOKUP_TOOL], tool_choice=choice))
    body = fake.requests[-1].body
    assert "tool_choice" not in body
    assert ([tool["function"]["name"] for tool in body["tools"]] if "tools" in body else None) == sent


def test_streamed_tool_calls_come_whole_in_one_line_and_end_the_stream(fake: FakeOllama) -> None:
    chunks = stream(fake, chat(tools=[WEATHER_TOOL]))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert len(deltas) == 1 and deltas[0].id and deltas[0].function.name == "get_weather"
    final = chunks[-1]
    assert final.metadata["final"] and final.finish_reason == "tool_calls"
    assert final.tool_calls is not None and final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].function.arguments == deltas[0].function.arguments == '{"city":"Weather in Oslo?"}'


def test_a_model_without_tools_is_a_bad_request(fake: FakeOllama) -> None:
    fake.models_without_tools = {"llama3:latest"}
    with pytest.raises(errors.BadRequestError, match="does not support tools"):
        generate(fake, chat(tools=[WEATHER_TOOL]))


def test_json_schema_is_the_format_and_a_matching_answer_parses(fake: FakeOllama) -> None:
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}})
    answer = check_output(request, generate(fake, request))
    assert fake.requests[-1].body["format"] == PLAN_SCHEMA
    assert answer.parsed == {"steps": [answer.parsed["steps"][0]], "done": True}


def test_json_object_is_format_json(fake: FakeOllama) -> None:
    request = chat(response_format={"type": "json_object"})
    answer = check_output(request, generate(fake, request))
    assert fake.requests[-1].body["format"] == "json"
    assert answer.parsed == {"answer": fake_reply_text("Weather in Oslo?", "ollama")}


def test_an_answer_that_misses_the_schema_is_an_output_validation_error(fake: FakeOllama) -> None:
    fake.json_answers = ['{"steps": [], "done": "yes"}']
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}})
    with pytest.raises(errors.OutputValidationError, match="at done"):
        check_output(request, generate(fake, request))
    assert errors.OutputValidationError.retryable  # the engine asks the same provider again


def test_a_data_image_goes_as_base64_without_its_prefix(fake: FakeOllama) -> None:
    fake.models.append("llava:latest")
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG_1X1}}]
    answer = generate(fake, chat(model="llava", messages=[{"role": "user", "content": content}]))
    sent = fake.requests[-1].body["messages"][0]
    assert sent == {"role": "user", "content": "What is this?", "images": [PNG_1X1.split(",", 1)[1]]}
    assert answer.usage.prompt_tokens == 3 + IMAGE_TOKENS


def test_an_https_image_is_refused_before_the_call(fake: FakeOllama) -> None:
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    with pytest.raises(errors.BadRequestError, match="inline only"):
        generate(fake, chat(messages=[{"role": "user", "content": content}]))
    assert fake.requests == []


def test_stop_seed_top_p_and_provider_options_go_where_ollama_reads_them(fake: FakeOllama) -> None:
    generate(fake, chat(stop=["END"], seed=7, top_p=0.5, provider_options={"top_k": 20, "think": False}),
             options={"num_ctx": 8192})
    body = fake.requests[-1].body
    assert body["options"] == {"temperature": 0, "num_predict": 64, "num_ctx": 8192, "stop": ["END"], "seed": 7,
                               "top_p": 0.5, "top_k": 20}
    assert body["think"] is False
    with pytest.raises(errors.BadRequestError, match="provider_options.logit_bias is not taken"):
        generate(fake, chat(provider_options={"logit_bias": {}}))


def test_embeddings_through_api_embed(fake: FakeOllama) -> None:
    fake.models.append("nomic-embed-text:latest")
    request = EmbeddingRequest(input=["mine iron ore", "craft a pickaxe"], model="nomic-embed-text", dimensions=4)
    response = run(fake, lambda provider: provider.embed(request), options={"keep_alive": "5m"})
    sent = fake.requests[-1]
    assert sent.path == "/api/embed"
    assert sent.body == {"model": "nomic-embed-text", "input": ["mine iron ore", "craft a pickaxe"], "dimensions": 4,
                         "keep_alive": "5m"}
    assert response.embeddings == [fake_vector("mine iron ore", 4), fake_vector("craft a pickaxe", 4)]
    assert response.usage.prompt_tokens == 6 and "usage_estimated" not in response.metadata


def test_embeddings_of_an_unknown_model_are_model_not_found(fake: FakeOllama) -> None:
    with pytest.raises(errors.ModelNotFoundError):
        run(fake, lambda provider: provider.embed(EmbeddingRequest(input="x", model="bge-m3")))
