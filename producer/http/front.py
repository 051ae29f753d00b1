"""What every endpoint shares: the service, the stores, who is calling, and may they.

One `Front` per server process. A request is authenticated by its bearer key (looked up by
hash, cached `key_cache_s` so a chat costs no SQL; a revoked key stops working within that
long), then admitted: the key may use the model (403), a configured provider serves it
(404), and the key's own requests/min and daily USD budget are not spent (429, with
`retry-after`). The per-key limits are the shared limiter's (Redis), so they hold across
every front process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine
from starlette.requests import Request

from llmq.client.service import LLMService
from llmq.contract.models import JobRequest
from llmq.contract.routing import RoutingError, plan_route
from llmq.http.apikeys import APIKey, KeyStore, hash_key, looks_like_key
from llmq.http.batches import Batches
from llmq.http.errors import CallerLimitedError, InvalidAPIKeyError, ModelNotAllowedError, NotFoundError
from llmq.http.records import BatchStore, FileStore
from llmq.worker.limiter.callers import CallerLimiter

T = TypeVar("T")
#: Keys looked up (found or not) kept at most this many; past it the cache starts afresh.
KEY_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: Largest JSON body accepted (bytes): a chat's messages may hold 8 Mi characters.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Largest file upload (bytes), for batch input files.
    max_file_bytes: int = 100 * 1024 * 1024
    #: Origins a browser may call from (CORS); none unless configured.
    cors_origins: tuple[str, ...] = ()
    #: An interactive job's deadline (s): past it the job fails and the front answers 504.
    request_timeout_s: float = 600.0
    #: How long a key lookup is trusted (s): a revoked key stops working within this long.
    key_cache_s: float = 5.0
    database_url: str | None = None
    access_log: bool = False
    #: Redis connections of this process: each stream being read holds one while it waits
    #: (redis-server's own default limit is 10,000 clients).
    redis_max_connections: int = 4000


class ClientGone(Exception):
    """The caller disconnected while its job ran; the job was cancelled."""


class Front:
    def __init__(self, service: LLMService, engine: Engine, settings: ServeSettings) -> None:
        self.service = service
        self.engine = engine
        self.settings = settings
        self.keys = KeyStore(engine)
        self.files = FileStore(engine)
        self.batches = Batches(service, self.files, BatchStore(engine))
        self.limiter = CallerLimiter(service.jobs.redis)
        self._key_cache: dict[str, tuple[APIKey | None, float]] = {}

    async def authenticate(self, request: Request) -> APIKey:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise InvalidAPIKeyError(
                "You didn't provide an API key: send it as 'Authorization: Bearer sk-llmq-...' "
                "(`llmq keys create --name NAME` makes one)", code="missing_api_key",
            )
        found = await self._lookup(key.strip())
        if found is None:
            # Never echo the key, not even part of it: logs and proxies keep error bodies.
            raise InvalidAPIKeyError("Incorrect API key provided, or the key was revoked.")
        return found

    async def _lookup(self, key: str) -> APIKey | None:
        if not looks_like_key(key):
            return None
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        found = await asyncio.to_thread(self.keys.find, key)
        if len(self._key_cache) >= KEY_CACHE_ENTRIES:
            self._key_cache.clear()
        self._key_cache[digest] = (found, now + self.settings.key_cache_s)
        return found

    async def admit(self, key: APIKey, request: JobRequest) -> None:
        """May this key run this request now? Raises the 403, 404 or 429 that says why not."""
        self.check_model(key, request.model)
        try:
            plan_route(request, self.service.config, await self.service.workers_configured())
        except RoutingError as exc:
            raise NotFoundError(str(exc), param="provider" if request.provider else "model", code="model_not_found") from None
        await self.check_limits(key)

    def check_model(self, key: APIKey, model: str) -> None:
        if not key.allows(model):
            raise ModelNotAllowedError(
                f"the key {key.name!r} may not use model {model!r} (it may use: {', '.join(key.models or ())})", param="model",
            )

    async def check_limits(self, key: APIKey) -> None:
        decision = await self.limiter.check(key.limits)
        if decision.allowed:
            return
        if decision.limit == "daily_usd":
            message = f"the key {key.name!r} has spent its daily budget of ${key.daily_usd} (UTC day); it resets at midnight UTC"
        else:
            message = f"the key {key.name!r} is over its limit of {key.requests_per_minute} requests per minute"
        raise CallerLimitedError(message, retry_after_s=decision.retry_after_s, code=decision.limit or "rate_limit_exceeded")

    def caller_budget(self, key: APIKey) -> float | None:
        return None if key.daily_usd is None else float(key.daily_usd)

    async def until_disconnect(self, request: Request, job_id: str, work: Awaitable[T]) -> T:
        """Await `work` unless the caller disconnects first: then cancel the job and raise ClientGone.

        The body has been read, so the next ASGI message can only be the disconnect.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await self.service.cancel(job_id)
        raise ClientGone(job_id)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
