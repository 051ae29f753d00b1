"""A real HTTP server on loopback that a fake provider builds on.

Each provider's fake subclasses `FakeProviderServer` and implements `route`
(success replies and streams in the provider's real wire format) and
`error_reply` (the provider's real error body and headers for a status).
The base gives every fake the same knobs:

- `latency_s`: delay before each reply (and between stream chunks, `chunk_delay_s`);
  `latency_jitter_s`: up to this much more, at random, after the request is admitted
- `fail_next(status, times)`: the next calls get that status with the provider's error body
- `inject(fault, times)`: transport faults: "reset" (close without a reply), "hang"
  (never answer), "malformed" (200 with a body that is not JSON), "truncate"
  (a stream cut off part-way), "stream_error" (the provider's in-stream error
  event after a 200), "trickle" (a stream that sends very slowly)
- `rate_limit(rpm, tpm)`: enforce limits the way the large providers do (429 + retry-after),
  counting each request's tokens at admission as the provider it imitates does (`tokens_for`)
- `requests`: every request received (method, path, query, headers, body)

A control API at `/_fake/*` sets the same knobs from another process (benchmarks).
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw_body: bytes
    received_at: float = field(default_factory=time.time)

    @property
    def body(self) -> Any:
        return json.loads(self.raw_body) if self.raw_body else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    """A complete reply: status, headers and a JSON (or raw) body."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = "application/json"

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body).encode()


@dataclass
class StreamReply:
    """A streamed reply: chunks written one by one with chunked transfer encoding."""

    chunks: Iterable[bytes]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/event-stream"


@dataclass
class Fault:
    kind: str  # "status" or a transport fault name
    times: int
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    path_contains: str | None = None


