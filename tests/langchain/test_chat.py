"""`ChatLLMQ` end to end: LangChain's messages in, a real worker, the fake OpenAI server's wire
format, LangChain's messages out. What LangChain's standard tests leave to each integration: the
request that reaches the provider, the job behind each answer, a tool round trip, structured
output, images, a stream that restarts, and the refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, ValidationError

from llmq.client import RequestError
from llmq.contract.models import JobState
from llmq.langchain import ChatLLMQ, StreamRestartedError
from tests.contract.test_request_features import PNG
from tests.langchain.conftest import CACHED_CHAT_MODEL, CHAT_MODEL, LangChainStack
from tests.support.fakes.openai import FakeOpenAI


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"Sunny in {city}"


class Verdict(BaseModel):
    """Whether a plan is safe."""

    ok: bool
    reason: str


class Joke(BaseModel):
    setup: str
    punchline: str | None = None


def sent(fake: FakeOpenAI) -> dict[str, Any]:
    """The body of the last chat request the fake received."""
    return next(request.body for request in reversed(fake.requests) if request.path.endswith("/chat/completions"))


def add_up(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


# --- answers and the job behind them --------------------------------------------------------


def test_an_answer_names_its_job_provider_and_usage(stack: LangChainStack, fake: FakeOpenAI) -> None:
    llm = ChatLLMQ(model=CHAT_MODEL, temperature=0, caller="critic", request_metadata={"run": "r1"})

    answer = llm.invoke([SystemMessage("You judge plans."), HumanMessage("Is mining at night safe?")])

    assert answer.content == "Task: fake openai answer to 'Is mining at night safe?'"
    metadata = answer.response_metadata
    assert metadata["finish_reason"] == "stop" and metadata["provider"] == "openai"
    assert metadata["model_name"].startswith(CHAT_MODEL) and metadata["llmq"]["response_id"].startswith("chatcmpl-")
    assert answer.id == metadata["job_id"]
    assert answer.usage_metadata is not None and answer.usage_metadata["input_tokens"] > 0
    assert answer.usage_metadata["total_tokens"] == answer.usage_metadata["input_tokens"] + answer.usage_metadata["output_tokens"]
    job = stack.llmq.poll(answer.id)
    assert job.state is JobState.SUCCEEDED
    assert job.request.metadata == {"run": "r1", "caller": "critic"}
    assert [message["role"] for message in sent(fake)["messages"]] == ["system", "user"]


def test_the_model_s_fields_and_the_call_s_reach_the_provider(fake: FakeOpenAI) -> None:
    llm = ChatLLMQ(model=CHAT_MODEL, temperature=0.2, max_tokens=50, stop=["END"], seed=7, top_p=0.9,
                   provider_options={"frequency_penalty": 0.5})

    llm.invoke("Plan the day", stop=["STOP"], seed=8)

    body = sent(fake)
    assert (body["temperature"], body["seed"], body["top_p"], body["frequency_penalty"]) == (0.2, 8, 0.9, 0.5)
    assert body["stop"] == ["STOP"] and 50 in (body.get("max_tokens"), body.get("max_completion_tokens"))


def test_batch_makes_one_job_per_input(stack: LangChainStack) -> None:
    answers = ChatLLMQ(model=CHAT_MODEL).batch(["Mine iron", "Craft a pickaxe", "Smelt ore"])

    assert [answer.content for answer in answers] == [
        f"Task: fake openai answer to '{prompt}'" for prompt in ("Mine iron", "Craft a pickaxe", "Smelt ore")
    ]
    assert len({answer.id for answer in answers}) == 3
    assert all(stack.llmq.poll(answer.id).state is JobState.SUCCEEDED for answer in answers)


async def test_async_calls_answer_like_the_sync_ones() -> None:
    llm = ChatLLMQ(model=CHAT_MODEL)

    answer = await llm.ainvoke("Mine iron")
    answers = await llm.abatch(["Mine iron", "Craft a pickaxe"])
    chunks = [chunk async for chunk in llm.astream("Mine iron")]

    assert answer.content == answers[0].content == add_up(chunks).content == "Task: fake openai answer to 'Mine iron'"
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"


def test_waiting_past_the_timeout_raises_while_the_job_goes_on(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake, "latency_s", 1.0)

    with pytest.raises(TimeoutError, match="not finished after 0.2s"):
        ChatLLMQ(model=CHAT_MODEL, timeout=0.2).invoke("Mine iron")


# --- streams -----------------------------------------------------------------------------------


class TokenCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_a_streaming_model_streams_on_invoke_too() -> None:
    collector = TokenCollector()

    answer = ChatLLMQ(model=CHAT_MODEL, streaming=True).invoke("Mine iron", config={"callbacks": [collector]})

    assert len([token for token in collector.tokens if token]) > 2
    assert "".join(collector.tokens) == answer.content == "Task: fake openai answer to 'Mine iron'"
    assert answer.usage_metadata is not None and answer.response_metadata["finish_reason"] == "stop"


def test_a_stream_adds_up_to_the_answer_with_usage_on_its_last_chunk() -> None:
    llm = ChatLLMQ(model=CHAT_MODEL)

    chunks = list(llm.stream("Write about iron ore and coal"))

    assert len(chunks) > 2
    assert add_up(chunks).content == llm.invoke("Write about iron ore and coal").content
    assert [chunk.usage_metadata is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.chunk_position == "last" and last.response_metadata["finish_reason"] == "stop"
    assert last.response_metadata["job_id"] == last.id == chunks[0].id


def test_an_answer_served_whole_streams_as_one_piece() -> None:
    # The cached entry answers a repeated request from llmq's response cache: no provider stream at all.
    llm = ChatLLMQ(model=CACHED_CHAT_MODEL, temperature=0).bind_tools([get_weather])
    first = add_up(list(llm.stream("Weather in Oslo?")))

    again = list(llm.stream("Weather in Oslo?"))

    assert again[-1].response_metadata["llmq"]["cached"] is True
    whole = add_up(again)
    assert whole.tool_calls == first.tool_calls and whole.tool_calls[0]["name"] == "get_weather"


def test_a_stream_that_restarts_after_yielding_says_so(fake: FakeOpenAI) -> None:
    fake.inject("stream_error")  # a piece of text, then a server error: llmq tries again
    llm = ChatLLMQ(model=CHAT_MODEL)

    seen: list[AIMessageChunk] = []
    with pytest.raises(StreamRestartedError) as raised:
        seen.extend(llm.stream("Mine iron"))

    assert seen and seen[0].content == "Task: half"
    assert finishes_with_the_answer(raised.value.job_id, llm)


def finishes_with_the_answer(job_id: str, llm: ChatLLMQ) -> bool:
    """The job goes on after the stream that watched it ended."""
    record = llm.shared().wait(job_id, timeout_s=30)
    return record.state is JobState.SUCCEEDED and record.result.content == "Task: fake openai answer to 'Mine iron'"


def test_a_stream_that_restarts_before_yielding_goes_on(fake: FakeOpenAI) -> None:
    fake.fail_next(500)  # the first attempt fails before any chunk: nothing to take back
    chunks = list(ChatLLMQ(model=CHAT_MODEL).stream("Mine iron"))

    assert add_up(chunks).content == "Task: fake openai answer to 'Mine iron'"


# --- tools ---------------------------------------------------------------------------------------


def test_a_tool_round_trip(fake: FakeOpenAI) -> None:
    llm = ChatLLMQ(model=CHAT_MODEL).bind_tools([get_weather])
    conversation: list[BaseMessage] = [HumanMessage("Weather in Oslo?")]

    call_message = llm.invoke(conversation)
    assert call_message.response_metadata["finish_reason"] == "tool_calls"
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Weather in Oslo?"}
    tool_message = get_weather.invoke(call)
    final = llm.invoke([*conversation, call_message, tool_message])

    assert final.content.startswith("Task: fake openai answer to 'Sunny in") and not final.tool_calls
    assistant, answered = sent(fake)["messages"][1:]
    assert assistant["tool_calls"][0]["id"] == call["id"] == answered["tool_call_id"]
    assert (answered["role"], answered["content"]) == ("tool", "Sunny in Weather in Oslo?")
    assert sent(fake)["tools"][0]["function"]["name"] == "get_weather"


def test_tool_calls_stream_as_chunks_that_add_up_to_the_call() -> None:
    llm = ChatLLMQ(model=CHAT_MODEL).bind_tools([get_weather], tool_choice="get_weather")

    chunks = list(llm.stream("Weather in Oslo?"))

    pieces = [piece for chunk in chunks for piece in chunk.tool_call_chunks]
    assert len(pieces) > 2 and pieces[0]["name"] == "get_weather" and pieces[0]["id"]
    whole = add_up(chunks)
    assert whole.tool_calls == llm.invoke("Weather in Oslo?").tool_calls
    assert chunks[-1].response_metadata["finish_reason"] == "tool_calls" and chunks[-1].usage_metadata is not None


@pytest.mark.parametrize(("choice", "sent_as"), [
    ("any", "required"), ("auto", "auto"), ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_in_langchain_s_words_is_sent_in_openai_s(fake: FakeOpenAI, choice: str, sent_as: Any) -> None:
    ChatLLMQ(model=CHAT_MODEL).bind_tools([get_weather], tool_choice=choice).invoke("Weather in Oslo?")

    assert sent(fake)["tool_choice"] == sent_as


async def test_an_async_tool_round_trip() -> None:
    llm = ChatLLMQ(model=CHAT_MODEL).bind_tools([get_weather])

    chunks = [chunk async for chunk in llm.astream("Weather in Oslo?")]
    call_message = add_up(chunks)
    final = await llm.ainvoke(["Weather in Oslo?", call_message, await get_weather.ainvoke(call_message.tool_calls[0])])

    assert call_message.tool_calls[0]["name"] == "get_weather" and final.content and not final.tool_calls


# --- structured output -------------------------------------------------------------------------------


def test_structured_output_from_a_pydantic_class_is_an_instance(fake: FakeOpenAI) -> None:
    verdict = ChatLLMQ(model=CHAT_MODEL).with_structured_output(Verdict).invoke("Is mining at night safe?")

    assert isinstance(verdict, Verdict) and verdict.ok is True
    response_format = sent(fake)["response_format"]
    assert response_format["type"] == "json_schema" and response_format["json_schema"]["name"] == "Verdict"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"]["additionalProperties"] is False


def test_structured_output_with_the_raw_message(fake: FakeOpenAI) -> None:
    fake.json_answers = ['{"setup": "Why did the creeper cross the road?", "punchline": null}']

    out = ChatLLMQ(model=CHAT_MODEL).with_structured_output(Joke, include_raw=True).invoke("A joke, no punchline")

    assert out["parsed"] == Joke(setup="Why did the creeper cross the road?") and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage) and out["raw"].response_metadata["job_id"]


def test_json_mode_parses_what_the_prompt_asked_for(fake: FakeOpenAI) -> None:
    fake.json_answers = ['{"setup": "a", "punchline": "b"}'] * 2
    llm = ChatLLMQ(model=CHAT_MODEL).with_structured_output(Joke, method="json_mode")

    assert llm.invoke("A joke as JSON with setup and punchline") == Joke(setup="a", punchline="b")
    assert sent(fake)["response_format"] == {"type": "json_object"}
    assert list(llm.stream("A joke as JSON with setup and punchline")) == [Joke(setup="a", punchline="b")]


def test_an_answer_that_does_not_fit_the_class_is_a_parsing_error(fake: FakeOpenAI) -> None:
    # JSON mode: the answer is JSON (llmq checked that much) but not a Verdict.
    out = ChatLLMQ(model=CHAT_MODEL).with_structured_output(Verdict, method="json_mode", include_raw=True).invoke("Safe?")

    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)
    assert out["raw"].additional_kwargs["parsed"] == {"answer": "Task: fake openai answer to 'Safe?'"}


def test_structured_output_from_a_json_schema_and_by_function_calling(fake: FakeOpenAI) -> None:
    schema = {"title": "plan step", "type": "object", "properties": {"step": {"type": "string"}}, "required": ["step"]}
    llm = ChatLLMQ(model=CHAT_MODEL)

    assert llm.with_structured_output(schema, strict=True).invoke("Next?") == {"step": "Task: fake openai answer to 'Next?'"}
    json_schema = sent(fake)["response_format"]["json_schema"]
    assert json_schema["name"] == "plan_step" and json_schema["schema"]["additionalProperties"] is False
    assert llm.with_structured_output(Verdict, method="function_calling").invoke("Safe?") == Verdict(ok=True, reason="Safe?")
    assert sent(fake)["tool_choice"] == "required"


async def test_async_structured_output() -> None:
    llm = ChatLLMQ(model=CHAT_MODEL).with_structured_output(Verdict)

    assert isinstance(await llm.ainvoke("Safe?"), Verdict)
    assert [type(item) async for item in llm.astream("Safe?")] == [Verdict]


# --- content blocks -------------------------------------------------------------------------------------


def test_an_image_block_reaches_the_provider_as_an_image_part(fake: FakeOpenAI) -> None:
    data = PNG.removeprefix("data:image/png;base64,")
    message = HumanMessage([{"type": "text", "text": "What is in the picture?"},
                            {"type": "image", "base64": data, "mime_type": "image/png"},
                            {"type": "image_url", "image_url": {"url": "https://example.com/ore.png", "detail": "low"}}])

    answer = ChatLLMQ(model=CHAT_MODEL).invoke([message])

    parts = sent(fake)["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"] == PNG and parts[2]["image_url"]["url"] == "https://example.com/ore.png"
    assert answer.usage_metadata is not None and answer.usage_metadata["input_tokens"] >= 2 * 85


# --- refusals ---------------------------------------------------------------------------------------


def test_what_llmq_does_not_take_is_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="api_key: llmq's workers hold the provider keys"):
        ChatLLMQ(model=CHAT_MODEL, api_key="sk-not-here")
    with pytest.raises(ValidationError, match="max_retries: llmq's workers retry"):
        ChatLLMQ(model=CHAT_MODEL, max_retries=3)
    with pytest.raises(ValidationError, match="frequency_penalty"):
        ChatLLMQ(model=CHAT_MODEL, frequency_penalty=0.5)


def test_a_bad_request_is_refused_before_anything_is_enqueued(stack: LangChainStack) -> None:
    llm = ChatLLMQ(model=CHAT_MODEL)
    with pytest.raises(RequestError, match="logit_bias: Extra inputs are not permitted"):
        llm.invoke("hi", logit_bias={"1": 2})
    pdf = {"type": "file", "base64": "JVBERi0xLjQK", "mime_type": "application/pdf", "filename": "plan.pdf"}
    with pytest.raises(RequestError, match=r"messages\.0\.content"):
        llm.invoke([HumanMessage([{"type": "text", "text": "Read this"}, pdf])])
    with pytest.raises(RequestError, match="no configured provider"):
        ChatLLMQ(model="no-such-model").invoke("hi")
    with pytest.raises(ValueError, match="tool_choice 'dig'"):
        llm.bind_tools([get_weather], tool_choice="dig")


def test_a_tool_message_s_content_blocks_are_sent_as_text(fake: FakeOpenAI) -> None:
    call = {"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_1", "type": "tool_call"}
    conversation = [HumanMessage("Weather?"),
                    AIMessage([{"type": "text", "text": "Looking."}, {"type": "tool_use", "id": "call_1",
                                                                       "name": "get_weather", "input": {"city": "Oslo"}}],
                              tool_calls=[call]),
                    ToolMessage([{"type": "text", "text": "Sunny"}], tool_call_id="call_1")]

    ChatLLMQ(model=CHAT_MODEL).bind_tools([get_weather]).invoke(conversation)

    assistant, answered = sent(fake)["messages"][1:]
    assert assistant["content"] == "Looking." and json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert answered["content"] in ("Sunny", [{"type": "text", "text": "Sunny"}])
