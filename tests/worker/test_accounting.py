"""Accounting for request features: the token estimate (images, tool definitions, schemas,
embedding inputs), the cache key (every field that changes the answer, nothing else), and
embedding prices from the maintained table."""

from __future__ import annotations

import base64
import struct
import time
from decimal import Decimal
from typing import Any

import pytest

from llmq.contract.messages import ImageURL
from llmq.contract.models import EmbeddingRequest, Hop, JobRequest, LLMRequest, Usage
from llmq.worker.attempt import Attempt
from llmq.worker.limiter.estimate import estimate_request_tokens
from llmq.worker.middleware.cache import cache_key
from llmq.worker.pricing import cost_usd
from llmq.worker.tokens import UNKNOWN_IMAGE_TOKENS, estimate_tokens, image_tokens

TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a thing up in the wiki",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height) + b"\x08\x06\x00\x00\x00"
    return "data:image/png;base64," + base64.b64encode(header).decode()


def gif(width: int, height: int) -> str:
    return "data:image/gif;base64," + base64.b64encode(b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 8).decode()


def chat(**fields: Any) -> LLMRequest:
    values: dict[str, Any] = {"messages": [{"role": "user", "content": "hello there"}], "model": "gpt-4o",
                              "temperature": 0, "max_tokens": 10}
    return LLMRequest.model_validate({**values, **fields})


@pytest.mark.parametrize(
    ("url", "detail", "tokens"),
    [
        (png(1024, 1024), None, 85 + 170 * 4),   # 768x768 after scaling: 2x2 tiles (OpenAI's worked example)
        (png(2048, 4096), None, 85 + 170 * 6),   # 1024x2048 -> 768x1536: 2x3 tiles
        (gif(100, 100), None, 85 + 170),
        (png(4096, 4096), "low", 85),
        ("https://example.com/cat.png", None, UNKNOWN_IMAGE_TOKENS),
    ],
)
def test_images_count_by_openais_tile_formula_or_a_fixed_figure_when_the_size_is_unknown(
    url: str, detail: str | None, tokens: int,
) -> None:
    assert image_tokens(ImageURL(url=url, detail=detail)) == tokens


def test_the_estimate_counts_images_tool_definitions_and_the_schema() -> None:
    plain = estimate_request_tokens(chat())
    image = chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hello there"}, {"type": "image_url", "image_url": {"url": png(512, 512)}}]}])
    assert estimate_request_tokens(image) == plain + 85 + 170
    assert estimate_request_tokens(chat(tools=[TOOL])) > plain + 10
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "answer": {"type": "string", "description": "the answer, in one sentence"}}}}}
    assert estimate_request_tokens(chat(response_format=schema)) > plain + 10


def test_an_embedding_job_reserves_its_inputs_tokens_and_no_output() -> None:
    request = EmbeddingRequest(input=["mine some iron ore", "craft a pickaxe"], model="text-embedding-3-small")
    assert estimate_request_tokens(request) == estimate_tokens("mine some iron ore") + estimate_tokens("craft a pickaxe")


def attempt(request: JobRequest, provider: str = "openai") -> Attempt:
    return Attempt(
        job_id="job", dispatch=1, request=request, route=[Hop(provider=provider, model=request.model)], route_index=0,
        attempt=1, hop_attempt=1, batch_id=None, deadline_at_s=time.time() + 60, started_at_s=time.time(),
    )


def test_the_cache_key_holds_every_field_that_changes_the_answer() -> None:
    base = cache_key(attempt(chat()))
    for changed in (
        chat(tools=[TOOL]), chat(tool_choice="none", tools=[TOOL]), chat(response_format={"type": "json_object"}),
        chat(stop="x"), chat(seed=1), chat(top_p=0.5), chat(provider_options={"frequency_penalty": 1}),
        chat(max_tokens=11), chat(temperature=0.1),
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"},
                                                    {"type": "image_url", "image_url": {"url": png(1, 1)}}]}]),
    ):
        assert cache_key(attempt(changed)) != base, changed
    # ...and nothing that does not: who asks, or whether the answer is streamed.
    assert cache_key(attempt(chat(metadata={"caller": "critic"}, stream=True))) == base
    assert cache_key(attempt(chat(), provider="other")) != base


def test_embeddings_have_keys_of_their_own() -> None:
    one = EmbeddingRequest(input="a", model="text-embedding-3-small")
    assert cache_key(attempt(one)) != cache_key(attempt(one.model_copy(update={"dimensions": 8})))
    assert cache_key(attempt(one)) != cache_key(attempt(chat(model="text-embedding-3-small",
                                                               messages=[{"role": "user", "content": "a"}])))


def test_embedding_tokens_are_priced_from_the_maintained_table() -> None:
    cost, priced = cost_usd("openai", "text-embedding-3-small", Usage.of(1_000_000, 0), overrides={}, local=False)
    assert priced and cost == Decimal("0.02")
    cost, priced = cost_usd("azure_openai", "text-embedding-3-large", Usage.of(500_000, 0), overrides={}, local=False)
    assert priced and cost == Decimal("0.065")
