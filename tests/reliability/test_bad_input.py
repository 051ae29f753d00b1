"""Scenario 5: bad input, property-based. Requests and JSONL batch files are generated
valid, then broken in one known way; every broken one must be refused with a message
naming the field (and the line, for files), nothing may be half-enqueued, and the
valid neighbours must go through unchanged. Oversized input is refused, never cut.

No workers for refusals: they happen in the caller's process, before Redis is touched.
The last part sends what is not refused (hostile text in prompts, ids, metadata and
answers) through a real worker into SQLite and PostgreSQL, and reads it back.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmq.cli.embedded import RedisServer
from llmq.client.batchfile import MAX_LINE_BYTES, read_batch_file
from llmq.client.service import BatchItem, RequestError
from llmq.client.sync import SyncLLMService
from llmq.contract import keys
from llmq.contract.config import parse_config
from llmq.contract.models import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_METADATA_BYTES,
    MAX_OUTPUT_TOKENS,
    JobState,
    LLMRequest,
    replace_lone_surrogates,
)
from llmq.worker.store.ledger import Store
from tests.reliability.support import job_keys, ledger_complete, wait_until
from tests.support.fakes.openai import FakeOpenAI
from tests.support.harness import Cluster, openai_entry, service_config, start_cluster

MODELS = ["gpt-4o-mini", "gpt-4o"]
ROLES = ["system", "user", "assistant"]
CONFIG = """
llm_service:
  providers:
    primary:
      type: mock
      models: [gpt-4o-mini, gpt-4o]
