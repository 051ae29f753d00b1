"""One attempt of one job on one hop: what the engine and its middleware share."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from llmq.contract import keys
from llmq.contract.jobs import load_request
from llmq.contract.labels import TaskLabel
from llmq.contract.models import Hop, JobKind, JobRequest, JobState, Lane
from llmq.worker import errors
from llmq.worker.limiter.estimate import estimate_request_tokens
from llmq.worker.logs import redact


@dataclass
class Attempt:
    job_id: str
    dispatch: int
    request: JobRequest
    route: list[Hop]
    route_index: int
    attempt: int
    hop_attempt: int
    batch_id: str | None
    deadline_at_s: float
    started_at_s: float
    #: When the job was submitted (epoch s): waiting jobs are served roughly in this order.
    created_at_s: float = 0.0
    #: The caller's id for the job within its batch (what Flower's label shows).
    custom_id: str | None = None
    #: Interactive jobs go before waiting batch jobs (queues and limits).
    lane: Lane = Lane.BATCH
    #: Why the job was last set aside without a call (a limit, "circuit open", ...), if it was.
    waiting_for: str = ""
    #: Per-job options from the caller (cache, ...).
    options: dict[str, Any] = field(default_factory=dict)
    #: Where middleware keeps what it needs between its hooks (a limiter's reservation, say).
    scratch: dict[str, Any] = field(default_factory=dict)
    #: The state the job is in while this attempt runs: running (a call on a worker), or
    #: in_provider_batch (a line of a provider batch, settled by worker/batches/settle.py).
    holds: JobState = JobState.RUNNING

    @property
    def hop(self) -> Hop:
        return self.route[self.route_index]

    @property
    def kind(self) -> JobKind:
        return self.request.kind

    @property
    def flow(self) -> str | None:
        """Whose share of the batch lane this job takes: its caller (metadata["caller"]), else its
        batch; None for neither (such jobs share one flow)."""
        caller = self.request.metadata.get("caller")
        return str(caller) if caller is not None else self.batch_id

    def estimated_tokens(self, model: str) -> int:
        """What a call of this job reserves at `model` (prompt estimate + max_tokens), counted once
        per model: a pool ranks its members by it, then the limiter reserves it at the one chosen."""
        estimates: dict[str, int] = self.scratch.setdefault("estimated_tokens", {})
        if model not in estimates:
            estimates[model] = estimate_request_tokens(self.request.model_copy(update={"model": model}))
        return estimates[model]

    def hop_fields(self, hop: Hop) -> dict[str, str]:
        """The job record's fields that name the hop a job is on: its queue and what Flower shows."""
        return {"queue": keys.queue_name(hop.provider, self.lane),
                "label": TaskLabel.for_job(self.request, hop, batch_id=self.batch_id, custom_id=self.custom_id,
                                           lane=self.lane).stored()}

    @classmethod
    def from_claim(cls, job: dict[str, str], dispatch: int) -> Attempt:
        return cls(
            job_id=job["job_id"],
            dispatch=dispatch,
            request=load_request(job),
            route=[Hop.model_validate(hop) for hop in json.loads(job["route"])],
            route_index=int(job.get("route_index", 0)),
            attempt=int(job["attempt"]),
            hop_attempt=int(job["hop_attempt"]),
            batch_id=job.get("batch_id") or None,
            custom_id=job.get("custom_id") or None,
            lane=Lane(job.get("lane") or Lane.BATCH.value),
            waiting_for=job.get("waiting_for") or "",
            deadline_at_s=int(job["deadline_at"]) / 1000.0,
            created_at_s=int(job.get("created_at") or 0) / 1000.0,
            started_at_s=time.time(),
            options=json.loads(job.get("options") or "{}"),
        )

    def record(self, outcome: str, error: errors.LLMQError | None = None) -> dict[str, Any]:
        finished = time.time()
        record: dict[str, Any] = {
            "kind": "attempt",
            "job_id": self.job_id,
            "attempt": self.attempt,
            "provider": self.hop.provider,
            "model": self.hop.model,
            "outcome": outcome,
            "started_at": self.started_at_s,
            "finished_at": finished,
            "latency_ms": round((finished - self.started_at_s) * 1000, 3),
        }
        if error is not None:
            details = public_error(error)
            record.update(
                error_type=details["type"], error_message=details["message"],
                status_code=details.get("status_code"), provider_request_id=details.get("request_id"),
            )
        return record


def public_error(error: errors.LLMQError) -> dict[str, Any]:
    """The error as it may be stored and shown: any configured secret in its message hidden.

    Adapters hide their own key; this also hides another provider's, should a body echo it.
    """
    details = error.to_dict()
    details["message"] = redact(details["message"])
    return details
