"""The AWS side of the Bedrock adapter: its options, credentials, SigV4 signing, event-stream frames.

What needs botocore (the `bedrock` extra) imports it on first need, so `llmq`
imports without it. The adapter (`llmq.worker.providers.bedrock`) speaks Converse
and maps errors to llmq's classes; this module knows AWS's conventions only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmq.worker import errors

SIGNING_NAME = "bedrock"
INSTALL_HINT = "pip install 'llmq[bedrock]'"
_REGION_PATTERN = re.compile(r"^[a-z0-9-]+$")


class BedrockOptions(BaseModel):
    """A bedrock entry's `options:`: where AWS is, and whose credentials sign."""

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


class EventStreamError(ValueError):
    """The event stream's framing is broken: a corrupt frame, or bytes left over at the end."""


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


class AwsCredentials:
    """The key pair (and session token) to sign with: from the entry's options, else botocore's chain."""

    def __init__(self, options: BedrockOptions, *, provider: str) -> None:
        self.options = options
        self.provider = provider
        self._credentials: Any = None
        self._frozen: Any = None

    async def frozen(self) -> Any:
        """Resolved once, off the event loop; refreshed per call, as SSO and assumed roles expire."""
        if self._credentials is None:
            self._credentials = await asyncio.to_thread(self._resolve)
        # Refreshable credentials (SSO, assumed roles) may call STS here: keep it off the loop.
        self._frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
        return self._frozen

    def secrets(self) -> list[str]:
        """The secret key and session token last used: redaction must hide them."""
        frozen = self._frozen
        return [secret for secret in (frozen.secret_key, frozen.token) if secret] if frozen is not None else []

    def _resolve(self) -> Any:
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
                provider=self.provider,
            )
        return credentials


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

    def __init__(self, credentials: AwsCredentials, region: str) -> None:
        self.credentials = credentials
        self.region = region

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        sign_request(request, await self.credentials.frozen(), self.region)
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


@dataclass(frozen=True)
class Frame:
    """One decoded event-stream message.

    kind "event": `name` is the event type (contentBlockDelta, messageStop, ...);
    "exception": the service's error (`:exception-type`, e.g. throttlingException) with its payload;
    "error": the event-stream protocol's own error, `name` its code and `payload["message"]` its text.
    """

    kind: Literal["event", "exception", "error"]
    name: str
    payload: dict[str, Any]


async def event_stream_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The `application/vnd.amazon.eventstream` frames of a response, CRCs checked by botocore."""
    botocore = botocore_modules()
    buffer = botocore.eventstream.EventStreamBuffer()
    received_bytes = decoded_bytes = 0
    async for chunk in response.aiter_bytes():
        received_bytes += len(chunk)
        buffer.add_data(chunk)
        try:
            messages = list(buffer)
        except (botocore.eventstream.ParserError, UnicodeDecodeError) as exc:
            raise EventStreamError(f"event stream frame is corrupt: {exc}") from exc
        for message in messages:
            decoded_bytes += message.prelude.total_length
            yield decode_frame(message)
    if received_bytes != decoded_bytes:
        raise EventStreamError("event stream ended part-way through a frame")


def decode_frame(message: Any) -> Frame:
    headers = message.headers
    message_type = headers.get(":message-type")
    if message_type == "error":  # the protocol's own error frame: no payload to parse
        return Frame("error", str(headers.get(":error-code", "error")), {"message": headers.get(":error-message", "")})
    try:
        payload = json.loads(message.payload) if message.payload else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EventStreamError(f"event payload is not JSON: {message.payload[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise EventStreamError(f"event payload is not an object: {message.payload[:200]!r}")
    if message_type == "exception":
        return Frame("exception", str(headers.get(":exception-type", "")), payload)
    return Frame("event", str(headers.get(":event-type", "")), payload)


def error_type_of(headers: httpx.Headers, body: Any) -> str | None:
    """`ThrottlingException:http://internal.amazon.com/...` -> `ThrottlingException` (botocore's rule)."""
    raw = headers.get("x-amzn-errortype")
    if raw is None and isinstance(body, dict):
        raw = body.get("__type") or body.get("code") or body.get("Code")
    if not raw:
        return None
    return str(raw).split(":", 1)[0].rsplit("#", 1)[-1] or None
