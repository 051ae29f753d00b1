"""A fake AWS Bedrock: Converse, ConverseStream and ListFoundationModels over real HTTP.

It checks auth the way Bedrock does: a Bedrock API key as `Authorization: Bearer`, or
a SigV4 signature that it recomputes with botocore for the secret it knows, answering
403 InvalidSignatureException (with the canonical request, as AWS does) when it differs.
Streams are real `application/vnd.amazon.eventstream` frames, encoded here by hand
(prelude, string headers of type 7, payload, CRC32s) so the adapter's botocore decoder
cross-checks this encoder. Errors carry `{"message"}`, `x-amzn-ErrorType` and
`x-amzn-RequestId`, as the service does. Tools, images, cache points, structured output and
the embedding models' InvokeModel (`bedrock_features`): a tool call streams as a
contentBlockStart (toolUse) and contentBlockDelta input pieces, as ConverseStream sends it.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
import zlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlencode

from tests.support.fakes.base import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    StreamReply,
    count_words,
    fake_reply_text,
)
from tests.support.fakes.bedrock_features import (
    CLAUDE_3,
    CLAUDE_4_5,
    EMBEDDING_MODELS,
    LLAMA_3,
    NOVA_MICRO,
    converse_problem,
    embedding_problem,
    embedding_reply,
    json_text,
    last_text,
    prompt_usage,
    tool_use,
)

TEST_API_KEY = "bedrock-api-key-TEST-0000"
#: A made-up key pair in AWS's documented example format; never a real one.
TEST_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
TEST_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DEFAULT_MODELS = (CLAUDE_3, NOVA_MICRO, LLAMA_3, CLAUDE_4_5)
ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
_SIGV4_HEADER = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)

#: Status -> (error name, message) as Bedrock sends them.
ERRORS_BY_STATUS: dict[int, tuple[str, str]] = {
    400: ("ValidationException", "Malformed input request, please reformat your input and try again."),
    401: ("UnrecognizedClientException", "The security token included in the request is invalid."),
    403: ("AccessDeniedException", "You don't have access to the model with the specified model ID."),
    404: ("ResourceNotFoundException", "Could not resolve the foundation model from the provided model identifier."),
    408: ("ModelTimeoutException", "Model has timed out in processing the request. Try your request again."),
    424: ("ModelErrorException", "The model returned the following errors: upstream model failure"),
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    500: ("InternalServerException", "The system encountered an unexpected error during processing. Try your request again."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
}
#: In-stream exception name -> message.
STREAM_EXCEPTIONS: dict[str, str] = {
    "modelStreamErrorException": "The model stream failed.",
    "throttlingException": "Too many tokens, please wait before trying again.",
    "internalServerException": "The system encountered an unexpected error during processing.",
    "serviceUnavailableException": "Bedrock is unable to process your request.",
    "validationException": "Input is too long for requested model.",
}


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC32), string headers, payload, message CRC32."""
    encoded = b"".join(_string_header(name, value) for name, value in headers.items())
    total_length = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total_length, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _string_header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode(), value.encode()
    return struct.pack(">B", len(name_bytes)) + name_bytes + b"\x07" + struct.pack(">H", len(value_bytes)) + value_bytes


def event(event_type: str, body: dict[str, Any]) -> bytes:
    # Bedrock pads each event with a "p" field of filler so sizes do not reveal content.
    payload = json.dumps({**body, "p": "abcdefghijklmnopqrstuvwxyz"[: 5 + len(event_type) % 20]}).encode()
    return event_frame({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}, payload)


def exception(exception_type: str, message: str) -> bytes:
    body: dict[str, Any] = {"message": message}
    if exception_type == "modelStreamErrorException":
        body.update(originalStatusCode=500, originalMessage="upstream model failure")
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return event_frame(headers, json.dumps(body).encode())


