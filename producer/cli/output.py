"""What the command line prints: one-line errors, progress bars, result lines."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from llmq.client.service import LLMService
from llmq.contract.embeddings import VECTORS_AS_FLOATS
from llmq.contract.models import BatchRecord, JobRecord

EXIT_ERROR = 1
EXIT_USAGE = 2

#: `command(name, handler, help)`: what main.py hands each command module's `add_commands`.
CommandRegistrar = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


class NotFoundError(LookupError):
    """An id that names no job or batch in Redis."""


def one_line(exc: BaseException) -> str:
    # str(KeyError("x")) is "'x'": take the message itself.
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def hint(exc: BaseException) -> str:
    """What to do about an unreachable Redis (the URL shown without its password)."""
    import redis
    from kombu.exceptions import OperationalError

    if isinstance(exc, (redis.exceptions.ConnectionError, OperationalError)) and not isinstance(
        exc, redis.exceptions.AuthenticationError
    ):
        from llmq.contract.queueing import REDIS_URL_ENV, redis_url

        return f" (is Redis running at {redact_url(redis_url())}? set {REDIS_URL_ENV}, or run `llmq up`)"
    return ""



def redact_url(url: str) -> str:
    """A URL fit to print: its password replaced by ***."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


async def wait_with_bar(
    service: LLMService, batch_id: str, *, timeout_s: float | None = None, on_poll: Callable[[], None] | None = None
) -> BatchRecord:
    """Wait for a batch with a progress bar; `on_poll()` runs on every poll (and may raise
    to stop waiting, e.g. when a process the caller started has died)."""
    from tqdm import tqdm

    with tqdm(desc="jobs", unit="job", file=sys.stderr) as bar:
        def progress(batch: BatchRecord) -> None:
            if on_poll is not None:
                on_poll()
            bar.total = batch.total
            bar.n = batch.finished
            bar.set_postfix_str(", ".join(f"{s.value} {n}" for s, n in batch.counts.items() if n), refresh=False)
            bar.refresh()

        record = await service.wait(batch_id, timeout_s=timeout_s, on_progress=progress)
    assert isinstance(record, BatchRecord)
    return record


def summary_line(batch: BatchRecord) -> str:
    counts = ", ".join(f"{state.value} {count}" for state, count in batch.counts.items() if count)
    return f"batch {batch.batch_id}: {batch.total} jobs: {counts}"


def result_line(job: JobRecord) -> str:
    """One output line: the job, and its answer (content, tool_calls, finish_reason and parsed for
    a chat; embeddings, as numbers, for an embedding job) or its error."""
    return json.dumps({
        "custom_id": job.custom_id,
        "job_id": job.job_id,
        "kind": job.kind.value,
        "status": job.state.value,
        "response": job.result.model_dump(mode="json", context=VECTORS_AS_FLOATS) if job.result else None,
        "error": job.error if not job.result else None,
    })


def write_lines(lines: list[str], output: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def not_found(some_id: str) -> str:
    return f"no job or batch {some_id!r} in Redis (expired, or never submitted)"


