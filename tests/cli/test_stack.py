"""`llmq up` as people run it: a subprocess in a directory of its own, the other commands run
in the same directory as a second terminal would. It supervises everything it starts: its
Redis killed mid-batch (SIGKILL, as the OOM killer would) is started again with its
append-only file and the batch completes, every job succeeded and every ledger row written;
a worker killed mid-batch is started again once the outbox flusher it left behind is
stopped. What it restarted, and why, is on its stderr; the waiting `llmq submit --wait`
reports the outage on its progress output."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmq.cli.embedded import free_port
from llmq.client.sync import SyncLLMService
from llmq.contract import keys
from llmq.contract.config import load_config
from llmq.contract.models import BatchRecord, JobState
from llmq.worker.store.ledger import Store
from tests.cli.test_cli import clean_env, llmq_command, write_jsonl
from tests.reliability.support import Figures, alive, child_pids, client, ledger_complete, ledger_rows, wait_until
from tests.support.harness import live_workers, write_config

pytestmark = pytest.mark.slow

#: One provider, one worker (`llmq up` runs one per provider); a call takes a second, so a
#: 300-job batch at the worker's 100 slots runs long enough to be hit mid-way. A short lease
#: brings a killed worker's jobs back within the test.
CONFIG = """
llm_service:
  jobs: {deadline_s: 600, lease_s: 3}
  providers:
    mock_a:
      type: mock
      models: [gpt-4]
      options: {latency_s: 1.0}
"""
JOBS = 300


@dataclass
class Up:
    """A running `llmq up` and the directory it was started in."""

    process: subprocess.Popen[bytes]
    cwd: Path
    out: Path
    err: Path

    @property
    def home(self) -> Path:
        return self.cwd / ".llmq"

    @property
    def redis_url(self) -> str:
        return (self.home / "redis.url").read_text().strip()

    def said(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def pid_of(self, name: str) -> int:
        found = re.search(rf"^  {re.escape(name)} +pid (\d+)$", self.out.read_text(), re.MULTILINE)
        assert found, self.out.read_text()
        return int(found.group(1))

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """An `llmq` command in the same directory, with no LLMQ_* setting: it must find the stack."""
        return subprocess.run([*llmq_command(), *args], cwd=self.cwd, env=clean_env(), capture_output=True, text=True,
                              timeout=timeout_s)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*llmq_command(), *args], cwd=self.cwd, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    cwd = tmp_path_factory.mktemp("up")
    write_config(cwd / "llm_service.yaml", CONFIG)  # found in the working directory, like the README's
    out, err = cwd / "up.out", cwd / "up.err"
    # The HTTP front on a free port: its default (8000) may be another `llmq up`'s, on a shared machine.
    process = subprocess.Popen([*llmq_command(), "up", "--no-flower", "--serve-port", str(free_port())], cwd=cwd,
                               env=clean_env(), stdout=out.open("wb"), stderr=err.open("wb"), start_new_session=True)
    running = Up(process, cwd, out, err)
    try:
        wait_until(lambda: "Ctrl-C stops everything." in out.read_text() or process.poll() is not None, 60,
                   "llmq up to start")
        assert process.poll() is None, running.said()
        wait_until(lambda: live_workers(running.redis_url), 60, "the worker's heartbeat")
        yield running
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, running.said()
    assert not (running.home / "redis.url").exists()  # nothing left that points at a stopped Redis


def batch_file(up: Up, prefix: str, count: int) -> Path:
    lines = [{"custom_id": f"{prefix}-{index}", "body": {"model": "gpt-4", "max_tokens": 16,
                                                         "messages": [{"role": "user", "content": f"{prefix} {index}"}]}}
             for index in range(count)]
    return write_jsonl(up.cwd / f"{prefix}.jsonl", lines)


def succeeded(up: Up, batch_id: str) -> int:
    return int(client(up.redis_url).hget(keys.batch(batch_id), "succeeded") or 0)


def finish(up: Up, submit: subprocess.Popen[str], batch_id: str) -> tuple[str, BatchRecord, list]:
    """The waiting submit's stderr, once it has ended, and the batch as Redis has it."""
    _, err = submit.communicate(timeout=600)
    with SyncLLMService(load_config(up.cwd / "llm_service.yaml"), redis_url=up.redis_url) as service:
        batch = service.batch(batch_id)
        records = service.results(batch_id)
    assert batch is not None, err
    return err, batch, records


def start_batch(up: Up, prefix: str) -> tuple[subprocess.Popen[str], str]:
    """`llmq submit --wait` in the same directory, once it has enqueued (its first line is the batch id)."""
    submit = up.start("submit", str(batch_file(up, prefix, JOBS)), "--wait")
    assert submit.stdout is not None
    batch_id = submit.stdout.readline().strip()
    assert batch_id.startswith("batch_"), submit.communicate()
    return submit, batch_id


def database_url(up: Up) -> str:
    return f"sqlite:///{up.home / 'llmq.sqlite3'}"


