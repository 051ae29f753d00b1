"""`llmq usage --by kind` and `--by lane`: usage grouped by its job's kind (chat, embedding) and lane
(interactive, batch), read from the ledger's job rows as the command reads them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from llmq.worker.store.ledger import Store
from tests.cli.test_cli import clean_env, llmq_command
from tests.worker.store.test_ledger import kinds_and_lanes


def usage(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with Store(url) as store:
        store.write(kinds_and_lanes())
    config = tmp_path / "llm_service.yaml"
    config.write_text("llm_service:\n  providers:\n    openai: {api_key: k}\n")
    shown = subprocess.run([*llmq_command(), "--config", str(config), "usage", *options, "--database-url", url],
                           capture_output=True, text=True, env=clean_env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    return shown


def test_usage_by_kind_shows_chat_and_embedding_and_rows_whose_job_is_unknown(tmp_path: Path) -> None:
    lines = usage(tmp_path, "--by", "kind").stdout.splitlines()
    assert lines[0] == "Usage by kind (all time)"
    requests = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert requests == {"-": 1, "chat": 2, "embedding": 1, "TOTAL": 4}


def test_usage_by_lane_as_json(tmp_path: Path) -> None:
    shown = json.loads(usage(tmp_path, "--by", "lane", "--json").stdout)
    assert shown["by"] == "lane" and shown["totals"]["requests"] == 4
    assert {row["lane"]: row["requests"] for row in shown["rows"]} == {"interactive": 1, "batch": 2, None: 1}
