"""Files and batches: OpenAI's Batch API over llmq batches, the whole flow through the official SDK."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
from typing import Any

import openai
import pytest

from llmq.client.sync import SyncLLMService
from llmq.http.errors import BATCH_ID_HEADER
from tests.http.conftest import FrontStack
from tests.support.fakes.openai import FakeOpenAI, fake_vector


def line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 32, **body}}


def embedding_line(custom_id: str, *texts: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": list(texts), **body}}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    content = lines if isinstance(lines, bytes) else "".join(json.dumps(item) + "\n" for item in lines).encode()
    return client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch").id


def wait_for(client: openai.OpenAI, batch_id: str, timeout_s: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def test_the_whole_files_and_batches_flow(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.poison("POISON-500", 500)
    name, key = stack.key()
    client = stack.client(key)
    lines = [line(f"task-{index}", f"Biome {index}: desert.") for index in range(6)] + [line("doomed", "POISON-500")]
    file = client.files.retrieve(upload(client, lines))
    assert file.purpose == "batch" and file.filename == "requests.jsonl" and file.bytes > 0
    raw = client.batches.with_raw_response.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                                  metadata={"project": "curriculum"})
    created = raw.parse()
    assert raw.headers[BATCH_ID_HEADER] == created.id and created.status == "in_progress"
    assert created.metadata == {"project": "curriculum"} and created.request_counts.total == 7

    batch = wait_for(client, created.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 6, 1)
    output = [json.loads(text) for text in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(text) for text in client.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == [f"task-{index}" for index in range(6)]
    for item in output:
        assert item["error"] is None and item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert [item["custom_id"] for item in errors] == ["doomed"]
    assert errors[0]["response"]["status_code"] == 502 and errors[0]["response"]["body"]["error"]["message"]
    # One id: the batch is the llmq batch (llmq status finds it), each job ran as the key's caller.
    with SyncLLMService(stack.cluster.config, redis_url=stack.cluster.redis_url) as service:
        record = service.status(created.id)
        jobs = service.results(created.id)
    assert record.total == 7 and {job.request.metadata["caller"] for job in jobs} == {name}
    # Read again: the same files (written once), from SQL.
    again = client.batches.retrieve(created.id)
    assert (again.output_file_id, again.error_file_id) == (batch.output_file_id, batch.error_file_id)
    assert created.id in [item.id for item in client.batches.list()]


def test_a_file_with_bad_lines_makes_a_failed_batch_with_errors_by_line(stack: FrontStack) -> None:
    client = stack.client(stack.key("--models", "gpt-4o-mini")[1])
    content = (json.dumps(line("ok", "fine")) + "\nnot json\n" + json.dumps(line("ok", "again")) + "\n"
               + json.dumps(line("other", "x", model="gpt-4o")) + "\n" + json.dumps(line("bad", "x", n=2)) + "\n"
               + json.dumps(embedding_line("vectors", "x")) + "\n").encode()
    batch = client.batches.create(input_file_id=upload(client, content), endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.errors is not None
    assert [(error.line, error.code) for error in batch.errors.data] == [
        (2, "invalid_json"), (3, "duplicate_custom_id"), (4, "model_not_allowed"), (5, "unsupported_parameter"),
        (6, "mismatched_url")]  # a batch has one endpoint: an embeddings line has no place in a chat batch
    assert batch.errors.data[3].param == "n"


def outputs(client: openai.OpenAI, batch: Any) -> dict[str, dict[str, Any]]:
    """The output file's lines by custom_id, each a success in OpenAI's batch output format."""
    lines = [json.loads(text) for text in client.files.content(batch.output_file_id).text.splitlines()]
    assert all(item["error"] is None and item["response"]["status_code"] == 200 for item in lines)
    return {item["custom_id"]: item["response"]["body"] for item in lines}


def test_a_batch_of_embeddings(stack: FrontStack) -> None:
    client = stack.client()
    lines = [embedding_line("skills", "mine iron ore", "craft a pickaxe"), embedding_line("short", "smelt", dimensions=4),
             embedding_line("packed", "trade", encoding_format="base64")]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/embeddings", completion_window="24h")
    done = wait_for(client, batch.id)
    assert (done.status, done.endpoint, done.request_counts.completed) == ("completed", "/v1/embeddings", 3)
    bodies = outputs(client, done)
    assert bodies["skills"]["object"] == "list" and bodies["skills"]["usage"]["prompt_tokens"] == 6
    assert [item["embedding"] for item in bodies["skills"]["data"]] == [fake_vector("mine iron ore", 8),
                                                                        fake_vector("craft a pickaxe", 8)]
    assert bodies["short"]["data"] == [{"object": "embedding", "index": 0, "embedding": fake_vector("smelt", 4)}]
    packed = base64.b64decode(bodies["packed"]["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == fake_vector("trade", 8)


def test_a_batch_of_tool_and_json_lines(stack: FrontStack) -> None:
    client = stack.client()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    lines = [line("act", "Oslo", tools=[weather]),
             line("judge", "Safe?", response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}})]
    batch = wait_for(client, client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
    bodies = outputs(client, batch)
    act = bodies["act"]["choices"][0]
    assert act["finish_reason"] == "tool_calls" and act["message"]["content"] is None
    assert act["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    assert json.loads(bodies["judge"]["choices"][0]["message"]["content"]) == {"ok": True}


def test_cancelling_a_batch_cancels_its_queued_jobs(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.latency_s = 1.0
    client = stack.client()
    lines = [line(f"slow-{index}", "wait") for index in range(120)]  # more than the worker's 50 slots
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_for(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.failed > 0
    errors = [json.loads(text) for text in client.files.content(done.error_file_id).text.splitlines()]
    assert {item["error"]["code"] for item in errors if item["error"]} == {"batch_cancelled"}


def test_another_key_cannot_see_a_batch_or_its_files(stack: FrontStack) -> None:
    owner = stack.client()
    file_id = upload(owner, [line("a", "b")])
    batch = owner.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    stranger = stack.client()
    for read in (lambda: stranger.batches.retrieve(batch.id), lambda: stranger.files.retrieve(file_id),
                 lambda: stranger.files.content(file_id), lambda: stranger.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            read()
    assert batch.id not in [item.id for item in stranger.batches.list()]
    with pytest.raises(openai.NotFoundError):
        stranger.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")


def test_batches_list_newest_first_in_pages(stack: FrontStack) -> None:
    client = stack.client()
    file_id = upload(client, [line("a", "b")])
    made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [item.id for item in first.data] == made[::-1][:2] and first.has_more
    assert [item.id for item in client.batches.list(limit=2, after=made[1]).data] == [made[0]]
    assert [item.id for item in client.batches.list(limit=2)] == made[::-1]  # the SDK follows the cursor


@pytest.mark.parametrize(("params", "param"), [
    ({"completion_window": "1h"}, "completion_window"),
    ({"endpoint": "/v1/completions"}, "endpoint"),
    ({"metadata": {"llmq_lane": "fast"}}, "metadata.llmq_lane"),
])
def test_what_a_batch_cannot_be_is_refused_naming_the_param(stack: FrontStack, params: dict[str, Any], param: str) -> None:
    client = stack.client()
    options = {"input_file_id": upload(client, [line("a", "b")]), "endpoint": "/v1/chat/completions",
               "completion_window": "24h", **params}
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(**options)
    assert refused.value.param == param  # type: ignore[attr-defined]


def test_the_normal_lane_can_be_named(stack: FrontStack) -> None:
    client = stack.client()
    batch = client.batches.create(input_file_id=upload(client, [line("a", "b")]), endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"llmq_lane": "normal"})
    assert wait_for(client, batch.id).status == "completed"


def test_the_provider_batch_lane_sends_the_lines_to_the_providers_batch_api(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.reset()  # what earlier tests left on record
    client = stack.client()
    batch = client.batches.create(input_file_id=upload(client, [line("a", "b"), line("c", "d")]),
                                  endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"llmq_lane": "provider_batch"})
    assert wait_for(client, batch.id).status == "completed"
    output = [json.loads(text) for text in client.files.content(wait_for(client, batch.id).output_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == ["a", "c"]
    [remote] = fake.batches.values()  # type: ignore[attr-defined]
    assert len(remote.lines) == 2 and not [r for r in fake.sync_requests() if "chat" in r.path]  # type: ignore[attr-defined]


def test_only_batch_files_are_taken(stack: FrontStack) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert refused.value.param == "purpose"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
