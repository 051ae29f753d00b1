"""The base of every provider batch API: what llmq needs of one, over the sync adapter's HTTP.

A batch API speaks for one provider entry through that entry's sync adapter (its client, key
headers, error mapping and answer parsing), so a line's answer is read exactly as a sync
call's would be. A subclass writes:

- `encode_line(line)`: the one function that turns a job's request (an `LLMRequest`, or an
  `EmbeddingRequest` where the provider batches embeddings) into the provider's batch line; it
  calls the sync adapter's `build_body` (`build_embeddings_body`), so it grows with the contract
  (`endpoint(request)` says which endpoint a line goes to, e.g. OpenAI's
  `/v1/chat/completions` or `/v1/embeddings`: a provider batch holds lines of one endpoint);
- `submit(...)`, `find(...)`, `get(...)`, `cancel(...)`: the batch's life at the provider,
  each answered as a `RemoteBatch` in llmq's words;
- `results(remote, lines)`: each line's answer or error (`LineResult`), however the provider
  hands them out (output and error files, a results stream, inline responses).

Like the sync adapters, these never retry: an HTTP failure raises the error tree's class and
the poller (worker/batches/poll.py) decides when to look again.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx

from llmq.contract.models import EmbeddingRequest, JobRequest, JobResponse
from llmq.worker import errors
from llmq.worker.providers.http import HTTPProvider

#: A provider batch's state at the provider, in one vocabulary for every provider (OpenAI's own).
RemoteState = Literal[
    "validating", "in_progress", "finalizing", "completed", "expired", "failed", "cancelling", "cancelled"
]
ENDED_STATES: frozenset[str] = frozenset({"completed", "expired", "failed", "cancelled"})
#: Pages of a provider's batch list looked through for a batch whose creation answer was lost.
FIND_PAGES = 5
#: Anthropic's custom_id pattern, the narrowest of the providers': a line key always fits it.
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def line_key(job_id: str) -> str:
    """The id a line carries at the provider (its custom_id or key): the job id where it fits."""
    return job_id if _KEY.match(job_id) else "k" + hashlib.sha256(job_id.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Line:
    """One job as a line of a provider batch; `request.model` is the hop's model."""

    job_id: str
    request: JobRequest

    @property
    def key(self) -> str:
        return line_key(self.job_id)


@dataclass(frozen=True)
class RemoteBatch:
    """What the provider says of a batch."""

    remote_id: str
    state: RemoteState
    #: The provider's own word for it (processing_status, BATCH_STATE_..., status).
    raw_state: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    input_file: str | None = None
    #: Where the results are: output and error file ids, a results URL, inline responses, a file name.
    handles: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


@dataclass(frozen=True)
class LineResult:
    """One line's outcome: an answer, or the typed error a sync call would have raised."""

    key: str
    response: JobResponse | None = None
    error: errors.ProviderError | None = None


