"""The `llmq` command never leaves its user waiting without a word: no live worker, no
Redis, a Redis lost during a wait, and ledger rows that need attention are each said
in one clear line. Subprocesses against real redis-servers; the checks are on what is
said and the exit code, never on how fast (the timeouts only guard against a hang)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import redis

from llmq.cli.embedded import RedisServer
from llmq.contract import keys
from llmq.worker.store.outbox import OutboxFlusher
from tests.cli.test_cli import Cli, clean_env, line, llmq_command, one_line_error, write_jsonl
from tests.support.harness import write_config

CONFIG = """
llm_service:
  client: {redis_unreachable_s: 3}
  providers:
    steady:
      type: mock
      models: [gpt-4]
"""


def cli_on(tmp_path: Path, redis_url: str, **env: str) -> Cli:
    config = write_config(tmp_path / "llm_service.yaml", CONFIG)
    return Cli(clean_env(LLMQ_REDIS_URL=redis_url, LLMQ_CONFIG=str(config), LLMQ_HOME=str(tmp_path), **env), tmp_path)


def test_chat_with_no_live_worker_says_so_and_what_to_start(tmp_path: Path, redis_url: str) -> None:
    result = cli_on(tmp_path, redis_url)("chat", "hello", timeout_s=60)
    assert result.returncode == 1 and result.stdout == ""
    assert one_line_error(result) == (
        "llmq: error: no live worker serves any hop of this route: llm.steady.interactive; start one with "
        "`llmq worker --queues steady`, or the whole stack with `llmq up`")
    assert redis.Redis.from_url(redis_url).keys(keys.job("") + "*") == []  # nothing was left queued


def test_a_missing_redis_is_one_clear_line(tmp_path: Path, closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    cli = cli_on(tmp_path, url)
    for args in (("chat", "hello"), ("status",), ("submit", str(write_jsonl(tmp_path / "a.jsonl", [line("a")])))):
        result = cli(*args, timeout_s=60)
        assert result.returncode == 1, result.stderr
        error = one_line_error(result)
        assert error.startswith(f"llmq: error: cannot reach Redis at {url} (from LLMQ_REDIS_URL) within 2 s"), error
        assert "`llmq up`" in error


def test_submit_wait_reports_a_lost_redis_then_gives_up_saying_how_to_resume(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistence=False).start()
    cli = cli_on(tmp_path, server.url)
    command = [*llmq_command(), "submit", str(write_jsonl(tmp_path / "a.jsonl", [line("a"), line("b")])), "--wait"]
    waiting = subprocess.Popen(command, env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert waiting.stdout is not None and waiting.stderr is not None
        batch_id = waiting.stdout.readline().strip()  # printed once enqueued; no worker: the batch waits
        for said in waiting.stderr:  # the wait says why nothing moves; then Redis goes
            if "llmq: no live worker on llm.steady" in said:
                break
        server.kill()
        out, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
        server.stop()
    assert batch_id.startswith("batch_") and out == ""
    assert waiting.returncode == 1
    assert "llmq: Redis unreachable, retrying (this wait gives up after 3 s)" in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"llmq: error: Redis unreachable for \d+ s while waiting for {batch_id} \(\w+\); gave up "
                        rf"waiting, but its jobs are not lost: once Redis is back, run `llmq results {batch_id}`", last)


def test_status_and_usage_show_ledger_rows_that_need_attention(tmp_path: Path, redis_url: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.rpush(keys.OUTBOX, json.dumps({"kind": "usage", "job_id": "j1", "attempt": 1, "prompt_tokens": 5}),
                 json.dumps({"kind": "usage", "job_id": "j2", "attempt": 1, "prompt_tokens": 2**70}))
    flusher = OutboxFlusher(redis_url, database_url)
    try:
        assert flusher.drain(timeout_s=30)
    finally:
        flusher.stop()
        flusher.redis.close()
    cli = cli_on(tmp_path, redis_url, LLMQ_DATABASE_URL=database_url)

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "workers: none live; start one with `llmq worker`, or the whole stack with `llmq up`" in status.stdout
    assert "ledger:  0 row(s) waiting for SQL; 1 row(s) set aside so far" in status.stdout
    assert f"attention: 1 ledger row(s) the SQL ledger refused: they are in its llmq_quarantine table and Redis " \
           f"list {keys.OUTBOX_DEAD}" in status.stdout

    usage = cli("usage")
    assert usage.returncode == 0, usage.stderr
    assert "Needs attention: 1 ledger row(s) the database refused are set aside" in usage.stdout
    assert re.search(r"TOTAL +1 +5 ", usage.stdout)  # the good row is counted
    assert json.loads(cli("usage", "--json").stdout)["quarantined_rows"] == 1
