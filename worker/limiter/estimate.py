"""What a call reserves before it runs: the prompt estimate plus the most the reply may use.

The limiter settles to the provider's real count afterwards; worker/tokens.py says why the
estimate leans high.
"""

from __future__ import annotations

from llmq.contract.models import LLMRequest
from llmq.worker.tokens import estimate_prompt_tokens


def estimate_request_tokens(request: LLMRequest) -> int:
    """Tokens to reserve before a call: the prompt estimate plus `max_tokens`."""
    messages: list[object] = list(request.messages)
    return estimate_prompt_tokens(messages) + request.max_tokens
