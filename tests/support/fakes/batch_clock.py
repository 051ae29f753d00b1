"""What every fake batch API shares: a batch's life on a compressed clock, and its lines' fates.

A `FakeBatchJob` computes its state from the time since it was created, in the vocabulary of
OpenAI's Batch API (each fake maps it to its provider's words): validating, then in_progress
while its lines complete one after another, finalizing, completed. A line whose prompt holds
`EXPIRE_MARKER` is never run: the batch then runs until its window and ends `expired`, the
lines done by then answered, the rest expired. A line holding `ERROR_MARKER` fails (the
provider's 500). A batch cancelled part-way is `cancelling`, then `cancelled`, with the lines
done before the cancel answered. A batch the provider refuses at validation is `failed`.
Seconds here stand for the hours of the real APIs (`BatchTiming`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ERROR_MARKER = "[[batch-line-error]]"
EXPIRE_MARKER = "[[batch-line-expire]]"
TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})
#: Path segments that name an endpoint rather than an object (the rest show as {id} in `stats`).
_PATH_WORDS = frozenset({"", "v1", "v1beta", "openai", "files", "batches", "content", "cancel", "results", "messages",
                         "upload", "download"})

LineFate = Literal["succeeded", "errored", "expired", "cancelled"]


@dataclass
class BatchTiming:
    """Seconds each phase lasts at the fake (the real ones take minutes to a day)."""

    validating_s: float = 0.1
    #: Time for all of a batch's lines; they complete evenly spread over it.
    in_progress_s: float = 0.4
    finalizing_s: float = 0.1
    #: The provider's completion window: a batch still running then expires.
    window_s: float = 5.0
    cancel_s: float = 0.1


@dataclass
class LineOutcome:
    key: str
    fate: LineFate
    #: The request body the line carried, and for a succeeded line the answer built from it.
    request: dict[str, Any]
    answer: Any = None


@dataclass
class FakeBatchJob:
    batch_id: str
    lines: list[tuple[str, dict[str, Any]]]
    timing: BatchTiming
    created_at: float = field(default_factory=time.time)
    #: Why validation refuses it (the batch ends `failed`), if it does.
    invalid: str | None = None
    cancel_requested_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _outcomes: list[LineOutcome] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Line index -> its place among the lines that run (1-based); read once.
    _places: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        runnable = [index for index, (_, body) in enumerate(self.lines) if EXPIRE_MARKER not in json.dumps(body)]
        self._places = {index: place for place, index in enumerate(runnable, start=1)}

    # --- the clock ----------------------------------------------------------------------

    @property
    def runnable(self) -> list[int]:
        return list(self._places)

    @property
    def processing_ends_s(self) -> float:
        """Seconds after creation when processing stops: all lines done, or the window, if some never run."""
        if len(self._places) < len(self.lines):
            return self.timing.window_s
        return self.timing.validating_s + self.timing.in_progress_s

    def phase(self, now: float | None = None) -> str:
        elapsed = (now or time.time()) - self.created_at
        if self.cancel_requested_at is not None:
            cancel_at = self.cancel_requested_at - self.created_at
            return "cancelling" if elapsed < cancel_at + self.timing.cancel_s else "cancelled"
        if elapsed < self.timing.validating_s:
            return "validating"
        if self.invalid is not None:
            return "failed"
        if elapsed < self.processing_ends_s:
            return "in_progress"
        if len(self._places) < len(self.lines):
            return "expired"
        return "finalizing" if elapsed < self.processing_ends_s + self.timing.finalizing_s else "completed"

    def phase_started(self, name: str) -> float | None:
        """Epoch seconds a phase began, if it has."""
        starts = {"in_progress": self.timing.validating_s, "finalizing": self.processing_ends_s,
                  "completed": self.processing_ends_s + self.timing.finalizing_s, "expired": self.processing_ends_s,
                  "failed": self.timing.validating_s}
        if name in ("cancelling", "cancelled"):
            if self.cancel_requested_at is None:
                return None
            return self.cancel_requested_at + (self.timing.cancel_s if name == "cancelled" else 0.0)
        offset = starts.get(name)
        if offset is None or time.time() - self.created_at < offset:
            return None
        return self.created_at + offset

    def done_by(self, index: int) -> float:
        """Seconds after creation when the line at `index` has been run (inf: never)."""
        place = self._places.get(index)
        if place is None:
            return float("inf")
        return self.timing.validating_s + place / len(self._places) * self.timing.in_progress_s

    def cancel(self) -> None:
        if self.cancel_requested_at is None and self.phase() not in TERMINAL:
            self.cancel_requested_at = time.time()

    # --- the lines ------------------------------------------------------------------------

    def outcomes(self, answer: Callable[[dict[str, Any]], Any]) -> list[LineOutcome]:
        """Each line's fate, decided once the batch is over (answers built then, once)."""
        with self._lock:
            if self._outcomes is None:
                self._outcomes = self._decide(answer)
            return self._outcomes

    def _decide(self, answer: Callable[[dict[str, Any]], Any]) -> list[LineOutcome]:
        phase = self.phase()
        if phase == "failed":
            return []
        cut_s = (self.cancel_requested_at - self.created_at) if self.cancel_requested_at is not None else float("inf")
        outcomes = []
        for index, (key, body) in enumerate(self.lines):
            if self.done_by(index) > cut_s or self.done_by(index) == float("inf"):
                outcomes.append(LineOutcome(key, "cancelled" if phase == "cancelled" else "expired", body))
            elif ERROR_MARKER in json.dumps(body):
                outcomes.append(LineOutcome(key, "errored", body))
            else:
                outcomes.append(LineOutcome(key, "succeeded", body, answer(body)))
        return outcomes

    def counts(self, answer: Callable[[dict[str, Any]], Any]) -> dict[str, int]:
        """How many lines ended each way so far (all still processing until the batch is over)."""
        if self.phase() not in TERMINAL:
            elapsed = time.time() - self.created_at
            done = sum(1 for index in range(len(self.lines)) if self.done_by(index) <= elapsed)
            return {"processing": len(self.lines) - done, "succeeded": done}
        tally: dict[str, int] = {}
        for outcome in self.outcomes(answer):
            tally[outcome.fate] = tally.get(outcome.fate, 0) + 1
        return tally


