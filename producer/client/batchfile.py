"""Batch files: one request per line, in OpenAI's Batch API line shape.

    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    {"custom_id": "...", "method": "POST", "url": "/v1/embeddings", "body": {...}}

`url` says the job's kind (chat when the line has none: the short `{"custom_id", "body"}`
stays valid); `body` is the request, with OpenAI's field names, so a line of an OpenAI
Batch API input file runs unchanged, and a body field llmq has no field for is refused
by name. Every line is checked before anything is enqueued; a bad line is refused with
its number and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmq.client.service import BatchItem, LLMService, RequestError
from llmq.contract.common import MAX_METADATA_DEPTH, id_problem
from llmq.contract.models import JobKind
from llmq.contract.validation import summarize_problems

#: A line longer than this is refused rather than read into memory whole.
MAX_LINE_BYTES = 8 * 1024 * 1024
#: A line's `url` -> the kind of job its body is (OpenAI's Batch API endpoints).
KIND_BY_URL = {"/v1/chat/completions": JobKind.CHAT, "/v1/embeddings": JobKind.EMBEDDING}
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})


def read_batch_file(path: str | Path, service: LLMService) -> list[BatchItem]:
    items: list[BatchItem] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    try:
        handle = Path(path).open("rb")
    except OSError as exc:
        raise RequestError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            if len(raw) > MAX_LINE_BYTES:
                problems.append((where, f"is {len(raw)} bytes; the limit is {MAX_LINE_BYTES} (split the request)"))
                continue
            if not raw.strip():
                continue
            try:
                item = _parse_line(raw, where, service, seen, number)
            except RequestError as exc:
                problems.append((where, str(exc).removeprefix(where + ": ")))
                continue
            items.append(item)
    if problems:
        raise RequestError(f"{path}: refused, nothing enqueued: {summarize_problems(problems, 'bad lines')}", problems)
    if not items:
        raise RequestError(f"{path}: holds no requests (one JSON object per line: custom_id, method, url and body)")
    return items


def _parse_line(raw: bytes, where: str, service: LLMService, seen: dict[str, int], number: int) -> BatchItem:
    try:
        line: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        # Python's parser gives up near a thousand levels; a request never needs more than a few.
        raise RequestError(f"{where}: JSON nested too deeply to read (metadata may nest {MAX_METADATA_DEPTH} "
                           "levels); flatten it") from None
    if not isinstance(line, dict):
        raise RequestError(f"{where}: must be a JSON object with custom_id and body")
    unknown = sorted(set(line) - LINE_KEYS)
    if unknown:
        raise RequestError(f"{where}: unknown key {unknown[0]!r}; a line holds custom_id, method, url and body")
    kind = _line_kind(line, where)
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip() or len(custom_id) > 256:
        raise RequestError(f"{where}: custom_id must be a non-empty string of at most 256 characters")
    problem = id_problem(custom_id)
    if problem:
        raise RequestError(f"{where}: custom_id {problem}")
    if custom_id in seen:
        raise RequestError(f"{where}: custom_id {custom_id!r} repeats line {seen[custom_id]}; give each line its own")
    body = line.get("body")
    if not isinstance(body, dict):
        raise RequestError(f"{where}: body must be a JSON object: the request (messages, model, ... or input, model)")
    request = service.prepare(body, where=f"{where}: body", kind=kind)
    seen[custom_id] = number
    return BatchItem(request, custom_id)


def _line_kind(line: dict[str, Any], where: str) -> JobKind:
    if line.get("method", "POST") != "POST":
        raise RequestError(f"{where}: method must be \"POST\" (got {line.get('method')!r})")
    url = line.get("url", "/v1/chat/completions")
    if url not in KIND_BY_URL:
        raise RequestError(f"{where}: url {url!r} is not served; use one of: {', '.join(KIND_BY_URL)}")
    return KIND_BY_URL[url]
