"""A fake of OpenAI's Batch API and Files API, and of Azure OpenAI's global batch, over real HTTP.

The same server answers Chat Completions (it is a `FakeOpenAI`), so a line that comes back
from a batch runs there synchronously. Batch endpoints, as OpenAI's API reference gives them:

- `POST /v1/files` (multipart: `purpose`, `file`), `GET /v1/files/{id}/content`;
- `POST /v1/batches` (`input_file_id`, `endpoint`, `completion_window` "24h", `metadata`),
  `GET /v1/batches` (newest first, `limit`, `after`), `GET /v1/batches/{id}`,
  `POST /v1/batches/{id}/cancel`;
- Azure: the same under `/openai/files` and `/openai/batches` with `?api-version=` and `api-key`,
  lines whose `url` is `/chat/completions`.

The input is validated as OpenAI does it, after creation (status `validating`, then `failed`
with `errors.data`): one model, one endpoint, unique custom_ids, the count and size limits.
Each line is answered by the fake's own Chat Completions (the same text and usage a sync call
gets); the output file holds answered lines, the error file failed (500), expired
(`batch_expired`) and cancelled (`batch_cancelled`) ones. Flex: a Chat Completions call with
`service_tier: "flex"` is answered with `"service_tier": "flex"`, or refused with 429 while
`flex_refusals` lasts.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from tests.support.fakes.base import RecordedRequest, Reply, StreamReply
from tests.support.fakes.batch_clock import TERMINAL, BatchTiming, FakeBatchAPI, FakeBatchJob, parse_multipart
from tests.support.fakes.openai import FakeOpenAI, openai_error

FLEX_REFUSAL = openai_error(
    "Resource Unavailable: flex processing has no capacity for this request right now. Retry later, or send it "
    "at the default service tier.", "resource_unavailable", "resource_unavailable",
)


class FakeOpenAIBatches(FakeBatchAPI, FakeOpenAI):
    name = "openai-batches"

    def __init__(self, *, timing: BatchTiming | None = None, max_requests: int = 50_000,
                 max_bytes: int = 200 * 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_batches(timing=timing, max_requests=max_requests, max_bytes=max_bytes)

    def is_batch_path(self, path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/openai/files", "/openai/batches"))

    # --- flex on the sync endpoint ----------------------------------------------------------

    def _chat(self, request: RecordedRequest) -> Reply | StreamReply:
        if (request.body or {}).get("service_tier") == "flex":
            if self.take_flex_refusal():
                return Reply(429, FLEX_REFUSAL, self._headers(request))
            reply = super()._chat(request)
            if isinstance(reply, Reply) and isinstance(reply.body, dict):
                reply.body["service_tier"] = "flex"
            return reply
        return super()._chat(request)

    # --- batch endpoints -------------------------------------------------------------------

    def route_batch(self, request: RecordedRequest) -> Reply:
        azure = request.path.startswith("/openai/")
        if azure and not self._azure_key_ok(request):
            return self.error_reply(401, request)
        if not azure:
            denied = self._check_bearer(request)
            if denied is not None:
                return denied
        parts = request.path.removeprefix("/v1").removeprefix("/openai").strip("/").split("/")
        if parts == ["files"] and request.method == "POST":
            return self._upload(request)
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            content = self.files.get(parts[1])
            if content is None:
                return self._not_found(request, f"No such File object: {parts[1]}")
            return Reply(200, raw=content, content_type="application/jsonl")
        if parts == ["batches"]:
            return self._create(request) if request.method == "POST" else self._list(request)
        if len(parts) >= 2 and parts[0] == "batches":
            job = self.batches.get(parts[1])
            if job is None:
                return self._not_found(request, f"No batch found with id '{parts[1]}'.")
            if parts[2:] == ["cancel"] and request.method == "POST":
                job.cancel()
            return Reply(200, self.batch_object(job), self._headers(request))
        return self._not_found(request, f"Invalid URL ({request.method} {request.path})")

    def _not_found(self, request: RecordedRequest, message: str) -> Reply:
        return Reply(404, openai_error(message, "invalid_request_error", None), self._headers(request))

    def _upload(self, request: RecordedRequest) -> Reply:
        fields = parse_multipart(request.header("content-type") or "", request.raw_body)
        if fields.get("purpose", (None, b""))[1] != b"batch" or "file" not in fields:
            return Reply(400, openai_error("purpose must be 'batch' and a file is required", "invalid_request_error",
                                           None), self._headers(request))
        file_id = "file-" + secrets.token_hex(12)
        filename, content = fields["file"]
        self.files[file_id] = content
        body = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": "batch"}
        return Reply(200, body, self._headers(request))

    def _create(self, request: RecordedRequest) -> Reply:
        body = request.body or {}
        content = self.files.get(str(body.get("input_file_id")))
        if content is None:
            return self._not_found(request, f"No such File object: {body.get('input_file_id')}")
        if body.get("completion_window") != "24h":
            return Reply(400, openai_error("completion_window must be '24h'", "invalid_request_error", None),
                         self._headers(request))
        lines = [json.loads(text) for text in content.splitlines() if text.strip()]
        job = self.new_batch("batch_" + secrets.token_hex(12), [(line["custom_id"], line) for line in lines],
                             len(content))
        job.invalid = job.invalid or _invalid_lines(lines, str(body.get("endpoint")))
        job.extra.update(endpoint=body.get("endpoint"), input_file_id=body["input_file_id"],
                         metadata=body.get("metadata") or {}, azure=request.path.startswith("/openai/"))
        if self.create_reply_delay_s:
            time.sleep(self.create_reply_delay_s)
        return Reply(200, self.batch_object(job), self._headers(request))

    def _list(self, request: RecordedRequest) -> Reply:
        jobs = sorted(self.batches.values(), key=lambda job: job.created_at, reverse=True)
        after = (request.query.get("after") or [None])[0]
        if after is not None:
            ids = [job.batch_id for job in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        limit = int((request.query.get("limit") or ["20"])[0])
        page = [self.batch_object(job) for job in jobs[:limit]]
        body = {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit}
        return Reply(200, body, self._headers(request))

    # --- a batch and its files -----------------------------------------------------------

    def batch_object(self, job: FakeBatchJob) -> dict[str, Any]:
        phase = job.phase()
        stamp = {name: _epoch(job.phase_started(name)) for name in
                 ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")}
        body: dict[str, Any] = {
            "id": job.batch_id, "object": "batch", "endpoint": job.extra["endpoint"], "errors": None,
            "input_file_id": job.extra["input_file_id"], "completion_window": "24h", "status": phase,
            "output_file_id": None, "error_file_id": None, "created_at": int(job.created_at),
            "expires_at": int(job.created_at + job.timing.window_s), "metadata": job.extra["metadata"],
            **{f"{name}_at": value for name, value in stamp.items()},
            "request_counts": {"total": len(job.lines), "completed": 0, "failed": 0},
        }
        if phase == "failed":
            body["errors"] = {"object": "list", "data": [{"code": "invalid_batch", "message": job.invalid,
                                                          "param": None, "line": None}]}
        elif phase in TERMINAL:
            body.update(self._files_of(job))
        return body

    def _files_of(self, job: FakeBatchJob) -> dict[str, Any]:
        if "files" not in job.extra:
            output, failed = [], []
            for outcome in job.outcomes(lambda line: self._answer_line(job, line)):
                item = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": outcome.key, "response": None,
                        "error": None}
                if outcome.fate == "succeeded":
                    item["response"] = {"status_code": 200, "request_id": secrets.token_hex(16), "body": outcome.answer}
                    output.append(item)
                    continue
                if outcome.fate == "errored":
                    item["response"] = {"status_code": 500, "request_id": secrets.token_hex(16),
                                        "body": openai_error("The server had an error while processing your request.",
                                                             "server_error", None)}
                else:
                    code = "batch_expired" if outcome.fate == "expired" else "batch_cancelled"
                    item["error"] = {"code": code, "message": f"This request was not executed: {code}."}
                failed.append(item)
            job.extra["files"] = {"output_file_id": self._store(output), "error_file_id": self._store(failed)}
            completed = len(output)
            job.extra["counts"] = {"total": len(job.lines), "completed": completed, "failed": len(failed)}
        return {**job.extra["files"], "request_counts": job.extra["counts"]}

    def _store(self, items: list[dict[str, Any]]) -> str | None:
        if not items:
            return None
        file_id = "file-" + secrets.token_hex(12)
        self.files[file_id] = b"".join(json.dumps(item).encode() + b"\n" for item in items)
        return file_id

    def _answer_line(self, job: FakeBatchJob, line: dict[str, Any]) -> Any:
        """The fake's own answer for a line (Chat Completions or embeddings), as a sync call would get it."""
        body = line["body"]
        kind = "embeddings" if str(line.get("url")).endswith("/embeddings") else "chat/completions"
        path = f"/openai/deployments/{body.get('model')}/{kind}" if job.extra["azure"] else f"/v1/{kind}"
        recorded = RecordedRequest("POST", path, {}, {}, json.dumps(body).encode())
        reply = FakeOpenAI._embeddings(self, recorded) if kind == "embeddings" else FakeOpenAI._chat(self, recorded)
        return reply.body if isinstance(reply, Reply) else None


def _invalid_lines(lines: list[dict[str, Any]], endpoint: str) -> str | None:
    models = {str((line.get("body") or {}).get("model")) for line in lines}
    keys = [line.get("custom_id") for line in lines]
    if len(models) > 1:
        return f"a batch must use one model; this one uses {len(models)}"
    if len(set(keys)) != len(keys):
        return "custom_id values must be unique within a batch"
    if any(line.get("url") != endpoint or line.get("method") != "POST" for line in lines):
        return f"every line must be a POST to the batch's endpoint {endpoint}"
    return None


def _epoch(value: float | None) -> int | None:
    return None if value is None else int(value)
