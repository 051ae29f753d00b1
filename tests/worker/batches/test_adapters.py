"""Each batch API (worker/batches/) against its fake over real HTTP: the requests it sends, the
states it reads, each line's answer or typed error, a lost batch found again, a cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from llmq.contract.config import LLMConfig, parse_config
from llmq.contract.models import LLMRequest
from llmq.worker import errors
from llmq.worker.batches.base import Line, LineResult, ProviderBatchAPI, RemoteBatch, line_key
from llmq.worker.batches.registry import BATCH_APIS, batch_api_for
from llmq.worker.providers.registry import create_provider
from tests.support.fakes.anthropic import API_KEY as ANTHROPIC_KEY
from tests.support.fakes.anthropic_batches import FakeAnthropicBatches
from tests.support.fakes.batch_clock import ERROR_MARKER, EXPIRE_MARKER, BatchTiming
from tests.support.fakes.gemini_batches import FakeGeminiBatches
from tests.support.fakes.openai import DEFAULT_API_KEY
from tests.support.fakes.openai_batches import FakeOpenAIBatches

T = TypeVar("T")
TIMING = BatchTiming(validating_s=0.05, in_progress_s=0.2, finalizing_s=0.05, window_s=0.8, cancel_s=0.05)
MODELS = {"openai": "gpt-4o-mini", "azure": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-20241022",
          "gemini": "gemini-2.0-flash", "gemini_file": "gemini-2.0-flash"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    servers = {"openai": FakeOpenAIBatches(timing=TIMING), "anthropic": FakeAnthropicBatches(timing=TIMING),
               "gemini": FakeGeminiBatches(timing=TIMING)}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def config(fakes: dict[str, Any]) -> LLMConfig:
    for server in fakes.values():
        server.reset()
    openai, anthropic, gemini = fakes["openai"].url, fakes["anthropic"].url, fakes["gemini"].base_url
    return parse_config(f"""
llm_service:
  providers:
    openai: {{api_key: {DEFAULT_API_KEY}, base_url: "{openai}/v1"}}
    azure: {{type: azure_openai, api_key: {DEFAULT_API_KEY}, base_url: "{openai}", options: {{deployments: {{gpt-4o-mini: mini-eu}}}}}}
    anthropic: {{api_key: {ANTHROPIC_KEY}, base_url: "{anthropic}"}}
    gemini: {{api_key: fake-gemini-key, base_url: "{gemini}"}}
    gemini_file: {{type: gemini, api_key: fake-gemini-key, base_url: "{gemini}", batch_api: {{inline_max_bytes: 10}}}}
