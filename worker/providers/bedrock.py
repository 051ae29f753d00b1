"""AWS Bedrock through the Converse and ConverseStream APIs.

Wire format (botocore's bedrock-runtime 2023-09-30 service model, and the API reference
at docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html):

- `POST {runtime}/model/{modelId}/converse` and `.../converse-stream`; the model id is
  percent-encoded in the path (ids contain ':' and ARNs '/').
- Body: `messages` [{role, content: [{text}]}] alternating user/assistant, `system`
  [{text}], `inferenceConfig` {maxTokens, temperature}.
- Answer: `output.message.content[].text`, `stopReason`, `usage`, `metrics.latencyMs`;
  request id in `x-amzn-RequestId`. Bedrock's `inputTokens` leaves out cache reads and
  writes, so prompt_tokens adds them back (the normalization `llmq.worker.pricing` expects).
- Streams are `application/vnd.amazon.eventstream` frames (botocore's EventStreamBuffer
  decodes them). Errors: `{"message"}`, the error name in `x-amzn-ErrorType`.

Auth: a Bedrock API key (`api_key`, env AWS_BEARER_TOKEN_BEDROCK) is sent as
`Authorization: Bearer`; without one every request is signed with SigV4 (service
"bedrock") from the options' keys or botocore's credential chain (env vars, shared
files, SSO, instance roles). Converse has no idempotency key, so `job_id` is unused.

Options (under `options:`): `region` (default us-east-1), `endpoint_url` (runtime host;
`base_url` works too), `control_endpoint_url` (model listing host), `aws_access_key_id`,
`aws_secret_access_key`, `aws_session_token`, `aws_profile`. Needs `llmq[bedrock]`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import HTTPProvider, retry_after_seconds

SIGNING_NAME = "bedrock"
INSTALL_HINT = "pip install 'llmq[bedrock]'"

#: Error names (x-amzn-ErrorType, or an in-stream `:exception-type` with its first
#: letter raised) -> class and the status the service model gives them.
ERROR_TYPES: dict[str, tuple[type[errors.ProviderError], int]] = {
    "AccessDeniedException": (errors.PermissionDeniedError, 403),
    "UnrecognizedClientException": (errors.AuthenticationError, 403),
    "InvalidSignatureException": (errors.AuthenticationError, 403),
    "IncompleteSignatureException": (errors.AuthenticationError, 403),
    "MissingAuthenticationTokenException": (errors.AuthenticationError, 403),
    "ExpiredTokenException": (errors.AuthenticationError, 403),
    "ResourceNotFoundException": (errors.ModelNotFoundError, 404),
    "ValidationException": (errors.BadRequestError, 400),
    "ThrottlingException": (errors.RateLimitedError, 429),
    "ServiceQuotaExceededException": (errors.RateLimitedError, 400),
    "ModelNotReadyException": (errors.OverloadedError, 429),
    "ModelTimeoutException": (errors.ProviderTimeoutError, 408),
    "ModelErrorException": (errors.ServerError, 424),
    "ModelStreamErrorException": (errors.ServerError, 424),
    "InternalServerException": (errors.ServerError, 500),
    "ServiceUnavailableException": (errors.OverloadedError, 503),
}
#: ValidationException texts that mean the prompt does not fit the model.
CONTEXT_WINDOW_MARKERS = ("input is too long", "too many input tokens", "prompt is too long", "context window")
#: The ValidationException Bedrock gives for a model id it does not know.
UNKNOWN_MODEL_MARKERS = ("model identifier is invalid",)
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls",
    "content_filtered": "content_filter", "guardrail_intervened": "content_filter",
}
FILTERED_STOP_REASONS = frozenset({"content_filtered", "guardrail_intervened"})
_REGION_PATTERN = re.compile(r"^[a-z0-9-]+$")


class BedrockOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region: str = "us-east-1"
    endpoint_url: str | None = None
    control_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_profile: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # `${VAR:-}` in YAML yields "" for an unset variable: treat it as not given.
        if isinstance(value, str) and not value.strip():
            return "us-east-1" if info.field_name == "region" else None
        return value

    @field_validator("region")
    @classmethod
    def _region_is_a_name(cls, value: str) -> str:
        if not _REGION_PATTERN.match(value):
            raise ValueError(f"region {value!r} is not an AWS region name, e.g. 'us-east-1'")
        return value

    @model_validator(mode="after")
    def _key_pair_complete(self) -> BedrockOptions:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError("set both aws_access_key_id and aws_secret_access_key, or neither")
        return self


def botocore_modules() -> Any:
    """botocore with the submodules this adapter uses, imported on first need."""
    try:
        import botocore.auth
        import botocore.awsrequest
        import botocore.credentials
        import botocore.eventstream
        import botocore.session
    except ImportError as exc:
        raise ImportError(
            f"the Bedrock adapter needs botocore for SigV4 signing and event streams: {INSTALL_HINT}"
        ) from exc
    return botocore


class BearerAuth(httpx.Auth):
    """Bedrock API keys go in the Authorization header as a bearer token."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["authorization"] = f"Bearer {self.api_key}"
        yield request


