"""AWS Bedrock through the Converse and ConverseStream APIs, and InvokeModel for embeddings.

Wire format (botocore's bedrock-runtime 2023-09-30 service model, and the API reference
at docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html):

- `POST {runtime}/model/{modelId}/converse` and `.../converse-stream`; the model id is
  percent-encoded in the path (ids contain ':' and ARNs '/').
- Body: `messages` [{role, content: [blocks]}] alternating user/assistant, `system` [blocks],
  `inferenceConfig` {maxTokens, temperature or topP, stopSequences}, `toolConfig`, `outputConfig`;
  how each message, part, tool and JSON request maps: `bedrock_format`. JSON by
  `outputConfig.textFormat` where the capability table says the model has it
  (`native_json_schema`), else by a forced `json_answer` tool. Converse has no seed: it is left out.
- Answer: `output.message.content[]` (text, toolUse), `stopReason`, `usage`, `metrics.latencyMs`;
  request id in `x-amzn-RequestId`. Bedrock's `inputTokens` leaves out cache reads and
  writes, so prompt_tokens adds them back (the normalization `llmq.worker.pricing` expects).
- Streams are `application/vnd.amazon.eventstream` frames (botocore's EventStreamBuffer
  decodes them): text and toolUse input arrive as contentBlockDelta pieces, a tool call
  opens with contentBlockStart. Errors: `{"message"}`, the error name in `x-amzn-ErrorType`.
- Embeddings: `POST {runtime}/model/{modelId}/invoke`, Titan Text Embeddings and Cohere Embed
  bodies (`bedrock_embed`).

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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from llmq.contract.capabilities import Capabilities, capabilities_for
from llmq.contract.config import ProviderConfig
from llmq.contract.models import EmbeddingRequest, EmbeddingResponse, LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers import bedrock_embed
from llmq.worker.providers.base import retry_after_seconds
from llmq.worker.providers.bedrock_aws import (
    AwsCredentials,
    BearerAuth,
    BedrockOptions,
    EventStreamError,
    SigV4Auth,
    botocore_modules,
    error_type_of,
    event_stream_frames,
)
from llmq.worker.providers.bedrock_format import (
    ConverseStreamState,
    UnsupportedRequest,
    bedrock_usage,
    converse_messages,
    inference_config,
    output_config,
    refine,
    tool_config,
)
from llmq.worker.providers.features import (
    ToolBlocks,
    ToolCallAssembler,
    answer_tool_for,
    embedding_usage,
    tool_plan,
)
from llmq.worker.providers.http import HTTPProvider, json_or_none

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
FILTERED_STOP_REASONS = frozenset({"content_filtered", "guardrail_intervened"})
#: ConverseRequest fields llmq has no field for, taken from a chat request's provider_options.
CONVERSE_OPTIONS = frozenset({
    "additionalModelRequestFields", "additionalModelResponseFieldPaths", "guardrailConfig", "performanceConfig",
    "requestMetadata", "serviceTier",
})


@dataclass
class BedrockProvider(HTTPProvider[ConverseStreamState]):
    type_name = "bedrock"
    description = "AWS Bedrock Converse API (Bedrock API key or SigV4 credentials)"
    price_provider_id = "aws"
    request_id_headers: ClassVar[tuple[str, ...]] = ("x-amzn-requestid",)
    options_model = BedrockOptions
    #: Converse fields for chat requests; each embedding family's own for embedding requests.
    allowed_provider_options: ClassVar[frozenset[str]] = (
        CONVERSE_OPTIONS | bedrock_embed.TITAN_OPTIONS | bedrock_embed.COHERE_OPTIONS
    )

    options: BedrockOptions

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        botocore_modules()  # fail at construction, with the install hint, not mid-job
        super().__init__(config, transport=transport)
        options = self.options
        self.control_url = (
            options.control_endpoint_url or f"https://bedrock.{options.region}.amazonaws.com"
        ).rstrip("/")
        self.credentials = AwsCredentials(options, provider=self.name)
        # Auth lives on the client, not in build_headers: SigV4 signs the exact bytes sent,
        # and model listing on the control plane needs it too.
        self.client.auth = BearerAuth(self.api_key) if self.api_key else SigV4Auth(self.credentials, options.region)

    def resolve_base_url(self) -> str | None:
        return (
            self.options.endpoint_url or self.config.base_url
            or f"https://bedrock-runtime.{self.options.region}.amazonaws.com"
        )

    def redact(self, text: str) -> str:
        # AWS echoes the canonical request in signature errors, session token included.
        text = super().redact(text)
        for secret in self.credentials.secrets():
            text = text.replace(secret, "[redacted]")
        return text

    # --- requests -----------------------------------------------------------------

    def request_path(self, model: str, *, stream: bool) -> str:
        return f"/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        return {}  # the client's auth adds them; Converse takes no idempotency key

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        """Converse's body; consecutive same-role messages share one turn, as Bedrock requires."""
        capabilities = capabilities_for(self.config, request.model)
        try:
            system, messages = converse_messages(request.messages, cache=capabilities.prompt_cache)
            body: dict[str, Any] = {
                "messages": messages, "inferenceConfig": inference_config(request, sampling=not capabilities.reasoning),
            }
            if system:
                body["system"] = system
            if request.uses_tools or request.response_format is not None or request.provider_options:
                body.update(self.feature_fields(request, capabilities))
        except UnsupportedRequest as exc:
            raise errors.BadRequestError(str(exc), provider=self.name, model=request.model) from exc
        return body

    def feature_fields(self, request: LLMRequest, capabilities: Capabilities) -> dict[str, Any]:
        """toolConfig, outputConfig and the allowed provider_options."""
        fields: dict[str, Any] = dict(self.provider_options_of(request, allowed=CONVERSE_OPTIONS))
        native = capabilities.native_json_schema
        history_has_tools = any(message.tool_calls or message.role == "tool" for message in request.messages)
        config = tool_config(tool_plan(request, native_json=native), history_has_tools=history_has_tools, strict=native)
        if config is not None:
            fields["toolConfig"] = config
        if native and request.response_format is not None and request.response_format.type == "json_schema":
            fields["outputConfig"] = output_config(request)
        return fields

    # --- answers ------------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        request_id = self.request_id(response)
        blocks = self.answer_blocks(body, request.model, request_id)
        stop_reason = body.get("stopReason") if isinstance(body.get("stopReason"), str) else None
        # Reasoning blocks are not answer text; toolUse blocks are calls, or the JSON answer.
        tools = ToolBlocks(ToolCallAssembler(), answer_tool_for(self.config, request))
        texts: list[str] = []
        answers: list[str] = []
        for index, block in enumerate(blocks):
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif isinstance(block.get("toolUse"), dict):
                tool_use = block["toolUse"]
                name = str(tool_use.get("name") or "")
                answers.append(tools.whole(index, tool_use.get("toolUseId"), name, tool_use.get("input")))
        text = "".join(answers) if tools.answered else "".join(texts)
        self.check_stop_reason(stop_reason, bool(text) or bool(tools.calls), request.model, request_id)
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        return self.response(
            request, text, bedrock_usage(body["usage"]), tool_calls=tools.calls.calls(),
            finish_reason=tools.finish_reason(stop_reason), stop_reason=stop_reason, request_id=request_id,
            latency_ms=metrics.get("latencyMs"),
        )

    def answer_blocks(self, data: Any, model: str, request_id: str | None) -> list[dict[str, Any]]:
        """The content blocks of a Converse answer, checked to be one."""
        output = data.get("output") if isinstance(data, dict) else None
        message = output.get("message") if isinstance(output, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise self.malformed(f"Converse answer lacks output.message: {str(data)[:200]!r}", model, request_id)
        if not isinstance(data.get("usage"), dict):
            raise self.malformed(f"Converse answer lacks usage: {str(data)[:200]!r}", model, request_id)
        return [block for block in message["content"] if isinstance(block, dict)]

    def check_stop_reason(self, stop_reason: Any, has_content: bool, model: str, request_id: str | None) -> None:
        """No answer and a filter's or the context window's stop reason: an error, not an empty answer."""
        if has_content:
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

    # --- streams ------------------------------------------------------------------

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> ConverseStreamState:
        state = ConverseStreamState(request, request_id)
        state.blocks = ToolBlocks(state.tool_calls, answer_tool_for(self.config, request))
        return state

    async def stream_events(
        self, response: httpx.Response, state: ConverseStreamState
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, payload) for each frame; error and exception frames raise typed errors."""
        model, request_id = state.request.model, state.request_id
        try:
            async for frame in event_stream_frames(response):
                if frame.kind == "error":
                    raise errors.ServerError(
                        self.redact(f"{frame.name}: {frame.payload['message']}"),
                        provider=self.name, model=model, request_id=request_id,
                    )
                if frame.kind == "exception":
                    raise self.stream_exception(frame.name, frame.payload, model, request_id)
                yield frame.name, frame.payload
        except EventStreamError as exc:
            raise self.malformed(str(exc), model, request_id) from exc

    def parse_stream_event(self, event: tuple[str, dict[str, Any]], state: ConverseStreamState) -> str | None:
        event_type, payload = event
        return state.take(event_type, payload)

    def stream_chunk(self, state: ConverseStreamState, text: str) -> LLMResponse:
        return self.response(state.request, text, Usage(), request_id=state.request_id)

    def finish_stream(self, state: ConverseStreamState) -> LLMResponse:
        request, request_id = state.request, state.request_id
        if not state.complete:
            raise self.malformed(
                "ConverseStream ended before messageStop and metadata: the answer may be cut short",
                request.model, request_id,
            )
        self.check_stop_reason(state.stop_reason, state.has_content, request.model, request_id)
        return self.final_chunk(
            request, bedrock_usage(state.usage or {}), tool_calls=state.tool_calls.calls(),
            finish_reason=state.blocks.finish_reason(state.stop_reason),
            stop_reason=state.stop_reason, request_id=request_id, latency_ms=state.latency_ms,
        )

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

    # --- errors -------------------------------------------------------------------

    def error_from_response(self, response: httpx.Response, model: str | None) -> errors.ProviderError:
        # The error's name travels in a header (x-amzn-ErrorType), which map_error does not see.
        body = json_or_none(response)
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
            error_class = self.map_error(response.status_code, body, detail)
        return error_class(
            message, provider=self.name, model=model, status_code=response.status_code,
            request_id=self.request_id(response), retry_after_s=retry_after_seconds(response.headers),
        )

    def error_message(self, body: Any) -> str | None:
        if isinstance(body, dict):
            found = body.get("message") or body.get("Message")
            return str(found) if found else None
        return None

    # --- embeddings ---------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, *, job_id: str | None = None) -> EmbeddingResponse:
        """Titan (one text per InvokeModel call) or Cohere Embed (96 per call), calls run side by side."""
        family = bedrock_embed.embedding_family(request.model)
        if family is None:
            return await super().embed(request, job_id=job_id)
        problem = bedrock_embed.dimensions_problem(request.model, family, request.dimensions)
        if problem:
            raise errors.BadRequestError(
                f"dimensions {request.dimensions}: {problem}", provider=self.name, model=request.model
            )
        titan = family == "titan"
        allowed = bedrock_embed.TITAN_OPTIONS if titan else bedrock_embed.COHERE_OPTIONS
        options = self.provider_options_of(request, allowed=allowed)
        bodies = (bedrock_embed.titan_bodies if titan else bedrock_embed.cohere_bodies)(
            request.model, request.texts, request.dimensions, options)
        answers = await self.invoke_all(f"/model/{quote(request.model, safe='')}/invoke", bodies, request.model)
        vectors: list[list[float]] = []
        tokens = 0
        for payload, response in answers:
            found = bedrock_embed.vectors_of(family, payload)
            if found is None:
                raise self.malformed(f"InvokeModel answer has no embeddings: {str(payload)[:200]!r}",
                                     request.model, self.request_id(response))
            vectors += found
            tokens += bedrock_embed.input_tokens(payload, response.headers.get(bedrock_embed.INPUT_TOKENS_HEADER))
        usage, estimated = embedding_usage(request.texts, tokens)  # llmq's estimate if Bedrock counted none
        return self.embedding_response(request, vectors, usage, request_id=self.request_id(answers[-1][1]), **estimated)

    async def invoke_all(self, path: str, bodies: list[dict[str, Any]], model: str) -> list[tuple[Any, httpx.Response]]:
        """InvokeModel once per body, a few at a time; the first failure cancels the rest and is raised."""
        limit = asyncio.Semaphore(bedrock_embed.CONCURRENT_CALLS)

        async def invoke(body: dict[str, Any]) -> tuple[Any, httpx.Response]:
            async with limit:
                return await self.post_json(path, body, model=model)

        calls = [asyncio.ensure_future(invoke(body)) for body in bodies]
        try:
            return await asyncio.gather(*calls)
        except BaseException:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            raise

    # --- discovery and health -----------------------------------------------------

    async def get_available_models(self) -> list[str]:
        """Text models from ListFoundationModels (control plane); the configured list if that fails."""
        try:
            data = await self.get_json(f"{self.control_url}/foundation-models?byOutputModality=TEXT")
        except errors.ProviderError:
            return list(self.config.models)
        summaries = data.get("modelSummaries") if isinstance(data, dict) else None
        models = [item["modelId"] for item in summaries or [] if isinstance(item, dict) and item.get("modelId")]
        return models or list(self.config.models)

    async def probe(self) -> None:
        try:
            await self.get_json(f"{self.control_url}/foundation-models?byOutputModality=TEXT")
        except errors.PermissionDeniedError:
            # Roles scoped to bedrock:InvokeModel* may not list models: ask for one token instead.
            model = self.config.default_model or (self.config.models[0] if self.config.models else None)
            if model is None:
                raise
            await self.generate(
                LLMRequest(messages=[{"role": "user", "content": "ping"}], model=model, max_tokens=1, temperature=0)
            )
