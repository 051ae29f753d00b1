"""Response cache in Redis, as engine middleware. Off unless switched on.

On per provider (`cache: {enabled: true, ttl_s}`) or per request
(`submit(..., cache=True)`); `cache=False` on a request opts out. By default only
deterministic requests (temperature 0, and every embedding job) are cached:
caching a sampled answer would replay one sample forever. The key is a digest of
the request as the provider sees it: the job kind, provider entry and model, and
every field that changes the answer (messages with their parts and tool calls,
temperature, max_tokens, response_format, tools, tool_choice, stop, seed, top_p,
provider_options; an embedding's inputs and dimensions), never the caller's
metadata or whether it streams. A hit answers without a call and writes a usage
row marked cached, at zero cost.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from llmq.contract import keys
from llmq.contract.jobs import dump_response, load_response
from llmq.contract.models import JobResponse
from llmq.worker.middleware.base import Middleware, Serve, Verdict

if TYPE_CHECKING:
    from llmq.worker.attempt import Attempt
    from llmq.worker.runtime import Runtime

#: How long hit/miss counters are kept (they are a rolling view, not a ledger).
STATS_TTL_S = 7 * 24 * 3600


#: Request fields that never change the answer.
NOT_IN_KEY = frozenset({"model", "provider", "metadata", "stream"})


def cache_key(attempt: Attempt) -> str:
    request = attempt.request
    normalized = {
        "kind": request.kind.value,
        "provider": attempt.hop.provider,
        "model": attempt.hop.model,
        # Every other field, defaults included, so a field added later is in the key by itself.
        **request.model_dump(mode="json", exclude=NOT_IN_KEY, exclude_none=True),
    }
    digest = hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return keys.cache_entry(digest)


class CacheMiddleware(Middleware):
    def start(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _ttl_s(self, attempt: Attempt) -> int | None:
        """The TTL to cache this attempt with, or None when caching does not apply."""
        settings = self.runtime.config.provider(attempt.hop.provider).cache
        requested = attempt.options.get("cache")
        if requested is False:
            return None
        if requested is True:
            return settings.ttl_s
        if not settings.enabled:
            return None
        if settings.only_deterministic and attempt.request.temperature != 0:
            return None
        return settings.ttl_s

    async def before_attempt(self, attempt: Attempt) -> Verdict | None:
        if self._ttl_s(attempt) is None:
            return None
        cached = await self.runtime.redis.get(cache_key(attempt))
        await self.runtime.redis.hincrby(keys.cache_stats(attempt.hop.provider), "hits" if cached else "misses", 1)
        await self.runtime.redis.expire(keys.cache_stats(attempt.hop.provider), STATS_TTL_S)
        if cached is None:
            return None
        response = load_response(attempt.kind, cached)
        attempt.scratch["cache_hit"] = True
        return Serve(response.model_copy(update={"metadata": {**response.metadata, "cached": True}}))

    async def after_success(self, attempt: Attempt, response: JobResponse, usage_row: dict[str, Any]) -> None:
        ttl_s = self._ttl_s(attempt)
        if ttl_s is None or attempt.scratch.get("cache_hit"):
            return
        await self.runtime.redis.set(cache_key(attempt), dump_response(response), ex=ttl_s)
