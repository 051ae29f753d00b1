"""How a caller asked its jobs to run: the keyword arguments `submit` and `submit_batch` share.

Besides the deadline, the cache and the lane (docs/rate-limits.md, "Lanes"), a completion window: the caller can wait that long, so
each job whose first hop's provider entry has a batch API (contract/tiers.py) waits in a
provider batch there, at batch prices; the others run in the normal lane, or, with
`batch_only`, are refused before anything is enqueued.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from llmq.client.errors import RequestError
from llmq.contract.config import LLMConfig
from llmq.contract.jobs import CALLER_BUDGET_OPTION, NewJob
from llmq.contract.models import Hop, JobRequest, Lane
from llmq.contract.tiers import parse_window, provider_batch_refusal


@dataclass(frozen=True)
class Submission:
    deadline_s: float | None = None
    #: Overrides the provider's cache setting.
    cache: bool | None = None
    #: The caller's own daily budget in USD (before `per_caller_daily_usd`).
    caller_daily_usd: float | None = None
    #: How long the caller can wait for the answers ("24h", "2d", or seconds): jobs may wait in a provider batch.
    completion_window: str | float | None = None
    #: With a completion window: a job that cannot wait in a provider batch is refused, and a line the
    #: provider batch fails or lets expire fails too, instead of running in the normal lane.
    batch_only: bool = False
    #: A flex-tier call refused for capacity retries at the standard tier (None: the entry's `flex:` says).
    flex_fallback: bool | None = None
    #: `interactive` goes before every waiting batch job; `batch` shares what is left, fairly by caller.
    lane: Lane | str = Lane.BATCH

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "lane", Lane(self.lane))
        except ValueError:
            raise RequestError(f"lane {self.lane!r}: use one of {', '.join(item.value for item in Lane)}") from None
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise RequestError(f"deadline_s must be a positive number of seconds (got {self.deadline_s})")
        if self.batch_only and self.completion_window is None:
            raise RequestError("batch_only needs a completion_window (e.g. completion_window='24h')")
        self.window_s  # a bad window is refused here, before anything is enqueued

    @property
    def window_s(self) -> float | None:
        if self.completion_window is None:
            return None
        try:
            return parse_window(self.completion_window)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def deadline_for(self, config: LLMConfig) -> float:
        """The job's deadline: as given; else, with a window, the window plus the usual deadline, so a
        line that expires with its provider batch still has time to run in the normal lane."""
        if self.deadline_s is not None:
            return self.deadline_s
        default_s = config.service.jobs.deadline_s
        return default_s + (self.window_s or 0.0)

    def refusal(self, config: LLMConfig, request: JobRequest, route: list[Hop]) -> str | None:
        """Why this job cannot wait in a provider batch (None: it can, or no window was asked for)."""
        window_s = self.window_s
        if window_s is None:
            return None
        entry = config.provider(route[0].provider)
        return provider_batch_refusal(entry, request, window_s=window_s, deadline_s=self.deadline_for(config))

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.cache is not None:
            options["cache"] = self.cache
        if self.batch_only:
            options["batch_only"] = True
        if self.flex_fallback is not None:
            options["flex_fallback"] = self.flex_fallback
        if self.caller_daily_usd is not None:
            options[CALLER_BUDGET_OPTION] = self.caller_daily_usd
        return options

    def check(self, config: LLMConfig, request: JobRequest, route: list[Hop], where: str) -> None:
        """With `batch_only`: refuse a job that cannot wait in a provider batch, naming where it is."""
        refusal = self.refusal(config, request, route) if self.batch_only else None
        if refusal is not None:
            raise RequestError(f"{where}: batch_only: {refusal}")

    def new_job(
        self, config: LLMConfig, request: JobRequest, route: list[Hop], job_id: str,
        batch_id: str | None = None, custom_id: str | None = None,
    ) -> NewJob:
        refusal = self.refusal(config, request, route)
        if refusal is not None and self.batch_only:
            raise RequestError(f"batch_only: {refusal}")
        return NewJob(
            job_id=job_id, request=request, route=route, batch_id=batch_id, custom_id=custom_id,
            deadline_s=self.deadline_for(config), options=self.options(), completion_window_s=self.window_s,
            via_provider_batch=self.window_s is not None and refusal is None, lane=Lane(self.lane),
        )


@dataclass
class BatchItem:
    """One request of a batch, with the caller's id for it."""

    request: JobRequest
    custom_id: str | None = None


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


def job_id_for(batch_id: str, item: BatchItem, index: int) -> str:
    """Deterministic per (batch, custom_id): re-submitting a batch file never makes new jobs."""
    if item.custom_id is not None:
        return "job_" + uuid.uuid5(uuid.NAMESPACE_URL, f"llmq:{batch_id}:{item.custom_id}").hex
    return new_id("job")
