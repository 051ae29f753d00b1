"""A fast local token estimate, for limits reserved before a call and for the mock.

No tokenizer files are loaded (nothing is downloaded at run time); the limiter
reserves with this estimate and settles to the provider's real count afterwards.

The estimate leans high on purpose: a provider counts a request's prompt against
tokens/min when it admits it, and an estimate below that count lets more through
than the provider allows (429s). A text counts the larger of its UTF-8 bytes / 4
(English runs ~4 characters a token; other scripts take more tokens a character,
roughly in step with their UTF-8 length) and its words (a BPE vocabulary rarely
joins two words into one token), so short-word text and numbers are not undercounted.
"""

from __future__ import annotations

#: UTF-8 bytes per token for English text in common BPE vocabularies (OpenAI's rule of thumb).
BYTES_PER_TOKEN = 4
#: Tokens each message adds for role and separators in chat formats (OpenAI's chat format adds 3).
TOKENS_PER_MESSAGE = 4
#: Tokens that prime the reply (OpenAI's chat format adds 3 to every prompt: `<|start|>assistant<|message|>`).
REPLY_PRIMING_TOKENS = 3


def estimate_tokens(text: str) -> int:
    size_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
    return max(1, -(-size_bytes // BYTES_PER_TOKEN), len(text.split()))


def estimate_prompt_tokens(messages: list[tuple[str, str]] | list[object]) -> int:
    """Estimate for a whole chat: content plus a small per-message overhead and the reply's priming."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        content = message[1] if isinstance(message, tuple) else getattr(message, "content", "")
        total += estimate_tokens(content) + TOKENS_PER_MESSAGE
    return total
