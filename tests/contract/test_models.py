from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmq import LLMRequest, LLMResponse, Usage


def request(**overrides):
    body = {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini"}
    body.update(overrides)
    return LLMRequest.model_validate(body)


def test_defaults_are_the_adrs() -> None:
    made = request()
    assert (made.temperature, made.max_tokens, made.stream, made.provider, made.metadata) == (0.7, 2000, False, None, {})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "  "}, "model"),
        ({"metadata": {"x": object()}}, "metadata"),
        ({"metadata": {"blob": "x" * 20000}}, "metadata"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_bad_requests_name_the_field(overrides, field) -> None:
    with pytest.raises(ValidationError) as caught:
        request(**overrides)
    located = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert field in located


def test_usage_reads_like_a_dict_and_derives_total() -> None:
    usage = Usage.of(10, 5, reasoning_tokens=2)
    assert usage["total_tokens"] == 15 and usage.get("reasoning_tokens") == 2
    response = LLMResponse(content="x", model="m", provider="p", usage=usage)
    assert response.metadata == {}
