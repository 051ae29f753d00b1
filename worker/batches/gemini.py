"""Gemini's batch mode (the Batch API of generativelanguage.googleapis.com).

Wire format (ai.google.dev: "Batch API" guide, API reference "Batch API"; Files API):

- `POST /models/{model}:batchGenerateContent` `{"batch": {"display_name", "input_config": ...}}`
  answers an Operation `{"name": "batches/...", "metadata": {GenerateContentBatch}, "done"}`;
  `input_config` is `{"requests": {"requests": [{"request": {GenerateContentRequest},
  "metadata": {"key"}}]}}` for requests up to 20 MB in all, else `{"file_name": "files/..."}`, a
  JSONL file of `{"key", "request"}` lines uploaded first (resumable upload to `/upload/v1beta/files`);
- `GET /batches/{id}`: `metadata.state` BATCH_STATE_PENDING, _RUNNING, _SUCCEEDED, _FAILED,
  _CANCELLED, _EXPIRED; `metadata.batchStats`; once done, `response` holds `inlinedResponses`
  (in request order, each `{"response"} | {"error": Status}` with its `metadata.key` where
  given) or `responsesFile`, downloaded from `/download/v1beta/{file}:download?alt=media`;
- `POST /batches/{id}:cancel`; `GET /batches` lists them (`operations`, `nextPageToken`).

The display name carries the provider batch id, so a batch whose creation answer was lost is
found again in the list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from llmq.contract.tiers import provider_batch_limits
from llmq.worker.batches.base import Line, LineResult, ProviderBatchAPI, RemoteBatch, RemoteState

_STATES: dict[str, RemoteState] = {
    "PENDING": "validating", "RUNNING": "in_progress", "SUCCEEDED": "completed", "FAILED": "failed",
    "CANCELLED": "cancelled", "EXPIRED": "expired",
}
#: google.rpc.Code numbers (a line's error is a Status) -> the HTTP status Google sends each with.
GRPC_HTTP_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 7: 403, 8: 429, 9: 400, 11: 400, 13: 500, 14: 503, 16: 401}


class GeminiBatches(ProviderBatchAPI):
    type_name = "gemini"

    def encode_line(self, line: Line) -> dict[str, Any]:
        return {"key": line.key, "request": self.adapter.build_body(line.request, stream=False)}

    def root_path(self, service: str, path: str, query: str = "") -> str:
        """A URL on the API's host outside its versioned base (`/upload/v1beta/...`, `/download/v1beta/...`)."""
        base = httpx.URL(self.adapter.base_url)
        url = str(base.copy_with(path=f"/{service}{base.path.rstrip('/')}{path}", query=None))
        return f"{url}?{query}" if query else url

    # --- the batch ----------------------------------------------------------------------

    async def submit(self, provider_batch_id: str, lines: list[Line], endpoint: str, window_s: float) -> RemoteBatch:
        encoded = [self.encode_line(line) for line in lines]
        size = sum(len(self.encoded(line)) for line in lines)
        limits = provider_batch_limits(self.adapter.config)
        if limits is not None and limits.inline_max_bytes is not None and size > limits.inline_max_bytes:
            input_config: dict[str, Any] = {"file_name": await self.upload(provider_batch_id, lines)}
        else:
            requests = [{"request": item["request"], "metadata": {"key": item["key"]}} for item in encoded]
            input_config = {"requests": {"requests": requests}}
        model = lines[0].request.model
        resource = model if "/" in model else f"models/{model}"
        body = {"batch": {"display_name": provider_batch_id, "input_config": input_config}}
        return self.remote(await self.call_json("POST", f"/{resource}:batchGenerateContent", json_body=body))

    async def upload(self, provider_batch_id: str, lines: list[Line]) -> str:
        """The resumable upload of the Files API: start, then upload and finalize in one call."""
        content = b"".join(self.encoded(line) + b"\n" for line in lines)
        start = await self.call(
            "POST", self.root_path("upload", "/files"), json_body={"file": {"display_name": provider_batch_id}},
            extra_headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                           "X-Goog-Upload-Header-Content-Length": str(len(content)),
                           "X-Goog-Upload-Header-Content-Type": "application/jsonl"},
        )
        upload_url = start.headers.get("x-goog-upload-url")
        if not upload_url:
            raise self.adapter.malformed("the Files API started an upload without an X-Goog-Upload-URL", None)
        done = await self.call("POST", upload_url, content=content, extra_headers={
            "X-Goog-Upload-Offset": "0", "X-Goog-Upload-Command": "upload, finalize"})
        return str(self.adapter.parse_json(done, None)["file"]["name"])

    async def find(
        self, provider_batch_id: str, lines: list[Line], since_s: float, taken: frozenset[str]
    ) -> RemoteBatch | None:
        async for operation in self.listed("/batches?pageSize=100", items="operations", cursor_param="pageToken",
                                           cursor=lambda page: page.get("nextPageToken")):
            metadata = operation.get("metadata") or {}
            if (metadata.get("displayName") or metadata.get("display_name")) == provider_batch_id:
                return self.remote(operation)
        return None

    async def get(self, remote_id: str) -> RemoteBatch:
        return self.remote(await self.call_json("GET", f"/{remote_id}"))

    async def cancel(self, remote_id: str) -> RemoteBatch:
        await self.call("POST", f"/{remote_id}:cancel")
        return await self.get(remote_id)

    def remote(self, operation: dict[str, Any]) -> RemoteBatch:
        metadata = operation.get("metadata") or {}
        raw_state = str(metadata.get("state") or "")
        state = _STATES.get(raw_state.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_"), "in_progress")
        stats = metadata.get("batchStats") or {}
        output = operation.get("response") or metadata.get("output") or {}
        inlined = output.get("inlinedResponses")
        if isinstance(inlined, dict):
            inlined = inlined.get("inlinedResponses")
        return RemoteBatch(
            remote_id=str(operation.get("name") or metadata.get("name")), state=state, raw_state=raw_state,
            counts={key: int(value) for key, value in stats.items()},
            error=(operation.get("error") or {}).get("message"),
            handles={"inlined": inlined, "responses_file": output.get("responsesFile")},
        )

    # --- the results --------------------------------------------------------------------

    async def results(self, remote: RemoteBatch, lines: list[Line]) -> AsyncIterator[LineResult]:
        by_key = {line.key: line for line in lines}
        if remote.handles.get("inlined") is not None:
            for index, item in enumerate(remote.handles["inlined"]):
                # Keyed where Google echoes the key; else by position (responses keep request order).
                key = (item.get("metadata") or {}).get("key") or (lines[index].key if index < len(lines) else None)
                if key in by_key:
                    yield self.read_line(by_key[key], item)
        elif remote.handles.get("responses_file"):
            name = remote.handles["responses_file"]
            async for item in self.jsonl(self.root_path("download", f"/{name}:download", "alt=media")):
                if str(item.get("key")) in by_key:
                    yield self.read_line(by_key[str(item["key"])], item)

    def read_line(self, line: Line, item: dict[str, Any]) -> LineResult:
        if item.get("error"):
            status = item["error"]
            code = status.get("code")
            http_status = GRPC_HTTP_STATUS.get(code, 500) if isinstance(code, int) else 500
            return LineResult(line.key, error=self.line_error(line, http_status, {"error": status}))
        return LineResult(line.key, response=self.answer(line, item.get("response")))
