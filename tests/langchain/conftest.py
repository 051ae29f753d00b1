"""One stack for the LangChain classes' tests: the fake OpenAI server (OpenAI's wire format over
real HTTP: tools, JSON, streamed tool-call deltas, embeddings), a real redis-server, SQLite and
one real `llmq worker`. Each test finds it through `LLMQ_CONFIG` and `LLMQ_REDIS_URL`, as an
application would; LangChain's standard tests build their models from parameters alone."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("langchain_core", reason="the LangChain classes need the langchain extra: pip install 'llmq[langchain]'")

from llmq.client import SyncLLMService
from llmq.langchain import close_services
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, fast_retry, openai_entry, service_config, start_cluster

CHAT_MODEL = "gpt-4o-mini"
#: Served by an entry with the response cache on: a repeated request is answered whole.
CACHED_CHAT_MODEL = "gpt-4o"
EMBEDDING_MODEL = "text-embedding-3-small"


@dataclass
class LangChainStack:
    cluster: Cluster
    fake: FakeOpenAI
    #: The cluster's own client, to read the jobs the LangChain classes made.
    llmq: SyncLLMService


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LangChainStack]:
    fake = FakeOpenAI().start()
    providers = {
        "openai": openai_entry(fake, models=[CHAT_MODEL, EMBEDDING_MODEL]),
        "openai_cached": openai_entry(fake, models=[CACHED_CHAT_MODEL], cache={"enabled": True}),
    }
    # Two attempts per provider: a stream that fails part-way is tried again (tests of the reset).
    config = service_config(providers, retry=fast_retry(2))
    cluster = start_cluster(tmp_path_factory.mktemp("langchain"), config)
    llmq = None
    try:
        cluster.start_workers(1, concurrency=50)
        llmq = cluster.service()
        yield LangChainStack(cluster, fake, llmq)
    finally:
        close_services()
        if llmq is not None:
            llmq.close()
        cluster.stop()
        fake.stop()


@pytest.fixture(autouse=True)
def _llmq_environment(stack: LangChainStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """Where llmq is, as an application's environment says it; the fake's knobs put back after each test."""
    monkeypatch.setenv("LLMQ_CONFIG", str(stack.cluster.config_path))
    monkeypatch.setenv("LLMQ_REDIS_URL", stack.cluster.redis_url)
    yield stack.fake
    stack.fake.reset()


@pytest.fixture
def fake(stack: LangChainStack) -> FakeOpenAI:
    return stack.fake


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Iterator[None]:
    """Every coroutine test here runs under pytest-asyncio, as LangChain's standard tests expect
    (they are written for its auto mode). Innermost wrapper: the mark is there before pytest-asyncio
    looks for it, and only in this folder."""
    outcome = yield
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items] if items is not None else []:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.asyncio)
