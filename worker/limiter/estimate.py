"""What a call reserves before it runs: the prompt estimate plus the most the reply may use.

The limiter settles to the provider's real count afterwards; worker/tokens.py says why the
estimate leans high.
"""

from __future__ import annotations

from llmq.contract.models import JobRequest
from llmq.worker.tokens import estimate_request_prompt_tokens


def estimate_request_tokens(request: JobRequest) -> int:
    """Tokens to reserve before a call: the prompt estimate (images, tool definitions and a JSON
    schema included; an embedding job's inputs) plus `max_tokens` (0 for embeddings)."""
    return estimate_request_prompt_tokens(request) + request.max_tokens
