"""Routing by context window: a hop is skipped only when its window surely cannot hold the request.

"Surely" is the prompt's fewest possible tokens (`llmq.contract.token_floor`), never the limiter's
estimate, which leans high; max_tokens counts too where the window holds the answer (OpenAI), not
where it is the prompt's limit alone (Gemini).
"""

from __future__ import annotations

from typing import Any

import pytest

from llmq.contract.config import LLMConfig, parse_config
from llmq.contract.embeddings import EmbeddingRequest
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.routing import RoutingError, can_serve, larger_context_hop, plan_route
from llmq.contract.token_floor import MAX_TOKEN_BYTES, prompt_token_floor, text_token_floor
from llmq.worker.tokens import estimate_request_prompt_tokens

# gpt-4's window is 8192 tokens and counts max_tokens; gpt-4-32k's 32768; the Gemini entry's
# stand-in gets a window of 8192 here, which limits the prompt alone.
CONFIG = """
llm_service:
  fallback_chain: [cloud, google]
  context_fallbacks: {gpt-4: gpt-4-32k}
  providers:
    cloud:
      type: openai
      api_key: sk-test
      models: [gpt-4, gpt-4-32k, gpt-4o, text-embedding-3-small]
    google:
      type: gemini
      api_key: g-test
      models: [gemini-2.0-flash]
      stand_ins: {gpt-4: gemini-2.0-flash}
      capabilities:
        "*": {context_window: 8192}
"""


@pytest.fixture
def config() -> LLMConfig:
    return parse_config(CONFIG)


def words(count: int) -> str:
    return " ".join(["word"] * count)


def chat(model: str = "gpt-4", prompt: str = "hi", **fields: Any) -> LLMRequest:
    return LLMRequest.model_validate({"messages": [{"role": "user", "content": prompt}], "model": model, **fields})


def hops(request: LLMRequest, config: LLMConfig) -> list[tuple[str, str]]:
    return [(hop.provider, hop.model) for hop in plan_route(request, config)]


# --- the floor ------------------------------------------------------------------------------


def test_the_floor_is_one_token_per_word_less_one_per_line_break() -> None:
    assert text_token_floor("mine iron ore") == 3
    # A token may run across a line break (o200k has ";\n//"), never across a space.
    assert text_token_floor("mine iron\nore then\r\ncraft") == 5 - 3
    assert text_token_floor("") == 0


def test_text_with_few_blanks_counts_its_bytes_over_the_longest_token() -> None:
    assert text_token_floor("x" * (3 * MAX_TOKEN_BYTES + 1)) == 4
    assert text_token_floor("é" * MAX_TOKEN_BYTES) == 2  # two bytes of UTF-8 each
    assert text_token_floor(" " * 5000) == 5  # no words; a token holds at most 1024 spaces


def test_each_message_counts_apart_and_images_and_tool_calls_add_nothing() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    request = LLMRequest.model_validate({"model": "gpt-4", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is"}, image, {"type": "text", "text": " this thing"}]},
    ]})
    assert prompt_token_floor(request.messages) == 2 + 4


def test_the_floor_never_exceeds_the_limiters_estimate() -> None:
    for prompt in ("hi", words(3000), "x" * 40_000, "a\nb\nc " * 500, "语言模型" * 2000):
        request = chat(prompt=prompt)
        assert prompt_token_floor(request.messages) <= estimate_request_prompt_tokens(request)


# --- routing --------------------------------------------------------------------------------


def test_a_prompt_that_fits_keeps_every_hop(config: LLMConfig) -> None:
    assert hops(chat(prompt=words(100)), config) == [("cloud", "gpt-4"), ("google", "gemini-2.0-flash")]


def test_a_hop_whose_window_cannot_hold_prompt_and_max_tokens_is_skipped(config: LLMConfig) -> None:
    # 8000 + 1000 > 8192 on gpt-4, whose window holds the answer; Gemini's window holds the prompt alone.
    assert hops(chat(prompt=words(8000), max_tokens=1000), config) == [("google", "gemini-2.0-flash")]
    assert not can_serve(Hop(provider="cloud", model="gpt-4"), chat(prompt=words(8000), max_tokens=1000), config)


def test_a_long_prompt_of_few_words_is_not_skipped_on_the_limiters_high_estimate(config: LLMConfig) -> None:
    prompt = " ".join(["x" * 10_000] * 4)  # about 10,000 tokens by the estimate; at least 40 for sure
    request = chat(prompt=prompt, max_tokens=100)
    assert estimate_request_prompt_tokens(request) > 8192
    assert hops(request, config) == [("cloud", "gpt-4"), ("google", "gemini-2.0-flash")]


def test_a_request_no_hop_can_hold_is_refused_naming_its_size_and_every_entry(config: LLMConfig) -> None:
    with pytest.raises(RoutingError) as refused:
        plan_route(chat(prompt=words(9000), max_tokens=1000), config)
    message = str(refused.value)
    assert "model 'gpt-4': no configured provider can serve this request" in message
    assert ("cloud/gpt-4 lacks room: its context window of 8192 tokens cannot hold a prompt of at least 9000 "
            "tokens plus max_tokens 1000") in message
    assert "google/gemini-2.0-flash lacks room: its context window of 8192 tokens cannot hold a prompt of at " \
           "least 9000 tokens;" in message
    assert "shorten the prompt, lower max_tokens or ask for a model with a larger context window" in message


def test_a_pinned_hop_that_cannot_hold_the_prompt_is_refused(config: LLMConfig) -> None:
    with pytest.raises(RoutingError, match="'cloud' model 'gpt-4' cannot serve this request: it lacks room: its "
                                           "context window of 8192 tokens cannot hold a prompt of at least 9000"):
        plan_route(chat(prompt=words(9000), provider="cloud"), config)
    assert plan_route(chat("gpt-4o", prompt=words(9000), provider="cloud"), config) == [Hop(provider="cloud", model="gpt-4o")]


def test_the_larger_context_model_is_taken_only_when_it_can_hold_the_prompt(config: LLMConfig) -> None:
    gpt_4 = Hop(provider="cloud", model="gpt-4")
    assert larger_context_hop(gpt_4, config, chat(prompt=words(20_000))) == Hop(provider="cloud", model="gpt-4-32k")
    assert larger_context_hop(gpt_4, config, chat(prompt=words(40_000))) is None


def test_embedding_inputs_are_left_to_the_call(config: LLMConfig) -> None:
    request = EmbeddingRequest(input=words(9000), model="text-embedding-3-small")
    assert hops(request, config) == [("cloud", "text-embedding-3-small")]  # its window of 8191 is per input
