"""`llmq demo` as the README runs it: from the repo root, no keys, data in a fresh LLMQ_HOME.

It must show the whole life of a batch and leave nothing running behind it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import clean_env, llmq_command
from tests.conftest import REPO_ROOT

REQUESTS = 20

# The whole stack comes up and down once for the module (a few seconds of process starts).
pytestmark = pytest.mark.slow


def processes_with_home(home: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process the demo started with this LLMQ_HOME:
    workers, beat and Flower carry it in their environment; redis-server overwrites its
    environment with its process title, but it runs in its data dir under the home."""
    marker = f"LLMQ_HOME={home}".encode()
    found: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            in_home = Path(os.readlink(entry / "cwd")).is_relative_to(home)
            if in_home or marker in (entry / "environ").read_bytes().split(b"\0"):
                state = next(row for row in (entry / "status").read_text().splitlines() if row.startswith("State:"))
                if "zombie" not in state:
                    found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, StopIteration):
            continue  # exited meanwhile, or not ours to read
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    home = tmp_path_factory.mktemp("demo-home")
    result = subprocess.run(
        [*llmq_command(), "demo", "--requests", str(REQUESTS)], cwd=REPO_ROOT, env=clean_env(LLMQ_HOME=str(home)),
        capture_output=True, text=True, timeout=300,
    )
    return result, home


def test_the_demo_succeeds(demo) -> None:
    result, home = demo
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert f"Done: {REQUESTS} of {REQUESTS} jobs succeeded." in result.stdout


def test_the_demo_shows_providers_and_routes(demo) -> None:
    out = demo[0].stdout
    assert re.search(r"provider openai +skipped \(environment variable not set: OPENAI_API_KEY\)", out)
    assert re.search(r"provider mock_primary +configured", out)
    # Both kinds of agent request (curriculum on gpt-4, skill descriptions on gpt-3.5-turbo).
    assert "route for gpt-4: mock_primary(gpt-4) -> mock_backup(gpt-4)" in out
    assert "route for gpt-3.5-turbo: mock_primary(gpt-3.5-turbo) -> mock_backup(gpt-3.5-turbo)" in out


def test_the_demo_shows_progress_retries_and_fallback(demo) -> None:
    result, _ = demo
    assert re.search(rf"Submitted batch batch_\w+ \({REQUESTS} jobs\)", result.stdout)
    assert f"{REQUESTS}/{REQUESTS}" in result.stderr  # the progress bar's last frame
    assert re.search(rf"batch batch_\w+: {REQUESTS} jobs: succeeded {REQUESTS} in [\d.]+s", result.stdout)
    retries = re.search(r"Retries and fallback: (\d+) jobs needed more than one attempt; (\d+) fell back", result.stdout)
    assert retries, result.stdout
    retried, moved = int(retries.group(1)), int(retries.group(2))
    assert retried >= 1 and moved <= retried  # mock_primary fails half its calls
    # Each trail: the failed attempts on mock_primary (typed errors), then the answer from mock_backup.
    trails = re.findall(r"^  \S+: mock_primary:ServerError( -> mock_primary:\w+Error)* -> mock_backup:succeeded$",
                        result.stdout, re.MULTILINE)
    assert len(trails) == min(moved, 3)


def test_the_demo_labels_simulated_results_and_prints_usage_from_sql(demo) -> None:
    out = demo[0].stdout
    samples = re.findall(r"^  (\S+) \[(mock_primary|mock_backup)/([\w.-]+) \(simulated\)\]: (.+)$", out, re.MULTILINE)
    assert len(samples) == 3 and all(text.strip() for *_, text in samples)
    usage = out.split("Usage and cost from the SQL ledger (sqlite):")[1].split("Stopping the stack")[0]
    rows = {row.split()[0]: row.split()[1:] for row in usage.strip().splitlines()[1:]}
    assert set(rows) <= {"mock_primary", "mock_backup"} and rows
    # One usage row per attempt that answered: every job answered exactly once.
    assert sum(int(columns[0]) for columns in rows.values()) == REQUESTS
    assert all(float(columns[3]) == 0.0 for columns in rows.values())  # simulated calls cost nothing


def test_the_demo_leaves_nothing_running(demo) -> None:
    _, home = demo
    deadline = time.monotonic() + 5  # the kernel reaps exited children asynchronously
    while (left := processes_with_home(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    assert sorted(path.name for path in (home / "logs").iterdir()) == [
        "beat.log", "flower.log", "worker-mock_backup.log", "worker-mock_primary.log"
    ]