class ProviderBatchAPI(ABC):
    """One provider entry's batch API, speaking through its sync adapter."""

    #: The adapter `type:` it serves (the keys of `contract.tiers.PROVIDER_BATCH_DEFAULTS`).
    type_name: ClassVar[str]

    def __init__(self, adapter: HTTPProvider[Any]) -> None:
        self.adapter = adapter
        self.name = adapter.name

    # --- the lines -------------------------------------------------------------------

    def endpoint(self, request: JobRequest) -> str:
        """The endpoint a line of this request goes to; lines of one provider batch share it."""
        return ""

    @abstractmethod
    def encode_line(self, line: Line) -> dict[str, Any]:
        """The line as the provider takes it (a JSONL line, or one entry of a request list)."""

    def encoded(self, line: Line) -> bytes:
        return json.dumps(self.encode_line(line), separators=(",", ":"), ensure_ascii=False).encode()

    # --- the batch at the provider ------------------------------------------------------

    @abstractmethod
    async def submit(self, provider_batch_id: str, lines: list[Line], endpoint: str, window_s: float) -> RemoteBatch:
        """Create the batch (uploading its input first where the provider wants a file)."""

    @abstractmethod
    async def find(
        self, provider_batch_id: str, lines: list[Line], since_s: float, taken: frozenset[str]
    ) -> RemoteBatch | None:
        """The batch an earlier `submit` made, if the provider has it (a submit whose answer was lost).

        `since_s`: when that submit began (epoch s); `taken`: remote ids other provider batches hold.
        """

    @abstractmethod
    async def get(self, remote_id: str) -> RemoteBatch:
        """Its state now."""

    @abstractmethod
    async def cancel(self, remote_id: str) -> RemoteBatch:
        """Ask the provider to stop it; lines already answered stay answered."""

    @abstractmethod
    def results(self, remote: RemoteBatch, lines: list[Line]) -> AsyncIterator[LineResult]:
        """Every line the provider answered or failed, in any order; a line it never ran is absent."""

    # --- helpers for subclasses -------------------------------------------------------

    def headers(self) -> dict[str, str]:
        return self.adapter.build_headers(None, None)

    def answer(self, line: Line, body: Any, request_id: str | None = None) -> JobResponse:
        """A line's answer, read by the sync adapter exactly as a sync call's body would be."""
        response = httpx.Response(200, headers={self.adapter.request_id_headers[0]: request_id} if request_id else {})
        if isinstance(line.request, EmbeddingRequest):
            return self.adapter.parse_embeddings(line.request, body, response)
        return self.adapter.parse_response(line.request, body, response)

    def line_error(self, line: Line, status_code: int, body: Any, request_id: str | None = None) -> errors.ProviderError:
        """A line's error, classed by the sync adapter as the same status and body would be."""
        message = self.adapter.redact(self.adapter.error_message(body) or json.dumps(body)[:300])
        error_class = self.adapter.map_error(status_code, body, message)
        return error_class(message, provider=self.name, model=line.request.model, status_code=status_code,
                           request_id=request_id)

    def not_run(self, line: Line, message: str, *, expired: bool = False) -> errors.ProviderError:
        """A line the batch never ran: back on its route."""
        error_class = errors.ProviderBatchExpiredError if expired else errors.ProviderBatchError
        return error_class(message, provider=self.name, model=line.request.model)

    async def call(self, method: str, url: str, *, json_body: Any = None,
                           content: bytes | None = None, files: Any = None, data: Any = None,
                           extra_headers: dict[str, str] | None = None) -> httpx.Response:
        """One call of the batch API with the entry's credentials; a non-2xx answer raises its typed error."""
        headers = {**self.headers(), **(extra_headers or {})}
        async with self.adapter.translate_errors(None):
            response = await self.adapter.client.request(
                method, url, json=json_body, content=content, files=files, data=data, headers=headers
            )
        if response.status_code >= 400:
            raise self.adapter.error_from_response(response, None)
        return response

    async def call_json(self, method: str, url: str, **options: Any) -> Any:
        response = await self.call(method, url, **options)
        return self.adapter.parse_json(response, None)

    async def listed(
        self, path: str, *, items: str, cursor_param: str, cursor: Callable[[dict[str, Any]], str | None],
    ) -> AsyncIterator[dict[str, Any]]:
        """The provider's list of batches, newest first, page after page (up to FIND_PAGES pages)."""
        token: str | None = None
        for _ in range(FIND_PAGES):
            joiner = "&" if "?" in path else "?"
            page = await self.call_json("GET", path + (f"{joiner}{cursor_param}={quote(token)}" if token else ""))
            for item in page.get(items) or []:
                yield item
            token = cursor(page)
            if not token:
                return

    async def jsonl(self, url: str) -> AsyncIterator[dict[str, Any]]:
        """A JSONL document, read line by line as it streams in."""
        async with self.adapter.translate_errors(None):
            async with self.adapter.client.stream("GET", url, headers=self.headers()) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self.adapter.error_from_response(response, None)
                async for text in response.aiter_lines():
                    if text.strip():
                        yield self.adapter.parse_event_json(text, None, None, what="batch result line")
