"""OpenAI's Batch API, and Azure OpenAI's global batch (the same shape on Azure's paths).

Wire format (OpenAI API reference: Files, Batch; "Batch API" guide):

- the input is a JSONL file uploaded with `POST /files` (multipart, `purpose=batch`), one line
  per request: `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`
  (`/v1/embeddings` for an embedding job: a batch holds lines of one endpoint);
- `POST /batches` `{"input_file_id", "endpoint", "completion_window": "24h", "metadata"}`; the
  metadata carries the provider batch id, so a batch whose creation answer was lost is found
  again with `GET /batches` (newest first, `after` pages on);
- `GET /batches/{id}`: `status` validating, failed, in_progress, finalizing, completed,
  expired, cancelling, cancelled; `request_counts`; `output_file_id`, `error_file_id`;
- results: `GET /files/{id}/content`, JSONL lines `{"custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}`; the error file holds failed lines (a non-200 response) and
  lines that never ran (`error.code` batch_expired, batch_cancelled);
- `POST /batches/{id}/cancel`.

Azure (learn.microsoft.com: Azure OpenAI batch how-to, REST 2024-10-21): the same objects
under `/openai/files` and `/openai/batches` with `?api-version=`, the `api-key` header, lines
whose `url` is `/chat/completions` and whose `model` is the deployment name. Azure does not
expire a batch that runs late; llmq cuts it at the job's window instead (worker/batches/poll.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import quote

from llmq.contract.models import EmbeddingRequest, JobRequest
from llmq.worker.batches.base import Line, LineResult, ProviderBatchAPI, RemoteBatch
from llmq.worker.providers.azure_openai import AzureOpenAIProvider

METADATA_KEY = "llmq_provider_batch"
_STATES = frozenset({
    "validating", "in_progress", "finalizing", "completed", "expired", "failed", "cancelling", "cancelled",
})


class OpenAIBatches(ProviderBatchAPI):
    type_name = "openai"
    #: Prefix of a line's `url` and of the batch's `endpoint`: OpenAI names the full path.
    url_prefix: ClassVar[str] = "/v1"
    #: Paths relative to the entry's base_url.
    files_path: ClassVar[str] = "/files"
    batches_path: ClassVar[str] = "/batches"

    def endpoint(self, request: JobRequest) -> str:
        kind = "embeddings" if isinstance(request, EmbeddingRequest) else "chat/completions"
        return f"{self.url_prefix}/{kind}"

    def encode_line(self, line: Line) -> dict[str, Any]:
        request = line.request
        if isinstance(request, EmbeddingRequest):
            body = self.adapter.build_embeddings_body(request)
        else:
            body = self.adapter.build_body(request, stream=False)
        return {"custom_id": line.key, "method": "POST", "url": self.endpoint(request), "body": body}

    def path(self, path: str) -> str:
        return path

    # --- the batch ----------------------------------------------------------------------

    async def submit(self, provider_batch_id: str, lines: list[Line], endpoint: str, window_s: float) -> RemoteBatch:
        content = b"".join(self.encoded(line) + b"\n" for line in lines)
        upload = await self.call_json(
            "POST", self.path(self.files_path), data={"purpose": "batch"},
            files={"file": (f"llmq-{provider_batch_id}.jsonl", content, "application/jsonl")},
        )
        body = {
            "input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h",
            "metadata": {METADATA_KEY: provider_batch_id},
        }
        return self.remote(await self.call_json("POST", self.path(self.batches_path), json_body=body))

    async def find(
        self, provider_batch_id: str, lines: list[Line], since_s: float, taken: frozenset[str]
    ) -> RemoteBatch | None:
        async for batch in self.listed(self.path(f"{self.batches_path}?limit=100"), items="data", cursor_param="after",
                                       cursor=lambda page: page["data"][-1]["id"] if page.get("has_more") else None):
            if (batch.get("metadata") or {}).get(METADATA_KEY) == provider_batch_id:
                return self.remote(batch)
            if float(batch.get("created_at") or 0) < since_s - 60:
                return None  # newest first: older than our first try, so it was never made
        return None

    async def get(self, remote_id: str) -> RemoteBatch:
        return self.remote(await self.call_json("GET", self.path(f"{self.batches_path}/{quote(remote_id)}")))

    async def cancel(self, remote_id: str) -> RemoteBatch:
        return self.remote(await self.call_json("POST", self.path(f"{self.batches_path}/{quote(remote_id)}/cancel")))

    def remote(self, batch: dict[str, Any]) -> RemoteBatch:
        status = str(batch.get("status") or "")
        problems = ((batch.get("errors") or {}).get("data") or []) if isinstance(batch.get("errors"), dict) else []
        return RemoteBatch(
            remote_id=str(batch["id"]), state=status if status in _STATES else "in_progress", raw_state=status,  # type: ignore[arg-type]
            counts={key: int(value) for key, value in (batch.get("request_counts") or {}).items()},
            error="; ".join(str(item.get("message")) for item in problems) or None,
            input_file=batch.get("input_file_id"),
            handles={"output_file_id": batch.get("output_file_id"), "error_file_id": batch.get("error_file_id")},
        )

    # --- the results --------------------------------------------------------------------

    async def results(self, remote: RemoteBatch, lines: list[Line]) -> AsyncIterator[LineResult]:
        by_key = {line.key: line for line in lines}
        for handle in ("output_file_id", "error_file_id"):
            file_id = remote.handles.get(handle)
            if not file_id:
                continue
            async for item in self.jsonl(self.path(f"{self.files_path}/{quote(file_id)}/content")):
                line = by_key.get(str(item.get("custom_id")))
                if line is not None:
                    yield self.read_line(line, item)

    def read_line(self, line: Line, item: dict[str, Any]) -> LineResult:
        response = item.get("response") or {}
        request_id = response.get("request_id")
        status = int(response.get("status_code") or 0)
        if response and 200 <= status < 300:
            return LineResult(line.key, response=self.answer(line, response.get("body"), request_id))
        if response:
            return LineResult(line.key, error=self.line_error(line, status, response.get("body"), request_id))
        error = item.get("error") or {}
        code, message = str(error.get("code") or ""), str(error.get("message") or "the batch did not run this line")
        return LineResult(line.key, error=self.not_run(line, f"{code}: {message}", expired=code == "batch_expired"))


class AzureOpenAIBatches(OpenAIBatches):
    type_name = "azure_openai"
    url_prefix = ""
    files_path = "/openai/files"
    batches_path = "/openai/batches"

    adapter: AzureOpenAIProvider

    def encode_line(self, line: Line) -> dict[str, Any]:
        encoded = super().encode_line(line)
        encoded["body"]["model"] = self.adapter.deployment_for(line.request.model)
        return encoded

    def path(self, path: str) -> str:
        joiner = "&" if "?" in path else "?"
        return f"{path}{joiner}api-version={quote(self.adapter.options.api_version)}"
