"""One stack for the HTTP front's tests: a fake OpenAI server, a real redis-server, SQLite, one
real `llmq worker`, and `llmq serve` on a free port; keys made with `llmq keys create`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import openai
import pytest

from llmq.contract.models import JobRecord
from tests.http.support import PRICING, FrontProcess, create_key
from tests.support.fakes.openai import FakeOpenAI
from tests.support.fakes.openai_batches import FakeOpenAIBatches
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

#: A provider entry with the response cache on (the stack's other entry, "fake", has it off).
CACHED_ENTRY, CACHED_MODEL = "fake_cached", "gpt-4o-mini-2024-07-18"

pytest.importorskip("uvicorn", reason="the HTTP front needs the serve extra: pip install 'llmq[serve]'")


@dataclass
class FrontStack:
    cluster: Cluster
    front: FrontProcess
    fake: FakeOpenAI
    names: Iterator[int]

    @property
    def base_url(self) -> str:
        return f"{self.front.url}/v1"

    def key(self, *options: str) -> tuple[str, str]:
        """A fresh key (name, key) with `llmq keys create` options (--rpm 1, --models a,b, ...)."""
        name = f"caller-{next(self.names)}"
        return name, create_key(self.cluster.database_url, name, *options)

    def job(self, job_id: str) -> JobRecord:
        """The job behind an answer, as `llmq status` reads it."""
        with self.cluster.service() as service:
            record = service.poll(job_id)
        assert record is not None, job_id
        return record

    def client(self, key: str | None = None, **options: object) -> openai.OpenAI:
        """The official SDK on this front; no retries of its own, so each error class shows as is."""
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key()[1], **{"max_retries": 0, **options})  # type: ignore[arg-type]


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontStack]:
    # With its batch API too, for the provider-batch lane; tended at test speed.
    fake = FakeOpenAIBatches().start()
    root = tmp_path_factory.mktemp("front")
    providers = {
        "fake": openai_entry(fake, models=["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"], pricing=PRICING,
                             batch_api={"gather_s": 0.3, "poll_min_s": 0.2, "poll_max_s": 0.5}),
        # The same server behind the response cache, for answers that come whole; a model of its own,
        # so the other models' routes stay one hop.
        CACHED_ENTRY: openai_entry(fake, models=[CACHED_MODEL], cache={"enabled": True}),
    }
    cluster = start_cluster(root, service_config(providers, retry=fast_retry(1), jobs={"deadline_s": 60, "lease_s": 5}))
    front = None
    try:
        cluster.start_workers(1, concurrency=50)
        front = FrontProcess(cluster, root / "front.log").start()
        yield FrontStack(cluster, front, fake, itertools.count(1))
    finally:
        if front is not None:
            front.stop()
        cluster.stop()
        fake.stop()


@pytest.fixture
def fake(stack: FrontStack) -> Iterator[FakeOpenAI]:
    """The stack's fake provider, its knobs put back after each test."""
    yield stack.fake
    stack.fake.reset()
    stack.fake.latency_s = stack.fake.chunk_delay_s = 0.0


@pytest.fixture
def client_for(stack: FrontStack) -> Callable[..., openai.OpenAI]:
    return stack.client
