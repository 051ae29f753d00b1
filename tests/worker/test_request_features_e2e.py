"""Request features end to end: a real redis-server, a real `llmq worker`, fake OpenAI servers
over real HTTP and the SQL ledger. A batch file mixing JSON, tools and embedding lines; a
schema miss retried once on the same provider, then on the next; tools routed past a
server without them; tool calls streamed through the queue; embeddings priced in the ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

from llmq.cli.output import result_line
from llmq.client.batchfile import read_batch_file
from llmq.client.service import RequestError
from llmq.contract.models import EmbeddingResponse, JobState, LLMResponse
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.fakes.openai import DEFAULT_API_KEY, FakeOpenAI, fake_vector
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
VERDICT_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": "string"}},
                  "required": ["ok", "reason"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}


class Verdict(BaseModel):
    ok: bool
    reason: str


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    local, cloud = FakeOpenAI(api_key=None).start(), FakeOpenAI().start()
    yield local, cloud
    local.stop()
    cloud.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fakes: tuple[FakeOpenAI, FakeOpenAI]) -> Iterator[Cluster]:
    local, cloud = fakes
    providers = {
        # A vLLM server: JSON schema yes, tools no (the capability table's defaults), listed first.
        "local": {"type": "vllm", "base_url": f"{local.url}/v1", "models": ["gpt-4o-mini"]},
        "cloud": openai_entry(cloud, api_key=DEFAULT_API_KEY, models=["gpt-4o-mini", "text-embedding-3-small"]),
    }
    config = service_config(providers, fallback_chain=["local", "cloud"], retry=fast_retry(3),
                            health={"minimum_calls": 1000})
    started = start_cluster(tmp_path_factory.mktemp("features"), config)
    started.start_workers(1, concurrency=20)
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _reset(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    for fake in fakes:
        fake.reset()


def chat_line(custom_id: str, **body: object) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "temperature": 0, "max_tokens": 64, **body}}


def test_a_batch_file_mixing_json_tools_and_embeddings(
    cluster: Cluster, fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Path,
) -> None:
    local, cloud = fakes
    lines = [
        chat_line("judge", messages=[{"role": "user", "content": "Is the plan safe?"}], response_format=JSON_FORMAT),
        chat_line("act", messages=[{"role": "user", "content": "Oslo"}], tools=[WEATHER_TOOL]),
        {"custom_id": "index", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": ["mine iron", "craft pickaxe"], "dimensions": 4}},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with cluster.service() as service:
        batch_id = service.submit_batch(read_batch_file(path, service.service))
        service.wait(batch_id, timeout_s=60)
        records = {record.custom_id: record for record in service.results(batch_id)}
    assert {record.state for record in records.values()} == {JobState.SUCCEEDED}

    judge = records["judge"].result
    assert isinstance(judge, LLMResponse) and judge.provider == "local"
    assert Verdict.model_validate(judge.parsed) and judge.finish_reason == "stop"

    act = records["act"].result
    assert isinstance(act, LLMResponse) and act.finish_reason == "tool_calls"
    assert act.provider == "cloud"  # the local server has no tools: its hop was never on the route
    assert act.tool_calls is not None and act.tool_calls[0].parsed_arguments() == {"city": "Oslo"}
    assert all("tools" not in (request.body or {}) for request in local.requests)

    index = records["index"].result
    assert isinstance(index, EmbeddingResponse) and records["index"].kind.value == "embedding"
    assert index.embeddings == [fake_vector("mine iron", 4), fake_vector("craft pickaxe", 4)]

    lines_out = {json.loads(line)["custom_id"]: json.loads(line) for line in map(result_line, records.values())}
    assert lines_out["judge"]["response"]["parsed"] == judge.parsed
    assert lines_out["act"]["response"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert lines_out["index"]["response"]["embeddings"] == index.embeddings  # numbers, not base64

    OutboxFlusher(cluster.redis_url, cluster.database_url).drain(timeout_s=30)
    with Store(cluster.database_url) as store:
        usage = store.usage_rows(records["index"].job_id)
        ledger = {name: store.job(record.job_id) or {} for name, record in records.items()}
    assert usage[0]["prompt_tokens"] == 4 and usage[0]["priced"]
    assert usage[0]["cost_usd"] == Decimal("0.02") * 4 / 1_000_000  # text-embedding-3-small, genai-prices
    # Each job's kind and lane, from its record through the outbox (a batch waits in the batch lane).
    assert {name: (row.get("kind"), row.get("lane")) for name, row in ledger.items()} == {
        "judge": ("chat", "batch"), "act": ("chat", "batch"), "index": ("embedding", "batch")}


def test_an_answer_that_misses_its_schema_is_retried_once_then_moves_on(
    cluster: Cluster, fakes: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    local, cloud = fakes
    local.json_answers = ['{"ok": "yes"}', "no json"]
    with cluster.service() as service:
        job_id = service.submit({"messages": [{"role": "user", "content": "judge"}], "model": "gpt-4o-mini",
                                 "temperature": 0, "response_format": Verdict})
        job = service.wait(job_id, timeout_s=60)
    answer = job.result
    # parsed is the caller's class, in the caller's process; never a value that missed the schema.
    assert isinstance(answer, LLMResponse) and isinstance(answer.parsed, Verdict) and answer.provider == "cloud"
    assert len(local.requests) == 2 and len(cloud.requests) == 1
    outcomes = [(attempt["provider"], attempt.get("error_type")) for attempt in job.attempts]
    assert outcomes == [("local", "OutputValidationError"), ("local", "OutputValidationError"), ("cloud", None)]
    OutboxFlusher(cluster.redis_url, cluster.database_url).drain(timeout_s=30)
    with Store(cluster.database_url) as store:
        row = store.job(job_id) or {}
    assert (row.get("kind"), row.get("lane")) == ("chat", "interactive")  # one request: the interactive lane


def test_tool_calls_stream_through_the_queue_as_deltas(cluster: Cluster) -> None:
    request = {"messages": [{"role": "user", "content": "Bergen"}], "model": "gpt-4o-mini", "tools": [WEATHER_TOOL]}
    with cluster.service() as service:
        chunks = list(_collect(service, request))
    deltas = [delta for chunk in chunks[:-1] for delta in chunk.tool_call_deltas or ()]
    final = chunks[-1]
    assert deltas and deltas[0].function.name == "get_weather"
    assert final.tool_calls is not None and final.tool_calls[0].id == deltas[0].id
    assert final.tool_calls[0].function.arguments == "".join(delta.function.arguments or "" for delta in deltas)


def _collect(service: object, request: dict[str, object]) -> list[LLMResponse]:
    async def run() -> list[LLMResponse]:
        return [chunk async for chunk in service.service.stream_generate(request)]  # type: ignore[attr-defined]

    return service._run(run())  # type: ignore[attr-defined]


def test_embed_from_python_and_an_impossible_request_refused_at_submit(cluster: Cluster) -> None:
    with cluster.service() as service:
        response = service.embed("one text", model="text-embedding-3-small", dimensions=3)
        assert response.embeddings == [fake_vector("one text", 3)] and response.provider == "cloud"
        with pytest.raises(RequestError, match="needs embeddings; considered: local/gpt-4o-mini lacks embeddings"):
            service.embed("x", model="gpt-4o-mini")
