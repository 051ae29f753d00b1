"""Providers' rate-limit headers, read: how long the fleet should hold off after a response.

OpenAI-style `x-ratelimit-{remaining,limit,reset}-{requests,tokens}` (resets as Go
durations) and Anthropic's `anthropic-ratelimit-{name}-{remaining,limit,reset}`
(resets as RFC 3339 times), plus `retry-after`. The limiter's header observer
(limiter.py) pauses the fleet for what this module reads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from llmq.worker.providers.base import retry_after_seconds

#: A tokens limit with no more than this share of its size left counts as spent
#: (Anthropic rounds remaining tokens to the nearest thousand).
NEARLY_EXHAUSTED_FRACTION = 0.01


@dataclass(frozen=True)
class HeaderLimit:
    """One limit as a provider reported it on a response."""

    name: str  # requests, tokens, input-tokens, output-tokens
    remaining: float
    limit: float | None
    #: Seconds from now until the provider's limit is fully replenished.
    reset_s: float | None

    @property
    def exhausted(self) -> bool:
        return self.remaining < self.headroom

    @property
    def headroom(self) -> float:
        """Below this much left the limit counts as spent: one request, or 1% of a tokens limit."""
        if self.name == "requests" or not self.limit:
            return 1.0
        return max(1.0, self.limit * NEARLY_EXHAUSTED_FRACTION)

    def refill_s(self) -> float | None:
        """Seconds until the headroom is back. Both OpenAI and Anthropic refill continuously and
        report the reset as the time until the limit is whole again, so a spent limit has its
        headroom back after that share of the reset, not after all of it (the whole reset would
        idle the fleet for up to a minute each time a client running at the limit sees it spent)."""
        if self.reset_s is None:
            return None
        if not self.limit or self.limit <= self.remaining:
            return self.reset_s
        return self.reset_s * min(1.0, (self.headroom - self.remaining) / (self.limit - self.remaining))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_OPENAI_NAMES = ("requests", "tokens")
_ANTHROPIC_NAMES = ("requests", "tokens", "input-tokens", "output-tokens")


def parse_duration_s(text: str) -> float | None:
    """OpenAI's reset durations ("1s", "6m0s", "20ms", "1h2m3.5s"; Go's format), or bare seconds, as seconds."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _DURATION_UNIT_S[unit] for number, unit in parts)


def parse_rfc3339_s(text: str, now_s: float) -> float | None:
    """Seconds from `now_s` (epoch) until an RFC 3339 time, as Anthropic sends its resets."""
    try:
        moment = datetime.fromisoformat(text.strip())  # Python 3.11 reads "Z" and fractions
    except ValueError:
        return None
    return None if moment.tzinfo is None else max(0.0, moment.timestamp() - now_s)


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


#: (limit name, remaining header, limit header, reset header, reset is RFC 3339) for every limit read.
_HEADER_KEYS: tuple[tuple[str, str, str, str, bool], ...] = (
    *((name, f"x-ratelimit-remaining-{name}", f"x-ratelimit-limit-{name}", f"x-ratelimit-reset-{name}", False)
      for name in _OPENAI_NAMES),
    *((name, f"anthropic-ratelimit-{name}-remaining", f"anthropic-ratelimit-{name}-limit",
       f"anthropic-ratelimit-{name}-reset", True) for name in _ANTHROPIC_NAMES),
)


def parse_rate_limit_headers(headers: Mapping[str, str], now_s: float | None = None) -> list[HeaderLimit]:
    """Every limit an OpenAI-style (`x-ratelimit-*`) or Anthropic (`anthropic-ratelimit-*`) response reports."""
    return list(_limits(_lowered(headers), now_s, only_exhausted=False))


def pause_from_headers(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """How long the fleet should hold off (s) by these headers: until any spent limit has its
    headroom back (`HeaderLimit.refill_s`), or for `retry-after`, whichever is longer. None when
    the provider has room. Runs on every response, so a reset is parsed only for a spent limit."""
    lowered = _lowered(headers)
    pauses = [
        refill_s
        for limit in _limits(lowered, now_s, only_exhausted=True)
        if (refill_s := limit.refill_s()) is not None
    ]
    retry_after = retry_after_seconds(lowered)
    if retry_after is not None:
        pauses.append(retry_after)
    return max(pauses) if pauses and max(pauses) > 0 else None


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _limits(lowered: Mapping[str, str], now_s: float | None, *, only_exhausted: bool) -> Iterator[HeaderLimit]:
    for name, remaining_key, limit_key, reset_key, rfc3339 in _HEADER_KEYS:
        remaining = _number(lowered.get(remaining_key))
        if remaining is None or remaining < 0:  # Azure sends -1 when it does not say
            continue
        limit = HeaderLimit(name, remaining, _number(lowered.get(limit_key)), None)
        if only_exhausted and not limit.exhausted:
            continue
        reset = lowered.get(reset_key)
        if reset:
            clock_s = time.time() if now_s is None else now_s
            limit = replace(limit, reset_s=parse_rfc3339_s(reset, clock_s) if rfc3339 else parse_duration_s(reset))
        yield limit