class SigV4Auth(httpx.Auth):
    """Signs each request's exact bytes with botocore's SigV4 signer."""

    requires_request_body = True

    def __init__(self, provider: BedrockProvider) -> None:
        self.provider = provider

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        credentials = await self.provider.frozen_credentials()
        sign_request(request, credentials, self.provider.options.region)
        yield request


def sign_request(request: httpx.Request, credentials: Any, region: str) -> None:
    botocore = botocore_modules()
    # Sign only what AWS requires (host, x-amz-date, token) and the content type, as the
    # SDKs do: headers a proxy may rewrite (user-agent, accept-encoding) stay unsigned.
    headers = {"host": request.headers["host"]}
    if "content-type" in request.headers:
        headers["content-type"] = request.headers["content-type"]
    aws_request = botocore.awsrequest.AWSRequest(
        method=request.method, url=str(request.url), data=request.content, headers=headers
    )
    botocore.auth.SigV4Auth(credentials, SIGNING_NAME, region).add_auth(aws_request)
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        if name in aws_request.headers:
            request.headers[name] = aws_request.headers[name]


@dataclass
class StreamState:
    """What a ConverseStream has said so far; complete once messageStop and metadata came."""

    has_text: bool = False
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    latency_ms: int | None = None

    @property
    def complete(self) -> bool:
        return self.stop_reason is not None and self.usage is not None


