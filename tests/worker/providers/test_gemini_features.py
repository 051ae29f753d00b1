"""Request features through the Gemini adapter, against the fake Gemini API over real HTTP:
function calling (declarations, calling config, call and response parts, streamed calls),
JSON output (responseSchema / responseJsonSchema), image parts, sampling fields, embeddings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from llmq.contract.models import EmbeddingRequest, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.providers.gemini import GeminiProvider
from llmq.worker.providers.gemini_format import SKIP_THOUGHT_SIGNATURE
from llmq.worker.providers.gemini_schema import gemini_schema
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.gemini import FakeGemini, model_entry
from tests.support.fakes.openai import fake_vector
from tests.support.harness import run_adapter
from tests.worker.providers.test_gemini import config
from tests.worker.providers.test_openai_features import PLAN_SCHEMA, PNG_1X1, WEATHER_TOOL

T = TypeVar("T")
MODEL = "gemini-2.0-flash"
LOOKUP_TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                                "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}


@pytest.fixture
def fake(fake_gemini: FakeGemini) -> FakeGemini:
    """The package's shared FakeGemini server (conftest.py), reset for this test."""
    return fake_gemini


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "model": MODEL,
                              "temperature": 0, "max_tokens": 64}
    return LLMRequest.model_validate({**values, **fields})


def run(fake: FakeGemini, action: Callable[[GeminiProvider], Awaitable[T]], **overrides: Any) -> T:
    return run_adapter(config(fake, **overrides), GeminiProvider, action)


def generate(fake: FakeGemini, request: LLMRequest, **overrides: Any) -> LLMResponse:
    return run(fake, lambda provider: provider.generate(request), **overrides)


def stream(fake: FakeGemini, request: LLMRequest) -> list[LLMResponse]:
    async def action(provider: GeminiProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request)]

    return run(fake, action)


def followup(first: LLMResponse, model: str = MODEL) -> LLMRequest:
    calls = first.tool_calls or []
    return chat(model=model, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump() for call in calls]},
        *({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"} for call in calls),
    ])


# --- tools ----------------------------------------------------------------------------------


def test_tools_round_trip_call_then_function_response_then_final_answer(fake: FakeGemini) -> None:
    first = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="auto"))
    sent = fake.requests[-1].body
    assert sent["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]},
    }]}]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert first.finish_reason == "tool_calls" and first.content == ""
    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.function.name == "get_weather" and call.parsed_arguments() == {"city": "Weather in Oslo?"}
    assert call.id.startswith("call_")  # Gemini 2 sends no id: one made from the answer

    final = generate(fake, followup(first))
    contents = fake.requests[-1].body["contents"]
    assert contents[1] == {"role": "model", "parts": [{
        "functionCall": {"name": "get_weather", "args": {"city": "Weather in Oslo?"}},
        "thoughtSignature": SKIP_THOUGHT_SIGNATURE}]}
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": "sunny, 21 C"}}}]}
    assert final.finish_reason == "stop" and final.tool_calls is None
    assert final.content == fake_reply_text("sunny, 21 C", "gemini")


def test_tool_results_go_back_in_the_order_of_their_calls_whatever_order_they_came_in(fake: FakeGemini) -> None:
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "fjord"}'}}]
    answer = generate(fake, chat(tools=[WEATHER_TOOL, LOOKUP_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo, and what is a fjord?"},
        {"role": "assistant", "content": "Looking both up.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_b", "content": "a long inlet"},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    ]))
    model_turn, results = fake.requests[-1].body["contents"][1:]
    assert [part.get("text") or part["functionCall"]["name"] for part in model_turn["parts"]] == \
        ["Looking both up.", "get_weather", "lookup"]
    assert "thoughtSignature" in model_turn["parts"][1] and "thoughtSignature" not in model_turn["parts"][2]
    assert [part["functionResponse"]["name"] for part in results["parts"]] == ["get_weather", "lookup"]
    assert answer.content == fake_reply_text("a long inlet", "gemini")  # the last result answered


def test_gemini_3_takes_the_replayed_call_with_the_documented_signature_and_its_own_call_ids(fake: FakeGemini) -> None:
    fake.models.append(model_entry("gemini-3-pro-preview"))
    fake.function_call_ids = True
    first = generate(fake, chat(model="gemini-3-pro-preview", tools=[WEATHER_TOOL]))
    assert first.tool_calls is not None and first.tool_calls[0].id.startswith("fc-")
    final = generate(fake, followup(first, model="gemini-3-pro-preview"))
    assert final.content == fake_reply_text("sunny, 21 C", "gemini")