def test_other_terminals_find_the_stack(up: Up) -> None:
    url_file = up.home / "redis.url"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    assert re.fullmatch(r"redis://:[\w-]{20,}@127\.0\.0\.1:\d+/0", up.redis_url)  # a password of its own
    assert up.redis_url.split("@")[0] not in up.said()  # printed nowhere

    result = up.run("submit", str(batch_file(up, "second", 5)), "--wait")
    assert result.returncode == 0, result.stderr
    assert re.search(r"batch batch_\w+: 5 jobs: succeeded 5", result.stderr)
    status = up.run("status")
    assert "(from " in status.stdout and "redis.url, written by `llmq up`): answers" in status.stdout
    assert "workers: 1 live, on llm.mock_a" in status.stdout

    again = up.run("up", "--no-flower", timeout_s=60)
    assert again.returncode == 1
    assert "`llmq up` is already running with data in" in again.stderr


@dataclass
class Crashed:
    """A batch that something was killed under: what the waiting submit said, and how it ended."""

    err: str
    batch: BatchRecord
    records: list
    crash_to_done_s: float
    succeeded_before: int


def batch_through(up: Up, prefix: str, crash: Callable[[], None], said: str) -> Crashed:
    """`llmq submit --wait` of JOBS jobs; `crash()` once a sixth have succeeded, then `llmq up` must
    say `said`; returns once the batch has ended and every ledger row is in SQL."""
    submit, batch_id = start_batch(up, prefix)
    wait_until(lambda: succeeded(up, batch_id) >= 50, 120, "a sixth of the batch")
    before = succeeded(up, batch_id)
    crashed_at = time.monotonic()
    crash()
    wait_until(lambda: said in up.err.read_text(), 30, f"llmq up to say {said!r}")
    err, batch, records = finish(up, submit, batch_id)
    done_s = time.monotonic() - crashed_at
    assert submit.returncode == 0, err
    wait_until(lambda: ledger_complete(up.redis_url, database_url(up), records), 120, "every ledger row in SQL")
    return Crashed(err, batch, records, round(done_s, 1), before)


def test_a_killed_redis_is_started_again_and_the_batch_completes_with_every_row(up: Up) -> None:
    redis_pid = up.pid_of("redis-server")
    run = batch_through(up, "redis", lambda: os.kill(redis_pid, signal.SIGKILL),
                        "llmq up: redis-server was killed by SIGKILL")

    restart = re.search(r"llmq up: redis-server was killed by SIGKILL; started again on port (\d+) with its password "
                        r"and its append-only file in ([\d.]+) s", up.err.read_text())
    assert restart and restart.group(1) in up.redis_url
    # The waiting submit saw it, however short: a poll that met no Redis, or Redis's new run id.
    assert "llmq: Redis restarted (a new run id); carrying on" in run.err, run.err
    if "llmq: Redis unreachable, retrying (this wait gives up after 120 s)" in run.err:
        assert re.search(r"llmq: Redis answers again, after [\d.]+ s", run.err)
    assert run.batch.total == JOBS and run.batch.counts[JobState.SUCCEEDED] == JOBS
    figures = Figures.tally("llmq up: its Redis SIGKILLed mid-batch", [r.job_id for r in run.records], run.records,
                            succeeded_before_kill=run.succeeded_before, redis_restart_s=float(restart.group(2)),
                            kill_to_batch_done_s=run.crash_to_done_s, ledger_rows_written=written(up, run.records),
                            ledger_rows_quarantined=quarantined(up)).record()
    assert figures.succeeded == JOBS and figures.lost == 0 and figures.measured["ledger_rows_quarantined"] == 0


def test_a_killed_worker_is_started_again_and_what_it_left_behind_is_stopped(up: Up) -> None:
    worker = current_worker(up)
    [flusher] = [pid for pid in child_pids(worker) if b"llmq.worker.store.outbox" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def crash() -> None:
        os.kill(flusher, signal.SIGSTOP)  # stuck (in a slow SQL call, say): it cannot leave on its own
        os.kill(worker, signal.SIGKILL)

    run = batch_through(up, "worker", crash, "llmq up: worker mock_a was killed by SIGKILL")

    said = re.search(r"llmq up: worker mock_a was killed by SIGKILL; stopped what it left behind: pid (\d+) \([^)]*"
                     r"llmq\.worker\.store\.outbox\); started again \(pid (\d+)\)", up.err.read_text())
    assert said and int(said.group(1)) == flusher, up.err.read_text()
    assert not alive(flusher) and alive(int(said.group(2)))
    assert run.batch.counts[JobState.SUCCEEDED] == JOBS
    lost_leases = sum(1 for r in run.records for a in r.attempts if a["outcome"] == "worker_lost")
    figures = Figures.tally("llmq up: a worker SIGKILLed mid-batch, its outbox flusher stuck",
                            [r.job_id for r in run.records], run.records, kill_to_batch_done_s=run.crash_to_done_s,
                            ledger_rows_written=written(up, run.records), ledger_rows_quarantined=quarantined(up),
                            rerun_after_lost_lease=lost_leases).record()
    assert figures.succeeded == JOBS and figures.lost == 0


def written(up: Up, records: list) -> int:
    with Store(database_url(up)) as store:
        return ledger_rows(store, records)


def quarantined(up: Up) -> int:
    return int(client(up.redis_url).llen(keys.OUTBOX_DEAD))


def current_worker(up: Up) -> int:
    """The worker's pid: as `llmq up` printed it at start, or as it said when it last started it again."""
    restarted = re.findall(r"worker mock_a .*started again \(pid (\d+)\)", up.err.read_text())
    return int(restarted[-1]) if restarted else up.pid_of("worker mock_a")
