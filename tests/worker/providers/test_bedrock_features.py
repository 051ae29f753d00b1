"""Request features through the Bedrock adapter, against FakeBedrock over real HTTP: toolConfig and
toolUse/toolResult blocks (streamed as contentBlockStart and toolUse input pieces), JSON by
outputConfig.textFormat and by a forced tool, image blocks, cachePoint blocks and cache usage,
inferenceConfig fields, and embeddings from Titan Text Embeddings and Cohere Embed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.pricing import cost_usd
from llmq.worker.providers.bedrock import BedrockProvider
from tests.support.fakes.bedrock import TEST_API_KEY, FakeBedrock
from tests.support.fakes.bedrock_features import CLAUDE_3, CLAUDE_4_5, COHERE_V3, LLAMA_3, TITAN_V2
from tests.support.fakes.openai import fake_vector
from tests.support.harness import run_adapter
from tests.worker.providers.test_openai_features import PLAN_SCHEMA, PNG_1X1, WEATHER_TOOL

PNG_DATA = PNG_1X1.split(",", 1)[1]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeBedrock]:
    with FakeBedrock() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def fake(server: FakeBedrock) -> FakeBedrock:
    server.reset()
    return server


def entry(fake: FakeBedrock, **overrides: Any) -> ProviderConfig:
    return ProviderConfig(name="bedrock_main", type="bedrock", api_key=TEST_API_KEY, base_url=fake.url, timeout=5.0,
                          options={"control_endpoint_url": fake.url}, **overrides)


def run(fake: FakeBedrock, action: Any, **overrides: Any) -> Any:
    return run_adapter(entry(fake, **overrides), BedrockProvider, action)


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "model": CLAUDE_3,
                              "temperature": 0, "max_tokens": 256}
    return LLMRequest.model_validate({**values, **fields})


def generate(fake: FakeBedrock, request: LLMRequest, **overrides: Any) -> LLMResponse:
    return run(fake, lambda adapter: adapter.generate(request), **overrides)


def stream(fake: FakeBedrock, request: LLMRequest) -> list[LLMResponse]:
    async def action(adapter: BedrockProvider) -> list[LLMResponse]:
        return [chunk async for chunk in adapter.stream_generate(request)]

    return run(fake, action)


def embed(fake: FakeBedrock, request: EmbeddingRequest) -> EmbeddingResponse:
    return run(fake, lambda adapter: adapter.embed(request))


def sent(fake: FakeBedrock) -> dict[str, Any]:
    return fake.requests[-1].body


WEATHER_SPEC = {"toolSpec": {"name": "get_weather", "description": "Weather in a city",
                             "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}}


# --- tools --------------------------------------------------------------------------------


def test_tools_round_trip_call_then_tool_result_then_final_answer(fake: FakeBedrock) -> None:
    first = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="auto"))
    assert sent(fake)["toolConfig"] == {"tools": [WEATHER_SPEC], "toolChoice": {"auto": {}}}
    assert first.finish_reason == "tool_calls" and first.metadata["stop_reason"] == "tool_use" and first.content == ""
    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.id.startswith("tooluse_") and call.parsed_arguments() == {"city": "Weather in Oslo?"}

    final = generate(fake, chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]))
    assert sent(fake)["messages"][1:] == [
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": call.id, "name": "get_weather",
                                                       "input": {"city": "Weather in Oslo?"}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": call.id, "content": [{"text": "sunny, 21 C"}]}}]},
    ]
    assert "toolChoice" not in sent(fake)["toolConfig"]
    assert final.finish_reason == "stop" and final.tool_calls is None and "sunny, 21 C" in final.content


def test_tool_results_share_one_user_turn_first_and_a_cache_point_stays_after_its_block(fake: FakeBedrock) -> None:
    calls = [{"id": f"tooluse_{n}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}} for n in (1, 2)]
    request = chat(model=CLAUDE_4_5, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "user", "content": "Quickly please."},
        {"role": "tool", "tool_call_id": "tooluse_1", "content": [{"type": "text", "text": "sunny", "cache_control": {"type": "ephemeral"}}]},
        {"role": "tool", "tool_call_id": "tooluse_2", "content": "rain"},
    ])
    generate(fake, request)
    assert sent(fake)["messages"][2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "sunny"}]}}, {"cachePoint": {"type": "default"}},
        {"toolResult": {"toolUseId": "tooluse_2", "content": [{"text": "rain"}]}},
        {"text": "Quickly please."},
    ]}


@pytest.mark.parametrize(("choice", "wire"), [
    ("required", {"any": {}}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"tool": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_converse_words(fake: FakeBedrock, choice: Any, wire: dict[str, Any]) -> None:
    answer = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice=choice))
    assert sent(fake)["toolConfig"]["toolChoice"] == wire and answer.tool_calls is not None


def test_tool_choice_none_sends_no_tools_unless_the_conversation_holds_tool_blocks(fake: FakeBedrock) -> None:
    answer = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="none"))
    assert "toolConfig" not in sent(fake) and answer.tool_calls is None
    call = {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="none", messages=[
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"}]))
    assert sent(fake)["toolConfig"] == {"tools": [WEATHER_SPEC]}  # Converse requires it; it has no "none"


def test_tool_blocks_without_tools_are_refused_before_the_call_as_converse_would(fake: FakeBedrock) -> None:
    call = {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    request = chat(messages=[{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"}])
    with pytest.raises(errors.BadRequestError, match="send `tools`"):
        generate(fake, request)
    assert fake.requests == []
    body = {"messages": [{"role": "user", "content": [{"text": "Weather?"}]},
                         {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "w", "input": {}}}]},
                         {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "ok"}]}}]}]}
    with httpx.Client(base_url=fake.url, headers={"authorization": f"Bearer {TEST_API_KEY}"}) as client:
        refused = client.post(f"/model/{quote(CLAUDE_3, safe='')}/converse", json=body)
    assert refused.status_code == 400 and "toolConfig field must be defined" in refused.text


def test_a_model_without_tool_use_is_refused_by_the_fake_as_by_bedrock(fake: FakeBedrock) -> None:
    with pytest.raises(errors.BadRequestError, match="doesn't support tool use"):
        generate(fake, chat(model=LLAMA_3, tools=[WEATHER_TOOL]), capabilities={"*": {"tools": True}})


def test_streamed_tool_calls_arrive_as_deltas_and_end_whole(fake: FakeBedrock) -> None:
    chunks = stream(fake, chat(tools=[WEATHER_TOOL]))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and all(delta.index == 0 for delta in deltas)
    streamed = "".join(delta.function.arguments or "" for delta in deltas)
    final = chunks[-1]
    assert final.metadata["final"] and final.finish_reason == "tool_calls"
    assert final.tool_calls is not None and final.tool_calls[0].function.arguments == streamed
    assert json.loads(streamed) == {"city": "Weather in Oslo?"}


# --- JSON ---------------------------------------------------------------------------------


def test_json_schema_by_a_forced_tool(fake: FakeBedrock) -> None:
    request = chat(response_format=JSON_SCHEMA_FORMAT)
    answer = check_output(request, generate(fake, request))
    config = sent(fake)["toolConfig"]
    assert [tool["toolSpec"]["name"] for tool in config["tools"]] == ["json_answer"]
    assert config["tools"][0]["toolSpec"]["inputSchema"] == {"json": PLAN_SCHEMA}
    assert config["toolChoice"] == {"tool": {"name": "json_answer"}} and "outputConfig" not in sent(fake)
    assert answer.tool_calls is None and answer.finish_reason == "stop" and answer.parsed["done"] is True


def test_json_schema_by_output_config_where_the_model_has_structured_output(fake: FakeBedrock) -> None:
    request = chat(model=CLAUDE_4_5, response_format=JSON_SCHEMA_FORMAT)
    answer = check_output(request, generate(fake, request))
    text_format = sent(fake)["outputConfig"]["textFormat"]
    assert text_format["type"] == "json_schema" and "toolConfig" not in sent(fake)
    assert text_format["structure"]["jsonSchema"]["name"] == "plan"
    assert json.loads(text_format["structure"]["jsonSchema"]["schema"]) == PLAN_SCHEMA  # a JSON string on the wire
    assert answer.parsed["done"] is True and answer.finish_reason == "stop"


@pytest.mark.parametrize("model", [CLAUDE_3, CLAUDE_4_5])
def test_an_answer_that_misses_the_schema_is_an_output_validation_error_then_asked_again(fake: FakeBedrock, model: str) -> None:
    fake.json_answers = ['{"steps": "not a list", "done": true}']
    request = chat(model=model, response_format=JSON_SCHEMA_FORMAT)
    with pytest.raises(errors.OutputValidationError, match="at steps") as caught:
        check_output(request, generate(fake, request))
    assert caught.value.retryable
    assert check_output(request, generate(fake, request)).parsed["done"] is True


def test_streamed_json_by_a_forced_tool_is_answer_text(fake: FakeBedrock) -> None:
    chunks = stream(fake, chat(response_format={"type": "json_object"}))
    assert not any(chunk.tool_call_deltas for chunk in chunks)
    assert json.loads("".join(chunk.content for chunk in chunks)) == {}
    assert chunks[-1].finish_reason == "stop" and chunks[-1].tool_calls is None


# --- images, caching, inferenceConfig ------------------------------------------------------


def test_an_inline_image_is_an_image_block_and_an_https_one_is_refused(fake: FakeBedrock) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG_1X1}}]
    answer = generate(fake, chat(messages=[{"role": "user", "content": content}]))
    assert sent(fake)["messages"][0]["content"] == [
        {"text": "What is this?"}, {"image": {"format": "png", "source": {"bytes": PNG_DATA}}}]
    assert answer.usage.prompt_tokens == 3 + 85
    https = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    with pytest.raises(errors.BadRequestError, match="data: URL"):
        generate(fake, chat(messages=[{"role": "user", "content": https}]))
    assert len(fake.requests) == 1


def test_cache_points_are_sent_and_usage_reports_the_cache_write_then_the_read(fake: FakeBedrock) -> None:
    rules = "Rules: " + "mine before crafting " * 30
    request = chat(model=CLAUDE_4_5, messages=[
        {"role": "system", "content": [{"type": "text", "text": rules, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        {"role": "user", "content": [{"type": "text", "text": "What first?", "cache_control": {"type": "ephemeral"}},
                                     {"type": "text", "text": "Be brief."}]},
    ])
    first = generate(fake, request)
    assert sent(fake)["system"] == [{"text": rules}, {"cachePoint": {"type": "default", "ttl": "1h"}}]
    assert sent(fake)["messages"][0]["content"] == [{"text": "What first?"}, {"cachePoint": {"type": "default"}},
                                                    {"text": "Be brief."}]
    prefix = len(rules.split()) + 2
    assert (first.usage.cache_write_tokens, first.usage.cached_read_tokens) == (prefix, 0)
    assert first.usage.prompt_tokens == prefix + 2
    second = generate(fake, request)
    assert (second.usage.cache_write_tokens, second.usage.cached_read_tokens) == (0, prefix)
    generate(fake, request.model_copy(update={"model": CLAUDE_3}))  # no prompt caching on Bedrock for it
    assert sent(fake)["system"] == [{"text": rules}] and {"cachePoint": {"type": "default"}} not in sent(fake)["messages"][0]["content"]


def test_stop_top_p_and_provider_options_go_where_converse_takes_them(fake: FakeBedrock) -> None:
    options = {"additionalModelRequestFields": {"top_k": 5}, "requestMetadata": {"team": "agents"}}
    generate(fake, chat(stop=["END"], top_p=0.5, seed=3, provider_options=options))
    assert sent(fake)["inferenceConfig"] == {"maxTokens": 256, "topP": 0.5, "stopSequences": ["END"]}
    assert sent(fake)["additionalModelRequestFields"] == {"top_k": 5} and "seed" not in json.dumps(sent(fake))
    with pytest.raises(errors.BadRequestError, match="provider_options.input_type is not taken"):
        generate(fake, chat(provider_options={"input_type": "search_query"}))
    generate(fake, chat(temperature=0.3), capabilities={"*": {"reasoning": True}})
    assert sent(fake)["inferenceConfig"] == {"maxTokens": 256}


# --- embeddings ---------------------------------------------------------------------------


def test_titan_embeds_one_text_per_call_in_input_order_and_is_priced(fake: FakeBedrock) -> None:
    texts = ["mine iron ore", "craft a pickaxe", "smelt"]
    response = embed(fake, EmbeddingRequest(input=texts, model=TITAN_V2, dimensions=256))
    calls = [request for request in fake.requests if request.path.endswith("/invoke")]
    assert {call.path for call in calls} == {f"/model/{quote(TITAN_V2, safe='')}/invoke"}
    assert sorted(call.body["inputText"] for call in calls) == sorted(texts)
    assert all(call.body == {"inputText": call.body["inputText"], "dimensions": 256} for call in calls)
    assert response.embeddings == [fake_vector(text, 4) for text in texts]
    assert response.usage.prompt_tokens == 3 + 3 + 1 and response.provider == "bedrock_main"
    cost, priced = cost_usd("bedrock", TITAN_V2, response.usage, overrides={}, local=False)
    assert priced and cost is not None and cost > 0


def test_cohere_embeds_up_to_96_texts_a_call_with_an_input_type(fake: FakeBedrock) -> None:
    texts = [f"skill number {n}" for n in range(100)]
    response = embed(fake, EmbeddingRequest(input=texts, model=COHERE_V3))
    calls = [request.body for request in fake.requests]
    assert sorted(len(call["texts"]) for call in calls) == [4, 96]
    assert all(call["input_type"] == "search_document" and call["embedding_types"] == ["float"] for call in calls)
    assert response.embeddings == [fake_vector(text, 16) for text in texts]
    assert response.usage.prompt_tokens == 300  # from X-Amzn-Bedrock-Input-Token-Count
    fake.token_count_header = False  # Cohere's body counts nothing: llmq estimates, and says so
    estimated = embed(fake, EmbeddingRequest(input=texts, model=COHERE_V3))
    assert estimated.usage.prompt_tokens > 0 and estimated.metadata["usage_estimated"] is True
    assert "usage_estimated" not in response.metadata
    embed(fake, EmbeddingRequest(input="which skill mines ore?", model=COHERE_V3,
                                 provider_options={"input_type": "search_query", "truncate": "END"}))
    assert (sent(fake)["input_type"], sent(fake)["truncate"]) == ("search_query", "END")


def test_embedding_requests_bedrock_cannot_serve_are_refused_before_any_call(fake: FakeBedrock) -> None:
    with pytest.raises(errors.BadRequestError, match="dimensions 512: .*Cohere Embed v4 only"):
        embed(fake, EmbeddingRequest(input="x", model=COHERE_V3, dimensions=512))
    with pytest.raises(errors.BadRequestError, match="provider_options.input_type is not taken"):
        embed(fake, EmbeddingRequest(input="x", model=TITAN_V2, provider_options={"input_type": "search_query"}))
    with pytest.raises(errors.BadRequestError, match="has no embeddings"):
        embed(fake, EmbeddingRequest(input="x", model=CLAUDE_3))
    assert fake.requests == []


def test_a_failed_embedding_call_raises_its_typed_error(fake: FakeBedrock) -> None:
    fake.fail_with("ThrottlingException", 429, "Too many requests, please wait before trying again.")
    with pytest.raises(errors.RateLimitedError):
        embed(fake, EmbeddingRequest(input=["a", "b", "c"], model=TITAN_V2))