"""
#: Modest for CI; RELIABILITY_EXAMPLES=1000 for a deeper hunt.
EXAMPLES = settings(
    max_examples=int(os.environ.get("RELIABILITY_EXAMPLES", "30")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

Mutation = tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]


@pytest.fixture(scope="module")
def service(redis_server: RedisServer) -> Iterator[SyncLLMService]:
    with SyncLLMService(parse_config(CONFIG), redis_url=redis_server.url) as opened:
        yield opened


@pytest.fixture(scope="module")
def raw_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield connection
    connection.close()


# --- strategies ---------------------------------------------------------------------------

# Lone surrogates are left out here: they are the subject of two tests of their own below.
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
#: A metadata key: any text but NUL, which is refused (one of the mutations below).
key = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key, inner, max_size=3),
    max_leaves=6,
)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text})
valid_request = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3), "model": st.sampled_from(MODELS)},
    optional={
        "temperature": st.floats(0.0, 2.0),
        "max_tokens": st.integers(1, MAX_OUTPUT_TOKENS),
        "stream": st.booleans(),
        "provider": st.just("primary"),
        "metadata": st.dictionaries(key, json_value, max_size=3),
    },
)


def token(fragment: str) -> str:
    """What names the field in an expected refusal: `messages.0.role`, or `body: messages.0.role` in a file."""
    if fragment.startswith("body: "):
        inner = token(fragment.removeprefix("body: "))
        return inner if " " in inner else f"body: {inner}"
    return fragment.split(":")[0]


def put(path: list[Any], values: st.SearchStrategy[Any], fragment: str) -> st.SearchStrategy[Mutation]:
    """Set the value at `path`; the refusal must contain `fragment`."""

    def make(value: Any) -> Mutation:
        def mutate(request: dict[str, Any]) -> dict[str, Any]:
            target = request
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value
            return request

        return fragment, mutate

    return values.map(make)


def drop(path: list[Any], fragment: str) -> st.SearchStrategy[Mutation]:
    def mutate(request: dict[str, Any]) -> dict[str, Any]:
        target = request
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return request

    return st.just((fragment, mutate))


mutation = st.one_of(
    drop(["messages"], "messages: Field required"),
    drop(["model"], "model: Field required"),
    put(["messages"], st.just([]), "messages: List should have at least 1 item"),
    put(["messages"], st.sampled_from(["hi", 3, None, {"role": "user"}]), "messages"),
    put(["messages", 0, "role"], text.filter(lambda role: role not in (*ROLES, "tool", "developer")) | st.none()
        | st.integers(), "messages.0.role"),
    put(["messages", 0, "content"], st.integers() | st.none() | st.lists(st.integers(), max_size=2), "messages.0.content"),
    drop(["messages", 0, "content"], "messages.0.content"),
    put(["messages", 0, "nickname"], json_value, "messages.0.nickname: Extra inputs are not permitted"),
    put(["temperature"], st.floats().filter(lambda t: not 0 <= t <= 2) | st.sampled_from(["hot", "", None]),
        "temperature"),
    put(["max_tokens"], st.integers().filter(lambda n: not 1 <= n <= MAX_OUTPUT_TOKENS)
        | st.floats(1.1, 1e6).filter(lambda f: not f.is_integer()) | st.sampled_from(["ten", None]), "max_tokens"),
    put(["model"], st.sampled_from(["", " ", "\t\n"]), "model"),
    put(["model"], st.text(min_size=257, max_size=300), "model"),
    # (An explicit provider takes any model name: its own list may be longer than the config's.)
    put(["model"], text.filter(lambda m: m.strip() != "" and m not in MODELS), "no configured provider serves it")
    .map(lambda broken: (broken[0], lambda request: {k: v for k, v in broken[1](request).items() if k != "provider"})),
    put(["provider"], text.filter(lambda p: p not in ("", "primary")), "is not in the config"),
    put(["provider"], st.just(""), "provider"),
    put(["stream"], st.lists(st.integers(), max_size=2) | st.dictionaries(text, text, max_size=1), "stream"),
    put(["metadata"], st.lists(st.integers(), max_size=2) | text | st.integers(), "metadata"),
    put(["metadata"], st.just({"blob": "x" * (MAX_METADATA_BYTES + 1)}), "metadata is"),
    put(["metadata"], key.map(lambda name: {"outer": {name + "\x00": 1}}), "metadata: key"),
    put(["surprise"], json_value, "surprise: Extra inputs are not permitted"),
)


# --- single requests -------------------------------------------------------------------------


@EXAMPLES
@given(request=valid_request)
def test_a_valid_request_is_accepted_unchanged(service: SyncLLMService, request: dict[str, Any]) -> None:
    assert service.prepare(request) == LLMRequest.model_validate(request)


@EXAMPLES
@given(request=valid_request, broken=mutation)
def test_an_invalid_request_is_refused_naming_its_field(
    service: SyncLLMService, request: dict[str, Any], broken: Mutation
) -> None:
    fragment, mutate = broken
    with pytest.raises(RequestError) as refused:
        service.prepare(mutate(copy.deepcopy(request)))
    assert fragment in str(refused.value)


# --- batches ------------------------------------------------------------------------------------


def enqueued(connection: redis.Redis) -> tuple[list[str], list[str], int]:
    """Job records, batch records and Celery messages now in Redis."""
    batches = [key for key in connection.scan_iter(keys.batch("") + "*")]
    return job_keys(connection), batches, int(connection.llen(keys.queue_name("primary")))


@EXAMPLES
@given(entries=st.lists(st.tuples(valid_request, st.none() | mutation), min_size=1, max_size=8))
def test_a_batch_with_bad_items_enqueues_nothing_and_its_good_items_go_through_alone(
    service: SyncLLMService, raw_redis: redis.Redis, entries: list[tuple[dict[str, Any], Mutation | None]]
) -> None:
    raw_redis.flushall()
    requests = [broken[1](copy.deepcopy(base)) if broken else base for base, broken in entries]
    bad = [index + 1 for index, (_, broken) in enumerate(entries) if broken]
    if bad:
        with pytest.raises(RequestError, match="nothing enqueued") as refused:
            service.submit_batch(requests, batch_id="batch_refused")
        assert [where for where, _ in refused.value.problems] == [f"item {index}" for index in bad]
        for (where, problem), index in zip(refused.value.problems, bad):
            assert token(entries[index - 1][1][0]) in problem, (where, problem)
        assert enqueued(raw_redis) == ([], [], 0)
    good = [request for request, (_, broken) in zip(requests, entries) if not broken]
    if good:
        batch_id = service.submit_batch(good)
        assert [job.request for job in service.results(batch_id)] == [LLMRequest.model_validate(item) for item in good]
        assert enqueued(raw_redis)[2] == len(good)


# --- JSONL batch files ------------------------------------------------------------------------


@st.composite
def batch_file(draw: st.DrawFn) -> tuple[list[bytes], dict[int, str], list[tuple[str, dict[str, Any]]]]:
    """Lines, {bad line number: fragment its refusal must hold}, and the valid (custom_id, body) in order."""
    lines: list[bytes] = []
    bad: dict[int, str] = {}
    valid: list[tuple[str, dict[str, Any]]] = []
    for number in range(1, draw(st.integers(1, 8)) + 1):
        kind = draw(st.sampled_from(["valid", "valid", "blank", "not_json", "not_object", "unknown_key",
                                     "bad_custom_id", "body_not_object", "body_invalid", "duplicate"]))
        custom_id, body = f"c{number}", draw(valid_request)
        line: Any = {"custom_id": custom_id, "body": body}
        if kind == "duplicate" and valid:
            line["custom_id"] = draw(st.sampled_from([seen for seen, _ in valid]))
            bad[number] = "repeats line"
        elif kind == "blank":
            lines.append(draw(st.sampled_from([b"", b"   ", b"\t"])))
            continue
        elif kind == "not_json":
            lines.append(draw(st.sampled_from([b'{"custom_id": "x", "body": ', b"custom_id=x", b'{"a": 1,}', b"[1, 2"])))
            bad[number] = "not valid JSON"
            continue
        elif kind == "not_object":
            line = draw(st.lists(st.integers(), max_size=2) | st.integers() | text.filter(lambda s: s.strip()))
            bad[number] = "must be a JSON object"
        elif kind == "unknown_key":
            line["response"] = None
            bad[number] = "unknown key 'response'"
        elif kind == "bad_custom_id":
            value = draw(st.sampled_from([None, 5, "", "   ", "x" * 257, ["c"]]))
            line["custom_id"] = value
            bad[number] = "custom_id must be"
        elif kind == "body_not_object":
            line["body"] = draw(st.sampled_from([[], "hello", 3, None]))
            bad[number] = "body must be a JSON object"
        elif kind == "body_invalid":
            fragment, mutate = draw(mutation)
            line["body"] = mutate(body)
            bad[number] = f"body: {fragment}"
        else:
            valid.append((custom_id, body))
        lines.append(json.dumps(line).encode())
    return lines, bad, valid


def write_lines(lines: list[bytes]) -> Path:
    handle = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False)
    with handle:
        handle.write(b"\n".join(lines) + b"\n")
    return Path(handle.name)


@EXAMPLES
@given(drawn=batch_file())
def test_a_batch_file_is_refused_line_by_line_or_read_whole(
    service: SyncLLMService, drawn: tuple[list[bytes], dict[int, str], list[tuple[str, dict[str, Any]]]]
) -> None:
    lines, bad, valid = drawn
    path = write_lines(lines)
    try:
        if bad:
            with pytest.raises(RequestError, match="refused, nothing enqueued") as refused:
                read_batch_file(path, service.service)
            assert [where for where, _ in refused.value.problems] == [f"line {number}" for number in sorted(bad)]
            for (where, problem), number in zip(refused.value.problems, sorted(bad)):
                assert token(bad[number]) in problem, (where, problem, bad[number])
        elif not valid:
            with pytest.raises(RequestError, match="holds no requests"):
                read_batch_file(path, service.service)
        else:
            items = read_batch_file(path, service.service)
            assert [(item.custom_id, item.request) for item in items] == [
                (custom_id, LLMRequest.model_validate(body)) for custom_id, body in valid
            ]
    finally:
        path.unlink()


# --- oversized input ----------------------------------------------------------------------------


def small(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "model": "gpt-4o-mini", **extra}


def test_an_oversized_line_is_refused_and_named_while_its_neighbours_pass(service: SyncLLMService) -> None:
    huge = json.dumps({"custom_id": "big", "body": small("x" * MAX_LINE_BYTES)}).encode()
    lines = [json.dumps({"custom_id": f"c{n}", "body": small()}).encode() for n in range(3)]
    path = write_lines([lines[0], huge, lines[1], lines[2]])
    try:
        with pytest.raises(RequestError) as refused:
            read_batch_file(path, service.service)
    finally:
        path.unlink()
    limit = f"is {len(huge) + 1} bytes; the limit is {MAX_LINE_BYTES} (split the request)"
    assert refused.value.problems == [("line 2", limit)]  # the line is named; its neighbours are not


@pytest.mark.parametrize(
    ("request_body", "fragment"),
    [
        (small("x" * (MAX_MESSAGE_CHARS + 1)), f"messages.0.content: String should have at most {MAX_MESSAGE_CHARS}"),
        ({"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1), "model": "gpt-4o-mini"},
         f"messages: List should have at most {MAX_MESSAGES}"),
        (small(metadata={"blob": "x" * MAX_METADATA_BYTES}), f"keep it under {MAX_METADATA_BYTES} bytes"),
        (small(max_tokens=MAX_OUTPUT_TOKENS + 1), "max_tokens: Input should be less than or equal to"),
    ],
    ids=["message", "message-count", "metadata", "max-tokens"],
)
def test_oversized_requests_are_refused_not_truncated(
    service: SyncLLMService, request_body: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(RequestError, match=fragment.replace(".", r"\.")):
        service.prepare(request_body)


def test_the_largest_accepted_message_is_stored_whole(service: SyncLLMService, raw_redis: redis.Redis) -> None:
    raw_redis.flushall()
    content = "y" * MAX_MESSAGE_CHARS
    job_id = service.submit(small(content))
    assert service.poll(job_id).request.messages[0].content == content


# --- lone surrogates: refused at the edge, never half-enqueued -----------------------------------


def test_metadata_that_is_not_utf8_is_refused_at_the_edge(service: SyncLLMService, raw_redis: redis.Redis) -> None:
    raw_redis.flushall()
    with pytest.raises(RequestError, match="metadata"):
        service.submit_batch([small(), small(metadata={"note": "\ud800"})], batch_id="batch_surrogate")
    assert enqueued(raw_redis) == ([], [], 0)


def test_a_custom_id_that_is_not_utf8_is_refused_with_its_line(service: SyncLLMService) -> None:
    line = json.dumps({"custom_id": "\ud800", "body": small("hi")}).encode()  # JSON escapes it: "\\ud800"
    path = write_lines([line])
    try:
        with pytest.raises(RequestError, match="line 1: custom_id"):
            read_batch_file(path, service.service)
    finally:
        path.unlink()


def test_batch_items_are_refused_with_their_custom_ids(service: SyncLLMService, raw_redis: redis.Redis) -> None:
    raw_redis.flushall()
    items = [BatchItem(LLMRequest.model_validate(small()), "a"), BatchItem(LLMRequest.model_validate(small()), "a")]
    with pytest.raises(RequestError, match=r"item 2 \(custom_id 'a'\): custom_id repeats item 1"):
        service.submit_batch(items)
    assert enqueued(raw_redis) == ([], [], 0)


# --- stored faithfully: hostile text through a real worker into SQLite and PostgreSQL -------------
#
# What is not refused must come back as it went in: NUL and control characters in prompts,
# custom ids and metadata values, and a provider answering with control characters, lone
# surrogates (the one thing changed: each becomes U+FFFD, as it is not text) and very long text.
# The fake answers with the JSON-decoded last message, so each prompt asks for its reply.

#: Text with the characters a database or a driver trips on drawn often.
hostile = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\r", "\ufffe",
                                                                        "\uffff", "\u2028"])),
    max_size=30,
)
#: A provider's answer: hostile text, lone surrogates, or long text.
reply = st.one_of(
    hostile,
    st.lists(st.sampled_from(["\ud800", "\udfff", "\ud83d", "a\x00b", "\uffff0000"]), min_size=1, max_size=6).map("".join),
    # Long, yet under the request limit once JSON-escaped in the prompt that asks for it.
    st.tuples(hostile.filter(bool), st.integers(1_000, 4_000)).map(lambda repeat: repeat[0] * repeat[1]),
)
StoredItem = tuple[str, str, str]  # (prompt, reply, metadata value)
STORED_EXAMPLES = settings(
    max_examples=int(os.environ.get("RELIABILITY_EXAMPLES", "8")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)



@pytest.fixture(scope="module")
def echoing_fake() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    fake.answer = json.loads
    yield fake
    fake.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hostile_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, echoing_fake: FakeOpenAI
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    database_url = None if request.param == "sqlite" else request.getfixturevalue("postgres").create_schema("hostile")
    # Room for the long answers and the long prompts that ask for them (the fake has no limit of its own).
    roomy = {"*": {"max_output_tokens": MAX_OUTPUT_TOKENS, "context_window": 10 * MAX_OUTPUT_TOKENS}}
    cluster = start_cluster(root, service_config({"primary": openai_entry(echoing_fake, capabilities=roomy)}),
                            database_url=database_url)
    cluster.start_workers(1, concurrency=20)
    yield cluster
    cluster.stop()


@STORED_EXAMPLES
@given(items=st.lists(st.tuples(hostile, reply, hostile), min_size=1, max_size=4))
@example(items=[("nul\x00 and\x1b[31m escapes", "a lone \ud800, a NUL \x00, the mark \uffff0000", "n\x00te"),
                ("long", "forty thousand characters \x07 " * 1250, "")])
def test_hostile_text_is_stored_faithfully_in_redis_and_the_ledger(
    hostile_cluster: Cluster, items: list[StoredItem]
) -> None:
    prefix = uuid.uuid4().hex[:8]
    batch = [
        BatchItem(LLMRequest(messages=[{"role": "user", "content": prompt}, {"role": "user", "content": json.dumps(answer)}],
                             model="gpt-4o-mini", max_tokens=MAX_OUTPUT_TOKENS,
                             metadata={"caller": f"caller\x00{note}", "note": note}),
                  custom_id=f"{prefix}\x01{index}\x1b{note}".replace("\x00", ""))
        for index, (prompt, answer, note) in enumerate(items)
    ]
    with hostile_cluster.service() as service:
        batch_id = service.submit_batch(batch)
        finished = service.wait(batch_id, timeout_s=120)
        records = service.results(batch_id)
    assert finished.counts[JobState.SUCCEEDED] == len(items)
    for record, item, (prompt, answer, note) in zip(records, batch, items):
        assert record.custom_id == item.custom_id and record.request == item.request
        assert record.result is not None and record.result.content == replace_lone_surrogates(answer)
    wait_until(lambda: ledger_complete(hostile_cluster.redis_url, hostile_cluster.database_url, records), 60,
               "the worker's flusher to write every row")
    with Store(hostile_cluster.database_url) as store:
        for record, item in zip(records, batch):
            row = store.job(record.job_id)
            assert row is not None
            assert (row["custom_id"], row["content"], row["metadata"], row["caller"]) == (
                item.custom_id, record.result.content, item.request.metadata, item.request.metadata["caller"])
        assert store.quarantined_count() == 0


def test_a_provider_error_holding_a_lone_surrogate_is_recorded_and_the_job_goes_on(
    hostile_cluster: Cluster, echoing_fake: FakeOpenAI
) -> None:
    # Redis's Lua JSON decoder refuses "\ud800": recorded as it was, the attempt would never be.
    echoing_fake.fail_next(500, body={"error": {"message": "upstream \ud800 broke", "type": "server_error"}})
    with hostile_cluster.service() as service:
        record = service.wait(service.submit(small(json.dumps("fine"), max_tokens=16)), timeout_s=60)
    assert record.state is JobState.SUCCEEDED and record.result.content == "fine"
    assert [attempt["outcome"] for attempt in record.attempts] == ["error", "succeeded"]
    assert "upstream \ufffd broke" in record.attempts[0]["error_message"]
    wait_until(lambda: ledger_complete(hostile_cluster.redis_url, hostile_cluster.database_url, [record]), 60,
               "the worker's flusher to write every row")
