"""POST /v1/chat/completions through the official OpenAI SDK: answers, streams, the job behind
each (its id in a header, its caller the key's name), and a caller that leaves."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import redis

from llmq.contract import keys
from llmq.contract.models import JobState
from llmq.http.errors import JOB_ID_HEADER
from tests.http.conftest import FrontStack
from tests.support.fakes.openai import FakeOpenAI

MESSAGES = [{"role": "system", "content": "You propose the next task."}, {"role": "user", "content": "Biome: desert."}]


def test_a_chat_completion_runs_as_a_job_named_in_a_header_with_the_key_as_its_caller(stack: FrontStack, fake: FakeOpenAI) -> None:
    name, key = stack.key()
    raw = stack.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=64,
                                                                      temperature=0, metadata={"caller": "someone-else"})
    completion = raw.parse()
    job_id = raw.headers[JOB_ID_HEADER]
    assert completion.id == job_id and completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    job = stack.job(job_id)
    assert job.state is JobState.SUCCEEDED and job.result.content == completion.choices[0].message.content
    # The key names the caller, whatever the body said; the worker's provider key never left it.
    assert job.request.metadata["caller"] == name
    assert job.request.temperature == 0 and job.request.max_tokens == 64
    sent = fake.requests[-1]
    assert key not in sent.raw_body.decode() and key not in str(sent.headers)


def test_openai_names_map_onto_the_contract(stack: FrontStack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_completion_tokens=32, n=1, presence_penalty=0, user="end-user-7",
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}],
    )
    job = stack.job(raw.headers[JOB_ID_HEADER])
    assert job.request.max_tokens == 32 and job.request.messages[0].role == "system"
    assert [part.text for part in job.request.messages[1].content] == ["first", "second"]
    assert job.request.metadata["end_user"] == "end-user-7"


def test_sampling_fields_and_provider_options_reach_the_provider(stack: FrontStack, fake: FakeOpenAI) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, top_p=0.5, seed=7, stop=["\n\n"],
        extra_body={"provider_options": {"frequency_penalty": 0.25}},
    )
    job = stack.job(raw.headers[JOB_ID_HEADER])
    assert (job.request.top_p, job.request.seed, job.request.stop) == (0.5, 7, ["\n\n"])
    sent = fake.requests[-1].body
    assert (sent["top_p"], sent["seed"], sent["stop"], sent["frequency_penalty"]) == (0.5, 7, ["\n\n"], 0.25)


@pytest.mark.parametrize(("field", "value"), [
    ("n", 2), ("logprobs", True), ("presence_penalty", 0.5), ("reasoning_effort", "low"), ("parallel_tool_calls", False),
])
def test_a_field_llmq_lacks_is_refused_naming_it(stack: FrontStack, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **{field: value})
    assert refused.value.status_code == 400 and refused.value.param == field  # type: ignore[attr-defined]
    assert refused.value.code == "unsupported_parameter"  # type: ignore[attr-defined]


def test_an_image_part_reaches_the_provider(stack: FrontStack, fake: FakeOpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
    completion = stack.client().chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    assert fake.requests[-1].body["messages"][0]["content"][1] == image
    assert completion.usage is not None and completion.usage.prompt_tokens == 3 + 85  # the fake's words, 85 an image


def test_a_bad_image_part_is_refused_naming_where_it_is(stack: FrontStack) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    assert refused.value.param == "messages[0].content[1].image_url.url"  # type: ignore[attr-defined]
    assert "https://" in refused.value.message


def test_a_stream_comes_through_the_queue_in_openai_chunks_with_usage_last(stack: FrontStack) -> None:
    client = stack.client()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
    ) as raw:
        job_id = raw.headers[JOB_ID_HEADER]
        chunks = list(raw.parse())
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and {chunk.id for chunk in chunks} == {job_id}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])
    job = stack.job(job_id)
    assert job.state is JobState.SUCCEEDED and job.result.content == text and job.request.stream


def test_a_stream_ends_with_done_and_carries_no_usage_unless_asked(stack: FrontStack) -> None:
    _, key = stack.key()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in events)
    assert '"usage":null' in events[-2] and '"finish_reason":"stop"' in events[-2]


def test_a_caller_that_disconnects_cancels_its_job(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.chunk_delay_s = 0.5  # a slow stream: the caller leaves long before it ends
    _, key = stack.key()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as reply:
        job_id = reply.headers[JOB_ID_HEADER]
        next(reply.iter_lines())
    assert_cancelled(stack, job_id)


def test_a_caller_that_disconnects_while_waiting_cancels_its_job(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.latency_s = 3.0
    _, key = stack.key()
    client = redis.Redis.from_url(stack.cluster.redis_url, decode_responses=True)
    before = set(client.scan_iter(keys.JOB_KEY_PREFIX + "*"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES},
                   headers={"authorization": f"Bearer {key}"}, timeout=httpx.Timeout(5, read=1.0))
    new = [name for name in set(client.scan_iter(keys.JOB_KEY_PREFIX + "*")) - before if name.count(":") == 2]
    assert len(new) == 1
    assert_cancelled(stack, new[0].rsplit(":", 1)[1])


def assert_cancelled(stack: FrontStack, job_id: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (job := stack.job(job_id)).state is not JobState.CANCELLED:
        assert not job.state.terminal, job.state
        assert time.monotonic() < deadline, job.state
        time.sleep(0.1)
