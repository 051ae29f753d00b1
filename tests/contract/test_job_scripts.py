"""The job-state Lua scripts (producer/contract/lua/) through `JobStore`, against a real redis-server.

One section per script: create_job, claim, transition, promote, reap, recheck, release_lock.
Each test drives a job through the scripts the way the client and the worker do and looks
at what Redis holds afterwards: the job hash, its batch's counters, the delayed, lease and
deadline sets, the attempts list and the SQL outbox.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llmq.contract import keys
from llmq.contract.jobs import (
    ACTIVE_STATES,
    PROMOTE_IN_FLIGHT_MS,
    PUBLISH_GRACE_MS,
    RESTART_RECHECK_MS,
    WAITING_STATES,
    JobStore,
    Promoted,
    Transition,
)
from llmq.contract.models import TERMINAL_STATES, JobState
from tests.support.jobs import new_job, with_job_store

RUNNING = (JobState.RUNNING,)
LEASE_MS = 30_000
TTL_S = 600
#: Slack for Redis's clock moving between a script and the test's reading of it (ms).
CLOCK_SLACK_MS = 2_000


async def outbox(store: JobStore) -> list[dict[str, Any]]:
    return [json.loads(row) for row in await store.redis.lrange(keys.OUTBOX, 0, -1)]


async def batch_counts(store: JobStore, batch_id: str) -> dict[JobState, int]:
    record = await store.batch(batch_id)
    assert record is not None
    return {state: count for state, count in record.counts.items() if count}


async def state_of(store: JobStore, job_id: str) -> JobState:
    record = await store.get(job_id)
    assert record is not None
    return record.state


async def create(store: JobStore, *job_ids: str, batch_id: str | None = None, **options: Any) -> None:
    await store.create_many([new_job(job_id, batch_id=batch_id, **options) for job_id in job_ids], TTL_S)


async def created_and_running(
    store: JobStore, job_id: str, batch_id: str | None = None, lease_ms: int = LEASE_MS,
) -> None:
    await create(store, job_id, batch_id=batch_id)
    assert (await store.claim(job_id, 1, "worker-a", lease_ms)).outcome == "ok"


async def finish(store: JobStore, job_id: str, state: JobState = JobState.SUCCEEDED, **options: Any) -> bool:
    done = await store.transition(job_id, new_state=state, allowed=RUNNING, ttl_s=TTL_S, **options)
    return done.moved


# --- create_job ---------------------------------------------------------------------------------


def test_create_writes_a_queued_record_with_its_watchdog_deadline_and_outbox_row(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        before = await store.now_ms()
        assert await store.create_many([new_job("job-1", deadline_s=60)], TTL_S) == [(True, "job-1")]
        raw = await store.redis.hgetall(keys.job("job-1"))
        assert raw["state"] == JobState.QUEUED
        assert (raw["dispatch"], raw["published"], raw["attempt"], raw["route_index"]) == ("1", "1", "0", "0")
        assert raw["queue"] == keys.queue_name("openai")
        created_at = int(raw["created_at"])
        assert before <= created_at and int(raw["deadline_at"]) == created_at + 60_000
        assert await store.redis.zscore(keys.DELAYED, "job-1") == created_at + PUBLISH_GRACE_MS
        assert await store.redis.zscore(keys.DEADLINES, "job-1") == created_at + 60_000
        assert TTL_S < await store.redis.ttl(keys.job("job-1")) <= TTL_S + 60
        assert await outbox(store) == [{"kind": "job", "job_id": "job-1"}]
        record = await store.get("job-1")
        assert record is not None and record.batch_id is None and record.custom_id is None

    with_job_store(redis_url, scenario)


def test_create_twice_with_one_job_id_keeps_the_first(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await store.create_many([new_job("job-1", prompt="first")], TTL_S)
        again = await store.create_many([new_job("job-1", prompt="second"), new_job("job-1", prompt="third")], TTL_S)
        assert again == [(False, "job-1"), (False, "job-1")]
        record = await store.get("job-1")
        assert record is not None and record.request.messages[0].content == "first"
        assert len(await outbox(store)) == 1 and await store.redis.zcard(keys.DEADLINES) == 1

    with_job_store(redis_url, scenario)


def test_create_dedups_by_custom_id_within_a_batch_only(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        results = await store.create_many(
            [
                new_job("job-1", batch_id="b1", custom_id="row-7"),
                new_job("job-2", batch_id="b1", custom_id="row-7"),
                new_job("job-3", batch_id="b2", custom_id="row-7"),
            ],
            TTL_S,
        )
        assert results == [(True, "job-1"), (False, "job-1"), (True, "job-3")]
        assert not await store.redis.exists(keys.job("job-2"))
        assert await store.redis.hget(keys.batch_custom_ids("b1"), "row-7") == "job-1"
        assert await store.redis.hget(keys.batch_custom_ids("b2"), "row-7") == "job-3"
        assert await store.batch_job_ids("b1") == ["job-1"]

    with_job_store(redis_url, scenario)


def test_create_counts_the_batch(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await store.create_batch("b1", TTL_S)
        await create(store, "job-1", "job-2", "job-3", batch_id="b1")
        await create(store, "job-2", batch_id="b1")  # a repeat counts nothing
        record = await store.batch("b1")
        assert record is not None and record.total == 3 and not record.done
        assert await batch_counts(store, "b1") == {JobState.QUEUED: 3}
        assert await store.batch_job_ids("b1") == ["job-1", "job-2", "job-3"]

    with_job_store(redis_url, scenario)


# --- claim --------------------------------------------------------------------------------------


def test_claim_starts_the_current_dispatch(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", batch_id="b1")
        before = await store.now_ms()
        claim = await store.claim("job-1", 1, "worker-a", LEASE_MS)
        assert (claim.outcome, claim.state) == ("ok", JobState.RUNNING)
        assert claim.job["state"] == JobState.RUNNING and claim.job["worker"] == "worker-a"
        assert (claim.job["attempt"], claim.job["hop_attempt"]) == ("1", "1")
        lease = await store.redis.zscore(keys.LEASES, "job-1")
        assert before + LEASE_MS <= lease <= before + LEASE_MS + CLOCK_SLACK_MS
        assert await store.redis.zscore(keys.DELAYED, "job-1") is None  # claimed: the watchdog steps back
        assert await batch_counts(store, "b1") == {JobState.RUNNING: 1}

    with_job_store(redis_url, scenario)


def test_claim_drops_a_stale_or_duplicate_dispatch(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", batch_id="b1")
        for stale in (0, 2):
            claim = await store.claim("job-1", stale, "worker-a", LEASE_MS)
            assert (claim.outcome, claim.state, claim.job) == ("skip", JobState.QUEUED, {})
        assert (await store.claim("job-1", 1, "worker-a", LEASE_MS)).outcome == "ok"
        duplicate = await store.claim("job-1", 1, "worker-b", LEASE_MS)
        assert (duplicate.outcome, duplicate.state) == ("skip", JobState.RUNNING)
        raw = await store.redis.hgetall(keys.job("job-1"))
        assert (raw["attempt"], raw["worker"]) == ("1", "worker-a")
        assert await batch_counts(store, "b1") == {JobState.RUNNING: 1}
        missing = await store.claim("job-nowhere", 1, "worker-a", LEASE_MS)
        assert (missing.outcome, missing.state) == ("skip", "missing")

    with_job_store(redis_url, scenario)


def test_claim_takes_a_job_waiting_in_any_waiting_state_on_its_new_dispatch(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        for waiting in (JobState.RETRYING, JobState.RATE_LIMITED):
            job_id = f"job-{waiting.value}"
            await created_and_running(store, job_id)
            done = await store.transition(
                job_id, new_state=waiting, allowed=RUNNING, expected_dispatch=1, delay_ms=0, new_dispatch=True,
            )
            assert done == Transition(moved=True, previous_state=JobState.RUNNING, dispatch=2)
            assert (await store.claim(job_id, 1, "worker-a", LEASE_MS)).outcome == "skip"
            claim = await store.claim(job_id, 2, "worker-b", LEASE_MS)
            assert claim.outcome == "ok" and claim.job["attempt"] == "2"

    with_job_store(redis_url, scenario)


def test_claim_past_the_deadline_is_expired_and_changes_nothing(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", batch_id="b1", deadline_s=0.001)
        await asyncio.sleep(0.01)
        claim = await store.claim("job-1", 1, "worker-a", LEASE_MS)
        assert (claim.outcome, claim.state) == ("expired", JobState.QUEUED)
        assert await state_of(store, "job-1") is JobState.QUEUED
        assert await store.redis.zscore(keys.LEASES, "job-1") is None
        assert await batch_counts(store, "b1") == {JobState.QUEUED: 1}

    with_job_store(redis_url, scenario)


# --- transition ----------------------------------------------------------------------------------


def test_a_finished_job_leaves_every_set_and_gets_its_ttl(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1", batch_id="b1")
        result = {"content": "hello", "model": "gpt-4o-mini", "provider": "openai"}
        done = await store.transition(
            "job-1", new_state=JobState.SUCCEEDED, allowed=RUNNING, expected_dispatch=1, ttl_s=120,
            fields={"result": json.dumps(result)},
        )
        assert done == Transition(moved=True, previous_state=JobState.RUNNING, dispatch=1)
        record = await store.get("job-1")
        assert record is not None and record.state is JobState.SUCCEEDED and record.done
        assert record.result is not None and record.result.content == "hello" and record.finished_at is not None
        for watch in (keys.LEASES, keys.DELAYED, keys.DEADLINES):
            assert await store.redis.zscore(watch, "job-1") is None, watch
        assert 0 < await store.redis.ttl(keys.job("job-1")) <= 120
        assert await outbox(store) == [{"kind": "job", "job_id": "job-1"}] * 2  # created, finished
        assert await batch_counts(store, "b1") == {JobState.SUCCEEDED: 1}
        assert (await store.batch("b1")).done  # type: ignore[union-attr]

    with_job_store(redis_url, scenario)


def test_transition_moves_only_from_an_allowed_state_on_the_expected_dispatch(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", batch_id="b1")
        not_running = await store.transition("job-1", new_state=JobState.SUCCEEDED, allowed=RUNNING)
        assert not_running == Transition(moved=False, previous_state=JobState.QUEUED, dispatch=1)
        assert (await store.claim("job-1", 1, "worker-a", LEASE_MS)).outcome == "ok"
        stale = await store.transition("job-1", new_state=JobState.SUCCEEDED, allowed=RUNNING, expected_dispatch=2)
        assert stale == Transition(moved=False, previous_state=JobState.RUNNING, dispatch=1)
        assert await state_of(store, "job-1") is JobState.RUNNING
        assert await batch_counts(store, "b1") == {JobState.RUNNING: 1}
        missing = await store.transition("job-nowhere", new_state=JobState.FAILED, allowed=ACTIVE_STATES)
        assert missing == Transition(moved=False, previous_state=None, dispatch=0)

    with_job_store(redis_url, scenario)


def test_batch_counters_move_exactly_once(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", "job-2", batch_id="b1")
        await store.claim("job-1", 1, "worker-a", LEASE_MS)
        # Two workers report the same attempt: only the first report counts.
        assert await finish(store, "job-1", expected_dispatch=1)
        assert not await finish(store, "job-1", JobState.FAILED, expected_dispatch=1)
        # A move to the state the job is already in changes no counter.
        assert (await store.transition("job-2", new_state=JobState.QUEUED, allowed=WAITING_STATES)).moved
        assert await batch_counts(store, "b1") == {JobState.SUCCEEDED: 1, JobState.QUEUED: 1}
        assert await store.cancel("job-2", TTL_S)
        assert not await store.cancel("job-2", TTL_S)
        record = await store.batch("b1")
        assert record is not None and record.finished == record.total == 2
        assert await batch_counts(store, "b1") == {JobState.SUCCEEDED: 1, JobState.CANCELLED: 1}

    with_job_store(redis_url, scenario)


def test_a_terminal_state_is_never_left(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        for terminal in sorted(TERMINAL_STATES):
            job_id = f"job-{terminal.value}"
            await created_and_running(store, job_id, batch_id="b1")
            assert await finish(store, job_id, terminal)
            # Every move the client and worker make: cancel, a late attempt's result, the
            # retry and fallback moves, the failure of a job that never started.
            assert not await store.cancel(job_id, TTL_S)
            for new_state in (JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.RUNNING):
                done = await store.transition(job_id, new_state=new_state, allowed=RUNNING)
                assert (done.moved, done.previous_state) == (False, terminal)
            assert not (await store.transition(job_id, new_state=JobState.FAILED, allowed=WAITING_STATES)).moved
            assert (await store.claim(job_id, 2, "worker-b", LEASE_MS)).outcome == "skip"
            assert await state_of(store, job_id) is terminal
        assert await batch_counts(store, "b1") == {state: 1 for state in TERMINAL_STATES}

    with_job_store(redis_url, scenario)


def test_a_new_dispatch_and_a_delay_schedule_the_next_message(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1")
        before = await store.now_ms()
        done = await store.transition(
            "job-1", new_state=JobState.RETRYING, allowed=RUNNING, delay_ms=5_000, new_dispatch=True,
            fields={"route_index": "1"},
        )
        assert done.moved and done.dispatch == 2
        due = await store.redis.zscore(keys.DELAYED, "job-1")
        assert before + 5_000 <= due <= before + 5_000 + CLOCK_SLACK_MS
        assert await store.redis.zscore(keys.LEASES, "job-1") is None  # not running: no lease
        assert await store.redis.zscore(keys.DEADLINES, "job-1") is not None  # not finished: deadline kept
        record = await store.get("job-1")
        assert record is not None and record.route_index == 1 and record.finished_at is None
        # delay_ms -1: nothing scheduled (e.g. the job waits on a limiter that wakes it).
        assert (await store.transition("job-1", new_state=JobState.RATE_LIMITED, allowed=(JobState.RETRYING,))).moved
        assert await store.redis.zscore(keys.DELAYED, "job-1") is None

    with_job_store(redis_url, scenario)


def test_attempts_are_appended_one_record_per_attempt_number(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1")
        failed = {"attempt": 1, "provider": "openai", "outcome": "failed", "error_type": "RateLimitedError"}
        await store.transition(
            "job-1", new_state=JobState.RETRYING, allowed=RUNNING, delay_ms=0, new_dispatch=True, attempt=failed,
        )
        # Attempt 2's worker stops renewing its lease: the reaper records it lost and re-queues the job.
        await store.claim("job-1", 2, "worker-a", lease_ms=1)
        await asyncio.sleep(0.01)
        assert (await store.reap(limit=100, ttl_s=TTL_S))[0] == ["job-1"]
        # Its result arrives late: it moves nothing, and replaces the worker_lost record.
        late = {"attempt": 2, "provider": "openai", "outcome": "succeeded"}
        assert not await finish(store, "job-1", expected_dispatch=2, attempt=late)
        await store.claim("job-1", 3, "worker-b", LEASE_MS)
        succeeded = {"attempt": 3, "provider": "openai", "outcome": "succeeded"}
        assert await finish(store, "job-1", expected_dispatch=3, attempt=succeeded)
        record = await store.get("job-1")
        assert record is not None and record.attempts == [failed, {**late, "outcome": "superseded"}, succeeded]

    with_job_store(redis_url, scenario)


def test_the_outbox_gets_every_row_marked_with_what_happened(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1")
        await create(store, "job-2")
        assert await store.cancel("job-2", TTL_S)
        attempt_row = {"kind": "attempt", "job_id": "job-1", "attempt": 1, "outcome": "succeeded"}
        usage_row = {"kind": "usage", "job_id": "job-1", "attempt": 1, "prompt_tokens": 3}
        assert await finish(store, "job-1", rows=[attempt_row, usage_row])
        late_row = {"kind": "attempt", "job_id": "job-2", "attempt": 1, "outcome": "succeeded"}
        assert not await finish(store, "job-2", rows=[late_row])
        rows = await outbox(store)
        assert rows[-4:] == [
            attempt_row, usage_row, {"kind": "job", "job_id": "job-1"}, {**late_row, "outcome": "cancelled"},
        ]
        cancelled = await store.get("job-2")
        assert cancelled is not None and cancelled.error is not None
        assert cancelled.error["type"] == "JobCancelledError"

    with_job_store(redis_url, scenario)


# --- promote -------------------------------------------------------------------------------------


def test_promote_hands_out_a_due_job_and_keeps_its_watchdog_entry(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1")
        await store.transition(
            "job-1", new_state=JobState.RETRYING, allowed=RUNNING, delay_ms=0, new_dispatch=True,
            fields={"queue": keys.queue_name("anthropic")},
        )
        before = await store.now_ms()
        handed_out = await store.promote_due()
        assert [(message.job_id, message.dispatch, message.queue) for message in handed_out.messages] == [
            ("job-1", 2, keys.queue_name("anthropic")),
        ]
        # Labelled for Flower from the job's record: its names and the attempt this message starts.
        label = handed_out.messages[0].label
        assert label is not None and (label.model, label.attempt) == ("gpt-4o-mini", 2)
        watchdog = await store.redis.zscore(keys.DELAYED, "job-1")
        assert before + PROMOTE_IN_FLIGHT_MS <= watchdog <= before + PROMOTE_IN_FLIGHT_MS + CLOCK_SLACK_MS
        assert await store.redis.hget(keys.job("job-1"), "published") == "2"
        assert await store.promote_due() == Promoted([], [])  # not due again until the watchdog runs out

    with_job_store(redis_url, scenario)


def test_promote_leaves_jobs_not_yet_due_and_drops_finished_running_and_gone_ones(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-waiting")  # due after the publish grace, not now
        await created_and_running(store, "job-running")
        await created_and_running(store, "job-done")
        await finish(store, "job-done")
        due_now = {"job-running": 0, "job-done": 0, "job-gone": 0}
        await store.redis.zadd(keys.DELAYED, due_now)
        assert await store.promote_due() == Promoted([], [])
        assert await store.redis.zrange(keys.DELAYED, 0, -1) == ["job-waiting"]

    with_job_store(redis_url, scenario)


def test_promote_hands_out_at_most_its_limit_oldest_first(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", "job-2", "job-3")
        await store.redis.zadd(keys.DELAYED, {"job-1": 3, "job-2": 1, "job-3": 2})  # all due; lost messages
        first = await store.promote_due(limit=2)
        assert [message.job_id for message in first.messages] == ["job-2", "job-3"]
        assert [message.job_id for message in (await store.promote_due(limit=2)).messages] == ["job-1"]

    with_job_store(redis_url, scenario)


# --- reap ----------------------------------------------------------------------------------------


def test_reap_requeues_a_job_whose_lease_ran_out(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1", batch_id="b1", lease_ms=1)
        await created_and_running(store, "job-alive", batch_id="b1")
        await asyncio.sleep(0.01)
        assert await store.reap(limit=100, ttl_s=TTL_S) == (["job-1"], [])
        raw = await store.redis.hgetall(keys.job("job-1"))
        assert raw["state"] == JobState.RETRYING
        assert (raw["dispatch"], raw["hop_attempt"], raw["attempt"]) == ("2", "0", "1")
        assert await store.redis.zscore(keys.LEASES, "job-1") is None
        assert await store.redis.zscore(keys.DELAYED, "job-1") is not None  # due now, for promote to publish
        record = await store.get("job-1")
        assert record is not None
        [lost] = record.attempts
        assert (lost["attempt"], lost["provider"], lost["outcome"]) == (1, "openai", "worker_lost")
        assert (await outbox(store))[-1] == {**lost, "kind": "attempt", "job_id": "job-1"}
        assert await batch_counts(store, "b1") == {JobState.RETRYING: 1, JobState.RUNNING: 1}
        # The lost worker's late message is stale; the new dispatch runs.
        assert (await store.claim("job-1", 1, "worker-a", LEASE_MS)).outcome == "skip"
        assert (await store.claim("job-1", 2, "worker-b", LEASE_MS)).outcome == "ok"
        assert await store.reap(limit=100, ttl_s=TTL_S) == ([], [])

    with_job_store(redis_url, scenario)


def test_reap_drops_a_lease_of_a_job_no_longer_running(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1")
        await finish(store, "job-1")
        await store.redis.zadd(keys.LEASES, {"job-1": 0})
        assert await store.reap(limit=100, ttl_s=TTL_S) == ([], [])
        assert await state_of(store, "job-1") is JobState.SUCCEEDED
        assert await store.redis.zcard(keys.LEASES) == 0

    with_job_store(redis_url, scenario)


def test_reap_fails_jobs_past_their_deadline(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-queued", "job-later", batch_id="b1")
        await created_and_running(store, "job-running", batch_id="b1")
        await store.redis.zadd(keys.DEADLINES, {"job-queued": 0, "job-running": 0})  # both past their deadline
        requeued, failed = await store.reap(limit=100, ttl_s=120)
        assert requeued == [] and sorted(failed) == ["job-queued", "job-running"]
        for job_id in failed:
            record = await store.get(job_id)
            assert record is not None and record.state is JobState.FAILED and record.finished_at is not None
            assert record.error is not None and record.error["type"] == "DeadlineExceededError"
            assert "raise jobs.deadline_s" in record.error["message"]
            assert await store.redis.hget(keys.job(job_id), "dispatch") == "2"  # any message still out is stale
            assert 0 < await store.redis.ttl(keys.job(job_id)) <= 120
        assert await store.redis.zrange(keys.LEASES, 0, -1) == []
        assert await store.redis.zrange(keys.DEADLINES, 0, -1) == ["job-later"]
        assert await batch_counts(store, "b1") == {JobState.FAILED: 2, JobState.QUEUED: 1}
        assert {"kind": "job", "job_id": "job-running"} in (await outbox(store))[-2:]
        # No message will say they failed: they stay due for promote, which hands them out once, with
        # their typed error, for a worker to tell Flower (worker/outcome.py).
        promoted = await store.promote_due()
        assert promoted.messages == []
        assert sorted((job.job_id, job.state, job.error["type"]) for job in promoted.ended if job.error) == [
            ("job-queued", JobState.FAILED, "DeadlineExceededError"),
            ("job-running", JobState.FAILED, "DeadlineExceededError"),
        ]
        assert await store.redis.zrange(keys.DELAYED, 0, -1) == ["job-later"]

    with_job_store(redis_url, scenario)


def test_reap_leaves_a_finished_job_whose_deadline_passes(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await created_and_running(store, "job-1", batch_id="b1")
        await finish(store, "job-1")
        await store.redis.zadd(keys.DEADLINES, {"job-1": 0})
        assert await store.reap(limit=100, ttl_s=TTL_S) == ([], [])
        assert await batch_counts(store, "b1") == {JobState.SUCCEEDED: 1}

    with_job_store(redis_url, scenario)


# --- recheck -------------------------------------------------------------------------------------


def test_recheck_brings_published_unclaimed_jobs_forward(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await create(store, "job-1", "job-2", "job-3", "job-4", "job-5")
        # job-3 waits for a retry not yet published: its entry is when to publish, not a watchdog.
        await store.claim("job-3", 1, "worker-a", LEASE_MS)
        await store.transition(
            "job-3", new_state=JobState.RETRYING, allowed=RUNNING, delay_ms=60_000, new_dispatch=True,
        )
        # job-4 has finished; its stale entry (left for promote to drop) must not come forward.
        await store.redis.zadd(keys.DELAYED, {"job-4": await store.now_ms() + 60_000})
        await store.redis.hset(keys.job("job-4"), "state", JobState.SUCCEEDED)
        before = await store.now_ms()
        assert await store.recheck_published(page=2) == 3
        soon = before + RESTART_RECHECK_MS
        for job_id in ("job-1", "job-2", "job-5"):
            assert soon <= await store.redis.zscore(keys.DELAYED, job_id) <= soon + CLOCK_SLACK_MS, job_id
        for job_id in ("job-3", "job-4"):
            assert await store.redis.zscore(keys.DELAYED, job_id) > soon + CLOCK_SLACK_MS, job_id
        assert await store.recheck_published() == 0  # already soon

    with_job_store(redis_url, scenario)


# --- release_lock --------------------------------------------------------------------------------


def test_release_lock_deletes_only_with_the_right_token(redis_url: str) -> None:
    async def scenario(store: JobStore) -> None:
        await store.redis.set(keys.REAPER_LOCK, "token-a", px=60_000)
        await store.release_lock(keys.REAPER_LOCK, "token-b")
        assert await store.redis.get(keys.REAPER_LOCK) == "token-a"
        await store.release_lock(keys.REAPER_LOCK, "token-a")
        assert await store.redis.get(keys.REAPER_LOCK) is None
        await store.release_lock(keys.REAPER_LOCK, "token-a")  # gone already: nothing to do

    with_job_store(redis_url, scenario)
