"""Batch files (llmq.client.batchfile.read_batch_file): every line checked, bad ones named, before anything is sent.

Reading a file needs the config (to check each body's route) but no Redis: the
service below points at a port nothing listens on, and is never asked to connect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmq.client import batchfile
from llmq.client.batchfile import read_batch_file
from llmq.client.errors import RequestError
from llmq.client.service import BatchItem, LLMService
from llmq.contract.config import parse_config
from llmq.contract.models import LLMRequest

CONFIG = "llm_service:\n  providers:\n    primary: {type: mock, models: [gpt-4o-mini, gpt-4o]}\n"


@pytest.fixture(scope="module")
def service() -> LLMService:
    return LLMService(parse_config(CONFIG, environ={}), redis_url="redis://127.0.0.1:9/0")


def body(content: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "model": "gpt-4o-mini", **fields}


def line(custom_id: Any = "c1", **fields: Any) -> str:
    return json.dumps({"custom_id": custom_id, "body": body(), **fields})


def batch_file(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b"".join((item if isinstance(item, bytes) else item.encode()) + b"\n" for item in lines))
    return path


def refusals(path: Path, service: LLMService) -> list[tuple[str, str]]:
    with pytest.raises(RequestError) as refused:
        read_batch_file(path, service)
    assert str(refused.value).startswith(f"{path}: refused, nothing enqueued: ")
    return refused.value.problems


def test_good_lines_become_items_in_file_order(tmp_path: Path, service: LLMService) -> None:
    lines = [
        json.dumps({"custom_id": "first", "body": body("one")}),
        json.dumps({"custom_id": "second", "body": body("two", model="gpt-4o", temperature=0, max_tokens=5)}),
        json.dumps({"custom_id": "x" * 256, "body": body("three", metadata={"caller": "billing"})}),
    ]
    items = read_batch_file(batch_file(tmp_path, *lines), service)
    assert items == [
        BatchItem(LLMRequest.model_validate(body("one")), "first"),
        BatchItem(LLMRequest.model_validate(body("two", model="gpt-4o", temperature=0, max_tokens=5)), "second"),
        BatchItem(LLMRequest.model_validate(body("three", metadata={"caller": "billing"})), "x" * 256),
    ]


def test_blank_lines_are_skipped_but_still_counted(tmp_path: Path, service: LLMService) -> None:
    path = batch_file(tmp_path, "", line("a"), "   ", "\t\r", line("b"), "", "{oops")
    assert refusals(path, service) == [("line 7", "not valid JSON (Expecting property name enclosed in double "
                                                  "quotes: line 1 column 2 (char 1))")]
    items = read_batch_file(batch_file(tmp_path, "", line("a"), "  ", line("b"), ""), service)
    assert [item.custom_id for item in items] == ["a", "b"]


def test_a_file_with_windows_line_ends_reads(tmp_path: Path, service: LLMService) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(f"{line('a')}\r\n{line('b')}\r\n".encode())
    assert [item.custom_id for item in read_batch_file(path, service)] == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("{oops", "not valid JSON"),
        (b"\xff\xfe not text", "not valid JSON"),
        ('["custom_id", "body"]', "must be a JSON object with custom_id and body"),
        ('"just a string"', "must be a JSON object with custom_id and body"),
        (line("a", response={}), "unknown key 'response'; a line holds custom_id, method, url and body"),
        (line("a", method="POST", url="/v1/chat"), "url '/v1/chat' is not served; use one of: /v1/chat/completions, "
                                                   "/v1/embeddings"),
        (json.dumps({"body": body()}), "custom_id must be a non-empty string of at most 256 characters"),
        (line(7), "custom_id must be a non-empty string of at most 256 characters"),
        (line(""), "custom_id must be a non-empty string of at most 256 characters"),
        (line("   "), "custom_id must be a non-empty string of at most 256 characters"),
        (line("x" * 257), "custom_id must be a non-empty string of at most 256 characters"),
        ('{"custom_id": "\\ud800", "body": {}}', "custom_id must be valid Unicode text (it holds a lone surrogate)"),
        (json.dumps({"custom_id": "a"}), "body must be a JSON object: the request (messages, model, ..."),
        (json.dumps({"custom_id": "a", "body": "hi"}), "body must be a JSON object: the request"),
    ],
    ids=[
        "bad-json", "not-utf8", "array", "string", "unknown-key", "unknown-url", "no-custom-id", "number-custom-id",
        "empty-custom-id", "blank-custom-id", "long-custom-id", "surrogate-custom-id", "no-body", "string-body",
    ],
)
def test_a_bad_line_is_refused_with_its_number_and_reason(
    tmp_path: Path, service: LLMService, raw: str | bytes, problem: str,
) -> None:
    [(where, message)] = refusals(batch_file(tmp_path, line("ok-1"), raw, line("ok-2")), service)
    assert where == "line 2" and message.startswith(problem), message


@pytest.mark.parametrize(
    ("bad_body", "problem"),
    [
        (body(temperature=5), "body: temperature: Input should be less than or equal to 2"),
        (
            {"messages": [{"role": "robot", "content": "x"}], "model": "gpt-4o-mini"},
            "body: messages.0.role: Input should be 'system', 'user', 'assistant' or 'tool'",
        ),
        ({"model": "gpt-4o-mini"}, "body: messages: Field required"),
        (body(stream="sometimes"), "body: stream: Input should be a valid boolean"),
        (body(n=2), "body: n: Extra inputs are not permitted; llmq's request has no such field"),
        (body(model="mystery"), "body: model 'mystery': no configured provider serves it (configured: primary)"),
        (body(provider="elsewhere"), "body: provider 'elsewhere' is not in the config; use one of: primary"),
    ],
    ids=["temperature", "role", "no-messages", "stream", "unknown-field", "unserved-model", "unknown-provider"],
)
def test_a_bad_body_is_refused_naming_the_field(
    tmp_path: Path, service: LLMService, bad_body: dict[str, Any], problem: str,
) -> None:
    raw = json.dumps({"custom_id": "bad", "body": bad_body})
    [(where, message)] = refusals(batch_file(tmp_path, line("ok"), raw), service)
    assert where == "line 2" and message.startswith(problem), message


def test_several_field_errors_in_one_body_are_counted(tmp_path: Path, service: LLMService) -> None:
    raw = json.dumps({"custom_id": "bad", "body": body(temperature=5, max_tokens=0)})
    [(_, message)] = refusals(batch_file(tmp_path, raw), service)
    assert message.endswith("(and 1 more)")


def test_a_repeated_custom_id_names_the_line_it_repeats(tmp_path: Path, service: LLMService) -> None:
    path = batch_file(tmp_path, line("a"), line("b"), line("a"), line("b"))
    assert refusals(path, service) == [
        ("line 3", "custom_id 'a' repeats line 1; give each line its own"),
        ("line 4", "custom_id 'b' repeats line 2; give each line its own"),
    ]


def test_an_oversize_line_is_refused_unread_and_its_neighbours_pass(
    tmp_path: Path, service: LLMService, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batchfile, "MAX_LINE_BYTES", 200)
    big = json.dumps({"custom_id": "big", "body": body("x" * 200)})
    path = batch_file(tmp_path, line("a"), big, line("b"))
    assert refusals(path, service) == [("line 2", f"is {len(big) + 1} bytes; the limit is 200 (split the request)")]


@pytest.mark.parametrize(
    ("bad_lines", "more"), [(3, ""), (4, " (and 1 more bad lines)"), (6, " (and 3 more bad lines)")],
)
def test_the_message_names_three_bad_lines_and_counts_the_rest(
    tmp_path: Path, service: LLMService, bad_lines: int, more: str,
) -> None:
    path = batch_file(tmp_path, line("ok"), *[f"bad {number}" for number in range(bad_lines)])
    with pytest.raises(RequestError) as refused:
        read_batch_file(path, service)
    message = str(refused.value)
    assert [where for where, _ in refused.value.problems] == [f"line {number + 2}" for number in range(bad_lines)]
    assert message.count("not valid JSON") == 3 and "line 5" not in message
    assert message.endswith("line 4: not valid JSON (Expecting value: line 1 column 1 (char 0))" + more)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "only-blank-lines"])
def test_a_file_with_no_requests_is_refused(tmp_path: Path, service: LLMService, content: bytes) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(content)
    with pytest.raises(RequestError) as refused:
        read_batch_file(path, service)
    assert str(refused.value) == f"{path}: holds no requests (one JSON object per line: custom_id, method, url and body)"
    assert refused.value.problems == []


def test_a_file_that_cannot_be_read_is_refused(tmp_path: Path, service: LLMService) -> None:
    with pytest.raises(RequestError, match=r"missing\.jsonl: cannot read \(No such file or directory\)"):
        read_batch_file(tmp_path / "missing.jsonl", service)
