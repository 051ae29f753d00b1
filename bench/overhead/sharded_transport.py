"""Prototype, not used by llmq: one httpx transport over several small connection pools.

Measured in bench/RESULTS.md ("## overhead"): wired into worker/providers/base.py
(`transport=transport or ShardedTransport(self.max_connections)`) in a scratch copy,
it cut the llmq worker's CPU per job by about a quarter. Kept here for whoever
makes the change in the engine.

httpcore 1.0.x manages its pool in `_assign_requests_to_connections`, run on every
request start and every response close: it checks every connection (has_expired
-> getpeername + poll) and, for each idle one, counts all connections again, so a
pool of N connections costs O(N) syscalls and O(N^2) Python steps per request.
Small pools bound that; each request goes to the pool with the fewest in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx


class _CountedStream(httpx.AsyncByteStream):
    """The response body; gives the pool's slot back when the body is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


class ShardedTransport(httpx.AsyncBaseTransport):
    """`max_connections` split over pools of at most `shard_size`; a request goes to the least busy."""

    def __init__(self, max_connections: int, *, shard_size: int = 32, keepalive_per_shard: int | None = None) -> None:
        count = max(1, -(-max_connections // shard_size))
        size = -(-max_connections // count)
        keepalive = keepalive_per_shard if keepalive_per_shard is not None else size
        tls = httpx.create_ssl_context()  # one for all shards: building one costs ~10 ms
        self.shards = [
            httpx.AsyncHTTPTransport(
                verify=tls, limits=httpx.Limits(max_connections=size, max_keepalive_connections=keepalive)
            )
            for _ in range(count)
        ]
        self.in_flight = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self.shards)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight[index] -= 1

        try:
            response = await self.shards[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CountedStream(response.stream, release)
        return response

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()
