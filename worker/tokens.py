"""A fast local token estimate, for limits reserved before a call and for the mock.

No tokenizer files are loaded (nothing is downloaded at run time); the limiter
reserves with this estimate and settles to the provider's real count afterwards.

The estimate leans high on purpose: a provider counts a request's prompt against
tokens/min when it admits it, and an estimate below that count lets more through
than the provider allows (429s). A text counts the larger of its UTF-8 bytes / 4
(English runs ~4 characters a token; other scripts take more tokens a character,
roughly in step with their UTF-8 length) and its words (a BPE vocabulary rarely
joins two words into one token), so short-word text and numbers are not undercounted.

Images count by OpenAI's tile formula when their size is known (a data: image's header
says it): scaled to fit 2048x2048, then its short side to 768, 85 tokens plus 170 per
512-pixel tile; 85 at detail "low". An image by URL has no size here, so it counts
`UNKNOWN_IMAGE_TOKENS`, the most one image costs at OpenAI (1,445 tokens, 8 tiles at detail
high) rounded up to the most it costs at Anthropic (about 1,600 for 1.15 megapixels). Tool
definitions and a JSON schema count as the JSON text they are sent as.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmq.contract.messages import ImageURL, Message
    from llmq.contract.models import JobRequest

#: UTF-8 bytes per token for English text in common BPE vocabularies (OpenAI's rule of thumb).
BYTES_PER_TOKEN = 4
#: Tokens each message adds for role and separators in chat formats (OpenAI's chat format adds 3).
TOKENS_PER_MESSAGE = 4
#: Tokens that prime the reply (OpenAI's chat format adds 3 to every prompt: `<|start|>assistant<|message|>`).
REPLY_PRIMING_TOKENS = 3


def estimate_tokens(text: str) -> int:
    size_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
    return max(1, -(-size_bytes // BYTES_PER_TOKEN), len(text.split()))


#: OpenAI's image accounting (vision guide): a base per image, and per 512-pixel tile at detail high.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
#: An image whose size is not known here (given by URL): the most one image costs (see above).
UNKNOWN_IMAGE_TOKENS = 1600


def estimate_prompt_tokens(messages: list[tuple[str, str]] | list[Message]) -> int:
    """Estimate for a whole chat: content plus a small per-message overhead and the reply's priming."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        if isinstance(message, tuple):
            total += estimate_tokens(message[1]) + TOKENS_PER_MESSAGE
        else:
            total += estimate_message_tokens(message)
    return total


def estimate_message_tokens(message: Message) -> int:
    if isinstance(message.content, str):  # the plain text message: nothing more to look at
        tokens = estimate_tokens(message.content)
    else:
        tokens = estimate_tokens(message.text) + sum(image_tokens(image) for image in message.images)
    for call in message.tool_calls or ():
        tokens += estimate_tokens(call.function.name + call.function.arguments)
    return tokens + TOKENS_PER_MESSAGE


def estimate_request_prompt_tokens(request: JobRequest) -> int:
    """A request's prompt tokens: messages, images, tool definitions and the JSON schema; or the
    texts of an embedding job."""
    if not hasattr(request, "messages"):
        return sum(estimate_tokens(text) for text in request.texts)
    total = estimate_prompt_tokens(request.messages)
    if request.tools is not None:
        total += estimate_tokens(json.dumps([tool.model_dump(exclude_none=True) for tool in request.tools]))
    if request.response_format is not None and request.response_format.schema_dict is not None:
        total += estimate_tokens(json.dumps(request.response_format.schema_dict))
    return total


def image_tokens(image: ImageURL) -> int:
    if image.detail == "low":
        return IMAGE_BASE_TOKENS
    size = image_size(image)
    if size is None:
        return UNKNOWN_IMAGE_TOKENS
    width, height = size
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    tiles = math.ceil(width * scale / 512) * math.ceil(height * scale / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def image_size(image: ImageURL) -> tuple[int, int] | None:
    """Width and height from a data: image's header (PNG, GIF, JPEG, WebP); None when unknown."""
    inline = image.inline
    if inline is None:
        return None
    try:
        return _size_from_header(base64.b64decode(inline.data_base64))
    except (ValueError, struct.error):
        return None


def _size_from_header(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame header (SOF0-SOF15 but DHT, JPG, DAC) holds height then width."""
    index = 2
    while index + 9 < len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        length = struct.unpack(">H", data[index + 2 : index + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[index + 5 : index + 9])
            return width, height
        index += 2 + length
    return None