@pytest.mark.parametrize(("choice", "expected"), [
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "lookup"}}, {"mode": "ANY", "allowedFunctionNames": ["lookup"]}),
])
def test_tool_choice_is_a_function_calling_mode(fake: FakeGemini, choice: Any, expected: dict[str, Any]) -> None:
    answer = generate(fake, chat(tools=[WEATHER_TOOL, LOOKUP_TOOL], tool_choice=choice))
    assert fake.requests[-1].body["toolConfig"] == {"functionCallingConfig": expected}
    if choice == "none":
        assert answer.tool_calls is None and answer.finish_reason == "stop"
    else:
        assert answer.tool_calls is not None
        assert answer.tool_calls[0].function.name == ("lookup" if isinstance(choice, dict) else "get_weather")


def test_a_function_without_parameters_is_declared_without_them(fake: FakeGemini) -> None:
    now = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    answer = generate(fake, chat(tools=[now]))
    assert fake.requests[-1].body["tools"] == [{"functionDeclarations": [{"name": "now"}]}]
    assert answer.tool_calls is not None and answer.tool_calls[0].parsed_arguments() == {}


def test_streamed_function_calls_arrive_as_deltas_and_end_whole(fake: FakeGemini) -> None:
    chunks = stream(fake, chat(tools=[WEATHER_TOOL]))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    final = chunks[-1]
    assert final.metadata["final"] and final.finish_reason == "tool_calls"
    assert final.tool_calls is not None and final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].function.arguments == deltas[0].function.arguments == '{"city":"Weather in Oslo?"}'
    assert final.usage.prompt_tokens == 3


def test_a_malformed_function_call_is_a_malformed_response_asked_again(fake: FakeGemini) -> None:
    body = {"candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL", "index": 0}], "responseId": "r1"}
    fake.fail_next(200, body=body)
    with pytest.raises(errors.MalformedResponseError, match="MALFORMED_FUNCTION_CALL") as caught:
        generate(fake, chat(tools=[WEATHER_TOOL]))
    assert caught.value.retryable


# --- JSON -----------------------------------------------------------------------------------


def test_json_schema_goes_as_response_schema_on_gemini_2_0_without_what_it_refuses(fake: FakeGemini) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}
    request = chat(response_format=response_format)
    answer = check_output(request, generate(fake, request))
    config = fake.requests[-1].body["generationConfig"]
    assert config["responseMimeType"] == "application/json" and "responseJsonSchema" not in config
    assert config["responseSchema"] == {
        "type": "OBJECT", "required": ["steps", "done"], "propertyOrdering": ["steps", "done"],
        "properties": {"steps": {"type": "ARRAY", "items": {"type": "STRING"}}, "done": {"type": "BOOLEAN"}},
    }
    assert answer.parsed == {"steps": [answer.parsed["steps"][0]], "done": True}


@pytest.mark.parametrize(("model", "options", "field"), [
    ("gemini-2.5-flash", {}, "responseJsonSchema"),
    ("gemini-2.5-flash", {"structured_output": "response_schema"}, "responseSchema"),
    ("gemini-2.0-flash", {"structured_output": "response_json_schema"}, "responseJsonSchema"),
])
def test_the_schema_field_follows_the_model_or_the_option(fake: FakeGemini, model: str, options: dict[str, Any],
                                                         field: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}}
    request = chat(model=model, response_format=response_format)
    check_output(request, generate(fake, request, options=options))
    config = fake.requests[-1].body["generationConfig"]
    assert set(config) & {"responseSchema", "responseJsonSchema"} == {field}
    if field == "responseJsonSchema":
        assert config[field] == PLAN_SCHEMA  # JSON Schema as given, additionalProperties and all


def test_json_object_asks_for_json_without_a_schema(fake: FakeGemini) -> None:
    request = chat(response_format={"type": "json_object"})
    answer = check_output(request, generate(fake, request))
    config = fake.requests[-1].body["generationConfig"]
    assert config["responseMimeType"] == "application/json" and "responseSchema" not in config
    assert answer.parsed == {"answer": fake_reply_text("Weather in Oslo?", "gemini")}


def test_an_answer_that_misses_the_schema_is_an_output_validation_error(fake: FakeGemini) -> None:
    fake.json_answers = ['{"steps": "not a list", "done": true}', "not json"]
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}})
    with pytest.raises(errors.OutputValidationError, match="at steps"):
        check_output(request, generate(fake, request))
    with pytest.raises(errors.OutputValidationError, match="not JSON"):
        check_output(request, generate(fake, request))
    assert errors.OutputValidationError.retryable  # the engine asks the same provider again


# --- images, sampling, provider options -------------------------------------------------------


