"""Worker logs: the job id on every record logged while a job runs, and never an API key.

- The job id lives in a context variable (`JOB_ID`), set by `with_job_id` around a
  job's coroutine; every record made while it runs, by any logger (llmq's, httpx's,
  Celery's), carries `record.job_id`. The text format shows it as `[job <id>]`;
  `LLMQ_LOG_FORMAT=json` writes one JSON object per line with a `job_id` field.
- Redaction happens where records are made (a log record factory), before any
  handler or formatter sees them: the message, its arguments and the traceback
  text are scrubbed of every secret in the config (`LLMConfig.secrets()`), so no
  handler added later, and no format, can print a key.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

FORMAT_ENV = "LLMQ_LOG_FORMAT"
REDACTED = "[redacted]"
#: Celery's own worker format, with the job tag in front of the message.
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(job_tag)s%(message)s"
#: Shorter values are not secrets worth the noise of scrubbing them from every line.
MIN_SECRET_LENGTH = 4

JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmq_job_id", default=None)
T = TypeVar("T")

_secrets_pattern: re.Pattern[str] | None = None
_installed = False


async def with_job_id(job_id: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run a job's coroutine with its id in the logging context."""
    token = JOB_ID.set(job_id)
    try:
        return await coro
    finally:
        JOB_ID.reset(token)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with every secret replaced; the installed secrets when none are given."""
    pattern = _compile(secrets) if secrets is not None else _secrets_pattern
    return pattern.sub(REDACTED, text) if pattern is not None and text else text


def _compile(secrets: Iterable[str]) -> re.Pattern[str] | None:
    usable = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in usable)) if usable else None


def install(secrets: Iterable[str]) -> None:
    """Make every record in this process carry the job id and hide `secrets` (idempotent)."""
    global _secrets_pattern, _installed
    _secrets_pattern = _compile(secrets)
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        job_id = JOB_ID.get()
        record.job_id = job_id
        record.job_tag = f"[job {job_id}] " if job_id else ""
        if _secrets_pattern is not None:
            _scrub(record, _secrets_pattern)
        return record

    logging.setLogRecordFactory(factory)


def _scrub(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: logging reports it later, as it would anyway
        return
    record.msg, record.args = pattern.sub(REDACTED, message), None
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text, so the traceback is formatted once, here, and scrubbed.
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = pattern.sub(REDACTED, record.exc_text)
    if record.stack_info:
        record.stack_info = pattern.sub(REDACTED, record.stack_info)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, pid, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "pid": record.process,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


def formatter() -> logging.Formatter:
    """The formatter `LLMQ_LOG_FORMAT` asks for: "json", or text (the default)."""
    if os.environ.get(FORMAT_ENV, "text").strip().lower() == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, defaults={"job_tag": ""})


def apply_formatter(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        handler.setFormatter(formatter())


def _on_celery_logging_setup(logger: logging.Logger | None = None, **_: object) -> None:
    if logger is not None:
        apply_formatter(logger)


def configure(secrets: Iterable[str]) -> None:
    """For a worker (or beat) process: the record factory, and llmq's formatter on the
    handlers Celery sets up (Celery keeps one connection per receiver, so this is idempotent)."""
    from celery import signals

    install(secrets)
    signals.after_setup_logger.connect(_on_celery_logging_setup, weak=False, dispatch_uid="llmq-logs")
    signals.after_setup_task_logger.connect(_on_celery_logging_setup, weak=False, dispatch_uid="llmq-task-logs")
