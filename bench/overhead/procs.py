"""The processes a benchmark run starts: fake provider servers and worker processes.

Everything runs as a real process of its own (fake, redis-server, workers), so
the client under test never shares a GIL with the server it calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from llmq.contract import keys

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Process:
    """A child process in its own session, stopped with SIGTERM, then SIGKILL of its group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def spawn(name: str, command: list[str], env: dict[str, str], log_path: Path) -> Process:
    popen = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return Process(name, popen, log_path)


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without LLMQ_* settings, plus the given ones."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMQ_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


# --- fake provider ------------------------------------------------------------------


@dataclass
class FakeProcess:
    process: Process
    url: str

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/_fake/stats", timeout=10).json()

    def stop(self) -> None:
        self.process.stop()


def start_fake(root: Path, name: str, latency_s: float) -> FakeProcess:
    """`python -m tests.support.fakes.serve openai` in its own process; waits for its ready line."""
    log_path = root / f"{name}.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fakes.serve", "openai", "--latency-s", str(latency_s)],
        cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=log_path.open("ab"), start_new_session=True,
    )
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line:
        raise RuntimeError(f"fake {name} did not start; see {log_path}")
    return FakeProcess(Process(name, popen, log_path), json.loads(line)["url"])


# --- workers ------------------------------------------------------------------------


def start_llmq_worker(
    root: Path, name: str, config_path: Path, redis_url: str, *, concurrency: int, loglevel: str, queue: str,
    events: bool = True, pool: str = "async",
) -> Process:
    """A real `llmq worker` process (`--pool async` unless told), the way the README starts one."""
    env = clean_env(
        LLMQ_REDIS_URL=redis_url, LLMQ_CONFIG=str(config_path), LLMQ_HOME=str(root),
        LLMQ_DATABASE_URL=f"sqlite:///{root / 'ledger.sqlite3'}",
    )
    command = [sys.executable, "-m", "llmq.cli", "--config", str(config_path), "worker", "--queues", queue,
               "--concurrency", str(concurrency), "--pool", pool, "--loglevel", loglevel,
               *([] if events else ["--no-events"])]
    worker = spawn(name, command, env, root / f"{name}.log")
    wait_for_key(redis_url, f"{keys.WORKER_PREFIX}*:{worker.pid}", worker)
    return worker


def start_bare_worker(
    root: Path, name: str, config_path: Path, redis_url: str, fake_url: str, api_key: str, *, concurrency: int,
    loglevel: str, events: bool = True,
) -> Process:
    """The baseline's worker: `python -m bench.overhead.bare` (same pool, concurrency, worker arguments)."""
    from bench.overhead.bare import READY_PREFIX

    env = clean_env(BENCH_BROKER_URL=redis_url, BENCH_CONFIG=str(config_path), BENCH_FAKE_URL=fake_url,
                    BENCH_API_KEY=api_key)
    command = [sys.executable, "-m", "bench.overhead.bare", "--concurrency", str(concurrency), "--loglevel", loglevel,
               *([] if events else ["--no-events"])]
    worker = spawn(name, command, env, root / f"{name}.log")
    wait_for_key(redis_url, f"{READY_PREFIX}{worker.pid}", worker)
    return worker


def wait_for_key(redis_url: str, pattern: str, process: Process, timeout_s: float = 60.0) -> None:
    """Workers announce readiness with a Redis key (llmq: its heartbeat; bare: worker_ready)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while not list(client.scan_iter(pattern)):
            process.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.name} not ready after {timeout_s}s; see {process.log_path}")
            time.sleep(0.1)
    finally:
        client.close()


# --- memory -------------------------------------------------------------------------


def _status_field(pid: int, name: str) -> int:
    """A number from /proc/<pid>/status (e.g. "VmRSS", "Threads"); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS), KiB."""
    return _status_field(pid, "VmRSS")


def thread_count(pid: int) -> int:
    return _status_field(pid, "Threads")


def _stat_cpu_s(stat: Path) -> float | None:
    """User + system CPU seconds from a /proc stat file (a process's or a thread's); None once gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields[11], fields[12] are utime, stime (the 14th, 15th of the full line).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds (user + system) of a process, read from /proc/<pid>/stat."""

    pid: int

    def seconds(self) -> float:
        return _stat_cpu_s(Path(f"/proc/{self.pid}/stat")) or 0.0


def children(pid: int) -> list[int]:
    """Child process ids (the worker's SQL outbox flusher runs in one)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds per thread (tid) of a process."""
    spent: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        seconds = _stat_cpu_s(task / "stat")
        if seconds is not None:
            spent[int(task.name)] = seconds
    return spent


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by tid, from `py-spy dump` when py-spy is installed ({} otherwise)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(match[1]): match[2] for match in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump, re.M)}


def cpu_by_thread_group(pid: int, before: dict[int, float]) -> dict[str, float]:
    """CPU seconds since `before` per thread name, numbered pool threads folded into one row."""
    after = thread_cpu_s(pid)
    names = thread_names(pid)
    groups: dict[str, float] = {}
    for tid, seconds in after.items():
        name = re.sub(r"[-_]\d+(_\d+)?$", "", names.get(tid, f"tid {tid}"))
        groups[name] = groups.get(name, 0.0) + seconds - before.get(tid, 0.0)
    return dict(sorted(groups.items(), key=lambda item: -item[1]))
