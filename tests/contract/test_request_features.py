"""The request contract's OpenAI fields, checked at the edge: each refusal names the field and the fix."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from llmq.contract.embeddings import EmbeddingRequest
from llmq.contract.models import JobKind, LLMRequest

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def request(**overrides: Any) -> LLMRequest:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini"}
    body.update(overrides)
    return LLMRequest.model_validate(body)


def refusal(**overrides: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        request(**overrides)
    error = caught.value.errors()[0]
    return ".".join(str(part) for part in error["loc"]) + ": " + error["msg"]


def test_old_calls_are_unchanged_and_the_new_fields_default_to_nothing() -> None:
    made = request()
    assert (made.temperature, made.max_tokens, made.stream, made.provider, made.metadata) == (0.7, 2000, False, None, {})
    assert (made.response_format, made.tools, made.tool_choice, made.stop, made.seed, made.top_p) == (None,) * 6
    assert made.provider_options == {} and made.kind is JobKind.CHAT and made.prompt_text() == "hi"


def test_an_openai_body_maps_field_for_field() -> None:
    made = request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
                                         {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={"type": "json_object"}, stop="END", seed=3, top_p=0.9, max_completion_tokens=300,
        provider_options={"frequency_penalty": 0.2},
    )
    assert made.messages[0].role == "system"  # developer is read as system
    assert made.max_tokens == 300 and made.uses_tools
    assert made.messages[1].text == "What is this?" and made.messages[1].images[0].inline.media_type == "image/png"
    assert made.prompt_text() == 'Be brief.\nWhat is this?\n\nget_weather({"city":"Oslo"})\nsunny'


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
         "https:// URL or a data: URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA=="}}]}]},
         "image type 'image/bmp' is not taken"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "needs tool_call_id"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "x"}]},
         "answers no tool call"),
        ({"messages": [{"role": "assistant"}]}, "content is missing"),
        ({"messages": [{"role": "user"}]}, "messages.0.content: Value error, content is missing"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
         "image parts belong in user messages"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "not a valid JSON Schema"),
        ({"tool_choice": "required"}, "tool_choice is set but tools is empty"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "not among tools"),
        ({"response_format": {"type": "json_schema"}}, 'needs json_schema'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "not a valid JSON Schema"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "give 1 to 4"),
        ({"top_p": 1.5}, "top_p"),
        ({"provider_options": {"base_url": "https://evil"}}, "may not set 'base_url'"),
        ({"max_tokens": 5, "max_completion_tokens": 5}, "not both"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ],
)
def test_bad_features_are_refused_naming_the_field_and_the_fix(overrides: dict[str, Any], expected: str) -> None:
    assert expected in refusal(**overrides)


def test_a_pydantic_class_as_response_format_becomes_its_strict_schema_and_is_remembered() -> None:
    class Step(BaseModel):
        action: str
        count: int = 1

    class Plan(BaseModel):
        steps: list[Step]

    made = request(response_format=Plan)
    assert made.response_model is Plan
    spec = made.response_format.json_schema
    assert spec.name == "Plan" and spec.strict is True
    assert spec.schema_["additionalProperties"] is False and spec.schema_["$defs"]["Step"]["required"] == ["action", "count"]
    # On the wire and in the job record the schema is under "schema", and the class does not travel.
    dumped = made.model_dump(mode="json", exclude_none=True)
    assert set(dumped["response_format"]["json_schema"]) == {"name", "schema", "strict"}
    assert LLMRequest.model_validate_json(made.model_dump_json()).response_model is None


def test_an_embedding_request_is_openais_body() -> None:
    made = EmbeddingRequest.model_validate({"input": ["a", "b"], "model": "text-embedding-3-small", "dimensions": 256})
    assert made.texts == ["a", "b"] and made.kind is JobKind.EMBEDDING and not made.stream and made.max_tokens == 0
    with pytest.raises(ValidationError, match="input\\[1\\] is empty"):
        EmbeddingRequest(input=["a", " "], model="m")
    with pytest.raises(ValidationError, match="give 1 to 2048"):
        EmbeddingRequest(input=[], model="m")