class RateLimitPolicy:
    """Requests/min and tokens/min enforced over a sliding 60 s window, as providers do."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, window_s: float = 60.0) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()
        self.rejected = 0
        self.accepted = 0
        self.accepted_tokens = 0
        #: Every admission (monotonic s, tokens), for the busiest-window figures.
        self.admitted: list[tuple[float, int]] = []

    def admit(self, tokens: int) -> float | None:
        """None when admitted, else seconds until the request would fit."""
        now = time.monotonic()
        with self.lock:
            while self.events and self.events[0][0] <= now - self.window_s:
                self.events.popleft()
            used_requests = len(self.events)
            used_tokens = sum(count for _, count in self.events)
            over_requests = self.requests_per_minute is not None and used_requests + 1 > self.requests_per_minute
            over_tokens = self.tokens_per_minute is not None and used_tokens + tokens > self.tokens_per_minute
            if over_requests or over_tokens:
                self.rejected += 1
                oldest = self.events[0][0] if self.events else now
                return max(0.05, oldest + self.window_s - now)
            self.events.append((now, tokens))
            self.admitted.append((now, tokens))
            self.accepted += 1
            self.accepted_tokens += tokens
            return None

    def busiest(self, window_s: float | None = None) -> tuple[int, int]:
        """The most requests and the most tokens admitted in any window of `window_s` (default: the policy's)."""
        span_s = self.window_s if window_s is None else window_s
        with self.lock:
            admitted = list(self.admitted)
        most_requests = most_tokens = tokens = start = 0
        for end, (at, count) in enumerate(admitted):
            tokens += count
            while admitted[start][0] <= at - span_s:
                tokens -= admitted[start][1]
                start += 1
            most_requests, most_tokens = max(most_requests, end - start + 1), max(most_tokens, tokens)
        return most_requests, most_tokens

    def reset_s(self) -> float:
        """Seconds until the window holds nothing again (the limits are whole): the newest admission ages out."""
        with self.lock:
            newest = self.events[-1][0] if self.events else None
        return 0.0 if newest is None else max(0.0, newest + self.window_s - time.monotonic())

    def remaining(self) -> tuple[int | None, int | None]:
        with self.lock:
            now = time.monotonic()
            live = [(at, count) for at, count in self.events if at > now - self.window_s]
            requests = None if self.requests_per_minute is None else self.requests_per_minute - len(live)
            tokens = None if self.tokens_per_minute is None else self.tokens_per_minute - sum(c for _, c in live)
            return requests, tokens


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body (and each stream chunk) go out in separate sends; with Nagle's algorithm
    # on, a send waits for the ACK of the one before, which the client delays by ~40 ms: every
    # reply would take >= 40 ms and a test or benchmark would measure TCP timers, not the client.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={key.lower(): value for key, value in self.headers.items()},
            raw_body=raw,
        )
        if parts.path.startswith("/_fake/"):
            self._send(fake.control(request))
            return
        with fake.lock:
            fake.requests.append(request)
        fake.in_flight_changed(+1)
        try:
            fake.serve(request, self)
        finally:
            fake.in_flight_changed(-1)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def _send(self, reply: Reply) -> None:
        payload = reply.payload()
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("content-length", str(len(payload)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _send_stream(self, reply: StreamReply, *, truncate: bool, chunk_delay_s: float) -> None:
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("transfer-encoding", "chunked")
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        chunks = list(reply.chunks)
        if truncate:
            chunks = chunks[: max(1, len(chunks) // 2)]
        for chunk in chunks:
            if chunk_delay_s:
                time.sleep(chunk_delay_s)
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        if truncate:
            self._drop()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    fake: FakeProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-stream (a timeout, a cancelled job) is normal here.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class FakeProviderServer:
    """Base of every fake provider: lifecycle, recording, fault injection, limits."""

    name = "fake"

    def __init__(
        self, *, latency_s: float = 0.0, chunk_delay_s: float = 0.0, port: int = 0, latency_jitter_s: float = 0.0
    ) -> None:
        self.latency_s = latency_s
        self.latency_jitter_s = latency_jitter_s
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.lock = threading.Lock()
        self.limits: RateLimitPolicy | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        #: Text -> HTTP status: a request whose body holds the text always gets that status
        #: (a request the provider can never handle: poison).
        self.poison_markers: dict[str, int] = {}
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProviderServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- knobs ------------------------------------------------------------------

    def fail_next(
        self, status: int, times: int = 1, *, headers: dict[str, str] | None = None, body: Any = None,
        path_contains: str | None = None,
    ) -> None:
        with self.lock:
            self.faults.append(Fault("status", times, status, headers or {}, body, path_contains))

    def inject(self, kind: str, times: int = 1, *, path_contains: str | None = None) -> None:
        assert kind in {"reset", "hang", "malformed", "truncate", "stream_error", "trickle"}, kind
        with self.lock:
            self.faults.append(Fault(kind, times, path_contains=path_contains))

    def poison(self, marker: str, status: int = 500) -> None:
        """Every request whose body contains `marker` fails with `status`, forever (until reset)."""
        with self.lock:
            self.poison_markers[marker] = status

    def _poisoned(self, request: RecordedRequest) -> int | None:
        text = request.raw_body.decode("utf-8", "replace")
        return next((status for marker, status in self.poison_markers.items() if marker in text), None)

    def rate_limit(self, requests_per_minute: int | None, tokens_per_minute: int | None, window_s: float = 60.0) -> RateLimitPolicy:
        self.limits = RateLimitPolicy(requests_per_minute, tokens_per_minute, window_s)
        return self.limits

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()
            self.limits = None
            self.poison_markers.clear()

    def in_flight_changed(self, delta: int) -> None:
        with self.lock:
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _take_fault(self, request: RecordedRequest) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.path_contains and fault.path_contains not in request.path:
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    # --- serving ----------------------------------------------------------------

    def serve(self, request: RecordedRequest, handler: _Handler) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        poisoned = self._poisoned(request) if self.poison_markers else None
        if poisoned is not None:
            handler._send(self.error_reply(poisoned, request))
            return
        fault = self._take_fault(request)
        if fault is not None and fault.kind == "reset":
            handler._drop()
            return
        if fault is not None and fault.kind == "hang":
            time.sleep(3600)
            return
        if fault is not None and fault.kind == "status":
            reply = self.error_reply(fault.status, request)
            reply.headers.update(fault.headers)
            if fault.body is not None:
                reply.body = fault.body
            handler._send(reply)
            return
        if self.limits is not None:
            wait_s = self.limits.admit(self.tokens_for(request))
            if wait_s is not None:
                reply = self.error_reply(429, request)
                reply.headers["retry-after"] = str(max(1, round(wait_s)))
                handler._send(reply)
                return
        if self.latency_jitter_s:
            time.sleep(random.uniform(0.0, self.latency_jitter_s))
        if fault is not None and fault.kind == "stream_error":
            handler._send_stream(self.stream_error_reply(request), truncate=False, chunk_delay_s=self.chunk_delay_s)
            return
        reply = self.route(request)
        if isinstance(reply, StreamReply):
            delay = 0.5 if fault is not None and fault.kind == "trickle" else self.chunk_delay_s
            handler._send_stream(reply, truncate=fault is not None and fault.kind == "truncate", chunk_delay_s=delay)
            return
        if fault is not None and fault.kind == "malformed":
            reply = Reply(200, raw=b'{"id": "broken", "choices": [', headers=reply.headers)
        handler._send(reply)

    def control(self, request: RecordedRequest) -> Reply:
        """`/_fake/fail`, `/_fake/inject`, `/_fake/poison`, `/_fake/rate_limit`, `/_fake/reset`, `/_fake/stats`."""
        action = request.path.removeprefix("/_fake/")
        body = request.body or {}
        if action == "fail":
            self.fail_next(body["status"], body.get("times", 1), headers=body.get("headers"))
        elif action == "inject":
            self.inject(body["kind"], body.get("times", 1))
        elif action == "poison":
            self.poison(body["marker"], body.get("status", 500))
        elif action == "rate_limit":
            self.rate_limit(body.get("requests_per_minute"), body.get("tokens_per_minute"), body.get("window_s", 60.0))
        elif action == "latency":
            self.latency_s = float(body.get("latency_s", 0.0))
            self.chunk_delay_s = float(body.get("chunk_delay_s", 0.0))
            self.latency_jitter_s = float(body.get("latency_jitter_s", 0.0))
        elif action == "reset":
            self.reset()
        elif action != "stats":
            return Reply(404, {"error": f"unknown control action {action}"})
        return Reply(200, self.stats())

    def stats(self) -> dict[str, Any]:
        limits = self.limits
        stats: dict[str, Any] = {
            "requests": len(self.requests),
            "max_in_flight": self.max_in_flight,
            "rate_limited": limits.rejected if limits else 0,
            "accepted": limits.accepted if limits else len(self.requests),
        }
        if limits is not None:
            busiest_requests, busiest_tokens = limits.busiest()
            stats.update(accepted_tokens=limits.accepted_tokens, busiest_window_requests=busiest_requests,
                         busiest_window_tokens=busiest_tokens)
        return stats

    # --- what each provider's fake defines --------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        raise NotImplementedError

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        raise NotImplementedError

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        """A 200 stream that starts normally, then carries the provider's error event."""
        raise NotImplementedError

    def tokens_for(self, request: RecordedRequest) -> int:
        """Tokens a request counts against tokens/min at admission: prompt estimate plus max output.

        A fake whose provider counts differently overrides this; the honest count is the prompt
        tokens the fake reports in its usage plus the most the reply may use."""
        body = request.body if request.raw_body else {}
        text = json.dumps(body.get("messages", body.get("contents", ""))) if isinstance(body, dict) else ""
        return len(text) // 4 + int(body.get("max_tokens", 0) if isinstance(body, dict) else 0)


# --- helpers every fake uses ----------------------------------------------------------


def fake_reply_text(prompt: str, provider: str) -> str:
    """Deterministic reply content: tests compare against this exactly."""
    head = prompt.strip().splitlines()[0][:40] if prompt.strip() else ""
    return f"Task: fake {provider} answer to '{head}'"


def count_words(text: str) -> int:
    return max(1, len(text.split()))


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def split_words(text: str, parts: int = 4) -> Iterator[str]:
    words = text.split(" ")
    size = max(1, -(-len(words) // parts))
    for index in range(0, len(words), size):
        piece = " ".join(words[index : index + size])
        yield piece if index == 0 else " " + piece
