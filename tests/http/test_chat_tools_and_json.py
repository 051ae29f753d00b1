"""Tools and JSON output over /v1/chat/completions, through the official OpenAI SDK and its
helpers: a tool round trip (the call, its result, the final answer), tool calls streamed as
OpenAI's deltas and put together by the SDK's stream helper, JSON schema answers and the
SDK's `parse` with a pydantic model. A real worker and the fake OpenAI, as every test here."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from llmq.contract.models import JobState
from llmq.http.errors import JOB_ID_HEADER
from tests.http.conftest import CACHED_MODEL, FrontStack
from tests.support.fakes.openai import FakeOpenAI

WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
VERDICT_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": "string"}},
                  "required": ["ok", "reason"], "additionalProperties": False}


class Verdict(BaseModel):
    ok: bool
    reason: str


def test_a_tool_round_trip_through_the_sdk(stack: FrontStack, fake: FakeOpenAI) -> None:
    client = stack.client()
    messages: list[Any] = [{"role": "user", "content": "Oslo"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    job = stack.job(first.id)
    assert job.result.tool_calls[0].id == call.id and job.request.tools[0].function.name == "get_weather"

    # The SDK's own message object goes back as it came, then the tool's result.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "12 degrees and rain"}]
    final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None
    sent = fake.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[2] == {
        "role": "tool", "tool_call_id": call.id, "content": "12 degrees and rain"}


def test_tool_calls_stream_as_deltas_the_sdk_stream_helper_puts_together(stack: FrontStack) -> None:
    client = stack.client()
    messages: list[Any] = [{"role": "user", "content": "Bergen"}]
    with client.chat.completions.stream(model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
        completion = stream.get_final_completion()
    pieces = [event.arguments_delta for event in events if event.type == "tool_calls.function.arguments.delta"]
    assert len(pieces) > 1  # the arguments came in pieces, as the provider streamed them
    choice = completion.choices[0]
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "".join(pieces) == call.function.arguments and json.loads(call.function.arguments) == {"city": "Bergen"}
    job = stack.job(completion.id)
    assert job.state is JobState.SUCCEEDED and job.result.tool_calls[0].id == call.id

    # The assembled message goes back as the stream helper made it (with its `index` and
    # `parsed_arguments`), then the result: the final answer streams as text.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    with client.chat.completions.stream(model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content


def test_tool_calls_answered_whole_stream_as_deltas_too(stack: FrontStack) -> None:
    """A cache hit (or a provider that does not stream) has its calls only in the final answer:
    they are sent as OpenAI streams calls, so the SDK's stream helper puts them together all the same."""
    client = stack.client()
    request: Any = {"model": CACHED_MODEL, "messages": [{"role": "user", "content": "Narvik"}], "tools": [WEATHER_TOOL],
                    "temperature": 0}
    first = client.chat.completions.create(**request).choices[0].message.tool_calls[0]  # type: ignore[index]
    with client.chat.completions.stream(**request) as stream:
        completion = stream.get_final_completion()
    assert stack.job(completion.id).result.metadata["cached"]
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, call.function.arguments) == (first.id, first.function.name, first.function.arguments)
    assert completion.choices[0].finish_reason == "tool_calls"


def test_a_streamed_tool_call_is_in_openai_s_chunk_shape(stack: FrontStack) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Tromso"}], "tools": [WEATHER_TOOL]}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {stack.key()[1]}"}) as reply:
        chunks = [json.loads(line.removeprefix("data: ")) for line in reply.iter_lines() if line and line != "data: [DONE]"]
    deltas = [piece for chunk in chunks for piece in chunk["choices"][0]["delta"].get("tool_calls", ())]
    head, *rest = deltas
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"]["name"] == "get_weather"
    assert rest and all(set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"} for piece in rest)
    assert json.loads("".join(piece["function"].get("arguments", "") for piece in deltas)) == {"city": "Tromso"}
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"][0]["finish_reason"]] == ["tool_calls"]


def test_a_json_schema_answer_is_its_json_text_as_content(stack: FrontStack) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Is the plan safe?"}], response_format=response_format)
    content = raw.parse().choices[0].message.content
    answer = json.loads(content or "")
    assert Verdict.model_validate(answer)
    job = stack.job(raw.headers[JOB_ID_HEADER])
    assert job.request.response_format.json_schema.name == "verdict" and job.result.parsed == answer


def test_a_json_object_answer(stack: FrontStack, fake: FakeOpenAI) -> None:
    completion = stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Answer in JSON."}], response_format={"type": "json_object"})
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    assert fake.requests[-1].body["response_format"] == {"type": "json_object"}


def test_the_sdk_parse_helper_gets_an_instance_of_its_model(stack: FrontStack) -> None:
    completion = stack.client().chat.completions.parse(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Is the plan safe?"}], response_format=Verdict)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and parsed.reason
    assert stack.job(completion.id).request.response_format.json_schema.name == "Verdict"


def test_an_answer_that_never_matches_its_schema_is_a_400(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.json_answers = ["not json", '{"ok": "yes"}']  # the answer, then the one ask again (invalid_output_retries)
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().chat.completions.parse(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Is the plan safe?"}], response_format=Verdict)
    assert refused.value.code == "output_validation_failed" and refused.value.response.headers[JOB_ID_HEADER]  # type: ignore[attr-defined]
