"""LangChain's messages to llmq's and back: a conversation into `LLMRequest` messages, an
`LLMResponse` into an `AIMessage`, a job's stream chunks into `AIMessageChunk`s.

LangChain's own `convert_to_openai_messages` does the first half: llmq's messages are OpenAI's
Chat Completions shapes, so system, human, AI (with `tool_calls`) and tool messages, and content
blocks (text; images by URL or base64, LangChain's standard blocks or OpenAI's `image_url`)
map field for field. A block llmq has no part for (a PDF, audio) is refused when the request is
checked, naming the message, the part and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    InputTokenDetails,
    InvalidToolCall,
    OutputTokenDetails,
    ToolCall,
    UsageMetadata,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.messages.tool import tool_call_chunk as make_tool_call_chunk
from langchain_core.messages.utils import convert_to_openai_messages

from llmq.contract.messages import ToolCall as LLMQToolCall
from llmq.contract.models import LLMResponse, Usage

#: `AIMessage.additional_kwargs` key of the answer's checked JSON, where langchain-openai keeps it too.
PARSED_KEY = "parsed"
#: llmq's own answer metadata copied to `response_metadata["llmq"]` (the rest is stream bookkeeping).
ANSWER_METADATA = ("request_id", "response_id", "served_model", "cached", "simulated")


class StreamRestartedError(RuntimeError):
    """The provider failed part-way through a streamed answer and llmq moved the job to its next
    attempt. The chunks already yielded belong to the failed attempt and a LangChain stream cannot
    take them back, so the stream ends here; the job goes on, and `LLMService.wait(job_id)` (or
    `invoke` again) has its answer."""

    def __init__(self, job_id: str, error: Any) -> None:
        super().__init__(
            f"job {job_id}: the provider failed part-way through the streamed answer ({error}); llmq goes on "
            "with the next attempt, but the chunks already yielded cannot be taken back"
        )
        self.job_id = job_id
        self.error = error


def request_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The conversation as llmq's (OpenAI's) message dicts."""
    converted = convert_to_openai_messages(list(messages))
    return [_assistant_text_only(message) if message["role"] == "assistant" else message for message in converted]


def _assistant_text_only(message: dict[str, Any]) -> dict[str, Any]:
    # An answer from another provider may hold blocks of its own (reasoning, tool_use) beside its
    # text; what is sent back is its text and its tool calls.
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        message = {**message, "content": text}
    if message.get("tool_calls") and not message.get("content"):
        message = {key: value for key, value in message.items() if key != "content"}
    return message


def ai_message(response: LLMResponse, job_id: str) -> AIMessage:
    return AIMessage(
        content=response.content, id=job_id, usage_metadata=usage_metadata(response.usage),
        response_metadata=response_metadata(response, job_id), additional_kwargs=_parsed(response),
        **_tool_calls(response.tool_calls or ()),
    )


def _tool_calls(calls: Sequence[LLMQToolCall]) -> dict[str, Any]:
    """The model's calls as `AIMessage` keeps them, `tool_calls` and `invalid_tool_calls` (arguments
    that are not a JSON object)."""
    valid: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for call in calls:
        try:
            arguments = call.parsed_arguments()
        except ValueError as exc:
            invalid.append(invalid_tool_call(name=call.function.name, args=call.function.arguments, id=call.id,
                                             error=f"arguments are not JSON: {exc}"))
            continue
        if isinstance(arguments, dict):
            valid.append(tool_call(name=call.function.name, args=arguments, id=call.id))
        else:
            invalid.append(invalid_tool_call(name=call.function.name, args=call.function.arguments, id=call.id,
                                             error="arguments are JSON but not an object"))
    return {"tool_calls": valid, "invalid_tool_calls": invalid}


def usage_metadata(usage: Usage) -> UsageMetadata:
    metadata = UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens)
    if usage.cached_read_tokens or usage.cache_write_tokens:
        metadata["input_token_details"] = InputTokenDetails(cache_read=usage.cached_read_tokens,
                                                            cache_creation=usage.cache_write_tokens)
    if usage.reasoning_tokens:
        metadata["output_token_details"] = OutputTokenDetails(reasoning=usage.reasoning_tokens)
    return metadata


def response_metadata(response: LLMResponse, job_id: str) -> dict[str, Any]:
    """`finish_reason` and `model_name` as every LangChain chat model has them; llmq's provider
    entry and job id; the provider's ids and llmq's flags under `llmq`."""
    answer = {key: response.metadata[key] for key in ANSWER_METADATA if key in response.metadata}
    return {"finish_reason": response.finish_reason, "model_name": response.model, "provider": response.provider,
            "job_id": job_id, "llmq": answer}


def _parsed(response: LLMResponse) -> dict[str, Any]:
    return {PARSED_KEY: response.parsed} if response.parsed is not None else {}


class ChunkReader:
    """One streamed job's chunks as `AIMessageChunk`s: text, tool-call pieces, and a last chunk with
    the usage, the metadata and `parsed`. Adding every chunk up gives what `ai_message` gives."""

    def __init__(self) -> None:
        self.text_seen = False
        self.calls_seen: set[int] = set()

    def read(self, response: LLMResponse) -> AIMessageChunk | None:
        """The chunk to yield for `response`; None when it carries nothing new."""
        job_id = response.metadata.get("job_id")
        if response.metadata.get("reset"):
            if self.text_seen or self.calls_seen:
                raise StreamRestartedError(str(job_id), response.metadata.get("error"))
            return None  # nothing of the failed attempt was yielded: its successor simply follows
        if response.metadata.get("final"):
            return self._last(response, str(job_id))
        pieces = [
            make_tool_call_chunk(name=delta.function.name, args=delta.function.arguments, id=delta.id, index=delta.index)
            for delta in response.tool_call_deltas or ()
        ]
        if not response.content and not pieces:
            return None
        self.text_seen |= bool(response.content)
        self.calls_seen.update(delta.index for delta in response.tool_call_deltas or ())
        return AIMessageChunk(content=response.content, tool_call_chunks=pieces, id=job_id)

    def _last(self, response: LLMResponse, job_id: str) -> AIMessageChunk:
        # An answer served whole (a cache hit, a stream that had expired) arrives only here.
        content = "" if self.text_seen else response.content
        missing = [
            make_tool_call_chunk(name=call.function.name, args=call.function.arguments, id=call.id, index=index)
            for index, call in enumerate(response.tool_calls or ()) if index not in self.calls_seen
        ]
        return AIMessageChunk(
            content=content, tool_call_chunks=missing, id=job_id, usage_metadata=usage_metadata(response.usage),
            response_metadata=response_metadata(response, job_id), additional_kwargs=_parsed(response),
            chunk_position="last",
        )

