"""Hugging Face: Text Generation Inference's OpenAI-compatible Messages API.

`POST {base_url}/v1/chat/completions` with `Authorization: Bearer <HF token>`,
streaming like OpenAI (`data: {chunk}` ... `data: [DONE]`). `base_url` is a TGI
server, an Inference Endpoint URL, or (the default) the Inference Providers
router. TGI's errors are `{"error": "...", "error_type": "..."}`, also inside a
200 stream; the type decides the class (TGI router `InferError::error_type`).

Request features, as TGI's Messages API takes them (router/src/lib.rs, ChatRequest):

- tools, `tool_choice`, assistant `tool_calls` and `tool` messages as OpenAI's. TGI answers a
  call with `arguments` that older versions send as an object, a `description: null`, and the
  id "0" (or "" when streaming): the arguments are read either way and such an id is replaced
  by one made from the answer. TGI reports finish_reason "stop" after a call: it is `tool_calls`
- JSON: TGI's grammar, `response_format: {"type": "json", "value": <schema>}` (`{"type":
  "object"}` for json_object), which every TGI since 2.1 takes; the Inference Providers router
  takes OpenAI's `response_format` as it is (option `response_format_style`, default by
  base_url). TGI refuses a grammar and tools together ("Grammar and tools are mutually
  exclusive"): such a request goes with its tools only, and its final answer's JSON is checked
  by llmq without being constrained
- images: `image_url` parts, for vision models (say so under `capabilities:`)
- `stop` always as a list (TGI takes no single string); `top_p` 1.0 is left out (TGI refuses
  it; it means no nucleus sampling, the default)
- embeddings: a Text Embeddings Inference server's OpenAI-compatible `POST /v1/embeddings`
  (float vectors and a usage count), chosen over TEI's native `/embed`, which counts no tokens;
  configure the TEI server as an entry of its own (`base_url` of the TEI server)

Options: `mode` ("api" | "pipeline", default "api"), `response_format_style` ("tgi" |
"openai"; default "openai" for the router, "tgi" for any other base_url), plus the shared
`max_tokens_field`, `stream_usage`, `send_temperature`. With `mode: pipeline` the entry runs a
transformers pipeline in-process instead (`llmq.worker.providers.hf_local.TransformersPipelineProvider`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx

from llmq.contract.config import ProviderConfig
from llmq.contract.messages import ToolCall
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.features import finish_reason, stable_tool_call_id, tool_call
from llmq.worker.providers.openai import ChatCompletionsOptions, ChatStreamState, OpenAIProvider

#: TGI error_type -> class. "generation" arrives as 424, which the status alone would call a bad request.
TGI_ERROR_CLASSES: dict[str, type[errors.ProviderError]] = {
    "validation": errors.BadRequestError,
    "template_error": errors.BadRequestError,
    "missing_template_variable": errors.BadRequestError,
    "tool_error": errors.BadRequestError,
    "overloaded": errors.OverloadedError,
    "generation": errors.ServerError,
    "incomplete_generation": errors.ServerError,
    "incomplete_generation_stream": errors.ServerError,
}
#: The status TGI gives each error_type (for errors that arrive inside a 200 stream).
TGI_ERROR_STATUS = {
    "validation": 422, "template_error": 422, "missing_template_variable": 422, "tool_error": 422,
    "overloaded": 429, "generation": 424,
}


#: The ids TGI gives every call (non-streamed "0", streamed ""): not ids at all.
PLACEHOLDER_CALL_IDS = frozenset({"", "0"})
ROUTER_HOST = "router.huggingface.co"


class HuggingFaceOptions(ChatCompletionsOptions):
    mode: Literal["api", "pipeline"] = "api"
    #: None: "openai" for the Inference Providers router, "tgi" for a TGI server or Inference Endpoint.
    response_format_style: Literal["tgi", "openai"] | None = None


@dataclass
class TGIStreamState(ChatStreamState):
    #: Calls (by index) whose first piece has had its placeholder id replaced.
    ids_given: set[int] = field(default_factory=set)


class HuggingFaceProvider(OpenAIProvider):
    type_name = "huggingface"
    description = "Hugging Face TGI / Inference Endpoints / Inference Providers (Messages API)"
    default_base_url = "https://router.huggingface.co"
    # A local TGI needs no token; Inference Endpoints and the router refuse calls without one.
    requires_api_key = False
    supports_flex = False
    options_model: ClassVar[type[ChatCompletionsOptions]] = HuggingFaceOptions
    chat_completions_path: ClassVar[str] = "/v1/chat/completions"
    models_path: ClassVar[str] = "/v1/models"
    client_request_id_header: ClassVar[str | None] = None
    #: genai-prices lists each backend of the router as `huggingface_<backend>`.
    price_provider_id = "huggingface"
    #: TEI's OpenAI-compatible route; vectors as floats (base64 only from TEI 1.6 on).
    embeddings_endpoint: ClassVar[str | None] = "/v1/embeddings"
    embeddings_encoding: ClassVar[str] = "float"
    allowed_provider_options: ClassVar[frozenset[str]] = OpenAIProvider.allowed_provider_options | {"tool_prompt"}

    options: HuggingFaceOptions

    def __new__(cls, config: ProviderConfig, *args: Any, **kwargs: Any) -> LLMProvider:
        if config.options.get("mode") == "pipeline":
            # Imported here only: transformers is heavy and optional.
            from llmq.worker.providers.hf_local import TransformersPipelineProvider

            return TransformersPipelineProvider(config)
        return super().__new__(cls)

    @classmethod
    def price_table_key(cls, model: str) -> tuple[str, str] | None:
        """The router picks a backend by a `model:backend` suffix
        (https://huggingface.co/docs/inference-providers/en/providers/cerebras), priced at that backend's rates."""
        model_ref, separator, backend = model.rpartition(":")
        if not separator or not model_ref or not backend:
            # No backend named: the router chooses one per call, so the rate is unknown.
            return None
        return f"{cls.price_provider_id}_{backend.lower()}", model_ref

    # --- requests -----------------------------------------------------------------

    @property
    def tgi_style(self) -> bool:
        style = self.options.response_format_style
        return style == "tgi" if style is not None else ROUTER_HOST not in self.base_url

    def build_body(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        body = super().build_body(request, stream=stream)
        if isinstance(body.get("stop"), str):
            body["stop"] = [body["stop"]]
        if self.tgi_style and body.get("top_p") == 1.0:
            del body["top_p"]
        return body

    def feature_fields(self, request: LLMRequest) -> dict[str, Any]:
        fields = super().feature_fields(request)
        response_format = request.response_format
        if not self.tgi_style or response_format is None:
            return fields
        if not response_format.wants_json or request.tools is not None:
            # "text" is TGI's default; with tools, TGI takes no grammar (the answer is still checked).
            fields.pop("response_format", None)
        else:
            schema = response_format.schema_dict
            fields["response_format"] = {"type": "json", "value": schema if schema is not None else {"type": "object"}}
        return fields

    # --- answers ------------------------------------------------------------------

    def parse_response(self, request: LLMRequest, body: Any, response: httpx.Response) -> LLMResponse:
        return called_finish(super().parse_response(request, body, response))

    def new_stream_state(self, request: LLMRequest, request_id: str | None) -> TGIStreamState:
        return TGIStreamState(request, request_id)

    def finish_stream(self, state: ChatStreamState) -> LLMResponse:
        return called_finish(super().finish_stream(state))

    def tool_calls_of(self, message: dict[str, Any], model: str, request_id: str | None) -> list[ToolCall] | None:
        """TGI's calls: arguments as a string or (older TGI) an object, a `description` beside
        them, and the placeholder id "0"."""
        raw = message.get("tool_calls")
        if not raw:
            return None
        calls = []
        for index, call in enumerate(raw):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise self.malformed(f"tool call without a function name: {str(call)[:200]!r}", model, request_id)
            call_id = str(call.get("id") or "")
            if call_id in PLACEHOLDER_CALL_IDS:
                call_id = stable_tool_call_id(request_id, index, function["name"])
            calls.append(tool_call(call_id, function["name"], function.get("arguments")))
        return calls

    def tool_call_piece(self, piece: dict[str, Any], state: ChatStreamState) -> dict[str, Any]:
        if str(piece.get("id") or "") not in PLACEHOLDER_CALL_IDS or not isinstance(state, TGIStreamState):
            return piece
        index = int(piece.get("index") or 0)
        # Every TGI piece carries the same placeholder; the first piece of a call gets a real id.
        made = stable_tool_call_id(state.response_id or state.request_id, index) if index not in state.ids_given else None
        state.ids_given.add(index)
        return {**piece, "id": made}

    # --- errors -------------------------------------------------------------------

    def map_error(self, status_code: int, body: Any, message: str) -> type[errors.ProviderError]:
        by_code = super().map_error(status_code, body, message)
        if by_code is errors.ContextWindowExceededError:
            return by_code
        error_type = body.get("error_type") if isinstance(body, dict) else None
        return TGI_ERROR_CLASSES.get(str(error_type), by_code)

    def stream_error_status(self, payload: dict[str, Any]) -> int:
        if "error_type" in payload:
            return TGI_ERROR_STATUS.get(str(payload["error_type"]), 500)
        return super().stream_error_status(payload)


def called_finish(response: LLMResponse) -> LLMResponse:
    """TGI says "stop" after a tool call, and "eos_token" / "stop_sequence" in older versions:
    llmq's word for each."""
    native = response.metadata.get("finish_reason")
    reason = "tool_calls" if response.tool_calls else finish_reason(native) or response.finish_reason
    if reason == response.finish_reason:
        return response
    return response.model_copy(update={"finish_reason": reason,
                                       "metadata": {**response.metadata, "finish_reason": reason or native}})
