"""Anthropic's Message Batches API.

Wire format (Anthropic API reference: Create / Retrieve / List / Cancel a Message Batch,
Retrieve Message Batch results; "Batch processing" guide):

- `POST /v1/messages/batches` `{"requests": [{"custom_id", "params": {Messages API body}}]}`,
  up to 100,000 requests or 256 MB; `custom_id` matches `^[a-zA-Z0-9_-]{1,64}$`;
- `GET /v1/messages/batches/{id}`: `processing_status` in_progress, canceling, ended;
  `request_counts` (processing, succeeded, errored, canceled, expired); `results_url` once ended;
- results: a JSONL stream, one `{"custom_id", "result": {"type": "succeeded", "message"} |
  {"type": "errored", "error": {"type": "error", "error": {"type", "message"}}} |
  {"type": "canceled"} | {"type": "expired"}}` per request, in any order;
- `POST /v1/messages/batches/{id}/cancel`; `GET /v1/messages/batches` lists them, newest first.

A Message Batch takes no metadata, so a batch whose creation answer was lost is found by what
it must look like: created after the first try, holding as many requests as ours, and not
already another provider batch's (`find`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

from llmq.worker.batches.base import Line, LineResult, ProviderBatchAPI, RemoteBatch

BATCHES_PATH = "/v1/messages/batches"
#: The HTTP status each `error.type` is sent with, so the sync adapter classes a line's error the same.
STATUS_FOR_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}


class AnthropicBatches(ProviderBatchAPI):
    type_name = "anthropic"

    def encode_line(self, line: Line) -> dict[str, Any]:
        return {"custom_id": line.key, "params": self.adapter.build_body(line.request, stream=False)}

    async def submit(self, provider_batch_id: str, lines: list[Line], endpoint: str, window_s: float) -> RemoteBatch:
        # The body is written by hand: a quarter of a GB of requests is not built twice as Python objects.
        content = b'{"requests":[' + b",".join(self.encoded(line) for line in lines) + b"]}"
        created = await self.call_json("POST", BATCHES_PATH, content=content,
                                       extra_headers={"content-type": "application/json"})
        return self.remote(created)

    async def find(
        self, provider_batch_id: str, lines: list[Line], since_s: float, taken: frozenset[str]
    ) -> RemoteBatch | None:
        async for batch in self.listed(f"{BATCHES_PATH}?limit=100", items="data", cursor_param="after_id",
                                       cursor=lambda page: page["data"][-1]["id"] if page.get("has_more") else None):
            if _epoch_s(batch.get("created_at")) < since_s - 60:
                return None  # newest first: older than our first try, so it was never made
            size = sum(int(count) for count in (batch.get("request_counts") or {}).values())
            if size == len(lines) and batch["id"] not in taken:
                return self.remote(batch)
        return None

    async def get(self, remote_id: str) -> RemoteBatch:
        return self.remote(await self.call_json("GET", f"{BATCHES_PATH}/{quote(remote_id)}"))

    async def cancel(self, remote_id: str) -> RemoteBatch:
        return self.remote(await self.call_json("POST", f"{BATCHES_PATH}/{quote(remote_id)}/cancel"))

    def remote(self, batch: dict[str, Any]) -> RemoteBatch:
        status = str(batch.get("processing_status") or "")
        counts = {key: int(value) for key, value in (batch.get("request_counts") or {}).items()}
        if status == "ended":
            state = "cancelled" if batch.get("cancel_initiated_at") else "completed"
        else:
            state = "cancelling" if status == "canceling" else "in_progress"
        return RemoteBatch(
            remote_id=str(batch["id"]), state=state, raw_state=status, counts=counts,  # type: ignore[arg-type]
            handles={"results_url": batch.get("results_url")},
        )

    async def results(self, remote: RemoteBatch, lines: list[Line]) -> AsyncIterator[LineResult]:
        by_key = {line.key: line for line in lines}
        url = remote.handles.get("results_url") or f"{BATCHES_PATH}/{quote(remote.remote_id)}/results"
        async for item in self.jsonl(url):
            line = by_key.get(str(item.get("custom_id")))
            if line is not None:
                yield self.read_line(line, item.get("result") or {})

    def read_line(self, line: Line, result: dict[str, Any]) -> LineResult:
        kind = result.get("type")
        if kind == "succeeded":
            return LineResult(line.key, response=self.answer(line, result.get("message")))
        if kind == "errored":
            body = result.get("error") or {}
            error_type = str((body.get("error") or {}).get("type") or "api_error")
            return LineResult(line.key, error=self.line_error(line, STATUS_FOR_TYPE.get(error_type, 500), body))
        return LineResult(line.key, error=self.not_run(line, f"the Message Batch reported the request {kind}",
                                                        expired=kind == "expired"))


def _epoch_s(value: Any) -> float:
    """An RFC 3339 time as epoch seconds (0 when absent)."""
    if not value:
        return 0.0
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
