"""OpenAI's Batch API over llmq batches: an uploaded JSONL file in, output and error files out.

`POST /v1/batches` reads the input file (purpose `batch`), maps every line's body with the
same mapping as its endpoint (`chat_request` for `/v1/chat/completions`, `embedding_request`
for `/v1/embeddings`; every line's `url` is the batch's endpoint, as OpenAI has it), checks
each line's model against the key and the routes, and submits one llmq batch whose id is
the batch's id. A file with a bad line
makes a batch that is `failed` at once with the errors by line number (as OpenAI does);
nothing of it is enqueued. The status is read from the llmq batch's counts; the first read
after its last job ended writes the output file (one line per success) and the error file
(one per failure), in OpenAI's batch output line format, matched to the input by `custom_id`:
a success's `response.body` is what the endpoint answers over HTTP (a `chat.completion` with
its tool calls and JSON text, or an embeddings list).

Lanes. OpenAI accepts only `completion_window: "24h"`. Which lane runs the batch is
`batch_lane`'s choice, in this one place: the normal lane (the same queues as any job: done
in minutes, the window being the jobs' deadline; a request not done by then ends
`batch_expired` in the error file) by default, or named with `metadata: {"llmq_lane":
"normal"}`; `{"llmq_lane": "provider_batch"}` submits the batch with the 24 h completion
window, so each line whose entry has a batch API waits in the provider's, at half price
(docs/batch-lane.md), and the rest run in the normal lane.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from llmq.client.batchfile import KIND_BY_URL
from llmq.client.service import BatchItem, LLMService, new_id
from llmq.contract.models import BatchRecord, EmbeddingResponse, JobKind, JobRecord, JobRequest, JobState
from llmq.contract.routing import RoutingError, plan_route
from llmq.http.apikeys import APIKey
from llmq.http.bodies import unrecognized
from llmq.http.chat import chat_request, completion_body
from llmq.http.embeddings import embedding_request, embeddings_body
from llmq.http.errors import APIError, InvalidRequestError, NotFoundError, job_error
from llmq.http.records import BatchRow, BatchStore, FileStore

COMPLETION_WINDOWS_S = {"24h": 24 * 3600}
LANE_METADATA_KEY = "llmq_lane"
NORMAL_LANE = "normal"
PROVIDER_BATCH_LANE = "provider_batch"
DEFAULT_LANE = NORMAL_LANE
#: OpenAI's limits on batch metadata.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512
#: Errors listed on a failed batch (the first ones, by line).
ERRORS_SHOWN = 100


def batch_lane(metadata: dict[str, str] | None) -> str:
    """The lane a batch runs in: the one place it is chosen (see the module docstring)."""
    lane = (metadata or {}).get(LANE_METADATA_KEY, DEFAULT_LANE)
    if lane in (NORMAL_LANE, PROVIDER_BATCH_LANE):
        return lane
    raise InvalidRequestError(
        f"metadata.{LANE_METADATA_KEY} must be {NORMAL_LANE!r} or {PROVIDER_BATCH_LANE!r} (got {lane!r})",
        param=f"metadata.{LANE_METADATA_KEY}",
    )


@dataclass(frozen=True)
class ParsedFile:
    items: list[BatchItem]
    errors: list[dict[str, Any]]


class Batches:
    def __init__(self, service: LLMService, files: FileStore, batches: BatchStore) -> None:
        self.service = service
        self.files = files
        self.batches = batches

    async def create(self, key: APIKey, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        input_file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
        for name, value in (("input_file_id", input_file_id), ("endpoint", endpoint), ("completion_window", window)):
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(f"'{name}' is required", param=name)
        if endpoint not in KIND_BY_URL:
            raise InvalidRequestError(f"endpoint {endpoint!r} is not served in batches; use one of: {', '.join(KIND_BY_URL)}",
                                      param="endpoint")
        if window not in COMPLETION_WINDOWS_S:
            raise InvalidRequestError(f"completion_window must be '24h' (got {window!r})", param="completion_window")
        extra = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        if extra:
            raise unrecognized(min(extra))
        metadata = _batch_metadata(body.get("metadata"))
        lane = batch_lane(metadata)
        record = await asyncio.to_thread(self.files.get, key.name, input_file_id)
        if record is None or record.purpose != "batch":
            raise NotFoundError(f"no file {input_file_id!r} with purpose 'batch'", param="input_file_id")
        content = await asyncio.to_thread(self.files.content, key.name, input_file_id)
        parsed = await self._parse(key, content or b"", endpoint)
        batch_id = new_id("batch")
        if not parsed.errors:
            # The provider-batch lane: the window is the providers' (each job's deadline the window plus
            # jobs.deadline_s, so a line the provider lets expire still runs in the normal lane).
            via_providers = lane == PROVIDER_BATCH_LANE
            await self.service.submit_batch(
                parsed.items, batch_id=batch_id, deadline_s=None if via_providers else COMPLETION_WINDOWS_S[window],
                caller_daily_usd=None if key.daily_usd is None else float(key.daily_usd),
                completion_window=window if via_providers else None,
            )
        row = await asyncio.to_thread(self.batches.create, {
            "batch_id": batch_id, "owner": key.name, "input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": window, "lane": lane, "metadata": metadata, "errors": parsed.errors or None,
            "request_counts": {"total": len(parsed.items), "completed": 0, "failed": 0} if parsed.errors else None,
        })
        return await self.describe(row)

    async def _parse(self, key: APIKey, content: bytes, endpoint: str) -> ParsedFile:
        items: list[BatchItem] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        configured = await self.service.workers_configured()
        for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(self._parse_line(key, line, endpoint, seen, configured))
            except APIError as exc:
                errors.append({"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param, "line": number})
        if not items and not errors:
            errors.append({"code": "empty_file", "message": "the input file holds no requests", "param": None, "line": None})
        return ParsedFile(items, errors[:ERRORS_SHOWN])

    def _parse_line(self, key: APIKey, line: str, endpoint: str, seen: set[str], configured: frozenset[str]) -> BatchItem:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"not JSON: {exc.msg}", code="invalid_json") from None
        if not isinstance(entry, dict):
            raise InvalidRequestError("each line must be a JSON object", code="invalid_json")
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidRequestError("custom_id is required (a string)", param="custom_id", code="missing_custom_id")
        if custom_id in seen:
            raise InvalidRequestError(f"custom_id {custom_id!r} repeats an earlier line", param="custom_id", code="duplicate_custom_id")
        seen.add(custom_id)
        if entry.get("method", "POST") != "POST" or entry.get("url", endpoint) != endpoint:
            raise InvalidRequestError(f"each line must be POST {endpoint}, the batch's endpoint", param="url", code="mismatched_url")
        request = line_request(KIND_BY_URL[endpoint], entry.get("body"), key.name)
        if not key.allows(request.model):
            raise InvalidRequestError(f"this key may not use model {request.model!r}", param="body.model", code="model_not_allowed")
        try:
            plan_route(request, self.service.config, configured)
        except RoutingError as exc:
            raise InvalidRequestError(str(exc), param="body.model", code="model_not_found") from None
        return BatchItem(request, custom_id)

    async def get(self, key: APIKey, batch_id: str) -> BatchRow:
        row = await asyncio.to_thread(self.batches.get, key.name, batch_id)
        if row is None:
            raise NotFoundError(f"no batch {batch_id!r}", param="batch_id")
        return row

    async def cancel(self, key: APIKey, batch_id: str) -> dict[str, Any]:
        row = await self.get(key, batch_id)
        if row.finished_at is None and not row.errors:
            await asyncio.to_thread(self.batches.mark_cancelling, batch_id)
            await self.service.cancel(batch_id)
            row = await self.get(key, batch_id)
        return await self.describe(row)

    async def page(self, key: APIKey, *, after: str | None, limit: int) -> dict[str, Any]:
        rows, has_more = await asyncio.to_thread(self.batches.page, key.name, after=after, limit=limit)
        data = [await self.describe(row) for row in rows]
        return {
            "object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        }

    async def describe(self, row: BatchRow) -> dict[str, Any]:
        """OpenAI's batch object, finishing the batch (its files) on the first read after its last job."""
        record = None if row.finished_at or row.errors else await self.service.batch(row.batch_id)
        if record is not None and record.done:
            await self._finish(row, record)
            row = await self.get_row(row)
        return batch_body(row, record)

    async def get_row(self, row: BatchRow) -> BatchRow:
        found = await asyncio.to_thread(self.batches.get, row.owner, row.batch_id)
        assert found is not None
        return found

    async def _finish(self, row: BatchRow, record: BatchRecord) -> None:
        jobs = await self.service.results(row.batch_id)
        output = [output_line(job) for job in jobs if job.state is JobState.SUCCEEDED and job.result is not None]
        errors = [output_line(job) for job in jobs if job.state is not JobState.SUCCEEDED or job.result is None]
        made: list[str] = []
        for lines, kind in ((output, "output"), (errors, "error")):
            if lines:
                content = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
                made.append((await asyncio.to_thread(
                    self.files.create, row.owner, "batch_output", f"{row.batch_id}_{kind}.jsonl", content,
                )).file_id)
            else:
                made.append("")
        counts = {"total": record.total, "completed": len(output), "failed": record.total - len(output)}
        won = await asyncio.to_thread(
            self.batches.finish, row.batch_id, request_counts=counts,
            output_file_id=made[0] or None, error_file_id=made[1] or None,
        )
        if not won:  # another request finished it first: its files stand
            await asyncio.to_thread(self.files.delete, [file_id for file_id in made if file_id])


