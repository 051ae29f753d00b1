"""The stream entry format (llmq.contract.streams): what a reader makes of each entry the worker writes."""

from __future__ import annotations

import json

import pytest

from llmq.contract.models import LLMResponse, Usage
from llmq.contract.streams import CHUNK, FINAL, RESET, entry_to_response

JOB_ID, STREAM_ID = "job-1", "1700000000000-0"


def test_a_chunk_carries_its_text_provider_model_and_attempt() -> None:
    fields = {"type": CHUNK, "content": "Hel", "provider": "openai_backup", "model": "gpt-4o-mini", "attempt": "2"}
    response = entry_to_response(fields, JOB_ID, STREAM_ID)
    assert response == LLMResponse(
        content="Hel", model="gpt-4o-mini", provider="openai_backup", usage=Usage(),
        metadata={"job_id": JOB_ID, "stream_id": STREAM_ID, "attempt": 2},
    )
    assert "final" not in response.metadata and "reset" not in response.metadata


def test_a_chunk_keeps_whitespace_and_empty_text() -> None:
    for text in ("", " ", "\n\n", "  two spaces"):
        fields = {"type": CHUNK, "content": text, "provider": "p", "model": "m", "attempt": "1"}
        assert entry_to_response(fields, JOB_ID, STREAM_ID).content == text


def test_a_reset_says_to_drop_what_came_before_and_why() -> None:
    error = {"type": "ProviderConnectionError", "message": "connection reset", "retryable": True}
    fields = {"type": RESET, "attempt": "1", "provider": "openai", "model": "gpt-4o", "error": json.dumps(error)}
    response = entry_to_response(fields, JOB_ID, STREAM_ID)
    assert (response.content, response.provider, response.model) == ("", "openai", "gpt-4o")
    assert response.metadata == {"job_id": JOB_ID, "stream_id": STREAM_ID, "reset": True, "attempt": 1, "error": error}


def test_a_reset_from_an_older_writer_without_provider_and_model_still_reads() -> None:
    fields = {"type": RESET, "attempt": "3", "error": json.dumps({"type": "X"})}
    response = entry_to_response(fields, JOB_ID, STREAM_ID)
    assert (response.provider, response.model, response.metadata["attempt"]) == ("", "", 3)


def test_the_final_entry_has_no_text_and_the_whole_calls_usage() -> None:
    whole = LLMResponse(
        content="Hello there", model="claude-3-haiku", provider="anthropic",
        usage=Usage.of(prompt_tokens=12, completion_tokens=3), metadata={"finish_reason": "stop"},
    )
    response = entry_to_response({"type": FINAL, "response": whole.model_dump_json()}, JOB_ID, STREAM_ID)
    # The text came in the chunks; the final entry closes the stream with the usage of the whole call.
    assert response.content == ""
    assert (response.model, response.provider) == ("claude-3-haiku", "anthropic")
    assert response.usage == Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15)
    assert response.metadata == {"finish_reason": "stop", "job_id": JOB_ID, "stream_id": STREAM_ID, "final": True}


def test_an_entry_missing_a_field_is_an_error_not_a_silent_blank() -> None:
    with pytest.raises(KeyError):
        entry_to_response({"type": CHUNK, "provider": "p", "model": "m", "attempt": "1"}, JOB_ID, STREAM_ID)
