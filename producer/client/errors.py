"""Every error the client raises, in one place.

    ValueError
     └── RequestError          refused at the edge, nothing enqueued; `problems` lists
                               (position, message) per bad line of a batch
    RuntimeError
     ├── JobFailedError        the job ended failed or cancelled; `error` is its typed
     │                         error record (type, message, retryable) from the worker's
     │                         error tree (llmq.worker.errors), as the job stored it
     ├── RedisUnreachableError Redis did not answer: at once for an interactive call
     │                         (`LLMService.ping`), or for `client.redis_unreachable_s`
     │                         during a wait; the message says how to resume
     └── NoLiveWorkerError     no live worker consumes any queue of a request's route
                               (`LLMService.require_live_worker`); names the queues and
                               how to start a worker

Waiting past `timeout_s` raises the built-in `TimeoutError`; an id that names no job
or batch raises `KeyError`.
"""

from __future__ import annotations

from pydantic import ValidationError

from llmq.contract.common import id_problem
from llmq.contract.models import JobRecord
from llmq.contract.validation import first_error


class RequestError(ValueError):
    """A request refused at the edge. `problems` lists (position, message) for batches."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class RedisUnreachableError(RuntimeError):
    """Redis did not answer in time; the message names it (no password) and what to do."""


class NoLiveWorkerError(RuntimeError):
    """No live worker consumes a queue of the route; `queues` are the route's queues."""

    def __init__(self, message: str, queues: list[str]) -> None:
        super().__init__(message)
        self.queues = queues


class JobFailedError(RuntimeError):
    """`generate` ended without an answer; `error` is the job's typed error record."""

    def __init__(self, job: JobRecord) -> None:
        error = job.error or {}
        super().__init__(f"job {job.job_id} {job.state.value}: {error.get('type', 'Error')}: {error.get('message', '')}")
        self.job = job
        self.error = error


def describe_validation_error(exc: ValidationError) -> str:
    error = first_error(exc)
    message = error.message
    if error.error_type == "extra_forbidden":
        # A field of OpenAI's body that llmq has no field for (frequency_penalty, n, ...).
        message += (
            "; llmq's request has no such field: remove it, fix its spelling, or pass a provider's own "
            "parameter under provider_options (docs/requests.md)"
        )
    return f"{error.location or 'request'}: {message}{error.more}"


def check_id(field: str, value: str | None) -> None:
    """RequestError naming `field` when `value` cannot be an id (a NUL, a lone surrogate)."""
    problem = id_problem(value) if isinstance(value, str) else None
    if problem:
        raise RequestError(f"{field}: {problem}")