class BedrockProvider(HTTPProvider):
    type_name = "bedrock"
    description = "AWS Bedrock Converse API (Bedrock API key or SigV4 credentials)"
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-amzn-requestid",)

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        botocore_modules()  # fail at construction, with the install hint, not mid-job
        options = BedrockOptions.model_validate(config.options)
        region = options.region
        runtime_url = options.endpoint_url or config.base_url or f"https://bedrock-runtime.{region}.amazonaws.com"
        super().__init__(config.model_copy(update={"base_url": runtime_url}), transport=transport)
        self.options = options
        self.control_url = (options.control_endpoint_url or f"https://bedrock.{region}.amazonaws.com").rstrip("/")
        self._credentials: Any = None
        self._frozen: Any = None
        self.client.auth = BearerAuth(self.api_key) if self.api_key else SigV4Auth(self)

    # --- auth ---------------------------------------------------------------------

    async def frozen_credentials(self) -> Any:
        """The AWS key pair (and session token) to sign with, resolved once off the event loop."""
        if self._credentials is None:
            self._credentials = await asyncio.to_thread(self._resolve_credentials)
        # Refreshable credentials (SSO, assumed roles) may call STS here: keep it off the loop.
        self._frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
        return self._frozen

    def _resolve_credentials(self) -> Any:
        botocore = botocore_modules()
        options = self.options
        if options.aws_access_key_id and options.aws_secret_access_key:
            token = options.aws_session_token.get_secret_value() if options.aws_session_token else None
            return botocore.credentials.Credentials(
                options.aws_access_key_id, options.aws_secret_access_key.get_secret_value(), token
            )
        credentials = botocore.session.Session(profile=options.aws_profile).get_credentials()
        if credentials is None:
            raise errors.AuthenticationError(
                "no Bedrock credentials: set api_key (a Bedrock API key, env AWS_BEARER_TOKEN_BEDROCK), "
                "options aws_access_key_id/aws_secret_access_key, or AWS credentials in the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)",
                provider=self.name,
            )
        return credentials

    def redact(self, text: str) -> str:
        # AWS echoes the canonical request in signature errors, session token included.
        text = super().redact(text)
        frozen = self._frozen
        for secret in (frozen.secret_key, frozen.token) if frozen is not None else ():
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    # --- requests -----------------------------------------------------------------

    def model_path(self, model: str, operation: str) -> str:
        return f"/model/{quote(model, safe='')}/{operation}"

    def converse_body(self, request: LLMRequest) -> dict[str, Any]:
        """Converse's body; consecutive same-role messages share one turn, as Bedrock requires."""
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message.role == "system":
                continue
            if messages and messages[-1]["role"] == message.role:
                messages[-1]["content"].append({"text": message.content})
            else:
                messages.append({"role": message.role, "content": [{"text": message.content}]})
        body: dict[str, Any] = {
            "messages": messages,
            "inferenceConfig": {"maxTokens": request.max_tokens, "temperature": request.temperature},
        }
        system = [{"text": message.content} for message in request.messages if message.role == "system"]
        if system:
            body["system"] = system
        return body

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        data, response = await self.post_json(
            self.model_path(request.model, "converse"), self.converse_body(request), model=request.model
        )
        request_id = self.request_id(response)
        text, stop_reason = self.answer_text(data, request.model, request_id)
        self.check_stop_reason(stop_reason, bool(text), request.model, request_id)
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        return self.response(
            request, text, bedrock_usage(data["usage"]), finish_reason=finish_reason(stop_reason),
            stop_reason=stop_reason, request_id=request_id, latency_ms=metrics.get("latencyMs"),
        )

    def answer_text(self, data: Any, model: str, request_id: str | None) -> tuple[str, str | None]:
        """The text blocks of a Converse answer (reasoning and tool blocks left out) and its stopReason."""
        output = data.get("output") if isinstance(data, dict) else None
        message = output.get("message") if isinstance(output, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise self.malformed(f"Converse answer lacks output.message: {str(data)[:200]!r}", model, request_id)
        if not isinstance(data.get("usage"), dict):
            raise self.malformed(f"Converse answer lacks usage: {str(data)[:200]!r}", model, request_id)
        blocks = [block for block in message["content"] if isinstance(block, dict)]
        text = "".join(block["text"] for block in blocks if isinstance(block.get("text"), str))
        stop_reason = data.get("stopReason")
        return text, stop_reason if isinstance(stop_reason, str) else None

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        state = StreamState()
        url = self.model_path(request.model, "converse-stream")
        async with self.open_stream(url, self.converse_body(request), model=request.model) as response:
            request_id = self.request_id(response)
            async for event_type, payload in self.stream_events(response, request.model, request_id):
                text = apply_event(state, event_type, payload)
                if text:
                    yield self.response(request, text, Usage(), request_id=request_id)
        if not state.complete:
            raise self.malformed(
                "ConverseStream ended before messageStop and metadata: the answer may be cut short",
                request.model, request_id,
            )
        self.check_stop_reason(state.stop_reason, state.has_text, request.model, request_id)
        yield self.final_chunk(
            request, bedrock_usage(state.usage or {}), finish_reason=finish_reason(state.stop_reason),
            stop_reason=state.stop_reason, request_id=request_id, latency_ms=state.latency_ms,
        )

    async def stream_events(
        self, response: httpx.Response, model: str, request_id: str | None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, payload) for each frame; exception frames raise typed errors."""
        botocore = botocore_modules()
        buffer = botocore.eventstream.EventStreamBuffer()
        received_bytes = decoded_bytes = 0
        async for chunk in response.aiter_bytes():
            received_bytes += len(chunk)
            buffer.add_data(chunk)
            try:
                messages = list(buffer)
            except (botocore.eventstream.ParserError, UnicodeDecodeError) as exc:
                raise self.malformed(f"event stream frame is corrupt: {exc}", model, request_id) from exc
            for message in messages:
                decoded_bytes += message.prelude.total_length
                yield self.decode_frame(message, model, request_id)
        if received_bytes != decoded_bytes:
            raise self.malformed("event stream ended part-way through a frame", model, request_id)

    def decode_frame(self, message: Any, model: str, request_id: str | None) -> tuple[str, dict[str, Any]]:
        headers = message.headers
        message_type = headers.get(":message-type")
        if message_type == "error":  # transport-level error frame: no typed payload
            raise errors.ServerError(
                self.redact(f"{headers.get(':error-code', 'error')}: {headers.get(':error-message', '')}"),
                provider=self.name, model=model, request_id=request_id,
            )
        try:
            payload = json.loads(message.payload) if message.payload else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.malformed(f"event payload is not JSON: {message.payload[:200]!r}", model, request_id) from exc
        if not isinstance(payload, dict):
            raise self.malformed(f"event payload is not an object: {message.payload[:200]!r}", model, request_id)
        if message_type == "exception":
            raise self.stream_exception(str(headers.get(":exception-type", "")), payload, model, request_id)
        return str(headers.get(":event-type", "")), payload

    def stream_exception(
        self, exception_type: str, payload: dict[str, Any], model: str, request_id: str | None
    ) -> errors.ProviderError:
        name = exception_type[:1].upper() + exception_type[1:]
        message = str(payload.get("message") or payload.get("Message") or "")
        if payload.get("originalMessage"):
            message += f" (model said {payload.get('originalStatusCode')}: {payload['originalMessage']})"
        error_class, status = ERROR_TYPES.get(name, (errors.ServerError, 500))
        error_class = refine(error_class, message)
        return error_class(
            self.redact(f"{name} in stream: {message}"), provider=self.name, model=model,
            status_code=status, request_id=request_id,
        )

    def check_stop_reason(self, stop_reason: Any, has_text: bool, model: str, request_id: str | None) -> None:
        if has_text:
            return
        if stop_reason in FILTERED_STOP_REASONS:
            raise errors.ContentFilteredError(
                f"Bedrock stopped the answer with stopReason={stop_reason} and no text",
                provider=self.name, model=model, request_id=request_id,
            )
        if stop_reason == "model_context_window_exceeded":
            raise errors.ContextWindowExceededError(
                "the prompt fills the model's context window (stopReason=model_context_window_exceeded)",
                provider=self.name, model=model, request_id=request_id,
            )

    def malformed(self, message: str, model: str | None, request_id: str | None) -> errors.MalformedResponseError:
        return errors.MalformedResponseError(message, provider=self.name, model=model, request_id=request_id)

    # --- errors -------------------------------------------------------------------

    def error_from_response(self, response: httpx.Response, model: str | None) -> errors.ProviderError:
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        error_type = error_type_of(response.headers, body)
        detail = self.error_message(body) or response.text[:300] or response.reason_phrase
        message = self.redact(f"{error_type}: {detail}" if error_type else detail)
        if error_type in ERROR_TYPES:
            error_class = refine(ERROR_TYPES[error_type][0], detail)
        elif response.status_code == 403:
            # A bad Bedrock API key gets a bare 403 with {"Message": "Authentication failed..."};
            # only AccessDeniedException means the credentials are good but lack access.
            error_class = errors.AuthenticationError
        else:
            error_class = self.classify_error(response.status_code, body, detail)
        return error_class(
            message, provider=self.name, model=model, status_code=response.status_code,
            request_id=self.request_id(response), retry_after_s=retry_after_seconds(response.headers),
        )

    def error_message(self, body: Any) -> str | None:
        if isinstance(body, dict):
            found = body.get("message") or body.get("Message")
            return str(found) if found else None
        return None

    # --- discovery ----------------------------------------------------------------

    async def get_available_models(self) -> list[str]:
        """Text models from ListFoundationModels (control plane); the configured list if that fails."""
        try:
            data = await self.get_json(f"{self.control_url}/foundation-models?byOutputModality=TEXT")
        except errors.ProviderError:
            return list(self.config.models)
        summaries = data.get("modelSummaries") if isinstance(data, dict) else None
        models = [item["modelId"] for item in summaries or [] if isinstance(item, dict) and item.get("modelId")]
        return models or list(self.config.models)

    async def health_check(self) -> bool:
        try:
            await self.get_json(f"{self.control_url}/foundation-models?byOutputModality=TEXT")
            return True
        except errors.PermissionDeniedError:
            # Roles scoped to bedrock:InvokeModel* may not list models: ask for one token instead.
            return await self._probe_converse()
        except Exception:  # health checks never raise
            return False

    async def _probe_converse(self) -> bool:
        model = self.config.default_model or (self.config.models[0] if self.config.models else None)
        if model is None:
            return False
        probe = LLMRequest(messages=[{"role": "user", "content": "ping"}], model=model, max_tokens=1, temperature=0)
        try:
            await self.generate(probe)
            return True
        except Exception:
            return False


def error_type_of(headers: httpx.Headers, body: Any) -> str | None:
    """`ThrottlingException:http://internal.amazon.com/...` -> `ThrottlingException` (botocore's rule)."""
    raw = headers.get("x-amzn-errortype")
    if raw is None and isinstance(body, dict):
        raw = body.get("__type") or body.get("code") or body.get("Code")
    if not raw:
        return None
    return str(raw).split(":", 1)[0].rsplit("#", 1)[-1] or None


def refine(error_class: type[errors.ProviderError], message: str) -> type[errors.ProviderError]:
    """ValidationException covers prompts too long and unknown models: give them their own class."""
    if error_class is not errors.BadRequestError:
        return error_class
    lowered = message.lower()
    if any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
        return errors.ContextWindowExceededError
    if any(marker in lowered for marker in UNKNOWN_MODEL_MARKERS):
        return errors.ModelNotFoundError
    return error_class


def apply_event(state: StreamState, event_type: str, payload: dict[str, Any]) -> str:
    """Fold one ConverseStream event into the state; the new answer text, if any."""
    if event_type == "contentBlockDelta":
        delta = payload.get("delta")
        text = delta.get("text") if isinstance(delta, dict) else None
        if isinstance(text, str) and text:
            state.has_text = True
            return text
    elif event_type == "messageStop":
        state.stop_reason = str(payload.get("stopReason") or "")
    elif event_type == "metadata":
        usage = payload.get("usage")
        state.usage = usage if isinstance(usage, dict) else None
        metrics = payload.get("metrics")
        state.latency_ms = metrics.get("latencyMs") if isinstance(metrics, dict) else None
    # messageStart, contentBlockStart/Stop and unknown future events carry no answer text.
    return ""


def bedrock_usage(usage: dict[str, Any]) -> Usage:
    """Bedrock's TokenUsage as llmq's Usage, prompt_tokens counting cached tokens too."""
    cache_read = _count(usage, "cacheReadInputTokens")
    cache_write = _count(usage, "cacheWriteInputTokens")
    prompt = _count(usage, "inputTokens") + cache_read + cache_write
    completion = _count(usage, "outputTokens")
    return Usage.of(
        prompt, completion, total_tokens=max(_count(usage, "totalTokens"), prompt + completion),
        cached_read_tokens=cache_read, cache_write_tokens=cache_write,
    )


def finish_reason(stop_reason: Any) -> str | None:
    return FINISH_REASONS.get(stop_reason, stop_reason) if stop_reason else None


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0
