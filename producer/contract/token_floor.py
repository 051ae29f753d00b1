"""The fewest tokens a chat prompt can take, so routing skips a hop only when its context window
surely cannot hold the request.

The limiter's estimate (worker/tokens.py) leans high so that rate limits hold; routing needs the
opposite, a floor, since skipping a hop that could have served would refuse a request wrongly.
Two floors for each message's text; the larger counts:

- **Words.** No token of the tokenizers measured below holds a blank (whitespace other than a
  line break) between two other characters: tiktoken's and Llama 3's pre-tokenizers split there,
  SentencePiece's pieces start at `▁`. Some o200k tokens do run across a line break (`;\\n//`). So a line of w words has w - 1 blanks between words, each
  a token boundary of its own, and a text of W words (`str.split`) and L line breaks (`\\n`,
  `\\r`), at most L + 1 lines, takes at least W - L tokens.
- **Bytes.** No token is longer than `MAX_TOKEN_BYTES` bytes of UTF-8, so a text of B bytes takes
  at least B / 1024 tokens (this floor matters only for text with few blanks).

Measured on the public vocabularies, with js-tiktoken's, @anthropic-ai/tokenizer's and
@lenml/tokenizer-{llama3,gemini}'s data files:

| vocabulary | used by | longest token | tokens across a blank |
|---|---|---|---|
| cl100k_base | gpt-4, gpt-3.5-turbo, text-embedding-3 | 128 bytes (128 spaces) | none |
| o200k_base | gpt-4o, gpt-4.1, o-series, gpt-5 | 128 bytes | none (194 across a line break, at most two) |
| Llama 3 | Llama 3 on vLLM, Ollama, Bedrock | 128 bytes | none |
| Gemma | Gemini's open sibling | 48 bytes | none |
| Claude before Claude 3 | claude-2, claude-instant | 1024 bytes (1024 spaces) | none |

Claude 3 and later and Gemini do not publish theirs; they are taken to follow the rule every
published one follows. Only message text counts: the chat template, tool definitions, a JSON
schema and images add tokens a floor may leave out, and tool-call arguments are left out
because providers render them their own way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmq.contract.messages import Message

#: The longest token of any measured vocabulary, in UTF-8 bytes (Claude's pre-3 tokenizer: 1024 spaces).
MAX_TOKEN_BYTES = 1024


def text_token_floor(text: str) -> int:
    """The fewest tokens `text` can take in any measured tokenizer (see the module docstring)."""
    if not text:
        return 0
    size_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    by_bytes = -(-size_bytes // MAX_TOKEN_BYTES)
    by_words = len(text.split()) - text.count("\n") - text.count("\r")
    return max(by_bytes, by_words)


def prompt_token_floor(messages: Iterable[Message]) -> int:
    """The fewest tokens the messages' text can take: each message's floor, added up (each is tokenized apart)."""
    return sum(text_token_floor(message.text) for message in messages)
