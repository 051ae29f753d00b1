"""Every error the front answers, in OpenAI's error JSON with OpenAI's status, so the official SDK
raises its usual exception; and raw HTTP for what an SDK never sends (bad JSON, oversize bodies,
bad keys)."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import openai
import pytest
import redis

from llmq.contract import keys
from llmq.http.errors import JOB_ID_HEADER
from tests.http.conftest import FrontStack
from tests.http.support import FrontProcess
from tests.support.fakes.openai import FakeOpenAI

MESSAGES = [{"role": "user", "content": "Biome: desert."}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}


def error_of(reply: httpx.Response) -> dict[str, object]:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- through the SDK ------------------------------------------------------------------------


def test_a_wrong_key_is_an_authentication_error(stack: FrontStack) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        stack.client("sk-llmq-not-a-key").chat.completions.create(**CHAT)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"  # type: ignore[attr-defined]
    assert "sk-llmq-not-a-key" not in refused.value.message


def test_a_model_the_key_may_not_use_is_permission_denied(stack: FrontStack) -> None:
    _, key = stack.key("--models", "gpt-4o")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        stack.client(key).chat.completions.create(**CHAT)
    assert refused.value.param == "model"  # type: ignore[attr-defined]
    assert stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content


def test_a_model_no_provider_serves_is_not_found(stack: FrontStack) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        stack.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert refused.value.param == "model" and refused.value.code == "model_not_found"  # type: ignore[attr-defined]


def test_a_key_over_its_requests_per_minute_is_rate_limited_with_retry_after(stack: FrontStack) -> None:
    _, key = stack.key("--rpm", "1")
    client = stack.client(key)
    client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**CHAT)
    assert limited.value.code == "requests_per_minute"  # type: ignore[attr-defined]
    assert 50 <= int(limited.value.response.headers["retry-after"]) <= 60
    # Another key is not held back by this one's limit.
    assert stack.client().chat.completions.create(**CHAT).choices


def test_a_key_whose_daily_budget_is_spent_is_rate_limited_until_midnight_utc(stack: FrontStack) -> None:
    name, key = stack.key("--daily-usd", "0.05")
    client = stack.client(key)
    client.chat.completions.create(**CHAT)  # at a cent a token this spends more than $0.05
    spent = redis.Redis.from_url(stack.cluster.redis_url, decode_responses=True)
    day = int(time.time() // 86400)
    assert Decimal(spent.get(keys.budget_spend_day("caller", name, day)) or 0) >= 50_000  # micro-USD, counted by the worker
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**CHAT)
    assert limited.value.code == "daily_usd"  # type: ignore[attr-defined]
    seconds_to_midnight = (day + 1) * 86400 - time.time()
    assert abs(int(limited.value.response.headers["retry-after"]) - seconds_to_midnight) < 5


def test_a_spent_key_s_queued_jobs_are_held_by_the_workers_and_its_batches_refused(stack: FrontStack) -> None:
    from llmq.client.sync import SyncLLMService
    from llmq.contract.models import JobState

    name, key = stack.key("--daily-usd", "0.05")
    client = stack.client(key)
    client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError):
        client.batches.create(input_file_id="file-any", endpoint="/v1/chat/completions", completion_window="24h")
    # A job of that caller already queued (a batch's, say) carries the key's budget: the worker holds it.
    with SyncLLMService(stack.cluster.config, redis_url=stack.cluster.redis_url) as service:
        job_id = service.submit({**CHAT, "metadata": {"caller": name}}, caller_daily_usd=0.05)
        deadline = time.monotonic() + 20
        while (job := service.poll(job_id)).state is not JobState.RATE_LIMITED:
            assert not job.state.terminal and time.monotonic() < deadline, job.state
            time.sleep(0.1)
        service.cancel(job_id)


def test_a_job_that_fails_on_every_provider_is_a_502_that_the_sdk_does_not_retry(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.poison("POISON-500", 500)
    client = stack.client(max_retries=2)  # the SDK's default retries: x-should-retry stops them
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "POISON-500"}])
    assert failed.value.status_code == 502 and failed.value.response.headers["x-should-retry"] == "false"
    assert failed.value.response.headers[JOB_ID_HEADER] in failed.value.message
    assert len([request for request in fake.requests if b"POISON-500" in request.raw_body]) == 1  # fast_retry(1), no SDK retry


def test_a_request_the_provider_refuses_is_a_400_not_a_502(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.poison("POISON-400", 400)
    with pytest.raises(openai.BadRequestError):
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "POISON-400"}])


def test_a_stream_whose_job_fails_before_any_output_is_a_502(stack: FrontStack, fake: FakeOpenAI) -> None:
    fake.poison("POISON-500", 500)
    with pytest.raises(openai.InternalServerError) as failed:
        list(stack.client().chat.completions.create(model="gpt-4o-mini", stream=True,
                                                   messages=[{"role": "user", "content": "POISON-500"}]))
    assert failed.value.status_code == 502


def test_a_job_past_its_deadline_is_a_504(stack: FrontStack, fake: FakeOpenAI, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake.latency_s = 8.0
    front = FrontProcess(stack.cluster, tmp_path / "front.log", ("--request-timeout", "1")).start()
    try:
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key=stack.key()[1], max_retries=0)
        with pytest.raises(openai.InternalServerError) as timed_out:
            client.chat.completions.create(**CHAT)
        assert timed_out.value.status_code == 504 and timed_out.value.code == "deadline_exceeded"  # type: ignore[attr-defined]
    finally:
        front.stop()


# --- raw HTTP -------------------------------------------------------------------------------


def post(stack: FrontStack, path: str, *, key: str | None = None, **options: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{stack.base_url}{path}", headers=headers, timeout=30, **options)  # type: ignore[arg-type]


def test_no_key_or_another_scheme_is_401(stack: FrontStack) -> None:
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer"}):
        reply = httpx.post(f"{stack.base_url}/chat/completions", json=CHAT, headers=headers)
        assert reply.status_code == 401 and error_of(reply)["type"] == "invalid_request_error"


def test_malformed_json_and_a_body_that_is_no_object_are_400(stack: FrontStack) -> None:
    _, key = stack.key()
    bad_json = post(stack, "/chat/completions", key=key, content=b'{"model": "gpt-4o-mini", ')
    assert bad_json.status_code == 400 and error_of(bad_json)["code"] == "invalid_json"
    listed = post(stack, "/chat/completions", key=key, json=[CHAT])
    assert listed.status_code == 400
    no_messages = post(stack, "/chat/completions", key=key, json={"model": "gpt-4o-mini"})
    assert no_messages.status_code == 400 and error_of(no_messages)["param"] == "messages"
    bad_role = post(stack, "/chat/completions", key=key, json={"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]})
    assert bad_role.status_code == 400 and error_of(bad_role)["param"] == "messages[0].role"
    unknown = post(stack, "/chat/completions", key=key, json={**CHAT, "frobnicate": 1})
    assert unknown.status_code == 400 and error_of(unknown)["param"] == "frobnicate"


def test_an_oversize_body_is_413_before_it_is_read(stack: FrontStack) -> None:
    _, key = stack.key()
    huge = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * (33 * 1024 * 1024) + b'"}]}'
    declared = post(stack, "/chat/completions", key=key, content=huge)
    assert declared.status_code == 413 and error_of(declared)["code"] == "request_too_large"

    def chunks():  # no content-length: chunked transfer, refused once it passes the limit
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    streamed = post(stack, "/chat/completions", key=key, content=chunks())
    assert streamed.status_code == 413


def test_unknown_paths_and_methods_answer_in_openai_shape(stack: FrontStack) -> None:
    _, key = stack.key()
    missing = httpx.get(f"{stack.base_url}/assistants", headers={"authorization": f"Bearer {key}"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "unknown_url"
    wrong_method = httpx.delete(f"{stack.base_url}/chat/completions", headers={"authorization": f"Bearer {key}"})
    assert wrong_method.status_code == 405


def test_no_cors_unless_configured(stack: FrontStack) -> None:
    preflight = httpx.options(f"{stack.base_url}/chat/completions", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_only_for_the_configured_origins(stack: FrontStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    front = FrontProcess(stack.cluster, tmp_path / "front.log", ("--cors-origin", "https://app.example")).start()
    try:
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(f"{front.url}/v1/chat/completions", headers={
                "origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization"})

        assert preflight("https://app.example").headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    finally:
        front.stop()


def test_serve_binds_loopback_unless_told() -> None:
    from llmq.cli.main import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_keys_never_reach_the_front_s_log(stack: FrontStack) -> None:
    _, key = stack.key()
    httpx.post(f"{stack.base_url}/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    assert key not in stack.front.log() and "sk-llmq-" not in stack.front.log()