def line_request(kind: JobKind, body: Any, caller: str) -> JobRequest:
    """A line's body as its endpoint's mapping reads it (batch requests are not streamed)."""
    if kind is JobKind.EMBEDDING:
        return embedding_request(body, caller=caller)
    return chat_request(body, caller=caller, stream_allowed=False).request


def answer_body(job: JobRecord) -> dict[str, Any]:
    """A succeeded job's answer as its endpoint answers over HTTP."""
    if isinstance(job.result, EmbeddingResponse):
        return embeddings_body(job.result, getattr(job.request, "encoding_format", None))
    assert job.result is not None
    return completion_body(job.job_id, job.result, job.created_at)


def output_line(job: JobRecord) -> dict[str, Any]:
    """One line of a batch's output or error file, in OpenAI's batch output format."""
    line: dict[str, Any] = {"id": f"batch_req_{job.job_id}", "custom_id": job.custom_id, "response": None, "error": None}
    if job.state is JobState.SUCCEEDED and job.result is not None:
        line["response"] = {"status_code": 200, "request_id": job.job_id, "body": answer_body(job)}
    elif job.state is JobState.CANCELLED:
        line["error"] = {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"}
    elif (job.error or {}).get("type") == "DeadlineExceededError":
        line["error"] = {"code": "batch_expired", "message": "this request was not done within the completion window"}
    else:
        failure = job_error(job.job_id, job.error, state=job.state.value)
        line["response"] = {"status_code": failure.status, "request_id": job.job_id, "body": failure.body()}
    return line


def batch_body(row: BatchRow, record: BatchRecord | None) -> dict[str, Any]:
    status, counts = _status(row, record)
    created = int(row.created_at.timestamp())
    finished = int(row.finished_at.timestamp()) if row.finished_at else None
    return {
        "id": row.batch_id, "object": "batch", "endpoint": row.endpoint, "input_file_id": row.input_file_id,
        "completion_window": row.completion_window, "status": status,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "output_file_id": row.output_file_id, "error_file_id": row.error_file_id,
        "created_at": created, "in_progress_at": None if row.errors else created,
        "expires_at": created + COMPLETION_WINDOWS_S.get(row.completion_window, 0),
        "finalizing_at": finished, "completed_at": finished if status == "completed" else None,
        "failed_at": created if row.errors else None, "expired_at": finished if status == "expired" else None,
        "cancelling_at": int(row.cancelling_at.timestamp()) if row.cancelling_at else None,
        "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": counts, "metadata": row.metadata,
    }


def _status(row: BatchRow, record: BatchRecord | None) -> tuple[str, dict[str, int]]:
    if row.errors:
        return "failed", row.request_counts or {"total": 0, "completed": 0, "failed": 0}
    if row.request_counts is not None:  # finished: the counts kept in SQL
        return ("cancelled" if row.cancelling_at else "completed"), row.request_counts
    if record is None:  # Redis forgot the batch before anyone read its end
        return "expired", {"total": 0, "completed": 0, "failed": 0}
    failed = record.counts.get(JobState.FAILED, 0) + record.counts.get(JobState.CANCELLED, 0)
    counts = {"total": record.total, "completed": record.counts.get(JobState.SUCCEEDED, 0), "failed": failed}
    return ("cancelling" if row.cancelling_at else "in_progress"), counts


def _batch_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > METADATA_MAX_PAIRS:
        raise InvalidRequestError(f"metadata must be an object of at most {METADATA_MAX_PAIRS} pairs", param="metadata")
    for name, value in metadata.items():
        if len(name) > METADATA_MAX_KEY or not isinstance(value, str) or len(value) > METADATA_MAX_VALUE:
            raise InvalidRequestError(
                f"metadata.{name}: keys up to {METADATA_MAX_KEY} characters, string values up to {METADATA_MAX_VALUE}",
                param=f"metadata.{name}",
            )
    return dict(metadata)
