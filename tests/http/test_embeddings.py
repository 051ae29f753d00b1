"""POST /v1/embeddings through the official OpenAI SDK and raw HTTP: vectors as numbers and as
OpenAI's base64 float32, `dimensions`, the job behind each answer, and what is refused."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from llmq.contract.models import JobState
from llmq.http.errors import JOB_ID_HEADER
from tests.http.conftest import FrontStack
from tests.support.fakes.openai import FakeOpenAI, fake_vector

MODEL = "text-embedding-3-small"
TEXTS = ["mine iron ore", "craft a pickaxe"]
#: The fake's vectors unless `dimensions` says otherwise.
FAKE_DIMENSIONS = 8


def embed(stack: FrontStack, key: str, **body: object) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/embeddings", json={"model": MODEL, "input": TEXTS, **body},
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_embeddings_as_numbers_run_as_a_job_of_the_key(stack: FrontStack, fake: FakeOpenAI) -> None:
    name, key = stack.key()
    raw = stack.client(key).embeddings.with_raw_response.create(model=MODEL, input=TEXTS, encoding_format="float",
                                                                user="end-user-3")
    reply = raw.parse()
    assert reply.object == "list" and reply.model == MODEL
    assert [(item.object, item.index) for item in reply.data] == [("embedding", 0), ("embedding", 1)]
    assert [item.embedding for item in reply.data] == [fake_vector(text, FAKE_DIMENSIONS) for text in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 6  # the fake counts words
    job = stack.job(raw.headers[JOB_ID_HEADER])
    assert job.state is JobState.SUCCEEDED and job.kind.value == "embedding"
    assert job.request.metadata == {"end_user": "end-user-3", "caller": name}
    assert fake.requests[-1].body["input"] == TEXTS


def test_embeddings_as_base64_are_little_endian_float32(stack: FrontStack) -> None:
    _, key = stack.key()
    reply = embed(stack, key, encoding_format="base64", dimensions=4)
    assert reply.status_code == 200 and reply.headers[JOB_ID_HEADER]
    for item, text in zip(reply.json()["data"], TEXTS, strict=True):
        assert list(struct.unpack("<4f", base64.b64decode(item["embedding"]))) == fake_vector(text, 4)
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    vectors = stack.client(key).embeddings.create(model=MODEL, input="one skill", dimensions=3).data
    assert [item.embedding for item in vectors] == [fake_vector("one skill", 3)]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [[1202, 3]]}, "input"),  # token ids
    ({"input": ["fine", ""]}, "input"),
    ({"dimensions": 0}, "dimensions"),
    ({"encoding_format": "int8"}, "encoding_format"),
    ({"truncate": True}, "truncate"),
])
def test_what_an_embeddings_body_cannot_be_is_refused_naming_the_param(
    stack: FrontStack, body: dict[str, object], param: str,
) -> None:
    reply = embed(stack, stack.key()[1], **body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_a_chat_model_serves_no_embeddings(stack: FrontStack) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        stack.client().embeddings.create(model="gpt-4o-mini", input="x")
    assert "lacks embeddings" in refused.value.message
