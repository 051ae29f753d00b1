"""The endpoints under /v1, each a small function over the `Front` (app.py wires them)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmq.client.errors import JobFailedError, RequestError
from llmq.contract.models import EmbeddingResponse, JobRecord, JobRequest, JobState, LLMResponse
from llmq.http.apikeys import APIKey
from llmq.http.chat import (
    ChatCall,
    answer_service_tier,
    chat_request,
    chunk_body,
    chunk_delta,
    completion_body,
    finish_reason,
    whole_calls_delta,
)
from llmq.http.embeddings import embedding_request, embeddings_body
from llmq.http.errors import (
    BATCH_ID_HEADER,
    JOB_ID_HEADER,
    APIError,
    InvalidRequestError,
    NotFoundError,
    job_error,
)
from llmq.http.front import Front
from llmq.http.records import FileRecord

#: Batches listed per page unless `limit` says otherwise (OpenAI's default), and at most.
DEFAULT_PAGE, MAX_PAGE = 20, 100
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def front_of(request: Request) -> Front:
    return request.app.state.front


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: send a JSON object with Content-Type: application/json",
            code="invalid_json",
        ) from None


# --- chat -------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    call = chat_request(await json_body(request), caller=key.name)
    job_id = await _submit(front, key, call.request)
    if call.stream:
        return await _stream(request, front, call, job_id)
    job = await _finished(request, front, job_id)
    assert isinstance(job.result, LLMResponse)
    return JSONResponse(completion_body(job_id, job.result, job.created_at), headers={JOB_ID_HEADER: job_id})


async def _submit(front: Front, key: APIKey, job_request: JobRequest) -> str:
    """Admit the key's request and enqueue it as an interactive job, with the key's budget and the front's deadline."""
    await front.admit(key, job_request)
    try:
        return await front.service.submit(
            job_request, deadline_s=front.settings.request_timeout_s, caller_daily_usd=front.caller_budget(key),
        )
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from None


async def _finished(request: Request, front: Front, job_id: str) -> JobRecord:
    """The job once it succeeded (a caller that leaves first cancels it); else the HTTP error for its end."""
    job = await front.until_disconnect(request, job_id, front.service.wait(job_id))
    assert isinstance(job, JobRecord)
    if job.state is not JobState.SUCCEEDED or job.result is None:
        raise job_error(job_id, job.error, state=job.state.value)
    return job


async def _stream(request: Request, front: Front, call: ChatCall, job_id: str) -> Response:
    chunks = front.service.stream_job(job_id)
    try:
        # The status line waits for the first chunk, so a job that fails before any output is a 502/504.
        first = await front.until_disconnect(request, job_id, anext(chunks))
    except JobFailedError as exc:
        raise job_error(job_id, exc.error, state=exc.job.state.value) from None
    return StreamingResponse(
        _events(front, call, job_id, first, chunks), media_type="text/event-stream",
        headers={**SSE_HEADERS, JOB_ID_HEADER: job_id},
    )


