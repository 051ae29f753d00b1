"""OpenAI's Chat Completions body <-> llmq's request contract, in both directions.

`chat_request` is the one place a body becomes an `LLMRequest`. The contract speaks
OpenAI's Chat Completions (docs/requests.md), so every body field that is an `LLMRequest`
field passes through as is: messages with their text and image parts, tool calls and tool
results, `tools`, `tool_choice`, `response_format`, `stop`, `seed`, `top_p`,
`max_completion_tokens`, and llmq's own `provider` and `provider_options` (the SDKs'
`extra_body`); the contract's verdict names the `param` (bodies.py). `service_tier` is read in
OpenAI's words (`SERVICE_TIERS`): `flex` is the contract's flex tier, `auto` and `default` the
provider entry's own tier; a tier the contract cannot honour (`priority`, `scale`) is refused.

A field OpenAI has and llmq's request lacks is refused with a 400 naming it, unless its
value is the one that asks for nothing (`n: 1`, `presence_penalty: 0`, `logprobs: false`,
...), which some SDKs and frameworks always send; the refusal says what to do instead
(`LACKING`). `stream_options` is the front's own, never sent on; `user` and `metadata`
become the job's metadata, whose `caller` is the key's name.

An answer's message sent back as it came (`messages.append(reply.choices[0].message)`)
carries what the SDKs add to it: `refusal: null`, `parsed`, a streamed call's `index`,
`function.parsed_arguments`. All of it is derived from the answer or empty, so it is
dropped here rather than refused by the contract.

The other direction: `completion_body`, `chunk_body`, `chunk_delta` and `usage_body` write
OpenAI's `chat.completion` and `chat.completion.chunk` objects from `LLMResponse`s. A JSON
answer's content is the JSON text, as OpenAI sends it (the SDKs parse it themselves), and
`service_tier` the tier the answer ran at where its result records one (`answer_service_tier`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from llmq.contract.messages import ToolCall
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.contract.tiers import ServiceTier
from llmq.http.bodies import body_object, job_metadata, split_body, unrecognized, validated
from llmq.http.errors import InvalidRequestError

#: The way out for a parameter of one provider's API: llmq sends provider_options as they are.
PROVIDER_OPTION = ", or pass it as provider_options.{name}, a provider's own parameter (the SDKs' extra_body; docs/requests.md)"


@dataclass(frozen=True)
class Lacking:
    """An OpenAI field llmq's request has no field for."""

    #: The values that ask for nothing: accepted and dropped.
    neutral: tuple[Any, ...] = (None,)
    #: What the refusal says after "leave it out".
    instead: str = PROVIDER_OPTION


NO_LOGPROBS = " (answers carry no log probabilities)"
LACKING: dict[str, Lacking] = {
    "n": Lacking((None, 1), " (a job has one answer: send n requests for n answers)"),
    "logprobs": Lacking((None, False), NO_LOGPROBS),
    "top_logprobs": Lacking((None, 0), NO_LOGPROBS),
    "modalities": Lacking((None, ["text"]), " (answers are text)"),
    "audio": Lacking((None,), " (answers are text)"),
    "functions": Lacking((None, []), ", and use tools (OpenAI's newer name)"),
    "function_call": Lacking((None, "none", "auto"), ", and use tool_choice (OpenAI's newer name)"),
    "presence_penalty": Lacking((None, 0, 0.0)),
    "frequency_penalty": Lacking((None, 0, 0.0)),
    "logit_bias": Lacking((None, {})),
    "parallel_tool_calls": Lacking((None, True)),
    "store": Lacking((None, False)),
    "reasoning_effort": Lacking(),
    "verbosity": Lacking(),
    "prediction": Lacking(),
    "web_search_options": Lacking(),
    "prompt_cache_key": Lacking(),
    "safety_identifier": Lacking(),
}
#: OpenAI's `service_tier` words the contract can honour, and the tier each asks for (None: the
#: provider entry's own, `service_tier:` in its config, else standard).
SERVICE_TIERS: dict[str, ServiceTier | None] = {"auto": None, "default": None, "flex": "flex"}
#: The contract's tiers in OpenAI's words, for the answer's `service_tier`.
OPENAI_TIER_NAMES: dict[str, str] = {"standard": "default", "flex": "flex"}
#: Fields the front reads itself and never hands to the contract as they are.
FRONT_FIELDS = frozenset({"stream", "stream_options", "metadata", "user", "service_tier"})
CONTRACT_FIELDS = frozenset(LLMRequest.model_fields) - FRONT_FIELDS
#: Keys of an answer's message the SDKs send back with it, with the values that carry nothing
#: (None: any value, being derived from the answer: `parsed` from content).
REPLAYED_MESSAGE_KEYS: dict[str, tuple[Any, ...] | None] = {
    "refusal": (None,), "annotations": (None, []), "audio": (None,), "function_call": (None,), "parsed": None,
}


@dataclass(frozen=True)
class ChatCall:
    """A chat body as the front runs it: the contract's request and what the front itself reads."""

    request: LLMRequest
    stream: bool
    include_usage: bool


def chat_request(body: Any, *, caller: str, stream_allowed: bool = True) -> ChatCall:
    """The one mapping from an OpenAI chat body to an `LLMRequest` (see the module docstring)."""
    body = body_object(body)
    fields, others = split_body(body, CONTRACT_FIELDS, FRONT_FIELDS)
    for name, value in others.items():
        _check_lacking(name, value)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be true or false", param="stream")
    if stream and not stream_allowed:
        raise InvalidRequestError("'stream' cannot be true here (batch requests are not streamed)", param="stream")
    if isinstance(fields.get("messages"), list):
        fields["messages"] = [_message(message) for message in fields["messages"]]
    fields["stream"] = stream
    fields["metadata"] = job_metadata(body, caller)
    tier = _service_tier(body.get("service_tier"))
    if tier is not None:
        fields["service_tier"] = tier
    include_usage = _include_usage(body.get("stream_options"), stream)
    return ChatCall(validated(LLMRequest, fields), stream, include_usage)