class FakeBedrock(FakeProviderServer):
    name = "bedrock"

    def __init__(
        self, *, api_keys: Iterable[str] = (TEST_API_KEY,), credentials: dict[str, str] | None = None,
        session_tokens: dict[str, str] | None = None, models: Iterable[str] = DEFAULT_MODELS, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.api_keys = set(api_keys)
        self.credentials = dict(credentials or {TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY})
        #: Access key id -> the session token it must come with (temporary credentials).
        self.session_tokens = dict(session_tokens or {})
        self.models = list(models)
        self.embedding_models = list(EMBEDDING_MODELS)
        # Knobs for the next replies.
        self.stop_reason = "end_turn"
        self.reply_text: str | None = None
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.stream_exception = "modelStreamErrorException"
        self.omit_final_events = False
        self.corrupt_crc = False
        #: Answers to send instead of made-up JSON: the text under outputConfig, or a forced tool's input.
        self.json_answers: list[str] = []
        #: Prompt prefixes written to the cache so far (the next identical one is read from it).
        self.cached_prefixes: set[str] = set()
        #: InvokeModel answers carry X-Amzn-Bedrock-Input-Token-Count (a proxy may drop it).
        self.token_count_header = True

    def reset(self) -> None:
        super().reset()
        self.stop_reason, self.reply_text = "end_turn", None
        self.cache_read_tokens = self.cache_write_tokens = 0
        self.stream_exception, self.omit_final_events, self.corrupt_crc = "modelStreamErrorException", False, False
        self.json_answers, self.cached_prefixes, self.token_count_header = [], set(), True

    def fail_with(self, error_type: str, status: int, message: str, times: int = 1) -> None:
        """The next calls fail with this Bedrock error name, status and message."""
        self.fail_next(status, times, headers=_error_headers(error_type), body={"message": message})

    # --- routing ------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Reply | StreamReply:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        if request.method == "GET" and request.path == "/foundation-models":
            return self.list_models(request)
        match = re.fullmatch(r"/model/(?P<model>[^/]+)/(?P<operation>converse|converse-stream|invoke)", request.path)
        if request.method != "POST" or match is None:
            return error("UnknownOperationException", 404, "Unknown operation")
        model = unquote(match["model"])
        if match["operation"] == "invoke":
            return self.invoke(model, request)
        if model not in self.models:
            return error("ValidationException", 400, "The provided model identifier is invalid.")
        problem = converse_problem(request.body, model)
        if problem:
            return error("ValidationException", 400, problem)
        content, stop_reason = self.answer(request.body)
        prompt = prompt_usage(request.body, self.cached_prefixes)
        if match["operation"] == "converse":
            return Reply(200, self.converse_reply(prompt, content, stop_reason), headers=_id_headers())
        return StreamReply(
            self.stream_chunks(prompt, content, stop_reason),
            headers=_id_headers(), content_type="application/vnd.amazon.eventstream",
        )

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """(content blocks, stopReason): a tool call, or text cut at maxTokens."""
        call = tool_use(body, self.json_answers)
        if call is not None:
            return [call], "tool_use"
        text = self.reply_text if self.reply_text is not None else (
            json_text(body, self.json_answers) or fake_reply_text(last_text(body), self.name))
        max_tokens = body.get("inferenceConfig", {}).get("maxTokens")
        words = text.split(" ")
        if max_tokens is not None and len(words) > max_tokens:
            return [{"text": " ".join(words[:max_tokens])}], "max_tokens"
        return ([{"text": text}] if text else []), self.stop_reason

    def usage(self, prompt: dict[str, int], content: list[dict[str, Any]]) -> dict[str, int]:
        output = sum(count_words(block["text"] if "text" in block else json.dumps(block["toolUse"]["input"])) for block in content)
        read = prompt["cacheReadInputTokens"] + self.cache_read_tokens
        write = prompt["cacheWriteInputTokens"] + self.cache_write_tokens
        usage = {"inputTokens": prompt["inputTokens"], "outputTokens": output,
                 "totalTokens": prompt["inputTokens"] + output + read + write}
        if read or write:
            usage.update(cacheReadInputTokens=read, cacheWriteInputTokens=write)
        return usage

    def converse_reply(self, prompt: dict[str, int], content: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
        return {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop_reason,
            "usage": self.usage(prompt, content),
            "metrics": {"latencyMs": 123},
        }

    def stream_chunks(self, prompt: dict[str, int], content: list[dict[str, Any]], stop_reason: str) -> list[bytes]:
        frames = [event("messageStart", {"role": "assistant"})]
        for index, block in enumerate(content):
            frames += _block_frames(index, block)
        if not self.omit_final_events:
            frames.append(event("messageStop", {"stopReason": stop_reason}))
            frames.append(event("metadata", {"usage": self.usage(prompt, content), "metrics": {"latencyMs": 321}}))
        if self.corrupt_crc:
            frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 0xFF])
        # Split one frame across two chunks: the decoder must reassemble frames.
        first, rest = frames[0], frames[1:]
        return [first[:7], first[7:], *rest]

    def invoke(self, model: str, request: RecordedRequest) -> Reply:
        """InvokeModel for the embedding models, with the token count in its header as Bedrock sends it."""
        if model not in self.embedding_models:
            return error("ValidationException", 400, "The provided model identifier is invalid.")
        problem = embedding_problem(model, request.body)
        if problem:
            return error("ValidationException", 400, problem)
        reply, tokens = embedding_reply(model, request.body)
        headers = {**_id_headers(), "X-Amzn-Bedrock-Invocation-Latency": "42"}
        if self.token_count_header:
            headers["X-Amzn-Bedrock-Input-Token-Count"] = str(tokens)
        return Reply(200, reply, headers=headers)

    def stream_error_reply(self, request: RecordedRequest) -> StreamReply:
        if self.stream_exception == "error-frame":  # the event-stream protocol's own error message
            failure = event_frame({":message-type": "error", ":error-code": "InternalFailure",
                                   ":error-message": "stream failed"}, b"")
        else:
            failure = exception(self.stream_exception, STREAM_EXCEPTIONS[self.stream_exception])
        frames = [event("messageStart", {"role": "assistant"}),
                  event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Task: partial"}}), failure]
        return StreamReply(frames, headers=_id_headers(), content_type="application/vnd.amazon.eventstream")

    def list_models(self, request: RecordedRequest) -> Reply:
        wanted = (request.query.get("byOutputModality") or [None])[0]
        summaries = [_summary(model, "TEXT") for model in self.models]
        summaries += [_summary(model, "EMBEDDING") for model in self.embedding_models]
        if wanted:
            summaries = [item for item in summaries if wanted in item["outputModalities"]]
        return Reply(200, {"modelSummaries": summaries}, headers=_id_headers())

    def error_reply(self, status: int, request: RecordedRequest) -> Reply:
        error_type, message = ERRORS_BY_STATUS.get(status, ("InternalServerException", "Internal failure"))
        return error(error_type, status, message)

    def tokens_for(self, request: RecordedRequest) -> int:
        body = request.body if request.raw_body else {}
        if not isinstance(body, dict):
            return 0
        return len(json.dumps(body.get("messages", ""))) // 4 + int(body.get("inferenceConfig", {}).get("maxTokens", 0))

    # --- auth -----------------------------------------------------------------------

    def check_auth(self, request: RecordedRequest) -> Reply | None:
        header = request.header("authorization")
        if not header:
            return error("MissingAuthenticationTokenException", 403, "Missing Authentication Token")
        if header.startswith("Bearer "):
            if header.removeprefix("Bearer ") in self.api_keys:
                return None
            # Bedrock answers a bad API key with a capitalized "Message" and no error name.
            return Reply(403, {"Message": "Authentication failed: Please make sure your API Key is valid."},
                         headers=_id_headers())
        return self.check_sigv4(request, header)

    def check_sigv4(self, request: RecordedRequest, header: str) -> Reply | None:
        parsed = _SIGV4_HEADER.match(header)
        if parsed is None:
            return error("IncompleteSignatureException", 403, f"Authorization header requires 'Credential', "
                         f"'SignedHeaders' and 'Signature' parameters. Authorization={header[:40]}")
        secret = self.credentials.get(parsed["key"])
        expected_token = self.session_tokens.get(parsed["key"])
        if secret is None or expected_token != request.header("x-amz-security-token"):
            return error("UnrecognizedClientException", 403, "The security token included in the request is invalid.")
        if parsed["service"] != "bedrock":
            return error("InvalidSignatureException", 403, "Credential should be scoped to correct service: 'bedrock'.")
        signed = parsed["signed"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return error("InvalidSignatureException", 403, "'Host' and 'X-Amz-Date' must be signed.")
        canonical, string_to_sign, signature = recompute_signature(request, parsed, secret)
        if signature != parsed["signature"]:
            return error("InvalidSignatureException", 403, (
                "The request signature we calculated does not match the signature you provided. Check your AWS "
                "Secret Access Key and signing method. Consult the service documentation for details.\n\n"
                f"The Canonical String for this request should have been\n'{canonical}'\n\n"
                f"The String-to-Sign should have been\n'{string_to_sign}'\n"))
        return None


def recompute_signature(request: RecordedRequest, parsed: re.Match[str], secret: str) -> tuple[str, str, str]:
    """Canonical request, string to sign and signature, computed with botocore as AWS would."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {name: request.header(name) or "" for name in parsed["signed"].split(";")}
    query = f"?{urlencode(request.query, doseq=True)}" if request.query else ""
    aws_request = AWSRequest(method=request.method, url=f"http://{headers['host']}{request.path}{query}",
                             data=request.raw_body, headers=headers)
    aws_request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(parsed["key"], secret, request.header("x-amz-security-token")),
                       parsed["service"], parsed["region"])
    canonical = signer.canonical_request(aws_request)
    string_to_sign = signer.string_to_sign(aws_request, canonical)
    return canonical, string_to_sign, signer.signature(string_to_sign, aws_request)


def error(error_type: str, status: int, message: str) -> Reply:
    return Reply(status, {"message": message}, headers=_error_headers(error_type))


def _error_headers(error_type: str) -> dict[str, str]:
    return {"x-amzn-ErrorType": f"{error_type}:{ERROR_NAMESPACE}", **_id_headers()}


def _id_headers() -> dict[str, str]:
    return {"x-amzn-RequestId": str(uuid.uuid4())}


def _summary(model: str, modality: str) -> dict[str, Any]:
    vendor = model.split(".", 1)[0]
    return {
        "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}",
        "modelId": model, "modelName": model, "providerName": vendor.capitalize(),
        "inputModalities": ["TEXT"], "outputModalities": [modality],
        "responseStreamingSupported": modality == "TEXT", "customizationsSupported": [],
        "inferenceTypesSupported": ["ON_DEMAND"], "modelLifecycle": {"status": "ACTIVE"},
    }


def _block_frames(index: int, block: dict[str, Any]) -> list[bytes]:
    """One content block as ConverseStream sends it: text pieces; or a toolUse start, then its input in pieces."""
    if "text" in block:
        frames = [event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": piece}})
                  for piece in _pieces(block["text"])]
    else:
        tool = block["toolUse"]
        start = {"toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}
        arguments = json.dumps(tool["input"])
        frames = [event("contentBlockStart", {"contentBlockIndex": index, "start": start})]
        frames += [event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": arguments[at : at + 9]}}})
                   for at in range(0, len(arguments), 9)]
    return [*frames, event("contentBlockStop", {"contentBlockIndex": index})]


def _pieces(text: str, parts: int = 4) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[index : index + size] for index in range(0, len(text), size)]
