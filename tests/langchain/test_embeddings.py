"""`LLMQEmbeddings` end to end: texts in jobs of `chunk_size`, through a real worker to the fake
OpenAI server's `/v1/embeddings`, vectors back in input order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmq.client import RequestError
from llmq.langchain import LLMQEmbeddings
from tests.langchain.conftest import EMBEDDING_MODEL
from tests.support.fakes.openai import FakeOpenAI, fake_vector

TEXTS = ["mine iron ore", "craft a pickaxe", "smelt iron", "build a shelter", "light a torch"]


def embedding_bodies(fake: FakeOpenAI) -> list[dict[str, object]]:
    return [request.body for request in fake.requests if request.path.endswith("/embeddings")]


def test_documents_go_in_jobs_of_chunk_size_and_come_back_in_order(fake: FakeOpenAI) -> None:
    embeddings = LLMQEmbeddings(model=EMBEDDING_MODEL, chunk_size=2, dimensions=12, caller="skills")

    vectors = embeddings.embed_documents(TEXTS)

    assert vectors == [fake_vector(text, 12) for text in TEXTS]  # exact in float32, as stored
    bodies = embedding_bodies(fake)
    assert sorted(tuple(body["input"]) for body in bodies) == sorted([tuple(TEXTS[0:2]), tuple(TEXTS[2:4]), (TEXTS[4],)])
    assert all(body["dimensions"] == 12 for body in bodies)


def test_a_query_is_one_text(fake: FakeOpenAI) -> None:
    vector = LLMQEmbeddings(model=EMBEDDING_MODEL).embed_query("mine iron ore")

    assert vector == fake_vector("mine iron ore", 8)  # the fake's own length when none is asked
    assert embedding_bodies(fake)[-1]["input"] == ["mine iron ore"]


async def test_async_embeddings_match_the_sync_ones() -> None:
    embeddings = LLMQEmbeddings(model=EMBEDDING_MODEL, chunk_size=3)

    assert await embeddings.aembed_documents(TEXTS) == embeddings.embed_documents(TEXTS)
    assert await embeddings.aembed_query("light a torch") == embeddings.embed_query("light a torch")


def test_no_texts_make_no_job(fake: FakeOpenAI) -> None:
    assert LLMQEmbeddings(model=EMBEDDING_MODEL).embed_documents([]) == []
    assert embedding_bodies(fake) == []


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ValidationError, match="api_key: llmq's workers hold the provider keys"):
        LLMQEmbeddings(model=EMBEDDING_MODEL, api_key="sk-not-here")
    with pytest.raises(ValidationError, match="chunk_size"):
        LLMQEmbeddings(model=EMBEDDING_MODEL, chunk_size=5000)
    with pytest.raises(RequestError, match="no configured provider"):
        LLMQEmbeddings(model="gpt-4o-mini").embed_query("chat models do not embed")