def _check_lacking(name: str, value: Any) -> None:
    lacking = LACKING.get(name)
    if lacking is None:
        raise unrecognized(name)
    if value not in lacking.neutral:
        harmless = [json.dumps(neutral) for neutral in lacking.neutral if neutral is not None]
        raise InvalidRequestError(
            f"{name}: llmq's request has no such field; leave it out"
            f"{' or send ' + harmless[0] if harmless else ''}{lacking.instead.format(name=name)}",
            param=name, code="unsupported_parameter",
        )


def _service_tier(value: Any) -> ServiceTier | None:
    """The contract's tier for OpenAI's `service_tier` (None: not given, or the entry's own)."""
    if value is None:
        return None
    if isinstance(value, str) and value in SERVICE_TIERS:
        return SERVICE_TIERS[value]
    raise InvalidRequestError(
        f"service_tier {value!r}: llmq runs a call at its provider entry's own tier or at the flex tier; send "
        "'flex' (OpenAI and Gemini entries, at batch prices: docs/batch-lane.md#flex), 'auto' or 'default' "
        "(the entry's own tier), or leave it out",
        param="service_tier", code="unsupported_value",
    )


def _message(message: Any) -> Any:
    """A message as the contract takes it: what an answer's message sent back carries extra, dropped."""
    if not isinstance(message, dict) or not (REPLAYED_MESSAGE_KEYS.keys() & message or message.get("tool_calls")):
        return message  # the plain message, as sent by hand: the contract's as it is
    mapped = {
        key: value for key, value in message.items()
        if key not in REPLAYED_MESSAGE_KEYS or (REPLAYED_MESSAGE_KEYS[key] is not None and value not in REPLAYED_MESSAGE_KEYS[key])
    }
    if isinstance(mapped.get("tool_calls"), list):
        mapped["tool_calls"] = [_replayed_call(call) for call in mapped["tool_calls"]]
    return mapped


def _replayed_call(call: Any) -> Any:
    """A tool call as the SDKs send it back: without the stream's `index` and their own `parsed_arguments`."""
    if not isinstance(call, dict):
        return call
    call = {key: value for key, value in call.items() if key != "index"}
    if isinstance(call.get("function"), dict):
        call["function"] = {key: value for key, value in call["function"].items() if key != "parsed_arguments"}
    return call


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise InvalidRequestError("'stream_options' takes only 'include_usage'", param="stream_options")
    return bool(options.get("include_usage"))


# --- llmq -> OpenAI -------------------------------------------------------------------


def completion_body(job_id: str, response: LLMResponse, created_s: float | None = None) -> dict[str, Any]:
    """OpenAI's `chat.completion` object for one answer; its id is the job id."""
    message: dict[str, Any] = {"role": "assistant", "content": response.content, "refusal": None}
    if response.tool_calls:
        message["tool_calls"] = [call.model_dump(mode="json") for call in response.tool_calls]
        message["content"] = response.content or None  # OpenAI's null beside calls, not ""
    return {
        "id": job_id,
        "object": "chat.completion",
        "created": int(created_s or time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(response)}],
        "usage": usage_body(response.usage),
        "service_tier": answer_service_tier(response),
        "system_fingerprint": None,
    }


def chunk_body(
    job_id: str, model: str, created_s: int, *, delta: dict[str, Any] | None = None, finish: str | None = None,
    usage: Usage | None = None, service_tier: str | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`: a delta, the closing chunk (`finish`), or the usage chunk (no choices).
    `service_tier` is known once the answer is whole: the closing and usage chunks carry it."""
    choices = [] if usage is not None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    ]
    return {
        "id": job_id, "object": "chat.completion.chunk", "created": created_s, "model": model,
        "service_tier": service_tier, "system_fingerprint": None, "choices": choices,
        "usage": usage_body(usage) if usage is not None else None,
    }


def chunk_delta(chunk: LLMResponse) -> dict[str, Any]:
    """A streamed chunk's `delta`: its new text and its pieces of tool calls (`index`; the first
    piece of a call has its `id`, `type` and `function.name`, later ones add `function.arguments`)."""
    delta: dict[str, Any] = {}
    if chunk.content:
        delta["content"] = chunk.content
    if chunk.tool_call_deltas:
        delta["tool_calls"] = [piece.model_dump(mode="json", exclude_none=True) for piece in chunk.tool_call_deltas]
    return delta


def whole_calls_delta(calls: list[ToolCall]) -> dict[str, Any]:
    """Calls that arrived whole (a provider that does not stream them), as one delta of first pieces."""
    return {"tool_calls": [{"index": index, **call.model_dump(mode="json")} for index, call in enumerate(calls)]}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finish_reason(response: LLMResponse) -> str:
    return response.finish_reason or "stop"


def answer_service_tier(response: LLMResponse) -> str | None:
    """The tier the answer ran at, in OpenAI's words, where its result records one (OpenAI and Gemini
    entries: the worker notes it); None for a cache hit, which ran nowhere."""
    tier = response.metadata.get("service_tier")
    if not isinstance(tier, str) or response.metadata.get("cached"):
        return None
    return OPENAI_TIER_NAMES.get(tier)
