"""`llmq usage` with rows run through provider batches and the flex tier: the standard price
beside what was paid, and the saving, from the SQL ledger as the command reads it."""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path

from llmq.worker.store.ledger import Store
from tests.cli.test_cli import clean_env, llmq_command
from tests.worker.store.test_ledger import usage_row


def ledger(path: Path) -> str:
    url = f"sqlite:///{path}"
    with Store(url) as store:
        store.write([
            usage_row("job-std", cost_usd="0.0100000000", price_tier="standard"),
            usage_row("job-b1", cost_usd="0.0050000000", standard_cost_usd="0.0100000000", price_tier="batch"),
            usage_row("job-b2", cost_usd="0.0050000000", standard_cost_usd="0.0100000000", price_tier="batch"),
            usage_row("job-flex", cost_usd="0.0020000000", standard_cost_usd="0.0040000000", price_tier="flex"),
            usage_row("job-old", cost_usd="0.0010000000"),  # a row of an older version: no tier
        ])
        by_tier = {row["price_tier"]: row for row in store.usage_report(by="price_tier")}
    assert by_tier["batch"]["cost_usd"] == Decimal("0.01") and by_tier["batch"]["saved_usd"] == Decimal("0.01")
    assert by_tier["standard"]["saved_usd"] == 0 and by_tier[None]["standard_cost_usd"] == Decimal("0.001")
    assert by_tier["flex"]["cheaper_tier"] == 1 and by_tier["batch"]["cheaper_tier"] == 2
    return url


def test_usage_shows_what_batch_and_flex_saved(tmp_path: Path) -> None:
    url = ledger(tmp_path / "ledger.sqlite3")
    config = tmp_path / "llm_service.yaml"
    config.write_text("llm_service:\n  providers:\n    openai: {api_key: k}\n")
    shown = subprocess.run([*llmq_command(), "--config", str(config), "usage", "--by", "price_tier",
                            "--database-url", url], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    header = next(line for line in shown.stdout.splitlines() if "requests" in line)
    assert header.rstrip().endswith("standard USD    saved USD")
    total = next(line for line in shown.stdout.splitlines() if line.strip().startswith("TOTAL")).split()
    assert (total[5], total[-2], total[-1]) == ("0.023000", "0.035000", "0.012000")  # paid, standard, saved
    assert "3 requests ran through provider batches or the flex tier: $0.012000 saved, 34% off the standard price" \
        in shown.stdout
