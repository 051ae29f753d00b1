"""An httpx transport that sends requests through aiohttp's connection pool.

Adapters keep httpx's API (requests, `Response`, streaming, error types); the
bytes travel through aiohttp, whose pool and C HTTP parser cost a quarter of
httpcore's CPU per call at 100 connections and a tenth at 1000 (measured against the
benchmarks' fake). httpcore 1.0.9's pool also hands one idle connection to two
waiting requests at once, so under load requests queue and retry inside the
client for seconds (https://github.com/encode/httpcore/issues/822): the rate-limit benchmark saw grants
reach the provider up to 10 s late. aiohttp's connector queues waiters in order.

The `httpx-aiohttp` package does the same job but maps a dropped connection to
`ConnectTimeout` and ignores httpx's pool timeout; errors matter here (they pick
retry or fallback), so the mapping below follows httpx's own meanings.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import yarl


@contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones adapters already translate."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx.NetworkError(str(exc) or type(exc).__name__, request=request) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            # Chunks as they arrive: a streamed answer is relayed token by token.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # A fully read response returns its connection to the pool; a partly read one is closed.
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (one pool), created on first use inside the running loop."""

    def __init__(self, *, max_connections: int, keepalive_expiry_s: float = 5.0) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str | None] = {}

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.keepalive_expiry_s,
            ssl=httpx.create_ssl_context(),  # certifi's roots, as httpx would use
        )
        # Not trust_env: aiohttp would look up .netrc and the proxy in a thread on every request.
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)

    def _proxy(self, url: httpx.URL) -> str | None:
        """HTTP(S)_PROXY / NO_PROXY from the environment, as httpx applies them; read once per origin."""
        origin = f"{url.scheme}://{url.host}"
        if origin not in self._proxies:
            proxy = urllib.request.getproxies().get(url.scheme)
            self._proxies[origin] = None if not proxy or urllib.request.proxy_bypass(url.host) else proxy
        return self._proxies[origin]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None or self._session.closed:
            self._session = self._open_session()
        timeout = request.extensions.get("timeout", {})
        with _httpx_errors(request):
            response = await self._session.request(
                request.method,
                # As httpx encoded it: Bedrock's model ids hold ':' sent as %3A, and SigV4 signs that.
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=await request.aread() or None,
                allow_redirects=False,
                # httpx's pool timeout bounds the wait for a free connection plus connecting;
                # aiohttp's `connect` is exactly that, `sock_connect` the TCP/TLS connect alone.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=timeout.get("pool"), sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
                server_hostname=request.extensions.get("sni_hostname"),
                proxy=self._proxy(request.url),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
