"""Request features through the Anthropic adapter, against the fake Messages API over real HTTP:
tools (call, tool result, final answer; streamed as input_json_delta), JSON by structured
outputs and by a forced tool, image blocks, cache breakpoints and cache usage, sampling fields."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.providers.anthropic import AnthropicProvider
from llmq.worker.providers.features import constrained_schema
from tests.support.fakes.anthropic import API_KEY, MODELS, FakeAnthropic
from tests.support.fakes.anthropic_features import IMAGE_TOKENS
from tests.support.harness import run_adapter
from tests.worker.providers.test_openai_features import PLAN_SCHEMA, PNG_1X1, WEATHER_TOOL

CLAUDE_3 = MODELS[0]  # JSON by a forced tool
CLAUDE_4_5 = "claude-sonnet-4-5-20250929"  # JSON by structured outputs
PNG_DATA = PNG_1X1.split(",", 1)[1]


@pytest.fixture
def fake(fake_anthropic: FakeAnthropic) -> FakeAnthropic:
    return fake_anthropic  # the package's shared server (conftest.py), reset


def entry(fake: FakeAnthropic, **overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {"type": "anthropic", "api_key": API_KEY, "base_url": fake.url, "timeout": 5.0, **overrides}
    config = ProviderConfig.model_validate(values)
    config.name = "claude"
    return config


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "model": CLAUDE_3,
                              "temperature": 0, "max_tokens": 256}
    return LLMRequest.model_validate({**values, **fields})


def generate(fake: FakeAnthropic, request: LLMRequest, **overrides: Any) -> LLMResponse:
    return run_adapter(entry(fake, **overrides), AnthropicProvider, lambda provider: provider.generate(request))


def stream(fake: FakeAnthropic, request: LLMRequest) -> list[LLMResponse]:
    async def action(provider: AnthropicProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request)]

    return run_adapter(entry(fake), AnthropicProvider, action)


def sent(fake: FakeAnthropic) -> dict[str, Any]:
    return fake.requests[-1].body


# --- tools --------------------------------------------------------------------------------


def test_tools_round_trip_call_then_tool_result_then_final_answer(fake: FakeAnthropic) -> None:
    first = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="auto"))
    assert sent(fake)["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                                    "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert sent(fake)["tool_choice"] == {"type": "auto"}
    assert first.finish_reason == "tool_calls" and first.metadata["stop_reason"] == "tool_use"
    assert first.content == "" and first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.id.startswith("toolu_01") and call.function.name == "get_weather"
    assert call.parsed_arguments() == {"city": "Weather in Oslo?"}

    final = generate(fake, chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]))
    assert sent(fake)["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "get_weather",
                                           "input": {"city": "Weather in Oslo?"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]},
    ]
    assert final.finish_reason == "stop" and final.tool_calls is None
    assert "sunny, 21 C" in final.content


def test_consecutive_tool_results_share_one_user_turn_before_any_text(fake: FakeAnthropic) -> None:
    calls = [{"id": f"toolu_{n}", "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
             for n, city in ((1, "Oslo"), (2, "Bergen"))]
    request = chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "content": "Looking both up.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "user", "content": "Which is warmer?"},
    ])
    answer = generate(fake, request)
    assistant, results = sent(fake)["messages"][1:]
    assert [block["type"] for block in assistant["content"]] == ["text", "tool_use", "tool_use"]
    assert assistant["content"][2]["input"] == {"city": "Bergen"}
    assert results == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "rain"},
        {"type": "text", "text": "Which is warmer?"},
    ]}
    assert "sunny rain Which is warmer?" in answer.content


def test_the_fake_refuses_tool_results_split_from_their_calls_as_the_api_does(fake: FakeAnthropic) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "text", "text": "first this"},
                                     {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    body = {"model": CLAUDE_3, "max_tokens": 50, "messages": messages,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=fake.url) as client:
        split = client.post("/v1/messages", json=body, headers=headers)
        stranger = client.post("/v1/messages", headers=headers, json=body | {"messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]})
    assert split.status_code == 400 and "`tool_use` ids were found without `tool_result` blocks" in split.text
    assert stranger.status_code == 400 and "unexpected `tool_use_id`" in stranger.text


@pytest.mark.parametrize(("choice", "wire"), [
    ("required", {"type": "any"}),
    ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "lookup"}}, {"type": "tool", "name": "lookup"}),
])
def test_tool_choice_maps_to_anthropics_words(fake: FakeAnthropic, choice: Any, wire: dict[str, Any]) -> None:
    lookup = {"type": "function", "function": {"name": "lookup"}}  # no parameters: an empty object schema
    answer = generate(fake, chat(tools=[WEATHER_TOOL, lookup], tool_choice=choice))
    assert sent(fake)["tool_choice"] == wire
    assert sent(fake)["tools"][1] == {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}
    if choice == "none":
        assert answer.tool_calls is None and answer.finish_reason == "stop"
    else:
        assert answer.tool_calls is not None
        assert answer.tool_calls[0].function.name == ("lookup" if isinstance(choice, dict) else "get_weather")


def test_streamed_tool_calls_arrive_as_deltas_after_the_preamble_and_end_whole(fake: FakeAnthropic) -> None:
    fake.tool_preamble = "Let me check the weather."
    chunks = stream(fake, chat(tools=[WEATHER_TOOL]))
    assert "".join(chunk.content for chunk in chunks[:-1]) == "Let me check the weather."
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    # The tool_use is content block 1 (after the text), and call 0 of the answer.
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and all(delta.index == 0 for delta in deltas)
    assert all(delta.function.arguments for delta in deltas[1:])  # the empty first input_json_delta is not passed on
    streamed = "".join(delta.function.arguments or "" for delta in deltas)
    final = chunks[-1]
    assert final.metadata["final"] and final.finish_reason == "tool_calls"
    assert final.tool_calls is not None and final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].function.arguments == streamed and json.loads(streamed) == {"city": "Weather in Oslo?"}


# --- JSON ---------------------------------------------------------------------------------

JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}


def test_json_schema_by_structured_outputs_where_the_model_has_them(fake: FakeAnthropic) -> None:
    request = chat(model=CLAUDE_4_5, response_format=JSON_SCHEMA_FORMAT)
    answer = check_output(request, generate(fake, request))
    assert sent(fake)["output_config"] == {"format": {"type": "json_schema", "schema": PLAN_SCHEMA}}
    assert "tools" not in sent(fake) and "tool_choice" not in sent(fake)
    assert answer.parsed == {"steps": [answer.parsed["steps"][0]], "done": True} and answer.finish_reason == "stop"


def test_json_schema_by_a_forced_tool_on_older_models(fake: FakeAnthropic) -> None:
    request = chat(response_format=JSON_SCHEMA_FORMAT)
    answer = check_output(request, generate(fake, request))
    assert "output_config" not in sent(fake)
    assert sent(fake)["tools"] == [{"name": "json_answer", "description": "Give your final answer by calling this "
                                    "tool: its input is the answer (plan)", "input_schema": PLAN_SCHEMA}]
    assert sent(fake)["tool_choice"] == {"type": "tool", "name": "json_answer"}
    assert answer.tool_calls is None and answer.finish_reason == "stop" and answer.metadata["stop_reason"] == "tool_use"
    assert json.loads(answer.content) == answer.parsed and answer.parsed["done"] is True


def test_the_fake_refuses_structured_outputs_on_a_model_without_them(fake: FakeAnthropic) -> None:
    # A config that wrongly says claude-3-5-sonnet has structured outputs gets Anthropic's 400.
    with pytest.raises(errors.BadRequestError, match="does not support output_config.format"):
        generate(fake, chat(response_format=JSON_SCHEMA_FORMAT), capabilities={"*": {"native_json_schema": True}})


@pytest.mark.parametrize("model", [CLAUDE_3, CLAUDE_4_5])
def test_an_answer_that_misses_the_schema_is_an_output_validation_error_then_asked_again(
    fake: FakeAnthropic, model: str
) -> None:
    fake.json_answers = ['{"steps": "not a list", "done": true}']
    request = chat(model=model, response_format=JSON_SCHEMA_FORMAT)
    with pytest.raises(errors.OutputValidationError, match="at steps") as caught:
        check_output(request, generate(fake, request))
    assert caught.value.retryable  # the engine asks the same provider again at once
    assert check_output(request, generate(fake, request)).parsed["done"] is True


def test_json_object_goes_by_a_forced_tool_and_a_non_object_schema_is_wrapped(fake: FakeAnthropic) -> None:
    request = chat(model=CLAUDE_4_5, response_format={"type": "json_object"})
    assert check_output(request, generate(fake, request)).parsed == {}
    assert sent(fake)["tools"][0]["input_schema"] == {"type": "object"} and "output_config" not in sent(fake)

    steps = {"type": "array", "items": {"type": "string"}}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "steps", "schema": steps}})
    answer = check_output(request, generate(fake, request))
    assert sent(fake)["tools"][0]["input_schema"] == {"type": "object", "properties": {"value": steps}, "required": ["value"]}
    assert answer.parsed == ["Weather in Oslo?"]
    chunks = stream(fake, request)
    assert json.loads("".join(chunk.content for chunk in chunks)) == ["Weather in Oslo?"]


def test_json_with_tools_lets_the_model_call_a_tool_or_answer(fake: FakeAnthropic) -> None:
    request = chat(tools=[WEATHER_TOOL], response_format=JSON_SCHEMA_FORMAT)
    answer = check_output(request, generate(fake, request))
    assert [tool["name"] for tool in sent(fake)["tools"]] == ["get_weather", "json_answer"]
    assert sent(fake)["tool_choice"] == {"type": "any"}
    assert answer.tool_calls is not None and answer.tool_calls[0].function.name == "get_weather"
    assert answer.parsed is None  # the JSON comes after the tool's result


def test_streamed_json_by_a_forced_tool_is_answer_text_not_a_tool_call(fake: FakeAnthropic) -> None:
    request = chat(response_format=JSON_SCHEMA_FORMAT, stream=True)
    chunks = stream(fake, request)
    assert not any(chunk.tool_call_deltas for chunk in chunks)
    text = "".join(chunk.content for chunk in chunks[:-1])
    assert len(chunks) > 3 and json.loads(text)["done"] is True
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.tool_calls is None


def test_constrained_schema_closes_objects_and_moves_what_decoding_lacks_into_the_description() -> None:
    schema = {"type": "object", "description": "A plan", "properties": {
        "count": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}, "minItems": 2},
        "when": {"type": "string", "format": "date"},
        "either": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {}, "additionalProperties": True}]},
    }, "required": ["count"]}
    assert constrained_schema(schema) == {"type": "object", "description": "A plan", "properties": {
        "count": {"type": "integer", "description": "{minimum: 1}"},
        "tags": {"type": "array", "items": {"type": "string", "description": "{pattern: ^[a-z]+$}"},
                 "description": "{minItems: 2}"},
        "when": {"type": "string", "format": "date"},
        "either": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {}, "additionalProperties": False}]},
    }, "required": ["count"], "additionalProperties": False}


# --- images, caching, sampling -------------------------------------------------------------


def test_image_parts_become_base64_and_url_image_blocks(fake: FakeAnthropic) -> None:
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": PNG_1X1, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    answer = generate(fake, chat(messages=[{"role": "user", "content": content}]))
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert answer.usage.prompt_tokens == 2 + 2 * IMAGE_TOKENS


def test_cache_breakpoints_are_sent_and_usage_reports_the_cache_write_then_the_read(fake: FakeAnthropic) -> None:
    rules = "Rules of the game: " + "always mine before crafting " * 20
    request = chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": rules, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        {"role": "user", "content": [{"type": "text", "text": "What first?", "cache_control": {"type": "ephemeral"}},
                                     {"type": "text", "text": "Be brief."}]},
    ])
    first = generate(fake, request)
    assert sent(fake)["system"] == [{"type": "text", "text": rules, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "What first?", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Be brief."}]
    prefix = len(rules.split()) + 2
    assert (first.usage.cache_write_tokens, first.usage.cached_read_tokens) == (prefix, 0)
    assert first.usage.prompt_tokens == prefix + 2  # Anthropic's input_tokens (after the breakpoint) added back
    second = generate(fake, request)
    assert (second.usage.cache_write_tokens, second.usage.cached_read_tokens) == (0, prefix)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens


def test_a_model_without_prompt_caching_gets_no_breakpoints(fake: FakeAnthropic) -> None:
    request = chat(messages=[{"role": "system", "content": [{"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}]},
                             {"role": "user", "content": "Hi"}])
    generate(fake, request, capabilities={"*": {"prompt_cache": False}})
    assert sent(fake)["system"] == "Rules." and sent(fake)["messages"][0]["content"] == "Hi"


def test_more_than_four_breakpoints_is_refused_as_the_api_does(fake: FakeAnthropic) -> None:
    parts = [{"type": "text", "text": f"part {n}", "cache_control": {"type": "ephemeral"}} for n in range(5)]
    with pytest.raises(errors.BadRequestError, match="A maximum of 4 blocks with cache_control may be provided. Found 5."):
        generate(fake, chat(messages=[{"role": "user", "content": parts}]))


def test_stop_top_p_and_provider_options_are_sent_and_seed_is_left_out(fake: FakeAnthropic) -> None:
    generate(fake, chat(stop="END", top_p=0.5, seed=7, provider_options={"top_k": 5, "metadata": {"user_id": "u-1"}}))
    body = sent(fake)
    assert (body["stop_sequences"], body["top_p"], body["top_k"], body["metadata"]) == (["END"], 0.5, 5, {"user_id": "u-1"})
    assert "temperature" not in body and "seed" not in body  # models from 4.5 on refuse temperature with top_p
    fake.stop_reason = "stop_sequence"
    assert generate(fake, chat(stop=["END", "STOP"])).finish_reason == "stop"
    assert sent(fake)["stop_sequences"] == ["END", "STOP"] and sent(fake)["temperature"] == 0


def test_a_provider_option_anthropic_does_not_take_is_refused_before_the_call(fake: FakeAnthropic) -> None:
    with pytest.raises(errors.BadRequestError, match="provider_options.frequency_penalty is not taken by provider type 'anthropic'"):
        generate(fake, chat(provider_options={"frequency_penalty": 0.5}))
    assert fake.requests == []


def test_models_that_refuse_sampling_settings_get_none(fake: FakeAnthropic) -> None:
    generate(fake, chat(temperature=0.3, top_p=0.9), capabilities={"*": {"reasoning": True}})
    assert "temperature" not in sent(fake) and "top_p" not in sent(fake)
