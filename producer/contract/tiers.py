"""Cheaper ways to run work that can wait: provider batch APIs and the flex tier.

Two settings on a provider entry (`ProviderConfig` takes them from `TierSettings`):

- `batch_api:` how the entry's provider batch API is used for jobs submitted with a
  completion window (`submit(..., completion_window="24h")`, `llmq submit --completion-window`).
  It is on by default for the adapter types in `PROVIDER_BATCH_DEFAULTS`, each with its
  provider's documented limits; anything can be set per entry.
- `service_tier:` and `flex:` the tier synchronous calls ask for (OpenAI and Gemini sell a
  "flex" tier at batch prices for calls that tolerate slow or refused service).

Which path a job takes is decided here, at submit, by `provider_batch_refusal`: the client
calls it for the first hop of the job's route, and a job that cannot wait in a provider
batch runs in the normal lane (or is refused, when the caller asked for batch-only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from llmq.contract.config import ProviderConfig
    from llmq.contract.models import JobRequest

ServiceTier = Literal["standard", "flex"]
#: What a usage row's `price_tier` says: the provider's batch API, its flex tier, else standard.
PriceTier = Literal["standard", "batch", "flex"]
#: The discount a provider gives batch and flex calls when the price table has no price for them.
DEFAULT_DISCOUNT = 0.5
DAY_S = 86_400.0


@dataclass(frozen=True)
class ProviderBatchDefaults:
    """One provider family's documented batch limits (each overridable per entry)."""

    #: Lines in one provider batch.
    max_requests: int
    #: Bytes of one provider batch's input (the JSONL file, or the request body).
    max_bytes: int
    #: How long the provider may take: a job's completion window must be at least this.
    window_s: float
    #: Gemini only: batches whose requests are at most this many bytes go inline, larger ones as a file.
    inline_max_bytes: int | None = None
    #: The job kinds (`JobKind` values) its batch API takes.
    kinds: frozenset[str] = frozenset({"chat"})


#: Adapter types whose provider has a batch API llmq speaks (worker/batches/ has one module each).
#: OpenAI: 50,000 requests and 200 MB per batch, window "24h", chat and embeddings. Azure OpenAI
#: global batch: 100,000 requests and 200 MB, 24 h target. Anthropic Message Batches: 100,000 requests or 256 MB, ended
#: within 24 h. Gemini batch mode: inline up to 20 MB, else a JSONL file (up to 2 GB), 24 h target;
#: no documented count limit, so llmq cuts at 50,000.
PROVIDER_BATCH_DEFAULTS: dict[str, ProviderBatchDefaults] = {
    "openai": ProviderBatchDefaults(max_requests=50_000, max_bytes=200 * 1024 * 1024, window_s=DAY_S,
                                    kinds=frozenset({"chat", "embedding"})),
    "azure_openai": ProviderBatchDefaults(max_requests=100_000, max_bytes=200 * 1024 * 1024, window_s=DAY_S,
                                          kinds=frozenset({"chat", "embedding"})),
    "anthropic": ProviderBatchDefaults(max_requests=100_000, max_bytes=256 * 1024 * 1024, window_s=DAY_S),
    "gemini": ProviderBatchDefaults(
        max_requests=50_000, max_bytes=2 * 1024 * 1024 * 1024, window_s=DAY_S, inline_max_bytes=20 * 1024 * 1024
    ),
}
#: Adapter types with a flex tier (`service_tier: flex`).
FLEX_TYPES = frozenset({"openai", "gemini"})


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchAPISettings(_Settings):
    """`batch_api:` on a provider entry. Unset limits are the provider's (`PROVIDER_BATCH_DEFAULTS`)."""

    #: None: on for adapter types with a batch API, off for the rest.
    enabled: bool | None = None
    max_requests: int | None = Field(default=None, gt=0)
    max_bytes: int | None = Field(default=None, gt=0)
    #: Seconds the provider may take; a job's completion window must be at least this long.
    window_s: float | None = Field(default=None, gt=0)
    inline_max_bytes: int | None = Field(default=None, gt=0)
    #: Price of a batch call as a share of the standard price, where the price table has no batch price.
    discount: float = Field(default=DEFAULT_DISCOUNT, gt=0, le=1)
    #: Seconds jobs wait to be grouped: a provider batch is sent once its oldest line waited this long
    #: (or it is full), so one llmq batch, enqueued in chunks, becomes as few provider batches as fit.
    gather_s: float = Field(default=5.0, ge=0)
    #: Polling backs off as a provider batch ages: every age/10 seconds, within these bounds.
    poll_min_s: float = Field(default=10.0, gt=0)
    poll_max_s: float = Field(default=600.0, gt=0)


