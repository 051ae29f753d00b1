"""What the command line prints: one-line errors, progress bars, result lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmq.client.service import LLMService
from llmq.client.waiting import WaitNotice
from llmq.contract.embeddings import VECTORS_AS_FLOATS
from llmq.contract.models import BatchRecord, JobRecord
from llmq.contract.queueing import redact_url

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
        from llmq.contract.queueing import REDIS_URL_ENV, redis_url, redis_url_source

        return (f" (is Redis running at {redact_url(redis_url())}, {redis_url_source()}? "
                f"set {REDIS_URL_ENV}, or run `llmq up`)")
    return ""


class NoticeLines:
    """Says on a line of its own when a wait starts or stops being stuck, and why
    (`LLMService.wait`'s notices); a progress bar shows the live text meanwhile."""

    def __init__(self, give_up_s: float, write: Callable[[str], None] | None = None) -> None:
        self.give_up_s = give_up_s
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.current: WaitNotice | None = None
        self._lost_at: float | None = None

    def __call__(self, notice: WaitNotice | None) -> None:
        before, self.current = self.current, notice
        if notice is not None and (before is None or before.kind != notice.kind):
            if notice.kind == "redis_unreachable":
                self._lost_at = time.monotonic()
                self.write(f"llmq: Redis unreachable, retrying (this wait gives up after {self.give_up_s:g} s)")
            else:
                self.write(f"llmq: {notice.text}")
        if before is not None and before.kind == "redis_unreachable" and (notice is None or notice.kind != before.kind):
            away_s = time.monotonic() - (self._lost_at or time.monotonic())
            self.write(f"llmq: Redis answers again, after {away_s:.1f} s")
        elif before is not None and before.kind == "no_live_worker" and notice is None:
            self.write("llmq: a live worker serves the waiting jobs now")

    @property
    def text(self) -> str:
        return self.current.text if self.current is not None else ""


async def wait_with_bar(
    service: LLMService, batch_id: str, *, timeout_s: float | None = None, on_poll: Callable[[], None] | None = None
) -> BatchRecord:
    """Wait for a batch with a progress bar; `on_poll()` runs on every poll (and may raise
    to stop waiting, e.g. when a process the caller started has died). Why the batch is not
    moving (Redis away, no live worker) shows on the bar and on lines of its own."""
    from tqdm import tqdm

    with tqdm(desc="jobs", unit="job", file=sys.stderr) as bar:
        write = lambda line: bar.write(line, file=sys.stderr)  # noqa: E731 - above the bar, not on stdout
        notices = NoticeLines(service.config.service.client.redis_unreachable_s, write=write)
        counts = ""

        def show() -> None:
            bar.set_postfix_str(" | ".join(part for part in (counts, notices.text) if part), refresh=False)
            bar.refresh()

        def progress(batch: BatchRecord) -> None:
            nonlocal counts
            if on_poll is not None:
                on_poll()
            bar.total = batch.total
            bar.n = batch.finished
            counts = ", ".join(f"{s.value} {n}" for s, n in batch.counts.items() if n)
            show()

        def notice(found: WaitNotice | None) -> None:
            if on_poll is not None:
                on_poll()
            notices(found)
            show()

        record = await service.wait(batch_id, timeout_s=timeout_s, on_progress=progress, on_notice=notice)
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