async def _events(
    front: Front, call: ChatCall, job_id: str, first: LLMResponse, chunks: AsyncIterator[LLMResponse],
) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format; a caller that goes away cancels its job."""
    created = int(time.time())
    model = first.model or call.request.model
    ended = sent = called = False
    try:
        yield _sse(chunk_body(job_id, model, created, delta={"role": "assistant", "content": ""}))
        chunk: LLMResponse | None = first
        while chunk is not None:
            model = chunk.model or model
            if chunk.metadata.get("reset"):
                if sent:  # output already sent cannot be taken back: end the stream, say why
                    yield _sse(job_error(job_id, chunk.metadata.get("error"), state="reset part-way").body())
                    return
            elif chunk.metadata.get("final"):
                if chunk.tool_calls and not called:  # calls that came whole, streamed as OpenAI streams calls
                    yield _sse(chunk_body(job_id, model, created, delta=whole_calls_delta(chunk.tool_calls)))
                tier = answer_service_tier(chunk)
                yield _sse(chunk_body(job_id, model, created, finish=finish_reason(chunk), service_tier=tier))
                if call.include_usage:
                    yield _sse(chunk_body(job_id, model, created, usage=chunk.usage, service_tier=tier))
                ended = True
                yield "data: [DONE]\n\n"
                return
            elif delta := chunk_delta(chunk):
                sent, called = True, called or "tool_calls" in delta
                yield _sse(chunk_body(job_id, model, created, delta=delta))
            chunk = await anext(chunks, None)
    except JobFailedError as exc:
        ended = True
        yield _sse(job_error(job_id, exc.error, state=exc.job.state.value).body())
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):  # the caller left (or the stream broke): stop the job
                await front.service.cancel(job_id)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# --- embeddings and models --------------------------------------------------------------


async def embeddings(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    embedding = embedding_request(await json_body(request), caller=key.name)
    job_id = await _submit(front, key, embedding)
    job = await _finished(request, front, job_id)
    assert isinstance(job.result, EmbeddingResponse)
    return JSONResponse(embeddings_body(job.result, embedding.encoding_format), headers={JOB_ID_HEADER: job_id})


async def list_models(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    return JSONResponse({"object": "list", "data": await _served_models(front, key.allows)})


async def get_model(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    model = request.path_params["model"]
    for entry in await _served_models(front, key.allows):
        if entry["id"] == model:
            return JSONResponse(entry)
    raise NotFoundError(f"The model {model!r} does not exist or you do not have access to it.", param="model",
                        code="model_not_found")


async def _served_models(front: Front, allowed: Any) -> list[dict[str, Any]]:
    """What the configured entries whose circuit lets calls through serve, first entry first."""
    status = await front.service.provider_status()
    owners: dict[str, str] = {}
    for name, entry in front.service.config.providers.items():
        if status.get(name, {}).get("available"):
            for model in entry.models:
                owners.setdefault(model, name)
    return [{"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in owners.items() if allowed(model)]


# --- files ------------------------------------------------------------------------------


async def create_file(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    try:
        form = await request.form(max_files=1, max_fields=10)
    except APIError:
        raise
    except Exception as exc:  # a malformed multipart body: Starlette says what is wrong
        raise InvalidRequestError(f"send the file as multipart/form-data with fields 'file' and 'purpose': {exc}") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequestError(f"purpose must be 'batch' (got {purpose!r}): files here feed batches", param="purpose")
        if upload is None or isinstance(upload, str):
            raise InvalidRequestError("'file' is required: the JSONL batch input, as a file part", param="file")
        content = await upload.read()
        record = await anyio.to_thread.run_sync(front.files.create, key.name, "batch", upload.filename or "upload.jsonl", content)
    finally:
        await form.close()  # the upload's spooled temporary file
    return JSONResponse(file_body(record))


async def get_file(request: Request) -> Response:
    return JSONResponse(file_body(await _own_file(request, "get")))


async def file_content(request: Request) -> Response:
    return Response(await _own_file(request, "content"), media_type="application/octet-stream")


async def _own_file(request: Request, what: str) -> Any:
    """The caller's file (its record or its bytes, `FileStore.get` / `.content`); any other is 404."""
    front = front_of(request)
    key = await front.authenticate(request)
    file_id = request.path_params["file_id"]
    found = await anyio.to_thread.run_sync(getattr(front.files, what), key.name, file_id)
    if found is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return found


def file_body(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.file_id, "object": "file", "bytes": record.size_bytes, "created_at": int(record.created_at.timestamp()),
        "filename": record.filename, "purpose": record.purpose, "status": "processed", "status_details": None,
        "expires_at": None,
    }


# --- batches ----------------------------------------------------------------------------


async def create_batch(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    body = await json_body(request)
    await front.check_limits(key)  # a batch is one request against the key's requests/min, refused once its budget is spent
    body = await front.batches.create(key, body)
    return JSONResponse(body, headers={BATCH_ID_HEADER: body["id"]})


async def get_batch(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    row = await front.batches.get(key, request.path_params["batch_id"])
    return JSONResponse(await front.batches.describe(row), headers={BATCH_ID_HEADER: row.batch_id})


async def cancel_batch(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    body = await front.batches.cancel(key, request.path_params["batch_id"])
    return JSONResponse(body, headers={BATCH_ID_HEADER: body["id"]})


async def list_batches(request: Request) -> Response:
    front = front_of(request)
    key = await front.authenticate(request)
    try:
        limit = int(request.query_params.get("limit", DEFAULT_PAGE))
    except ValueError:
        raise InvalidRequestError("limit must be a whole number", param="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}", param="limit")
    return JSONResponse(await front.batches.page(key, after=request.query_params.get("after"), limit=limit))


async def health(request: Request) -> Response:
    """Liveness for a proxy or compose: no key needed, says nothing about the deployment."""
    return JSONResponse({"ok": True})