class FlexSettings(_Settings):
    """`flex:` on a provider entry: what a flex-tier call costs and does when refused."""

    #: A flex refusal (no capacity) retries at once at the standard tier, unless the job says otherwise.
    standard_on_refusal: bool = True
    #: Price of a flex call as a share of the standard price, where the price table has no flex price.
    discount: float = Field(default=DEFAULT_DISCOUNT, gt=0, le=1)


class TierSettings(BaseModel):
    """The fields `ProviderConfig` takes from here."""

    batch_api: BatchAPISettings = Field(default_factory=BatchAPISettings)
    #: The tier this entry's synchronous calls ask for unless the request says (`LLMRequest.service_tier`).
    service_tier: ServiceTier = "standard"
    flex: FlexSettings = Field(default_factory=FlexSettings)


@dataclass(frozen=True)
class ProviderBatchLimits:
    """An entry's batch API as it applies: its settings over its provider's defaults."""

    max_requests: int
    max_bytes: int
    window_s: float
    inline_max_bytes: int | None
    discount: float
    gather_s: float
    poll_min_s: float
    poll_max_s: float


def provider_batch_limits(entry: ProviderConfig) -> ProviderBatchLimits | None:
    """The entry's batch API limits, or None when it has no batch API or it is off."""
    settings = entry.batch_api
    defaults = PROVIDER_BATCH_DEFAULTS.get(entry.adapter_type)
    if defaults is None or settings.enabled is False:
        return None
    return ProviderBatchLimits(
        max_requests=settings.max_requests or defaults.max_requests,
        max_bytes=settings.max_bytes or defaults.max_bytes,
        window_s=settings.window_s or defaults.window_s,
        inline_max_bytes=settings.inline_max_bytes or defaults.inline_max_bytes,
        discount=settings.discount, gather_s=settings.gather_s,
        poll_min_s=settings.poll_min_s, poll_max_s=max(settings.poll_min_s, settings.poll_max_s),
    )


def provider_batch_refusal(
    entry: ProviderConfig, request: JobRequest, *, window_s: float, deadline_s: float
) -> str | None:
    """Why a job cannot wait in this entry's provider batch (None: it can)."""
    limits = provider_batch_limits(entry)
    if limits is None:
        if entry.adapter_type in PROVIDER_BATCH_DEFAULTS:
            return f"provider {entry.name!r} has its batch API turned off (batch_api.enabled: false)"
        return f"provider {entry.name!r} (type {entry.adapter_type!r}) has no batch API llmq speaks"
    if request.kind.value not in PROVIDER_BATCH_DEFAULTS[entry.adapter_type].kinds:
        return f"the batch API of provider {entry.name!r} takes no {request.kind.value} jobs"
    if request.stream:
        return "a streamed request needs an answer as it is written; a provider batch answers at the end"
    if window_s < limits.window_s:
        return (f"provider {entry.name!r} promises batch results within {describe_duration(limits.window_s)}; "
                f"a {describe_duration(window_s)} completion window cannot be met (use at least "
                f"{describe_duration(limits.window_s)})")
    if deadline_s < limits.window_s:
        return (f"the job's deadline ({describe_duration(deadline_s)}) ends before the batch window of provider "
                f"{entry.name!r} ({describe_duration(limits.window_s)}); raise deadline_s or drop the completion window")
    return None


_DURATION = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S, "w": 7 * DAY_S}


def parse_window(value: str | float | int) -> float:
    """A completion window as seconds: "24h", "90m", "2d", "1w", or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"completion window {value!r}: use a duration such as 24h, 90m, 2d or 1w")
        seconds = float(match["amount"]) * _UNIT_S[match["unit"] or "s"]
    if seconds <= 0:
        raise ValueError(f"completion window {value!r}: must be longer than zero, e.g. 24h")
    return seconds


def describe_duration(seconds: float) -> str:
    for unit, unit_s in (("w", 7 * DAY_S), ("d", DAY_S), ("h", 3600.0), ("m", 60.0)):
        if seconds >= unit_s and seconds % unit_s == 0:
            return f"{int(seconds // unit_s)}{unit}"
    return f"{seconds:g}s"