""")


def run(config: LLMConfig, name: str, action: Callable[[ProviderBatchAPI], Awaitable[T]]) -> T:
    async def main() -> T:
        api = batch_api_for(create_provider(config.provider(name)))
        assert api is not None
        try:
            return await action(api)
        finally:
            await api.adapter.aclose()

    return asyncio.run(main())


def lines(name: str, *prompts: str) -> list[Line]:
    model = MODELS[name]
    return [Line(f"job_{index}", LLMRequest(messages=[{"role": "user", "content": prompt}], model=model,
                                              temperature=0.5))
            for index, prompt in enumerate(prompts)]


async def until_ended(api: ProviderBatchAPI, remote: RemoteBatch, timeout_s: float = 10.0) -> RemoteBatch:
    deadline = time.monotonic() + timeout_s
    seen = [remote.state]
    while not remote.ended:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
        remote = await api.get(remote.remote_id)
        seen.append(remote.state)
    return remote


async def submit_and_collect(api: ProviderBatchAPI, batch: list[Line]) -> tuple[RemoteBatch, dict[str, LineResult]]:
    remote = await api.submit("pbatch_test", batch, api.endpoint(batch[0].request), 86400)
    remote = await until_ended(api, remote)
    return remote, {result.key: result async for result in api.results(remote, batch)}


def test_every_batch_api_type_is_one_the_contract_lists() -> None:
    from llmq.contract.tiers import PROVIDER_BATCH_DEFAULTS

    assert set(BATCH_APIS) == set(PROVIDER_BATCH_DEFAULTS)


def test_a_line_key_is_the_job_id_where_every_provider_takes_it() -> None:
    assert line_key("job_0123abc-x") == "job_0123abc-x"
    odd = line_key("my job/42")
    assert odd != line_key("my job/43") and len(odd) <= 64 and odd.replace("_", "").isalnum()


@pytest.mark.parametrize("name", ["openai", "azure", "anthropic", "gemini", "gemini_file"])
def test_answers_errors_and_expired_lines_come_back_typed(config: LLMConfig, fakes: dict[str, Any], name: str) -> None:
    batch = lines(name, "write a haiku", f"fail {ERROR_MARKER}", f"never {EXPIRE_MARKER}")
    remote, results = run(config, name, lambda api: submit_and_collect(api, batch))
    # A Message Batch just ends; the expiry is each request's own result.
    assert remote.state == ("completed" if name == "anthropic" else "expired")
    answer = results["job_0"].response
    assert answer is not None and answer.provider == name and "write a haiku" in answer.content
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert isinstance(results["job_1"].error, errors.ServerError)
    expired = results.get("job_2")  # Gemini lists no entry for a request it never ran
    assert expired is None or isinstance(expired.error, errors.ProviderBatchExpiredError)


def test_openai_uploads_a_batch_file_and_creates_the_batch_with_its_id_in_metadata(
    config: LLMConfig, fakes: dict[str, Any],
) -> None:
    batch = lines("openai", "one", "two")
    run(config, "openai", lambda api: submit_and_collect(api, batch))
    upload, create = (request for request in fakes["openai"].batch_requests() if request.method == "POST")
    assert upload.path == "/v1/files" and b'name="purpose"\r\n\r\nbatch' in upload.raw_body
    assert b'filename="llmq-pbatch_test.jsonl"' in upload.raw_body
    first = json.loads(upload.raw_body.split(b"\r\n\r\n")[-1].split(b"\n")[0])
    assert first == {"custom_id": "job_0", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one"}], "max_tokens": 2000,
        "stream": False, "temperature": 0.5}}
    assert create.path == "/v1/batches" and create.body["endpoint"] == "/v1/chat/completions"
    assert (create.body["completion_window"], create.body["metadata"]) == ("24h", {"llmq_provider_batch": "pbatch_test"})
    assert create.header("authorization") == f"Bearer {DEFAULT_API_KEY}"


def test_azure_sends_the_deployment_in_each_line_on_azures_paths(config: LLMConfig, fakes: dict[str, Any]) -> None:
    batch = lines("azure", "one")
    run(config, "azure", lambda api: submit_and_collect(api, batch))
    upload, create = (request for request in fakes["openai"].batch_requests() if request.method == "POST")
    assert (upload.path, upload.query["api-version"]) == ("/openai/files", ["2024-10-21"])
    line = json.loads(upload.raw_body.split(b"\r\n\r\n")[-1].split(b"\n")[0])
    assert (line["url"], line["body"]["model"]) == ("/chat/completions", "mini-eu")
    assert create.path == "/openai/batches" and create.body["endpoint"] == "/chat/completions"
    assert create.header("api-key") == DEFAULT_API_KEY


def test_anthropic_sends_custom_ids_and_messages_params(config: LLMConfig, fakes: dict[str, Any]) -> None:
    batch = lines("anthropic", "one")
    run(config, "anthropic", lambda api: submit_and_collect(api, batch))
    create = next(request for request in fakes["anthropic"].batch_requests() if request.method == "POST")
    assert create.path == "/v1/messages/batches" and create.header("anthropic-version") == "2023-06-01"
    assert create.body["requests"] == [{"custom_id": "job_0", "params": {
        "model": "claude-3-5-haiku-20241022", "max_tokens": 2000, "messages": [{"role": "user", "content": "one"}],
        "temperature": 0.5}}]


def test_gemini_sends_small_batches_inline_and_large_ones_as_an_uploaded_file(
    config: LLMConfig, fakes: dict[str, Any],
) -> None:
    run(config, "gemini", lambda api: submit_and_collect(api, lines("gemini", "one")))
    create = next(r for r in fakes["gemini"].batch_requests() if r.path.endswith(":batchGenerateContent"))
    entry = create.body["batch"]["input_config"]["requests"]["requests"][0]
    assert entry["metadata"] == {"key": "job_0"} and entry["request"]["contents"][0]["parts"] == [{"text": "one"}]
    assert create.body["batch"]["display_name"] == "pbatch_test"
    fakes["gemini"].reset()
    remote, results = run(config, "gemini_file", lambda api: submit_and_collect(api, lines("gemini_file", "one")))
    paths = [request.path for request in fakes["gemini"].batch_requests()]
    assert paths[:3] == ["/upload/v1beta/files", "/upload/v1beta/files", "/v1beta/models/gemini-2.0-flash:batchGenerateContent"]
    assert remote.handles["responses_file"] and results["job_0"].response is not None
    assert any(path.startswith("/download/v1beta/files/") for path in paths)


@pytest.mark.parametrize("name", ["openai", "azure", "anthropic", "gemini"])
def test_a_batch_whose_creation_answer_was_lost_is_found_again(config: LLMConfig, name: str) -> None:
    batch = lines(name, "one", "two")

    async def scenario(api: ProviderBatchAPI) -> None:
        started_s = time.time()
        assert await api.find("pbatch_lost", batch, started_s, frozenset()) is None
        made = await api.submit("pbatch_lost", batch, api.endpoint(batch[0].request), 86400)
        found = await api.find("pbatch_lost", batch, started_s, frozenset())
        assert found is not None and found.remote_id == made.remote_id
        if name != "anthropic":  # found by the id it carries, never another's
            assert await api.find("pbatch_other", batch, started_s, frozenset()) is None
        else:  # found by size and time: never one another provider batch holds
            assert await api.find("pbatch_lost", batch, started_s, frozenset({made.remote_id})) is None

    run(config, name, scenario)


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_a_cancelled_batch_ends_cancelled_with_its_unrun_lines_not_run(
    config: LLMConfig, fakes: dict[str, Any], name: str,
) -> None:
    for server in fakes.values():
        server.timing = BatchTiming(validating_s=0.05, in_progress_s=30, window_s=60, cancel_s=0.05)
    batch = lines(name, "one", "two")

    async def scenario(api: ProviderBatchAPI) -> dict[str, LineResult]:
        remote = await api.submit("pbatch_cancel", batch, api.endpoint(batch[0].request), 86400)
        cancelling = await api.cancel(remote.remote_id)
        assert cancelling.state in ("cancelling", "cancelled") or name == "gemini"  # Gemini shows RUNNING meanwhile
        remote = await until_ended(api, cancelling)
        assert remote.state == "cancelled"
        return {result.key: result async for result in api.results(remote, batch)}

    results = run(config, name, scenario)
    assert all(isinstance(result.error, errors.ProviderBatchError) for result in results.values())
    assert not any(isinstance(result.error, errors.ProviderBatchExpiredError) for result in results.values())
