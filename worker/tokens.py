"""A fast local token estimate, for limits reserved before a call and for the mock.

No tokenizer files are loaded (nothing is downloaded at run time); the limiter
reserves with this estimate and settles to the provider's real count afterwards.
"""

from __future__ import annotations

#: Characters per token for English text in common BPE vocabularies (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4
#: Tokens each message adds for role and separators in chat formats.
TOKENS_PER_MESSAGE = 4


def estimate_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def estimate_prompt_tokens(messages: list[tuple[str, str]] | list[object]) -> int:
    """Estimate for a whole chat: content plus a small per-message overhead."""
    total = 0
    for message in messages:
        content = message[1] if isinstance(message, tuple) else getattr(message, "content", "")
        total += estimate_tokens(content) + TOKENS_PER_MESSAGE
    return total
