"""Streamed output through Redis Streams: the entry format both sides share.

The worker appends one entry per provider chunk to the job's stream
(`keys.job_stream`); the caller reads with XREAD from the last id it saw, so a
reader that reconnects (or a second reader) gets every chunk once, in order.

Entry fields: `type` is one of
- `chunk`: `content`, `provider`, `model`, `attempt`, and `tool_calls` when the chunk carries
  pieces of tool calls (JSON list of OpenAI's `delta.tool_calls` entries: `index`, the first
  piece of a call with its `id` and `function.name`, later ones adding `function.arguments`)
- `reset`: the attempt that was streaming failed part-way (`attempt`, `error` JSON);
  the job moves on and the next attempt's chunks follow: drop what came before
- `final`: `response`, the whole answer as LLMResponse JSON (with the usage and the whole tool calls)
- `error`: the job failed for good (`error` JSON)
"""

from __future__ import annotations

import json
from typing import Any

from llmq.contract.models import LLMResponse, ToolCallDelta, Usage

CHUNK, RESET, FINAL, ERROR = "chunk", "reset", "final", "error"


def entry_to_response(fields: dict[str, str], job_id: str, stream_id: str) -> LLMResponse:
    meta: dict[str, Any] = {"job_id": job_id, "stream_id": stream_id}
    if fields["type"] == FINAL:
        response = LLMResponse.model_validate_json(fields["response"])
        return response.model_copy(update={"content": "", "metadata": {**response.metadata, **meta, "final": True}})
    if fields["type"] == RESET:
        meta.update(reset=True, attempt=int(fields["attempt"]), error=json.loads(fields["error"]))
        return LLMResponse(content="", model=fields.get("model", ""), provider=fields.get("provider", ""), metadata=meta)
    meta["attempt"] = int(fields["attempt"])
    deltas = [ToolCallDelta.model_validate(item) for item in json.loads(fields["tool_calls"])] if "tool_calls" in fields else None
    return LLMResponse(
        content=fields["content"], model=fields["model"], provider=fields["provider"], usage=Usage(), metadata=meta,
        tool_call_deltas=deltas,
    )


def chunk_fields(response: LLMResponse, attempt: int) -> dict[str, str]:
    """A chunk entry's fields (the writer's side of `entry_to_response`)."""
    fields = {"type": CHUNK, "content": response.content, "provider": response.provider, "model": response.model,
              "attempt": str(attempt)}
    if response.tool_call_deltas:
        fields["tool_calls"] = json.dumps([delta.model_dump(exclude_none=True) for delta in response.tool_call_deltas])
    return fields
