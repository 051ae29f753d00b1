"""Any text in any text field: NUL, other control characters, lone surrogates and the
escape mark itself go into SQLite and PostgreSQL and come back unchanged."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text as sql

from llmq.contract.schema import TEXT_ESCAPE, escape_text, unescape_text
from llmq.worker.store.ledger import Store

EXAMPLES = settings(
    max_examples=int(os.environ.get("RELIABILITY_EXAMPLES", "40")), deadline=None,
    # One store serves every example (each writes rows of its own ids).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: Every code point, surrogates and noncharacters included, with the troublesome ones drawn often.
any_text = st.text(
    alphabet=st.one_of(st.characters(codec=None, categories=None), st.sampled_from(["\x00", "\ud800", "\udfff",
                                                                                      TEXT_ESCAPE, "\x1b", "\x7f"])),
    max_size=40,
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)

JOB_TEXT = ("batch_id", "custom_id", "requested_model", "provider", "model", "caller", "content", "error_type",
            "error_message")
ATTEMPT_TEXT = ("provider", "model", "outcome", "error_type", "error_message", "provider_request_id")
USAGE_TEXT = ("provider", "provider_type", "model", "caller", "batch_id")
_ids = itertools.count()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


@EXAMPLES
@given(value=any_text)
def test_escaping_is_reversible_and_leaves_nothing_a_database_refuses(value: str) -> None:
    stored = escape_text(value)
    assert unescape_text(stored) == value
    assert "\x00" not in stored
    stored.encode("utf-8")  # no lone surrogate left
    if not any(char in ("\x00", TEXT_ESCAPE) or "\ud800" <= char <= "\udfff" for char in value):
        assert stored == value  # ordinary text is stored as it is


@EXAMPLES
@given(texts=st.fixed_dictionaries({name: any_text for name in {*JOB_TEXT, *ATTEMPT_TEXT, *USAGE_TEXT}}),
       metadata=st.dictionaries(any_text, json_value, max_size=4), job_id=any_text)
def test_every_text_field_comes_back_as_it_was_written(
    store: Store, texts: dict[str, str], metadata: dict[str, Any], job_id: str
) -> None:
    job_id = f"{job_id}#{next(_ids)}"  # any text, unique per example
    store.write([
        {"kind": "job", "job_id": job_id, "state": "succeeded", "metadata": metadata,
         **{name: texts[name] for name in JOB_TEXT}},
        {"kind": "attempt", "job_id": job_id, "attempt": 1, **{name: texts[name] for name in ATTEMPT_TEXT}},
        {"kind": "usage", "job_id": job_id, "attempt": 1, **{name: texts[name] for name in USAGE_TEXT}},
    ])
    job = store.job(job_id)
    assert job is not None
    assert {name: job[name] for name in (*JOB_TEXT, "job_id", "metadata")} == {
        **{name: texts[name] for name in JOB_TEXT}, "job_id": job_id, "metadata": metadata}
    [attempt] = store.attempts(job_id)
    assert {name: attempt[name] for name in ATTEMPT_TEXT} == {name: texts[name] for name in ATTEMPT_TEXT}
    [usage] = store.usage_rows(job_id)
    assert {name: usage[name] for name in USAGE_TEXT} == {name: texts[name] for name in USAGE_TEXT}


def test_reports_group_by_the_text_as_written(store: Store) -> None:
    callers = ["a\x00b", "a\x00c", "a", TEXT_ESCAPE + "0000"]
    store.write([{"kind": "usage", "job_id": f"job-{index}", "attempt": 1, "caller": caller}
                 for index, caller in enumerate(callers)])
    assert [row["caller"] for row in store.usage_report(by="caller")] == sorted(callers, key=escape_text)
    assert [row["caller"] for row in store.usage_rows()] == callers


def test_ordinary_text_reads_the_same_in_a_sql_shell(store: Store) -> None:
    store.write([{"kind": "job", "job_id": "job-1", "state": "succeeded", "content": "tab\there, ünïcode ✓",
                  "custom_id": "nul\x00here"}])
    with store.engine.connect() as connection:
        content, custom_id = connection.execute(
            sql("SELECT content, custom_id FROM llmq_jobs WHERE job_id = 'job-1'")).one()
    assert content == "tab\there, ünïcode ✓"
    assert custom_id == f"nul{TEXT_ESCAPE}0000here"
