"""Scenario: rows PostgreSQL refuses, with a real worker and its own outbox flusher.

Before: one job with a NUL in its prompt or answer made the flusher retry the same chunk
forever, and no later job's rows reached SQL. Now NUL is stored (escaped) and reads back
unchanged; a row the database still refuses (here a usage row whose token count does
not fit the column) is set aside with its error while every other row is written, and
`llmq status`, `llmq usage` and the metrics report it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmq import LLMRequest
from llmq.cli.embedded import free_port
from llmq.client.service import BatchItem
from llmq.contract import keys
from llmq.contract.models import JobState
from llmq.worker.store.ledger import Store
from tests.cli.test_cli import Cli, clean_env
from tests.reliability.support import Figures, client, ledger_complete, ledger_rows, wait_until
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster
from tests.support.pg import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: More completion tokens than PostgreSQL's INTEGER holds: a provider's absurd usage report.
ABSURD_TOKENS = 3_000_000_000



@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    server.answer = json.loads  # each prompt's last message is the JSON of the answer it wants
    yield server
    server.stop()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def cluster(tmp_path: Path, fake: FakeOpenAI, postgres: PostgresServer, metrics_port: int) -> Iterator[Cluster]:
    started = start_cluster(tmp_path, service_config({"primary": openai_entry(fake)}),
                            database_url=postgres.create_schema("poison"))
    started.start_workers(1, concurrency=20, extra_env={"LLMQ_METRICS_PORT": str(metrics_port)})
    yield started
    started.stop()
    fake.reasoning_tokens = 0


def ask(prompt: str, answer: str) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": prompt}, {"role": "user", "content": json.dumps(answer)}],
                      model="gpt-4o-mini", max_tokens=64)


def run(cluster: Cluster, items: list[BatchItem]) -> list:
    with cluster.service() as service:
        batch_id = service.submit_batch(items)
        batch = service.wait(batch_id, timeout_s=120)
        assert batch.counts[JobState.SUCCEEDED] == len(items)
        return service.results(batch_id)


def test_the_issues_batch_with_nul_in_prompts_and_answers_reaches_postgresql(cluster: Cluster) -> None:
    """20 jobs, two with a NUL in the prompt and two answered with one (the NUL custom_ids of the
    report are refused at the edge now: tests/client/test_edge.py)."""
    items = [BatchItem(ask(f"question {n}" + ("\x00" if n in (3, 4) else ""), f"answer {n}" + ("\x00!" if n in (5, 6) else "")),
                       custom_id=f"c{n}") for n in range(20)]
    records = run(cluster, items)
    wait_until(lambda: ledger_complete(cluster.redis_url, cluster.database_url, records), 60, "every row in PostgreSQL")
    with Store(cluster.database_url) as store:
        contents = {store.job(record.job_id)["custom_id"]: store.job(record.job_id)["content"] for record in records}
        quarantined = store.quarantined_count()
        written = ledger_rows(store, records)
    assert contents["c5"] == "answer 5\x00!" and contents["c0"] == "answer 0"
    assert quarantined == 0
    Figures.tally("NUL in prompts and answers, PostgreSQL ledger", [r.job_id for r in records], records,
                  ledger_rows_written=written, ledger_rows_quarantined=quarantined).record()


def test_a_row_postgresql_refuses_is_set_aside_and_the_rows_after_it_are_written(
    cluster: Cluster, fake: FakeOpenAI, metrics_port: int
) -> None:
    before = run(cluster, [BatchItem(ask(f"before {n}", f"fine {n}")) for n in range(20)])
    fake.reasoning_tokens = ABSURD_TOKENS
    [poison] = run(cluster, [BatchItem(ask("poison", "an answer whose usage no INTEGER column holds"))])
    poison_done = time.monotonic()
    fake.reasoning_tokens = 0
    redis = client(cluster.redis_url)
    wait_until(lambda: redis.llen(keys.OUTBOX_DEAD) == 1, 60, "the poison row to be set aside")
    set_aside_s = time.monotonic() - poison_done
    after = run(cluster, [BatchItem(ask(f"after {n}", f"fine {n}")) for n in range(20)])

    # Every row but the poison usage row lands: the job and attempt rows of the poison job included.
    good = [*before, *after]
    wait_until(lambda: ledger_complete(cluster.redis_url, cluster.database_url, good), 60, "the rows after the poison")
    wait_until(lambda: redis.llen(keys.OUTBOX) == 0, 60, "the outbox to empty")
    with Store(cluster.database_url) as store:
        poison_job = store.job(poison.job_id)
        poison_attempts = store.attempts(poison.job_id)
        poison_usage = store.usage_rows(poison.job_id)
        [quarantined] = store.quarantined()
        written = ledger_rows(store, [*before, poison, *after])
    assert poison_job is not None and poison_job["state"] == "succeeded" and poison_attempts
    assert poison_usage == []
    assert (quarantined["job_id"], quarantined["kind"]) == (poison.job_id, "usage")
    assert quarantined["error"].startswith("NumericValueOutOfRange: integer out of range")
    [dead] = [json.loads(item) for item in redis.lrange(keys.OUTBOX_DEAD, 0, -1)]
    assert dead["row"]["job_id"] == poison.job_id and dead["row"]["completion_tokens"] > ABSURD_TOKENS

    cli = Cli(clean_env(LLMQ_REDIS_URL=cluster.redis_url, LLMQ_CONFIG=str(cluster.config_path),
                        LLMQ_DATABASE_URL=cluster.database_url), cluster.root)
    assert "attention: 1 ledger row(s) the SQL ledger refused" in cli("status").stdout
    assert "Needs attention: 1 ledger row(s)" in cli("usage").stdout
    wait_until(lambda: scrape(metrics_port).get("llmq_ledger_rows_quarantined_total") == 1, 30,
               "the metrics sampler to count the quarantined row")
    samples = scrape(metrics_port)
    assert samples["llmq_ledger_dead_letter_rows"] == 1 and samples["llmq_outbox_rows"] == 0

    records = [*before, poison, *after]
    Figures.tally("a usage row PostgreSQL refuses, among 41 jobs", [r.job_id for r in records], records,
                  ledger_rows_written=written, ledger_rows_quarantined=1,
                  poison_job_done_to_row_set_aside_s=round(set_aside_s, 2)).record()


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.labels}
