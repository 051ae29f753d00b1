"""Benchmark-only experiment, loaded into llmq worker processes through PYTHONPATH by
`bench.ratelimit.run --pool-fix`: the proposed fix for httpcore's connection-pool race.

httpcore 1.0.9 hands an idle HTTP/1.1 connection to a queued request, but the connection
reports itself available until that request starts on it, so the next pass hands the same
connection to another request; the loser gets ConnectionNotAvailable and queues again
(encode/httpcore#822; the review of #1111 points at this reuse case). On a busy event loop a
request can lose for seconds. This hides connections already handed out from the reuse pass.
"""

from __future__ import annotations

from typing import Any

import httpcore._async.connection_pool as pool_module

_original = pool_module.AsyncConnectionPool._assign_requests_to_connections


def _assign_requests_to_connections(self: Any) -> list[Any]:
    handed_out = [request.connection for request in self._requests if request.connection is not None]
    hidden = list({id(connection): connection for connection in handed_out if connection.is_available()}.values())
    for connection in hidden:
        connection.is_available = lambda: False  # an instance attribute shadows the method
    try:
        return _original(self)
    finally:
        for connection in hidden:
            del connection.is_available


pool_module.AsyncConnectionPool._assign_requests_to_connections = _assign_requests_to_connections