class FakeBatchAPI:
    """Mixed in before a provider's fake (`class FakeOpenAIBatches(FakeBatchAPI, FakeOpenAI)`).

    Its batch endpoints are served outside the fake's sync rate limits, as the providers give
    batches limits of their own; `fail_next(..., path_contains=...)` and `inject("reset")` still
    reach them. Knobs: `timing`, `max_requests` and `max_bytes` (what the provider refuses),
    `create_reply_delay_s` (the batch exists before its creation is answered: a client that dies
    meanwhile never learns its id), `flex_refusals` (sync flex-tier calls refused for capacity).
    """

    timing: BatchTiming
    batches: dict[str, FakeBatchJob]

    def init_batches(self, *, timing: BatchTiming | None, max_requests: int, max_bytes: int) -> None:
        self.timing = timing or BatchTiming()
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.batches = {}
        self.files: dict[str, bytes] = {}
        self.create_reply_delay_s = 0.0
        self.flex_refusals = 0
        self.flex_calls = 0

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.init_batches(timing=self.timing, max_requests=self.max_requests, max_bytes=self.max_bytes)

    def is_batch_path(self, path: str) -> bool:
        raise NotImplementedError

    def route_batch(self, request: Any) -> Any:
        raise NotImplementedError

    def serve(self, request: Any, handler: Any) -> None:
        if not self.is_batch_path(request.path):
            super().serve(request, handler)  # type: ignore[misc]
            return
        fault = self._take_fault(request)  # type: ignore[attr-defined]
        if fault is not None and fault.kind == "reset":
            handler._drop()
            return
        if fault is not None and fault.kind == "status":
            handler._send(self.error_reply(fault.status, request))  # type: ignore[attr-defined]
            return
        handler._send(self.route_batch(request))

    def control(self, request: Any) -> Any:
        """`/_fake/batches` {timing, max_requests, max_bytes, flex_refusals}: the knobs from another process."""
        if request.path != "/_fake/batches":
            return super().control(request)  # type: ignore[misc]
        body = request.body or {}
        if "timing" in body:
            self.timing = BatchTiming(**body["timing"])
        for name in ("max_requests", "max_bytes", "flex_refusals"):
            if name in body:
                setattr(self, name, body[name])
        from tests.support.fakes.base import Reply

        return Reply(200, self.stats())

    def stats(self) -> dict[str, Any]:
        """The base's figures, plus the calls made to the batch endpoints (by kind) and to the sync ones."""
        calls: dict[str, int] = {}
        for request in self.batch_requests():
            path = "/".join(part if part in _PATH_WORDS else "{id}" for part in request.path.split("/"))
            kind = f"{request.method} {path}"
            calls[kind] = calls.get(kind, 0) + 1
        return {**super().stats(), "batches": len(self.batches), "batch_calls": calls,  # type: ignore[misc]
                "sync_requests": len(self.sync_requests()), "flex_calls": self.flex_calls}

    def take_flex_refusal(self) -> bool:
        """Whether this flex-tier call is refused (counts every flex call)."""
        with self.lock:  # type: ignore[attr-defined]
            self.flex_calls += 1
            if self.flex_refusals > 0:
                self.flex_refusals -= 1
                return True
            return False

    def new_batch(self, batch_id: str, lines: list[tuple[str, dict[str, Any]]], size_bytes: int) -> FakeBatchJob:
        """Register a batch, refusing at validation what the provider would (count and size limits)."""
        invalid = None
        if len(lines) > self.max_requests:
            invalid = f"the batch holds {len(lines)} requests; the limit is {self.max_requests}"
        elif size_bytes > self.max_bytes:
            invalid = f"the batch input is {size_bytes} bytes; the limit is {self.max_bytes}"
        job = FakeBatchJob(batch_id, lines, BatchTiming(**vars(self.timing)), invalid=invalid)
        with self.lock:  # type: ignore[attr-defined]
            self.batches[batch_id] = job
        return job

    def batch_requests(self) -> list[Any]:
        """The requests made to the batch endpoints."""
        return [request for request in self.requests if self.is_batch_path(request.path)]  # type: ignore[attr-defined]

    def sync_requests(self) -> list[Any]:
        return [request for request in self.requests if not self.is_batch_path(request.path)]  # type: ignore[attr-defined]


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field: (filename, bytes)}."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields
