"""`service_tier` on POST /v1/chat/completions through the official OpenAI SDK: OpenAI's words
mapped onto the contract's tiers (flex, or the entry's own), the tiers llmq cannot honour
refused as OpenAI refuses a bad value, and the answer saying which tier ran."""

from __future__ import annotations

import openai
import pytest

from llmq.http.errors import JOB_ID_HEADER
from tests.http.conftest import CACHED_MODEL, FrontStack
from tests.support.fakes.openai_batches import FakeOpenAIBatches

MESSAGES = [{"role": "user", "content": "Biome: desert. Next task?"}]


def test_flex_runs_at_the_flex_tier_and_the_answer_says_so(stack: FrontStack, fake: FakeOpenAIBatches) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, service_tier="flex")
    completion = raw.parse()
    assert completion.service_tier == "flex"
    assert fake.requests[-1].body["service_tier"] == "flex"
    job = stack.job(raw.headers[JOB_ID_HEADER])
    assert job.request.service_tier == "flex" and job.result.metadata["service_tier"] == "flex"


@pytest.mark.parametrize("tier", ["auto", "default", None])
def test_auto_and_default_leave_the_tier_to_the_entry(stack: FrontStack, fake: FakeOpenAIBatches, tier: str | None) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, **({} if tier is None else {"service_tier": tier}))
    assert raw.parse().service_tier == "default"  # the entry has no tier of its own: standard ran
    assert "service_tier" not in fake.requests[-1].body
    assert stack.job(raw.headers[JOB_ID_HEADER]).request.service_tier is None


def test_a_flex_call_refused_for_capacity_runs_at_the_standard_tier_and_says_so(
    stack: FrontStack, fake: FakeOpenAIBatches,
) -> None:
    fake.flex_refusals = 1
    completion = stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, service_tier="flex")
    assert completion.service_tier == "default"
    assert [request.body.get("service_tier") for request in fake.requests[-2:]] == ["flex", None]


@pytest.mark.parametrize("tier", ["priority", "scale", "FLEX", 2])
def test_a_tier_llmq_cannot_honour_is_refused_naming_the_param_and_the_fix(
    stack: FrontStack, fake: FakeOpenAIBatches, tier: object,
) -> None:
    calls = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                               service_tier=tier)  # type: ignore[arg-type]
    error = refused.value
    assert error.status_code == 400 and error.param == "service_tier"  # type: ignore[attr-defined]
    assert error.code == "unsupported_value"  # type: ignore[attr-defined]
    assert f"service_tier {tier!r}" in error.message and "send 'flex'" in error.message
    assert "'auto' or 'default'" in error.message
    assert len(fake.requests) == calls  # nothing ran


def test_a_streamed_flex_answer_names_its_tier_in_the_closing_chunks(stack: FrontStack) -> None:
    chunks = list(stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, service_tier="flex", stream=True, stream_options={"include_usage": True}))
    closing = [chunk for chunk in chunks if not chunk.choices or chunk.choices[0].finish_reason]
    assert [chunk.service_tier for chunk in closing] == ["flex", "flex"]
    assert {chunk.service_tier for chunk in chunks if chunk not in closing} == {None}


def test_a_cache_hit_ran_at_no_tier(stack: FrontStack) -> None:
    client = stack.client()
    ask = {"model": CACHED_MODEL, "messages": MESSAGES, "temperature": 0, "service_tier": "flex"}
    assert client.chat.completions.create(**ask).service_tier == "flex"  # type: ignore[call-overload]
    again = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert stack.job(again.id).result.metadata["cached"] and again.service_tier is None
