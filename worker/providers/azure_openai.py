"""Azure OpenAI: OpenAI's Chat Completions behind Azure deployments, keys and ids.

`POST {endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`
and `.../embeddings?api-version=...` (Azure OpenAI REST reference, data plane inference);
the bodies and every request feature are OpenAI's, so they come from `OpenAIProvider`. `base_url` is the resource
endpoint, e.g. `https://my-resource.openai.azure.com`.

Options (under `options:`), checked by `AzureOpenAIOptions`:

- `api_version` (default "2024-10-21", the latest dated GA data-plane version)
- `deployments` ({model: deployment}); a model not listed is sent to a deployment of its own name
- `auth` ("api_key" | "bearer", default "api_key"): `api-key: <key>`, or
  `Authorization: Bearer <token>` with a Microsoft Entra ID token given as `api_key`
- and the shared `max_tokens_field`, `stream_usage`, `send_temperature`
"""

from __future__ import annotations

from typing import ClassVar, Literal
from urllib.parse import quote

from llmq.worker.providers.openai import ChatCompletionsOptions, OpenAIProvider

DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIOptions(ChatCompletionsOptions):
    api_version: str = DEFAULT_API_VERSION
    deployments: dict[str, str] = {}
    auth: Literal["api_key", "bearer"] = "api_key"


class AzureOpenAIProvider(OpenAIProvider):
    type_name = "azure_openai"
    description = "Azure OpenAI (Chat Completions on your Azure deployments)"
    default_base_url = None  # every resource has its own endpoint
    requires_api_key = True
    price_provider_id = "azure"
    supports_flex = False
    # APIM's id comes first: it is the one Azure support asks for.
    request_id_headers: ClassVar[tuple[str, ...]] = ("apim-request-id", "x-request-id")
    options_model: ClassVar[type[ChatCompletionsOptions]] = AzureOpenAIOptions
    # Azure's standard client-generated request id header (Azure REST API guidelines).
    client_request_id_header: ClassVar[str | None] = "x-ms-client-request-id"

    options: AzureOpenAIOptions

    def deployment_for(self, model: str) -> str:
        return self.options.deployments.get(model, model)

    def request_path(self, model: str, *, stream: bool) -> str:
        return self.deployment_path(model, "chat/completions")

    def embeddings_path(self, model: str) -> str | None:
        return self.deployment_path(model, "embeddings")

    def deployment_path(self, model: str, operation: str) -> str:
        deployment = quote(self.deployment_for(model), safe="")
        return f"/openai/deployments/{deployment}/{operation}?api-version={quote(self.options.api_version)}"

    def build_headers(self, model: str | None, job_id: str | None) -> dict[str, str]:
        key = self.require_api_key(model)
        auth = {"Authorization": f"Bearer {key}"} if self.options.auth == "bearer" else {"api-key": key}
        return auth | self.client_request_id(job_id)

    async def get_available_models(self) -> list[str]:
        """The models this entry is configured for, each served by its deployment.

        The data plane has no call that lists deployments (that is the ARM control
        plane, with management credentials this worker does not hold), so the
        configured mapping is the truth here.
        """
        return list(dict.fromkeys([*self.config.models, *self.options.deployments]))

    async def probe(self) -> None:
        """The resource answers an authenticated data-plane call (`GET /openai/models`)."""
        await self.get_json(
            f"/openai/models?api-version={quote(self.options.api_version)}", headers=self.build_headers(None, None)
        )
