"""A fake of Anthropic's Message Batches API over real HTTP (it is a `FakeAnthropic` too).

Endpoints as Anthropic's API reference gives them:

- `POST /v1/messages/batches` `{"requests": [{"custom_id", "params"}]}`: custom_ids must match
  `^[a-zA-Z0-9_-]{1,64}$` and be unique, at most `max_requests` requests and `max_bytes` bytes
  (else 400 / 413 at once, as Anthropic refuses them);
- `GET /v1/messages/batches/{id}`: `processing_status` in_progress, canceling, ended;
  `request_counts` processing, succeeded, errored, canceled, expired; `results_url` once ended;
- `GET /v1/messages/batches` (newest first, `limit`, `after_id`); `POST .../{id}/cancel`;
- `GET /v1/messages/batches/{id}/results`: JSONL, one `{"custom_id", "result"}` per request:
  succeeded (the fake's own Messages answer), errored (a params the Messages API refuses, or a
  500 `api_error` for ERROR_MARKER lines), canceled, expired.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from tests.support.fakes.anthropic import FakeAnthropic
from tests.support.fakes.base import RecordedRequest, Reply
from tests.support.fakes.batch_clock import TERMINAL, BatchTiming, FakeBatchAPI, FakeBatchJob

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
PREFIX = "/v1/messages/batches"
_FATES = {"succeeded": "succeeded", "errored": "errored", "expired": "expired", "cancelled": "canceled"}


class FakeAnthropicBatches(FakeBatchAPI, FakeAnthropic):
    name = "anthropic"

    def __init__(self, *, timing: BatchTiming | None = None, max_requests: int = 100_000,
                 max_bytes: int = 256 * 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_batches(timing=timing, max_requests=max_requests, max_bytes=max_bytes)

    def is_batch_path(self, path: str) -> bool:
        return path.startswith(PREFIX)

    def route_batch(self, request: RecordedRequest) -> Reply:
        problem = self._check_headers(request)
        if problem is not None:
            return problem
        parts = request.path.removeprefix(PREFIX).strip("/").split("/") if request.path != PREFIX else []
        if not parts:
            return self._create(request) if request.method == "POST" else self._list(request)
        job = self.batches.get(parts[0])
        if job is None:
            return self._error(404, request, "not_found_error", f"message batch {parts[0]} not found")
        if parts[1:] == ["cancel"] and request.method == "POST":
            job.cancel()
        if parts[1:] == ["results"]:
            if job.phase() not in TERMINAL:
                return self._error(400, request, "invalid_request_error", "the message batch has not ended yet")
            return Reply(200, raw=self._results(request, job), content_type="application/binary",
                         headers=self.headers())
        return Reply(200, self.batch_object(job, request), headers=self.headers())

    def _create(self, request: RecordedRequest) -> Reply:
        requests = (request.body or {}).get("requests")
        if not isinstance(requests, list) or not requests:
            return self._error(400, request, "invalid_request_error", "requests: at least one request is required")
        if len(request.raw_body) > self.max_bytes:
            return self._error(413, request, "request_too_large", "Request exceeds the maximum allowed number of bytes.")
        if len(requests) > self.max_requests:
            return self._error(400, request, "invalid_request_error",
                               f"requests: too many requests ({len(requests)} > {self.max_requests})")
        keys = [str(item.get("custom_id")) for item in requests]
        if not all(CUSTOM_ID.match(key) for key in keys) or len(set(keys)) != len(keys):
            return self._error(400, request, "invalid_request_error",
                               "requests: each custom_id must match ^[a-zA-Z0-9_-]{1,64}$ and be unique")
        job = self.new_batch("msgbatch_" + secrets.token_hex(12), [(key, item["params"]) for key, item in
                                                                   zip(keys, requests)], len(request.raw_body))
        if self.create_reply_delay_s:
            time.sleep(self.create_reply_delay_s)
        return Reply(200, self.batch_object(job, request), headers=self.headers())

    def _list(self, request: RecordedRequest) -> Reply:
        jobs = sorted(self.batches.values(), key=lambda job: job.created_at, reverse=True)
        after = (request.query.get("after_id") or [None])[0]
        if after is not None:
            ids = [job.batch_id for job in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        limit = int((request.query.get("limit") or ["20"])[0])
        page = [self.batch_object(job, request) for job in jobs[:limit]]
        return Reply(200, {"data": page, "has_more": len(jobs) > limit, "first_id": page[0]["id"] if page else None,
                           "last_id": page[-1]["id"] if page else None}, headers=self.headers())

    def batch_object(self, job: FakeBatchJob, request: RecordedRequest) -> dict[str, Any]:
        phase = job.phase()
        status = "ended" if phase in TERMINAL else "canceling" if phase == "cancelling" else "in_progress"
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if status == "ended":
            for outcome in job.outcomes(self._answer):
                counts[_FATES[outcome.fate]] += 1
        else:
            counts["processing"] = len(job.lines)
        host = request.header("host") or f"127.0.0.1:{self.port}"
        return {
            "id": job.batch_id, "type": "message_batch", "processing_status": status, "request_counts": counts,
            "created_at": _rfc3339(job.created_at), "expires_at": _rfc3339(job.created_at + job.timing.window_s),
            "ended_at": _rfc3339(job.phase_started(phase)) if status == "ended" else None,
            "cancel_initiated_at": _rfc3339(job.cancel_requested_at), "archived_at": None,
            "results_url": f"http://{host}{PREFIX}/{job.batch_id}/results" if status == "ended" else None,
        }

    def _answer(self, params: dict[str, Any]) -> Any:
        if self._check_body(RecordedRequest("POST", "/v1/messages", {}, {}, b""), params) is not None:
            return None  # refused as the Messages API would refuse it: an errored line
        return self.message(params)

    def _results(self, request: RecordedRequest, job: FakeBatchJob) -> bytes:
        lines = []
        for outcome in job.outcomes(self._answer):
            if outcome.fate == "succeeded" and outcome.answer is not None:
                result: dict[str, Any] = {"type": "succeeded", "message": outcome.answer}
            elif outcome.fate in ("succeeded", "errored"):
                kind, message = ("invalid_request_error", "the request's params are invalid") \
                    if outcome.answer is None and outcome.fate == "succeeded" else ("api_error", "Internal server error")
                result = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}
            else:
                result = {"type": _FATES[outcome.fate]}
            lines.append(json.dumps({"custom_id": outcome.key, "result": result}).encode() + b"\n")
        return b"".join(lines)


def _rfc3339(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat().replace("+00:00", "Z")
