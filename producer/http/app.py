"""The ASGI app: routes, OpenAI-shaped errors, size limits, CORS only when asked; and `serve`.

Starlette under uvicorn, not FastAPI: the endpoints take OpenAI's bodies, which are
checked by the contract's own pydantic models (`chat.chat_request`) with OpenAI's error
shape, so FastAPI's request models, its 422 errors and its OpenAPI generation would be
layers to switch off; Starlette is the routing and the responses FastAPI itself sits on,
and adds nothing on the path of a request the benchmark has to pay for. uvicorn runs it
on uvloop with httptools' C parser.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmq.client.service import LLMService
from llmq.contract.config import LLMConfig
from llmq.http import routes
from llmq.http.database import open_database
from llmq.http.errors import (
    APIError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
)
from llmq.http.front import ClientGone, Front, ServeSettings

log = logging.getLogger("llmq.http")
#: Paths that take a file upload, with the larger limit.
UPLOAD_PATHS = frozenset({"/v1/files"})

ROUTES = [
    Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
    Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
    Route("/v1/models", routes.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", routes.get_model, methods=["GET"]),
    Route("/v1/files", routes.create_file, methods=["POST"]),
    Route("/v1/files/{file_id}", routes.get_file, methods=["GET"]),
    Route("/v1/files/{file_id}/content", routes.file_content, methods=["GET"]),
    Route("/v1/batches", routes.create_batch, methods=["POST"]),
    Route("/v1/batches", routes.list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", routes.get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", routes.cancel_batch, methods=["POST"]),
    Route("/health", routes.health, methods=["GET"]),
]


def create_app(config: LLMConfig, settings: ServeSettings, *, redis_url: str | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = LLMService(config, redis_url=redis_url, redis_max_connections=settings.redis_max_connections)
        engine = await asyncio.to_thread(open_database, settings.database_url)
        app.state.front = Front(service, engine, settings)
        try:
            yield
        finally:
            await service.aclose()
            engine.dispose()

    middleware = [Middleware(BodyLimit, max_body_bytes=settings.max_body_bytes, max_file_bytes=settings.max_file_bytes)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"], expose_headers=["x-llmq-job-id", "x-llmq-batch-id"],
        ))
    return Starlette(
        routes=ROUTES, middleware=middleware, lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, ClientGone: _client_gone, Exception: _unexpected},
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return NotFoundError(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url").response()
    if exc.status_code == 405:
        return MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}").response()
    return JSONResponse(InvalidRequestError(str(exc.detail)).body(), status_code=exc.status_code)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this: the connection is closed. The job was cancelled.
    return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed", "param": None,
                                   "code": "client_closed"}}, status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": {"message": "internal error in llmq's HTTP front; see its log", "type": "server_error",
                                   "param": None, "code": None}}, status_code=500)


class BodyLimit:
    """Refuse bodies over the limit (413 in OpenAI's shape) before reading them when they say their
    length, and as soon as they pass it when they do not (chunked uploads)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_file_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_file_bytes if scope["path"] in UPLOAD_PATHS else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(limit).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(limit)
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    def _too_large(limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is over this server's limit of {limit} bytes")


def serve(config: LLMConfig, settings: ServeSettings, *, redis_url: str | None = None) -> None:
    """Run the front until interrupted (uvicorn on uvloop and httptools)."""
    import uvicorn

    uvicorn.run(
        create_app(config, settings, redis_url=redis_url), host=settings.host, port=settings.port,
        loop="uvloop", http="httptools", access_log=settings.access_log, log_level="info",
        # Keys travel in the Authorization header, which uvicorn never logs; bodies are never logged.
        server_header=False, proxy_headers=True, forwarded_allow_ips="127.0.0.1",
    )
