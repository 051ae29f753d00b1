"""What is refused at the edge, before anything is enqueued, and what is kept as given.

Refused, naming the line (batch files) or the field (Python): a NUL in an id
(custom_id, job_id, batch_id) or in a metadata key, metadata nested too deep, and
a batch line nested thousands deep. Kept: NUL and control characters in prompts and
metadata values; a provider's lone surrogate becomes U+FFFD, since it is not text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from llmq.client.batchfile import read_batch_file
from llmq.client.service import BatchItem, RequestError
from llmq.client.sync import SyncLLMService
from llmq.contract.common import MAX_METADATA_DEPTH
from llmq.contract.config import parse_config
from llmq.contract.models import LLMRequest, LLMResponse

CONFIG = """
llm_service:
  providers:
    primary:
      type: mock
      models: [gpt-4o-mini]
"""


@pytest.fixture
def service(redis_url: str) -> Iterator[SyncLLMService]:
    with SyncLLMService(parse_config(CONFIG), redis_url=redis_url) as opened:
        yield opened


def body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "model": "gpt-4o-mini", **extra}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def write_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_batch_file_is_refused_line_by_line_for_nul_ids_keys_and_deep_nesting(
    service: SyncLLMService, tmp_path: Path
) -> None:
    lines = [
        json.dumps({"custom_id": "fine", "body": body("tab\t, bell\a, nul\x00 in a prompt are kept")}),
        '{"custom_id": "deep", "body": {"model": "gpt-4o-mini", "messages": [], "metadata": {"a": ' + nested(5000) + "}}}",
        json.dumps({"custom_id": "nul\x00id", "body": body()}),
        json.dumps({"custom_id": "nul-key", "body": body(metadata={"ok": {"k\x00": 1}})}),
        json.dumps({"custom_id": "too-deep", "body": body(metadata={"a": json.loads(nested(MAX_METADATA_DEPTH))})}),
        json.dumps({"custom_id": "nul-value", "body": body(metadata={"note": "a\x00b"})}),
    ]
    with pytest.raises(RequestError, match="refused, nothing enqueued") as refused:
        read_batch_file(write_file(tmp_path / "batch.jsonl", lines), service.service)
    assert refused.value.problems == [
        ("line 2", f"JSON nested too deeply to read (metadata may nest {MAX_METADATA_DEPTH} levels); flatten it"),
        ("line 3", "custom_id must not contain a NUL character (\\u0000)"),
        ("line 4", "body: metadata: key 'k\\x00' must not contain a NUL character (\\u0000)"),
        ("line 5", f"body: metadata: nests more than {MAX_METADATA_DEPTH} levels deep; flatten it"),
    ]


def test_nul_in_ids_and_metadata_keys_is_refused_naming_the_field(service: SyncLLMService, redis_url: str) -> None:
    with pytest.raises(RequestError, match=r"^job_id: must not contain a NUL character"):
        service.submit(body(), job_id="job\x00one")
    with pytest.raises(RequestError, match=r"^batch_id: must not contain a NUL character"):
        service.submit_batch([body()], batch_id="batch\x00one")
    items = [BatchItem(LLMRequest.model_validate(body()), "a"), BatchItem(LLMRequest.model_validate(body()), "b\x00")]
    with pytest.raises(RequestError, match=r"item 2 \(custom_id 'b\\x00'\): custom_id: must not contain a NUL"):
        service.submit_batch(items)
    with pytest.raises(RequestError, match=r"^request: metadata: key 'x\\x00' must not contain a NUL"):
        service.submit(body(metadata={"x\x00": "y"}))
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys("*") == []  # nothing enqueued by any of them
    finally:
        client.close()


def test_nul_and_control_characters_in_prompts_and_metadata_values_are_kept(service: SyncLLMService) -> None:
    prompt = "".join(chr(code) for code in range(32)) + "\x7f\u2028 end"
    job_id = service.submit(body(prompt, metadata={"note": "a\x00b", "caller": "c\x1bd"}))
    record = service.poll(job_id)
    assert record.request.messages[0].content == prompt
    assert record.request.metadata == {"note": "a\x00b", "caller": "c\x1bd"}


def test_a_providers_lone_surrogate_becomes_a_replacement_character_and_the_rest_is_kept() -> None:
    response = LLMResponse(content="ok \ud83d\ude00 \ud800 nul\x00", model="m\udfff", provider="p",
                           metadata={"finish": "\udc00"})
    assert response.content == "ok \U0001f600 \ufffd nul\x00"  # a proper pair is a character, kept
    assert (response.model, response.metadata) == ("m\ufffd", {"finish": "\ufffd"})
    assert LLMResponse.model_validate_json(response.model_dump_json()) == response


WINDOWS_CONFIG = """
llm_service:
  providers:
    small:
      type: mock
      models: [m]
      capabilities: {"*": {context_window: 4000}}
    large:
      type: mock
      models: [m]
      capabilities: {"*": {context_window: 20000}}
"""


def test_submit_routes_past_a_window_that_cannot_hold_the_prompt_and_refuses_one_no_window_holds(
    redis_url: str,
) -> None:
    ask = {"model": "m", "max_tokens": 500, "messages": [{"role": "user", "content": " ".join(["ore"] * 5000)}]}
    with SyncLLMService(parse_config(WINDOWS_CONFIG), redis_url=redis_url) as windows:
        job_id = windows.submit(ask)
        assert [hop.provider for hop in windows.poll(job_id).route] == ["large"]
        too_long = {**ask, "messages": [{"role": "user", "content": " ".join(["ore"] * 25_000)}]}
        with pytest.raises(RequestError) as refused:
            windows.submit(too_long, job_id="too-long")
        assert windows.poll("too-long") is None  # nothing enqueued
    message = str(refused.value)
    assert message.startswith("request: model 'm': no configured provider can serve this request")
    for entry, window in (("small", 4000), ("large", 20000)):
        assert (f"{entry}/m lacks room: its context window of {window} tokens cannot hold a prompt of at least "
                "25000 tokens plus max_tokens 500") in message
