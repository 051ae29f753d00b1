"""Hugging Face: Text Generation Inference's OpenAI-compatible Messages API.

`POST {base_url}/v1/chat/completions` with `Authorization: Bearer <HF token>`,
streaming like OpenAI (`data: {chunk}` ... `data: [DONE]`). `base_url` is a TGI
server, an Inference Endpoint URL, or (the default) the Inference Providers
router. TGI's errors are `{"error": "...", "error_type": "..."}`, also inside a
200 stream; the type decides the class (TGI router `InferError::error_type`).

Options: `mode` ("api" | "pipeline", default "api"), plus the shared
`max_tokens_field`, `stream_usage`, `send_temperature`. With `mode: pipeline`
the entry runs a transformers pipeline in-process instead
(`llmq.worker.providers.hf_local.TransformersPipelineProvider`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from llmq.contract.config import ProviderConfig
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.openai import ChatCompletionsOptions, OpenAIProvider

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


class HuggingFaceOptions(ChatCompletionsOptions):
    mode: Literal["api", "pipeline"] = "api"


class HuggingFaceProvider(OpenAIProvider):
    type_name = "huggingface"
    description = "Hugging Face TGI / Inference Endpoints / Inference Providers (Messages API)"
    default_base_url = "https://router.huggingface.co"
    # A local TGI needs no token; Inference Endpoints and the router refuse calls without one.
    requires_api_key = False
    options_model: ClassVar[type[ChatCompletionsOptions]] = HuggingFaceOptions
    chat_completions_path: ClassVar[str] = "/v1/chat/completions"
    models_path: ClassVar[str] = "/v1/models"
    client_request_id_header: ClassVar[str | None] = None
    #: genai-prices lists each backend of the router as `huggingface_<backend>`.
    price_provider_id = "huggingface"

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
