"""Batch files in OpenAI's Batch API line shape, and what the client checks before anything is
enqueued. No Redis: every refusal happens in the caller's process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from llmq.client.batchfile import read_batch_file
from llmq.client.service import LLMService, RequestError
from llmq.contract.config import parse_config
from llmq.contract.models import EmbeddingRequest, JobRecord, JobState, LLMRequest, LLMResponse

CONFIG = """
llm_service:
  providers:
    sim:
      type: mock
      models: [gpt-3.5-turbo-0125, gpt-4o-mini, text-embedding-3-small]
    text_only:
      type: ollama
      base_url: http://127.0.0.1:9
      models: [llama3]
      capabilities:
        "*": {tools: false, json_object: false, json_schema: false, vision: false, embeddings: false}
"""
# Lines as OpenAI's Batch API guide shows them, unchanged.
OPENAI_CHAT_LINE = {
    "custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": "gpt-3.5-turbo-0125", "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello world!"}],
        "max_tokens": 1000},
}
OPENAI_EMBEDDING_LINE = {
    "custom_id": "request-2", "method": "POST", "url": "/v1/embeddings",
    "body": {"model": "text-embedding-3-small", "input": "Hello world!", "encoding_format": "float"},
}


@pytest.fixture(scope="module")
def service() -> LLMService:
    return LLMService(parse_config(CONFIG))


def write(tmp_path: Path, *lines: dict[str, Any]) -> Path:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_openai_batch_api_lines_run_unchanged_and_the_short_form_stays_valid(service: LLMService, tmp_path: Path) -> None:
    short = {"custom_id": "short", "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    tools = {"custom_id": "tools", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}}
    items = read_batch_file(write(tmp_path, OPENAI_CHAT_LINE, OPENAI_EMBEDDING_LINE, short, tools), service)
    assert [item.custom_id for item in items] == ["request-1", "request-2", "short", "tools"]
    assert isinstance(items[0].request, LLMRequest) and items[0].request.max_tokens == 1000
    assert isinstance(items[1].request, EmbeddingRequest) and items[1].request.texts == ["Hello world!"]
    assert isinstance(items[3].request, LLMRequest) and items[3].request.uses_tools


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({**OPENAI_CHAT_LINE, "body": {**OPENAI_CHAT_LINE["body"], "logit_bias": {"50256": -100}}},
         "line 1: body: logit_bias: Extra inputs are not permitted; llmq's request has no such field"),
        ({**OPENAI_CHAT_LINE, "url": "/v1/responses"}, "url '/v1/responses' is not served"),
        ({**OPENAI_CHAT_LINE, "method": "GET"}, 'method must be "POST"'),
        ({**OPENAI_EMBEDDING_LINE, "body": {"model": "text-embedding-3-small", "input": [1, 2]}}, "body: input"),
        ({**OPENAI_EMBEDDING_LINE, "body": {"model": "llama3", "input": "x"}}, "needs embeddings"),
        ({**OPENAI_CHAT_LINE, "body": {**OPENAI_CHAT_LINE["body"], "model": "llama3", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}},
         "lacks json_schema"),
    ],
)
def test_a_bad_line_is_refused_naming_the_line_and_the_field(
    service: LLMService, tmp_path: Path, line: dict[str, Any], expected: str,
) -> None:
    with pytest.raises(RequestError, match="nothing enqueued") as caught:
        read_batch_file(write(tmp_path, line), service)
    assert expected in str(caught.value)


def test_parsed_comes_back_as_the_callers_class_in_the_callers_process(service: LLMService) -> None:
    class Verdict(BaseModel):
        ok: bool
        reason: str

    request = service.prepare({"messages": [{"role": "user", "content": "judge"}], "model": "gpt-4o-mini",
                               "response_format": Verdict})
    assert isinstance(request, LLMRequest) and request.response_model is Verdict
    service.response_models.remember("job-1", request)
    answer = LLMResponse(content='{"ok": true, "reason": "fine"}', model="m", provider="sim",
                         parsed={"ok": True, "reason": "fine"})
    record = JobRecord(job_id="job-1", state=JobState.SUCCEEDED, request=request, route=[], result=answer)
    assert service.response_models.record(record).result.parsed == Verdict(ok=True, reason="fine")
    # Another process (or a job this one did not submit) gets the JSON as it came.
    assert service.response_models.record(record.model_copy(update={"job_id": "job-2"})).result.parsed == {"ok": True, "reason": "fine"}
