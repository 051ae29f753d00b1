"""Request features through the Hugging Face adapter against a fake TGI (Messages API) and TEI
over real HTTP: tools with TGI's placeholder ids, grammar-constrained JSON, streamed calls,
images, TGI's sampling limits, TEI embeddings; and what the in-process pipeline says it can do."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from llmq.contract.capabilities import capabilities_for
from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.output import check_output
from llmq.worker.providers.hf_local import pipeline_messages
from llmq.worker.providers.huggingface import HuggingFaceProvider
from tests.support.fakes.base import fake_reply_text
from tests.support.fakes.openai import fake_vector
from tests.support.fakes.tgi import FakeTGI
from tests.support.harness import run_adapter
from tests.worker.providers.test_openai_features import PLAN_SCHEMA, PNG_1X1, WEATHER_TOOL

T = TypeVar("T")
HF_TOKEN = "hf_fakeTOKENabcdefghijklmnopqrstuvwxyz01"
PLAN_FORMAT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tgi_server() -> Iterator[FakeTGI]:
    with FakeTGI(api_key=HF_TOKEN) as fake:
        yield fake


@pytest.fixture
def fake(tgi_server: FakeTGI) -> FakeTGI:
    tgi_server.reset()
    return tgi_server


def entry(fake: FakeTGI, **overrides: Any) -> ProviderConfig:
    made = ProviderConfig.model_validate({"type": "huggingface", "base_url": fake.url, "api_key": HF_TOKEN,
                                          "timeout": 5, **overrides})
    made.name = "tgi"
    return made


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Oslo?"}],
                              "model": "meta-llama/Llama-3.1-8B-Instruct", "temperature": 0, "max_tokens": 64}
    return LLMRequest.model_validate({**values, **fields})


def run(fake: FakeTGI, action: Callable[[HuggingFaceProvider], Awaitable[T]], **overrides: Any) -> T:
    return run_adapter(entry(fake, **overrides), HuggingFaceProvider, action)


def generate(fake: FakeTGI, request: LLMRequest, **overrides: Any) -> LLMResponse:
    return run(fake, lambda provider: provider.generate(request), **overrides)


def stream(fake: FakeTGI, request: LLMRequest) -> list[LLMResponse]:
    async def action(provider: HuggingFaceProvider) -> list[LLMResponse]:
        return [chunk async for chunk in provider.stream_generate(request)]

    return run(fake, action)


@pytest.mark.parametrize("arguments_as_object", [False, True])
def test_tools_round_trip_with_tgis_placeholder_ids(fake: FakeTGI, arguments_as_object: bool) -> None:
    fake.arguments_as_object = arguments_as_object
    first = generate(fake, chat(tools=[WEATHER_TOOL], tool_choice="auto"))
    assert fake.requests[-1].body["tools"] == [WEATHER_TOOL]
    assert first.finish_reason == "tool_calls" and first.content == ""  # TGI said "stop"
    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.id != "0" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and call.parsed_arguments() == {"city": "Weather in Oslo?"}

    final = generate(fake, chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]))
    messages = fake.requests[-1].body["messages"]
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}
    assert final.finish_reason == "stop" and final.content == fake_reply_text("sunny, 21 C", "huggingface")


def test_streamed_tool_calls_get_one_id_and_end_whole(fake: FakeTGI) -> None:
    chunks = stream(fake, chat(tools=[WEATHER_TOOL]))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    assert deltas[0].id and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and all(delta.id is None and delta.function.name is None for delta in deltas[1:])
    final = chunks[-1]
    assert final.finish_reason == "tool_calls" and final.tool_calls is not None
    assert final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].parsed_arguments() == {"city": "Weather in Oslo?"}
    assert final.tool_calls[0].function.arguments == "".join(delta.function.arguments or "" for delta in deltas)


def test_json_schema_is_tgis_grammar_and_a_matching_answer_parses(fake: FakeTGI) -> None:
    request = chat(response_format=PLAN_FORMAT)
    answer = check_output(request, generate(fake, request))
    assert fake.requests[-1].body["response_format"] == {"type": "json", "value": PLAN_SCHEMA}
    assert answer.parsed == {"steps": [answer.parsed["steps"][0]], "done": True}


def test_json_object_is_a_grammar_for_any_object(fake: FakeTGI) -> None:
    request = chat(response_format={"type": "json_object"})
    answer = check_output(request, generate(fake, request))
    assert fake.requests[-1].body["response_format"] == {"type": "json", "value": {"type": "object"}}
    assert isinstance(answer.parsed, dict)


def test_the_router_style_sends_openais_response_format(fake: FakeTGI) -> None:
    request = chat(response_format=PLAN_FORMAT)
    check_output(request, generate(fake, request, options={"response_format_style": "openai"}))
    assert fake.requests[-1].body["response_format"] == PLAN_FORMAT


def test_an_answer_that_misses_the_schema_is_an_output_validation_error(fake: FakeTGI) -> None:
    fake.json_answers = ['{"steps": ["a"]}']
    request = chat(response_format=PLAN_FORMAT)
    with pytest.raises(errors.OutputValidationError, match="'done' is a required property"):
        check_output(request, generate(fake, request))
    assert errors.OutputValidationError.retryable  # the engine asks the same provider again


def test_tools_and_json_together_go_with_tools_only_as_tgi_takes_no_grammar_beside_them(fake: FakeTGI) -> None:
    answer = generate(fake, chat(tools=[WEATHER_TOOL], response_format=PLAN_FORMAT))
    sent = fake.requests[-1].body
    assert "response_format" not in sent and sent["tools"] == [WEATHER_TOOL]
    assert answer.tool_calls is not None


def test_stop_goes_as_a_list_and_top_p_one_is_left_out(fake: FakeTGI) -> None:
    generate(fake, chat(stop="END", seed=7, top_p=1.0))
    sent = fake.requests[-1].body
    assert sent["stop"] == ["END"] and sent["seed"] == 7 and "top_p" not in sent
    generate(fake, chat(top_p=0.5))
    assert fake.requests[-1].body["top_p"] == 0.5


def test_an_image_part_is_sent_as_tgi_takes_it(fake: FakeTGI) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG_1X1}}]
    answer = generate(fake, chat(messages=[{"role": "user", "content": content}]))
    assert fake.requests[-1].body["messages"][0]["content"] == content
    assert answer.usage.prompt_tokens == 3 + 85


def test_embeddings_through_teis_openai_compatible_route(fake: FakeTGI) -> None:
    request = EmbeddingRequest(input=["mine iron ore", "craft a pickaxe"], model="BAAI/bge-small-en-v1.5")
    response = run(fake, lambda provider: provider.embed(request))
    sent = fake.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body == {"model": "BAAI/bge-small-en-v1.5", "input": ["mine iron ore", "craft a pickaxe"],
                         "encoding_format": "float"}
    assert response.embeddings == [fake_vector("mine iron ore", 8), fake_vector("craft a pickaxe", 8)]
    assert response.usage.prompt_tokens == 6


def test_capabilities_of_tgi_tei_and_the_in_process_pipeline() -> None:
    tgi = ProviderConfig.model_validate({"type": "huggingface"})
    assert capabilities_for(tgi, "meta-llama/Llama-3.1-8B-Instruct").model_dump(
        include={"tools", "json_object", "json_schema", "embeddings"}) == {
        "tools": True, "json_object": True, "json_schema": True, "embeddings": False}
    tei = capabilities_for(tgi, "BAAI/bge-small-en-v1.5")
    assert tei.embeddings and not tei.chat
    pipeline = ProviderConfig.model_validate({"type": "huggingface", "options": {"mode": "pipeline",
                                                                                 "model_path": "/models/tiny"}})
    local = capabilities_for(pipeline, "tiny")
    # Plain chat; JSON only as an answer llmq validates (no constrained decoding); no tools, images or embeddings.
    assert (local.chat, local.json_object, local.json_schema) == (True, True, True)
    assert not (local.tools or local.vision or local.embeddings)


def test_the_pipeline_asks_for_json_in_the_prompt_and_refuses_tools_and_images() -> None:
    request = chat(messages=[{"role": "system", "content": "Plan."}, {"role": "user", "content": "Next step?"}],
                   response_format=PLAN_FORMAT)
    messages = pipeline_messages(request, provider="local")
    assert messages[0] == {"role": "system", "content": "Plan."}
    assert messages[1]["content"].startswith("Next step?\n\nAnswer with one JSON object and nothing else, matching")
    assert '"required":["steps","done"]' in messages[1]["content"]
    assert pipeline_messages(chat(), provider="local") == [{"role": "user", "content": "Weather in Oslo?"}]
    with pytest.raises(errors.BadRequestError, match="neither tools nor images"):
        pipeline_messages(chat(tools=[WEATHER_TOOL]), provider="local")
    image = [{"type": "image_url", "image_url": {"url": PNG_1X1}}]
    with pytest.raises(errors.BadRequestError, match="neither tools nor images"):
        pipeline_messages(chat(messages=[{"role": "user", "content": image}]), provider="local")
