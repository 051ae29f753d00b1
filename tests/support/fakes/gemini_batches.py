"""A fake of Gemini's batch mode and its Files API over real HTTP (it is a `FakeGemini` too).

Endpoints as ai.google.dev's Batch API and Files API references give them:

- `POST /v1beta/models/{model}:batchGenerateContent` `{"batch": {"display_name", "input_config":
  {"requests": {"requests": [{"request", "metadata": {"key"}}]}} | {"file_name": "files/..."}}}`
  answers an Operation `{"name": "batches/...", "metadata": {GenerateContentBatch}, "done"}`;
- `GET /v1beta/batches/{id}`, `GET /v1beta/batches`, `POST /v1beta/batches/{id}:cancel`;
  `metadata.state` BATCH_STATE_PENDING, _RUNNING, _SUCCEEDED, _FAILED, _CANCELLED, _EXPIRED;
  once done, `response.inlinedResponses.inlinedResponses` (request order) or `responsesFile`;
- the resumable upload (`POST /upload/v1beta/files`, `X-Goog-Upload-Command: start`, then the
  returned `X-Goog-Upload-URL` with `upload, finalize`) and `GET /download/v1beta/files/{id}:download?alt=media`.

A request the batch never ran (it expired or was cancelled first) has no entry in the output.
Flex: a generateContent call with `service_tier` FLEX is answered as usual (header
`x-gemini-service-tier: flex`) or shed with 503 UNAVAILABLE while `flex_refusals` lasts.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from tests.support.fakes.base import RecordedRequest, Reply, StreamReply
from tests.support.fakes.batch_clock import TERMINAL, BatchTiming, FakeBatchAPI, FakeBatchJob
from tests.support.fakes.gemini import API_PREFIX, JSON_CONTENT_TYPE, FakeGemini, google_error

_STATES = {"validating": "PENDING", "in_progress": "RUNNING", "finalizing": "RUNNING", "completed": "SUCCEEDED",
           "failed": "FAILED", "expired": "EXPIRED", "cancelling": "RUNNING", "cancelled": "CANCELLED"}
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."


class FakeGeminiBatches(FakeBatchAPI, FakeGemini):
    name = "gemini"

    def __init__(self, *, timing: BatchTiming | None = None, max_requests: int = 50_000,
                 max_bytes: int = 2 * 1024 * 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_batches(timing=timing, max_requests=max_requests, max_bytes=max_bytes)
        self.uploads: dict[str, str] = {}

    def is_batch_path(self, path: str) -> bool:
        return path.startswith(("/upload/", "/download/", f"{API_PREFIX}/batches")) or path.endswith(
            ":batchGenerateContent")

    # --- flex on the sync endpoint ----------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        body = request.body if request.raw_body and request.method == "POST" else None
        if not isinstance(body, dict) or "service_tier" not in body:
            return super().route(request)
        if str(body.pop("service_tier")).upper() == "FLEX" and self.take_flex_refusal():
            return _reply(503, google_error(503, "The service is currently unavailable for the flex tier."))
        plain = RecordedRequest(request.method, request.path, request.query, request.headers, json.dumps(body).encode())
        reply = super().route(plain)
        reply.headers["x-gemini-service-tier"] = "flex"
        return reply

    # --- batch endpoints ---------------------------------------------------------------------

    def route_batch(self, request: RecordedRequest) -> Reply:
        if request.path.startswith("/upload/"):
            return self._upload(request)
        refused = self.refuse_key(request)
        if refused is not None:
            return refused
        if request.path.startswith("/download/"):
            content = self.files.get(request.path.removeprefix(f"/download{API_PREFIX}/").removesuffix(":download"))
            return Reply(200, raw=content or b"", content_type="application/octet-stream") if content is not None \
                else _reply(404, google_error(404, "File not found."))
        path = request.path.removeprefix(API_PREFIX)
        if path.endswith(":batchGenerateContent"):
            return self._create(request, path.removeprefix("/models/").removesuffix(":batchGenerateContent"))
        if path == "/batches":
            return _reply(200, {"operations": [self.operation(job) for job in
                                               sorted(self.batches.values(), key=lambda job: -job.created_at)]})
        name = path.removeprefix("/")
        job = self.batches.get(name.removesuffix(":cancel"))
        if job is None:
            return _reply(404, google_error(404, "Requested entity was not found."))
        if name.endswith(":cancel") and request.method == "POST":
            job.cancel()
            return _reply(200, {})
        return _reply(200, self.operation(job))

    def _upload(self, request: RecordedRequest) -> Reply:
        command = request.header("x-goog-upload-command") or ""
        if command == "start":
            if request.header("x-goog-api-key") != self.api_key:
                return _reply(400, google_error(400, "API key not valid. Please pass a valid API key."))
            upload_id = secrets.token_hex(8)
            self.uploads[upload_id] = ""
            url = f"{self.url}/upload{API_PREFIX}/files?upload_id={upload_id}"
            return Reply(200, raw=b"", headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"})
        upload_id = (request.query.get("upload_id") or [""])[0]
        if upload_id not in self.uploads or "finalize" not in command:
            return _reply(400, google_error(400, "Invalid upload request."))
        name = "files/" + secrets.token_hex(6)
        self.files[name] = request.raw_body
        file = {"name": name, "mimeType": "application/jsonl", "sizeBytes": str(len(request.raw_body)), "state": "ACTIVE"}
        return _reply(200, {"file": file})

    def _create(self, request: RecordedRequest, model: str) -> Reply:
        batch = (request.body or {}).get("batch") or {}
        config = batch.get("input_config") or batch.get("inputConfig") or {}
        if "file_name" in config or "fileName" in config:
            content = self.files.get(config.get("file_name") or config.get("fileName"), b"")
            items = [json.loads(text) for text in content.splitlines() if text.strip()]
            lines = [(str(item.get("key")), item["request"]) for item in items]
            size = len(content)
        else:
            entries = ((config.get("requests") or {}).get("requests")) or []
            lines = [(str((entry.get("metadata") or {}).get("key")), entry["request"]) for entry in entries]
            size = len(request.raw_body)
            if size > 20 * 1024 * 1024:
                return _reply(400, google_error(400, "Request payload size exceeds the limit: 20971520 bytes."))
        if not lines:
            return _reply(400, google_error(400, "* BatchGenerateContentRequest.batch.input_config: required"))
        job = self.new_batch("batches/" + secrets.token_hex(8), lines, size)
        job.extra.update(model=f"models/{model}", display_name=batch.get("display_name") or batch.get("displayName"),
                         inline="file_name" not in config and "fileName" not in config)
        if self.create_reply_delay_s:
            time.sleep(self.create_reply_delay_s)
        return _reply(200, self.operation(job))

    # --- a batch as an Operation ------------------------------------------------------------

    def operation(self, job: FakeBatchJob) -> dict[str, Any]:
        phase = job.phase()
        done = phase in TERMINAL
        counts = job.counts(lambda body: None) if not done else self._stats(job)
        metadata = {
            "@type": _TYPE + "GenerateContentBatch", "model": job.extra["model"], "displayName": job.extra["display_name"],
            "createTime": _rfc3339(job.created_at), "state": "BATCH_STATE_" + _STATES[phase],
            "batchStats": {"requestCount": str(len(job.lines)), **counts},
        }
        operation: dict[str, Any] = {"name": job.batch_id, "metadata": metadata, "done": done}
        if phase == "failed":
            operation["error"] = {"code": 3, "message": job.invalid or "the batch input is invalid"}
        elif done:
            operation["response"] = {"@type": _TYPE + "GenerateContentBatchOutput", **self._output(job)}
        return operation

    def _answers(self, job: FakeBatchJob) -> list[dict[str, Any]]:
        items = []
        for outcome in job.outcomes(lambda body: self.answer_chunks(job.extra["model"], body, streaming=False)[0]):
            if outcome.fate == "succeeded":
                items.append({"key": outcome.key, "response": outcome.answer})
            elif outcome.fate == "errored":
                items.append({"key": outcome.key, "error": {"code": 13, "message": "Internal error encountered.",
                                                            "status": "INTERNAL"}})
            # A request the batch never ran (it expired or was cancelled first) has no entry.
        return items

    def _stats(self, job: FakeBatchJob) -> dict[str, str]:
        answers = self._answers(job)
        good = sum(1 for item in answers if "response" in item)
        return {"successfulRequestCount": str(good), "failedRequestCount": str(len(answers) - good),
                "pendingRequestCount": str(len(job.lines) - len(answers))}

    def _output(self, job: FakeBatchJob) -> dict[str, Any]:
        answers = self._answers(job)
        if job.extra["inline"]:
            inlined = [{"metadata": {"key": item["key"]}, **{k: v for k, v in item.items() if k != "key"}}
                       for item in answers]
            return {"inlinedResponses": {"inlinedResponses": inlined}}
        name = job.extra.setdefault("responses_file", "files/" + secrets.token_hex(6))
        self.files[name] = b"".join(json.dumps(item).encode() + b"\n" for item in answers)
        return {"responsesFile": name}


def _reply(status: int, body: Any) -> Reply:
    return Reply(status, body, content_type=JSON_CONTENT_TYPE)


def _rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
