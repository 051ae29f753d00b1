"""OpenAI's Chat Completions body <-> llmq's request contract, in both directions.

`chat_request` is the one place a body becomes an `LLMRequest`; when the contract grows
(tools, response_format, image parts: issue 12), this module is what changes, and a field
the contract gains with OpenAI's name passes through by itself: every body field that is
an `LLMRequest` field is handed over as is, and pydantic's verdict names the `param`.

A field OpenAI has and the contract does not is refused with a 400 naming it, unless its
value is the one that changes nothing (`n: 1`, `top_p: 1`, `stop: null`, ...), which some
SDKs and frameworks always send. Fields of the front itself (`stream_options`) are read
here, never sent on. `user` (OpenAI's end-user id) is kept in `metadata["end_user"]`;
`metadata["caller"]` is always the caller's key name, whatever the body said.

Messages: role `developer` (OpenAI's newer name for system) is `system`; content given as
a list of text parts is joined with newlines while the contract's content is text only.

The other direction: `completion_body`, `chunk_body` and `usage_body` write OpenAI's
`chat.completion` and `chat.completion.chunk` objects from `LLMResponse`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llmq.contract.models import LLMRequest, LLMResponse, Message, Usage
from llmq.http.errors import InvalidRequestError

#: OpenAI fields the contract lacks, with the values that ask for nothing: accepted and dropped.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "top_p": (None, 1, 1.0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "seed": (None,),
    "modalities": (None, ["text"]),
}
#: Fields the front reads itself and never hands to the contract.
FRONT_FIELDS = frozenset({"stream_options", "user"})
#: OpenAI's names for contract fields.
RENAMED = {"max_completion_tokens": "max_tokens"}
ROLE_ALIASES = {"developer": "system"}
#: Message keys OpenAI allows with a value that adds nothing.
NEUTRAL_MESSAGE_VALUES: dict[str, tuple[Any, ...]] = {"name": (None,), "refusal": (None,), "tool_calls": (None, [])}
CONTRACT_FIELDS = frozenset(LLMRequest.model_fields)
MESSAGE_FIELDS = frozenset(Message.model_fields)


@dataclass(frozen=True)
class ChatCall:
    """A chat body as the front runs it: the contract's request and what the front itself reads."""

    request: LLMRequest
    stream: bool
    include_usage: bool


def chat_request(body: Any, *, caller: str, stream_allowed: bool = True) -> ChatCall:
    """The one mapping from an OpenAI chat body to an `LLMRequest` (see the module docstring)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", param=None)
    fields: dict[str, Any] = {}
    for name, value in body.items():
        target = RENAMED.get(name, name)
        if target in ("stream", "metadata") or name in FRONT_FIELDS:
            continue
        if target in CONTRACT_FIELDS:
            fields[target] = value
        elif name in NEUTRAL_VALUES:
            if value not in NEUTRAL_VALUES[name]:
                raise InvalidRequestError(
                    f"{name!r} is not supported by llmq's request contract yet (issue 12); leave it out or use "
                    f"{NEUTRAL_VALUES[name][-1]!r}", param=name, code="unsupported_parameter",
                )
        else:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be true or false", param="stream")
    if stream and not stream_allowed:
        raise InvalidRequestError("'stream' cannot be true here (batch requests are not streamed)", param="stream")
    fields["stream"] = stream
    if "messages" in fields:
        fields["messages"] = _messages(fields["messages"])
    fields["metadata"] = _metadata(body, caller)
    include_usage = _include_usage(body.get("stream_options"), stream)
    try:
        request = LLMRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InvalidRequestError(
            f"{param_name(error['loc']) or 'body'}: {error['msg'].removeprefix('Value error, ')}",
            param=param_name(error["loc"]),
        ) from None
    return ChatCall(request, stream, include_usage)


def _messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages  # the contract refuses it, naming `messages`
    return [_message(message, index) for index, message in enumerate(messages)]


def _message(message: Any, index: int) -> Any:
    if not isinstance(message, dict):
        return message
    mapped: dict[str, Any] = {}
    for key, value in message.items():
        if key in MESSAGE_FIELDS:
            mapped[key] = value
        elif key not in NEUTRAL_MESSAGE_VALUES or value not in NEUTRAL_MESSAGE_VALUES[key]:
            raise InvalidRequestError(
                f"messages[{index}].{key} is not supported by llmq's request contract yet (issue 12)",
                param=f"messages[{index}].{key}", code="unsupported_parameter",
            )
    mapped["role"] = ROLE_ALIASES.get(mapped.get("role"), mapped.get("role"))  # type: ignore[arg-type]
    content = mapped.get("content")
    if isinstance(content, list) and Message.model_fields["content"].annotation is str:
        mapped["content"] = _text_parts(content, index)
    return mapped


def _text_parts(parts: list[Any], index: int) -> str:
    texts: list[str] = []
    for position, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"messages[{index}].content[{position}]: only text parts are served yet ({kind or 'no type'} given); "
                "image and other parts need llmq's request contract to grow (issue 12)",
                param=f"messages[{index}].content[{position}]", code="unsupported_content",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _metadata(body: dict[str, Any], caller: str) -> dict[str, Any]:
    given = body.get("metadata")
    if given is not None and not isinstance(given, dict):
        raise InvalidRequestError("'metadata' must be an object of strings", param="metadata")
    metadata = dict(given or {})
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidRequestError("'user' must be a string", param="user")
        metadata["end_user"] = user
    metadata["caller"] = caller
    return metadata


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise InvalidRequestError("'stream_options' takes only 'include_usage'", param="stream_options")
    return bool(options.get("include_usage"))


def param_name(location: tuple[int | str, ...] | list[int | str]) -> str | None:
    """pydantic's ("messages", 0, "content") as OpenAI names it: messages[0].content."""
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


# --- llmq -> OpenAI -------------------------------------------------------------------


def completion_body(job_id: str, response: LLMResponse, created_s: float | None = None) -> dict[str, Any]:
    """OpenAI's `chat.completion` object for one answer; its id is the job id."""
    message: dict[str, Any] = {"role": "assistant", "content": response.content, "refusal": None}
    tool_calls = getattr(response, "tool_calls", None)
    if tool_calls:
        message["tool_calls"] = [_plain(call) for call in tool_calls]
    return {
        "id": job_id,
        "object": "chat.completion",
        "created": int(created_s or time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(response)}],
        "usage": usage_body(response.usage),
        "system_fingerprint": None,
    }


def chunk_body(
    job_id: str, model: str, created_s: int, *, delta: dict[str, Any] | None = None, finish: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`: a delta, the closing chunk (`finish`), or the usage chunk (no choices)."""
    choices = [] if usage is not None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    ]
    return {
        "id": job_id, "object": "chat.completion.chunk", "created": created_s, "model": model,
        "system_fingerprint": None, "choices": choices, "usage": usage_body(usage) if usage is not None else None,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finish_reason(response: LLMResponse) -> str:
    return str(getattr(response, "finish_reason", None) or response.metadata.get("finish_reason") or "stop")


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value