def test_images_go_inline_or_by_uri(fake: FakeGemini) -> None:
    content = [{"type": "text", "text": "Compare these.", "cache_control": {"type": "ephemeral"}},
               {"type": "image_url", "image_url": {"url": PNG_1X1}},
               {"type": "image_url", "image_url": {"url": "https://example.com/maps/oslo.jpeg?size=large"}}]
    answer = generate(fake, chat(messages=[{"role": "user", "content": content}]))
    parts = fake.requests[-1].body["contents"][0]["parts"]
    assert parts == [
        {"text": "Compare these."},
        {"inlineData": {"mimeType": "image/png", "data": PNG_1X1.split(",", 1)[1]}},
        {"fileData": {"fileUri": "https://example.com/maps/oslo.jpeg?size=large", "mimeType": "image/jpeg"}},
    ]
    assert answer.usage.prompt_tokens == 2 + 2 * 258


def test_stop_seed_top_p_and_provider_options_reach_their_fields(fake: FakeGemini) -> None:
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    generate(fake, chat(stop="END", seed=7, top_p=0.5, provider_options={"topK": 20, "safetySettings": safety}))
    sent = fake.requests[-1].body
    config = sent["generationConfig"]
    assert (config["stopSequences"], config["seed"], config["topP"], config["topK"]) == (["END"], 7, 0.5, 20)
    assert sent["safetySettings"] == safety


def test_provider_options_gemini_does_not_take_are_refused_before_the_call(fake: FakeGemini) -> None:
    with pytest.raises(errors.BadRequestError, match="provider_options.top_k is not taken"):
        generate(fake, chat(provider_options={"top_k": 5}))
    with pytest.raises(errors.BadRequestError, match="taskType is for embedding requests"):
        generate(fake, chat(provider_options={"taskType": "RETRIEVAL_QUERY"}))
    assert fake.requests == []


# --- embeddings -------------------------------------------------------------------------------


def test_embeddings_go_through_batch_embed_contents_in_input_order(fake: FakeGemini) -> None:
    request = EmbeddingRequest(input=["mine iron ore", "craft a pickaxe"], model="text-embedding-004", dimensions=4,
                               provider_options={"taskType": "RETRIEVAL_DOCUMENT"})
    response = run(fake, lambda provider: provider.embed(request))
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent.body == {"requests": [
        {"model": "models/text-embedding-004", "taskType": "RETRIEVAL_DOCUMENT", "outputDimensionality": 4,
         "content": {"parts": [{"text": text}]}} for text in ["mine iron ore", "craft a pickaxe"]]}
    assert response.embeddings == [fake_vector("mine iron ore", 4), fake_vector("craft a pickaxe", 4)]
    # No usageMetadata in the answer: llmq's own estimate, said to be one.
    assert response.usage.prompt_tokens > 0 and response.metadata["usage_estimated"] is True


def test_embedding_usage_is_googles_count_when_the_answer_has_one(fake: FakeGemini) -> None:
    fake.embedding_usage = True
    response = run(fake, lambda provider: provider.embed(EmbeddingRequest(input="mine iron ore",
                                                                          model="text-embedding-004")))
    assert response.usage.prompt_tokens == 3 and "usage_estimated" not in response.metadata
    assert len(response.embeddings[0]) == 8


# --- the schema conversion --------------------------------------------------------------------


def test_json_schema_becomes_gemini_schema_dropping_what_gemini_refuses() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
        "$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string", "format": "email"},
                                                            "count": {"type": "integer", "format": "int64",
                                                                      "multipleOf": 2}}},
                  "Tree": {"type": "object", "properties": {"children": {"type": "array",
                                                                          "items": {"$ref": "#/$defs/Tree"}}}}},
        "properties": {
            "item": {"$ref": "#/$defs/Item", "description": "the thing"},
            "note": {"type": ["string", "null"]},
            "kind": {"oneOf": [{"const": "a"}, {"type": "null"}]},
            "either": {"anyOf": [{"type": "string"}, {"type": "number", "exclusiveMinimum": 0}]},
            "tree": {"$ref": "#/$defs/Tree"},
            "levels": {"enum": [1, 2, 3], "type": "integer"},
        },
        "required": ["item", "ghost"],
    }
    converted = gemini_schema(schema)
    assert converted["properties"]["item"] == {
        "type": "OBJECT", "description": "the thing", "propertyOrdering": ["name", "count"],
        "properties": {"name": {"type": "STRING"}, "count": {"type": "INTEGER", "format": "int64"}}}
    assert converted["properties"]["note"] == {"type": "STRING", "nullable": True}
    assert converted["properties"]["kind"] == {"type": "STRING", "enum": ["a"], "nullable": True}
    assert converted["properties"]["either"] == {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]}
    assert converted["properties"]["tree"]["properties"]["children"]["items"] == {"type": "OBJECT"}
    assert converted["properties"]["levels"] == {"type": "INTEGER"}
    assert converted["required"] == ["item"]
    assert not {"additionalProperties", "$schema", "$defs"} & set(converted)
