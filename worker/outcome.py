"""How one message of a job ended, told to Celery in Celery's own terms, so Flower shows the truth.

The engine returns one outcome for every `llmq.generate` message it takes, after the job's
record, attempts and ledger rows are written. The task (worker/app.py) then calls
`tell_celery()`, which returns or raises what Celery's task protocol means by it:

    outcome     the task                       Celery's event   Flower shows
    Succeeded   returns a short summary        task-succeeded   SUCCESS, result = the summary
    HandedOn    raises Retry (HandOff)         task-retried     RETRY, exception = the typed error
    Failed      raises the typed error         task-failed      FAILURE, exception = the typed error
    Cancelled   raises Terminated              task-revoked     REVOKED
    Dropped     raises Ignore                  (none)           whatever the job's live message shows

Every one of them acks the message, as a plain return did before: late acks ack on
success and on Retry, Ignore and Terminated ack, and `task_acks_on_failure_or_timeout`
acks a failure. Only `Reject(requeue=True)` (Redis lost mid-job, worker/app.py) hands a
message back, and a worker that dies acks nothing. So this changes what Flower is told,
never how a job runs.

Ordering matters to Flower's state (celery.events.state): a READY state (SUCCESS,
FAILURE, REVOKED) is never replaced by an earlier one, RETRY gives way to whatever comes
next. A hop that hands the job on therefore must not say SUCCESS or FAILURE, and a
stale or duplicate message (dropped at claim) says nothing at all.

A job can also end while no worker holds a message for it: cancelled while it waited
(or before a worker took its message), or failed by the reaper past its deadline. The
promoter finds it (promote.lua) and the worker sends Celery's event for it itself
(`ended_events`): task-revoked or task-failed, as the worker's own node.

Every message is what the job record holds: the error's class and its public,
secret-free message (`public_error`), never a prompt or a key. With task events off
(`llmq worker --no-events`) Celery sends none of these; acks stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from celery.exceptions import Ignore, Retry, Terminated

from llmq.contract.jobs import EndedJob
from llmq.contract.models import Hop, JobState
from llmq.contract.queueing import TaskEvent
from llmq.worker import errors


class HandOff(Retry):
    """Celery's Retry, shown by its cause: task-retried carries `repr()` of the exception Celery
    got, which billiard hands over as the Retry itself, so Flower would show `Retry(Retry(...), ...)`."""

    def __repr__(self) -> str:
        return repr(self.exc)


class JobDeferred(Exception):
    """Not an error: the job waits (a limit, a budget, an open circuit) without having called the provider."""


@dataclass(frozen=True)
class Succeeded:
    summary: dict[str, Any]

    @classmethod
    def from_usage(cls, usage_row: dict[str, Any]) -> Succeeded:
        summary = {"state": "succeeded", "provider": usage_row["provider"], "model": usage_row["model"],
                   "prompt_tokens": usage_row["prompt_tokens"], "completion_tokens": usage_row["completion_tokens"],
                   "cost_usd": usage_row["cost_usd"]}
        if usage_row.get("cached"):
            summary["cached"] = True
        return cls(summary)

    def tell_celery(self) -> dict[str, Any]:
        return self.summary


@dataclass(frozen=True)
class HandedOn:
    """This message is done; the job runs again later on the same provider, or on the next hop."""

    #: Why: the typed error as the job record stores it, or, for a job set aside without a
    #: call, what it waits for (middleware's Defer reason).
    reason: dict[str, Any] | str
    #: Where and when the job runs next, e.g. "next: backup/gpt-4o-mini, attempt 3".
    next_step: str
    delay_s: float = 0.0

    @classmethod
    def to(
        cls, reason: dict[str, Any] | str, hop: Hop, attempt: int, *, new_hop: bool, delay_s: float = 0.0,
    ) -> HandedOn:
        """`attempt`: the number the job's next attempt will have."""
        where = f"{'next' if new_hop else 'again'}: {hop.provider}/{hop.model}, attempt {attempt}"
        return cls(reason, where + (f", in {delay_s:.1f} s" if delay_s >= 0.05 else ""), delay_s)

    def tell_celery(self) -> NoReturn:
        if isinstance(self.reason, str):
            cause: Exception = JobDeferred(f"waiting for {self.reason}")
        else:
            cause = errors.from_record(self.reason)
        raise HandOff(f"{self.next_step}; after {cause}", exc=cause, when=self.delay_s)


@dataclass(frozen=True)
class Failed:
    error: dict[str, Any]

    def tell_celery(self) -> NoReturn:
        raise errors.from_record(self.error)


@dataclass(frozen=True)
class Cancelled:
    def tell_celery(self) -> NoReturn:
        raise Terminated("cancelled by the caller")


@dataclass(frozen=True)
class Dropped:
    """A stale or duplicate message, or an attempt superseded after its lease ran out: the job is elsewhere."""

    def tell_celery(self) -> NoReturn:
        raise Ignore()


Outcome = Succeeded | HandedOn | Failed | Cancelled | Dropped


def ended_events(ended: list[EndedJob]) -> list[TaskEvent]:
    """The events a worker sends for jobs that ended with no message to tell it."""
    events: list[TaskEvent] = []
    for job in ended:
        if job.state is JobState.CANCELLED:
            revoked = {"terminated": False, "signum": None, "expired": False}
            events.append(TaskEvent("task-revoked", job.job_id, revoked))
        elif job.error:
            error = errors.from_record(job.error)
            events.append(TaskEvent("task-failed", job.job_id, {"exception": repr(error), "traceback": str(error)}))
    return events
