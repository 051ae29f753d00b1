"""`ChatLLMQ`: a LangChain chat model whose every call is an llmq job.

Code written against `ChatOpenAI` switches with the line that builds the model:

    llm = ChatLLMQ(model="gpt-4o-mini", temperature=0, caller="critic")

`invoke`, `stream`, `batch` and their async twins, `bind_tools` and `with_structured_output`
behave as LangChain's own models do; the request goes through llmq's queue, limits, budgets,
routing and fallback, and the answer's `response_metadata` names the provider entry that served
it and the job (`AIMessage.id` is the job id too).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from llmq.client import JobFailedError, LLMService
from llmq.contract.models import JobRecord, JobState, LLMResponse
from llmq.langchain.connection import SERVICE_FIELDS_CONFIG, ServiceFields
from llmq.langchain.messages import ChunkReader, ai_message, request_messages
from llmq.langchain.structured import StructuredMethod, response_format_for, trace_format, with_parser

#: LangChain's names for tool_choice that OpenAI (and so llmq) spells otherwise.
_TOOL_CHOICE_WORDS = {"any": "required", True: "required"}


class ChatLLMQ(ServiceFields, BaseChatModel):
    """A LangChain chat model backed by llmq (`pip install 'llmq[langchain]'`).

    Takes what `ChatOpenAI` takes for a request (model, temperature, max_tokens, stop, seed,
    top_p, timeout), llmq's own request fields (provider, caller, request_metadata,
    provider_options) and where llmq is (config_path, redis_url); no API key, base URL or
    retry count: the workers hold those. A call-time keyword (`invoke(..., model=...)`, or what
    `bind` holds) is an `LLMRequest` field, checked like any request.
    """

    # Stated again: a base's config (LangChain's ignores unknown fields) would win otherwise.
    model_config = SERVICE_FIELDS_CONFIG

    temperature: float | None = None
    """None: llmq's default (0.7)."""
    max_tokens: int | None = Field(default=None, alias="max_completion_tokens")
    """Most tokens the answer may use; None: llmq's default (2000)."""
    stop: list[str] | str | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    top_p: float | None = None
    streaming: bool = False
    """Stream even on `invoke` (callbacks then see each token)."""

    @property
    def _llm_type(self) -> str:
        return "llmq-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, **self._sampling()}

    def _sampling(self) -> dict[str, Any]:
        fields = {"temperature": self.temperature, "max_tokens": self.max_tokens, "stop": self.stop or None,
                  "seed": self.seed, "top_p": self.top_p}
        return {name: value for name, value in fields.items() if value is not None}

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The `LLMRequest` body: the model's fields, then the call's (which win)."""
        # `stream`: LangChain's say in whether to stream, which the method that runs has already decided.
        call = {name: value for name, value in kwargs.items() if name != "stream"}
        if stop:
            call["stop"] = stop
        return {"messages": request_messages(messages), "model": self.model, **self._sampling(),
                **self.request_fields(), **call}

    # --- answers -------------------------------------------------------------------

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        shared = self.shared()
        return shared.run(_answer(shared.service, self._request(messages, stop, kwargs), self.timeout_s))

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        shared = self.shared()
        request = self._request(messages, stop, kwargs)
        return await shared.arun(_answer(shared.service, request, self.timeout_s))

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        shared = self.shared()
        reader = ChunkReader()
        for response in shared.iterate(shared.service.stream_generate(self._request(messages, stop, kwargs))):
            message = reader.read(response)
            if message is not None:
                chunk = ChatGenerationChunk(message=message)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        shared = self.shared()
        reader = ChunkReader()
        async for response in shared.aiterate(shared.service.stream_generate(self._request(messages, stop, kwargs))):
            message = reader.read(response)
            if message is not None:
                chunk = ChatGenerationChunk(message=message)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    # --- tools and structured output ----------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools in any form LangChain takes (`BaseTool`, a function, a pydantic class, a JSON
        schema), sent as OpenAI's function tools. `tool_choice`: "auto", "none", "required" (or
        "any", or True), a tool's name, or OpenAI's `{"type": "function", ...}`."""
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _tool_choice(tool_choice, {tool["function"]["name"] for tool in formatted})
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers as `schema` (a pydantic class, a TypedDict or a JSON schema).

        `json_schema` (the default) asks the provider for JSON matching the schema, and llmq
        checks it before the job may succeed (a pydantic class is made strict, as OpenAI's SDK
        does; `strict` says so for the others); `json_mode` asks for any JSON object (say the
        shape in the prompt); `function_calling` forces a tool call. With `include_raw`, the
        output is `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`.
        """
        if kwargs:
            raise ValueError(f"with_structured_output: unexpected arguments {sorted(kwargs)}")
        if schema is None:
            raise ValueError("with_structured_output: give a schema (a pydantic class, a TypedDict or a JSON schema)")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"with_structured_output: method {method!r}; use json_schema, json_mode or function_calling")
        model = self.bind(
            response_format=response_format_for(schema, method, strict),
            ls_structured_output_format=trace_format(schema, method, strict),
        )
        return with_parser(model, schema, include_raw=include_raw)


def _tool_choice(choice: dict[str, Any] | str | bool, names: set[str]) -> dict[str, Any] | str:
    if isinstance(choice, dict):
        return choice
    if choice in _TOOL_CHOICE_WORDS:
        return _TOOL_CHOICE_WORDS[choice]
    if isinstance(choice, str) and choice in names:
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice
    raise ValueError(f"tool_choice {choice!r}: give auto, none, required, any, or one of the tools: {sorted(names)}")


async def _answer(service: LLMService, request: dict[str, Any], timeout_s: float | None) -> ChatResult:
    """Submit and wait, as `LLMService.generate` does, keeping the job id for the message."""
    job_id = await service.submit(request)
    job = await service.wait(job_id, timeout_s=timeout_s)
    assert isinstance(job, JobRecord)
    if job.state is not JobState.SUCCEEDED or not isinstance(job.result, LLMResponse):
        raise JobFailedError(job)
    message = ai_message(job.result, job_id)
    return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": job.result.model})
