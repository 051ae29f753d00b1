"""A Hugging Face `transformers` causal LM run in-process (the `transformers` extra).

Selected by a `huggingface` entry with `options: {mode: pipeline, model_path: ...}`
(see `llmq.worker.providers.huggingface`). Options:

- `model_path` (required): a local directory holding the model and tokenizer, as written by
  `save_pretrained`; nothing is ever downloaded (`local_files_only=True`)
- `device` (default "cpu"): where the model runs ("cuda", "cuda:1", "mps", ...)
- `max_concurrent` (default 1): generations at once in this worker process

Generation runs in worker threads (`asyncio.to_thread`) so the event loop stays free, behind
an `asyncio.Semaphore`. Usage is the real token count: prompt ids in, new ids out.
Temperature 0 means greedy decoding.

What it can honestly do (the capability table's `huggingface:pipeline` row says the same):
plain chat; `top_p` and `stop` (transformers' `stop_strings`); JSON by asking for it in the
prompt (`pipeline_messages`) and letting llmq validate the answer (`worker/output.py`), with no
constrained decoding, so a small model may miss and be asked again. It refuses tools (a model's
call syntax is its own, with nothing to parse it) and images; `seed` is not honoured (torch's
generator is global to the process, shared by concurrent generations); there are no embeddings
(an embedding model needs pooling this adapter does not read: serve it with TEI).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse, Usage
from llmq.worker import errors
from llmq.worker.providers.base import LLMProvider

INSTALL_HINT = "pip install 'llmq[transformers]'"
_END_OF_STREAM = object()


class MissingDependencyError(ImportError):
    """The `transformers` extra is not installed in this worker's environment."""


class PipelineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["pipeline"] = "pipeline"
    model_path: str = Field(min_length=1)
    device: str = "cpu"
    max_concurrent: int = Field(default=1, ge=1)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    #: Longest sequence (prompt + output) the model's position embeddings allow, if it says.
    max_positions: int | None


@dataclass
class _Prepared:
    input_ids: Any  # torch.LongTensor of shape (1, prompt_tokens)
    generate_kwargs: dict[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def require_backend() -> None:
    """Raise a clear error when torch or transformers is missing (cheap: nothing is imported)."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"the huggingface provider in pipeline mode needs {' and '.join(missing)}: {INSTALL_HINT}"
        )


class TransformersPipelineProvider(LLMProvider):
    type_name = "huggingface"
    description = "Hugging Face transformers model run in-process (options.mode: pipeline)"
    local = True
    # Its health check only says the model loads; a job is the better probe of an in-process model.
    health_probe = False
    requires_api_key = False
    supports_streaming = True
    options_model = PipelineOptions

    options: PipelineOptions

    def __init__(self, config: ProviderConfig, **_: object) -> None:
        super().__init__(config)
        require_backend()
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        self._slots = asyncio.Semaphore(self.options.max_concurrent)

    # --- loading --------------------------------------------------------------

    def _load(self) -> _Loaded:
        with self._load_lock:  # several first calls at once load the model once
            if self._loaded is None:
                self._loaded = self._load_from_disk()
            return self._loaded

    def _load_from_disk(self) -> _Loaded:
        path = Path(self.options.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise errors.ModelNotFoundError(
                f"options.model_path {str(path)!r} is not a saved transformers model (no config.json)",
                provider=self.name,
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a worker's log is no terminal
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise errors.ModelNotFoundError(
                f"cannot load the model in {str(path)!r}: {type(exc).__name__}: {exc}", provider=self.name
            ) from exc
        model.to(self.options.device)
        model.eval()
        config = model.config
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return _Loaded(model, tokenizer, max_positions)

    # --- preparing a call -------------------------------------------------------

    def _prompt_ids(self, loaded: _Loaded, request: LLMRequest) -> Any:
        tokenizer = loaded.tokenizer
        messages = pipeline_messages(request, provider=self.name)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already wrote any special tokens the model expects.
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            text = "\n".join(f"{message['role']}: {message['content']}" for message in messages) + "\nassistant:"
            encoded = tokenizer(text, return_tensors="pt")
        return encoded["input_ids"].to(self.options.device)

    def _prepare(self, loaded: _Loaded, request: LLMRequest) -> _Prepared:
        input_ids = self._prompt_ids(loaded, request)
        prompt_tokens = int(input_ids.shape[1])
        max_new_tokens = request.max_tokens
        if loaded.max_positions is not None:
            if prompt_tokens >= loaded.max_positions:
                raise errors.ContextWindowExceededError(
                    f"prompt is {prompt_tokens} tokens; the model takes at most {loaded.max_positions}",
                    provider=self.name, model=request.model,
                )
            max_new_tokens = min(max_new_tokens, loaded.max_positions - prompt_tokens)
        tokenizer = loaded.tokenizer
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": input_ids.new_ones(input_ids.shape),
            "max_new_tokens": max_new_tokens,
            "pad_token_id": pad_token_id,
            "do_sample": request.temperature > 0,
        }
        if request.temperature > 0:
            kwargs["temperature"] = request.temperature
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
        if request.stop is not None:
            kwargs["stop_strings"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
            kwargs["tokenizer"] = tokenizer  # transformers matches stop strings through it
        return _Prepared(input_ids, kwargs)

    def _finish(self, loaded: _Loaded, prepared: _Prepared, output: Any) -> tuple[str, Usage, str]:
        new_ids = output[0, prepared.prompt_tokens :]
        text = loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
        eos = loaded.tokenizer.eos_token_id
        stopped = len(new_ids) > 0 and eos is not None and int(new_ids[-1]) == eos
        finish_reason = "stop" if stopped or len(new_ids) < prepared.generate_kwargs["max_new_tokens"] else "length"
        return text, Usage.of(prepared.prompt_tokens, len(new_ids)), finish_reason

    def _run_generate(self, loaded: _Loaded, kwargs: dict[str, Any], model: str) -> Any:
        import torch

        try:
            with torch.inference_mode():
                return loaded.model.generate(**kwargs)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise errors.ServerError(f"generation failed: {type(exc).__name__}: {exc}", provider=self.name,
                                     model=model) from exc

    # --- the interface --------------------------------------------------------

    async def generate(self, request: LLMRequest, *, job_id: str | None = None) -> LLMResponse:
        async with self._slots:
            loaded = await asyncio.to_thread(self._load)
            prepared = self._prepare(loaded, request)
            output = await asyncio.to_thread(self._run_generate, loaded, prepared.generate_kwargs, request.model)
        text, usage, finish_reason = self._finish(loaded, prepared, output)
        return self.response(request, text, usage, finish_reason=finish_reason, device=self.options.device)

    async def stream_generate(self, request: LLMRequest, *, job_id: str | None = None) -> AsyncIterator[LLMResponse]:
        async with self._slots:
            loaded = await asyncio.to_thread(self._load)
            prepared = self._prepare(loaded, request)
            streamer, stop = self._streamer(loaded, prepared)
            worker = asyncio.create_task(
                asyncio.to_thread(self._generate_into, loaded, prepared, streamer, request.model)
            )
            try:
                pieces = iter(streamer)
                while (piece := await asyncio.to_thread(next, pieces, _END_OF_STREAM)) is not _END_OF_STREAM:
                    if piece:
                        yield self.response(request, str(piece), Usage())
                output = await worker
            finally:
                stop.set()  # a caller that stops reading also stops the model
                await asyncio.wait({worker})  # never leave a thread writing after we return
        _, usage, finish_reason = self._finish(loaded, prepared, output)
        yield self.final_chunk(request, usage, finish_reason=finish_reason, device=self.options.device)

    def _streamer(self, loaded: _Loaded, prepared: _Prepared) -> tuple[Any, threading.Event]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        prepared.generate_kwargs["streamer"] = streamer
        prepared.generate_kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_when_set(stop)])
        return streamer, stop

    def _generate_into(self, loaded: _Loaded, prepared: _Prepared, streamer: Any, model: str) -> Any:
        try:
            return self._run_generate(loaded, prepared.generate_kwargs, model)
        except BaseException:
            streamer.end()  # wake the reader; the error reaches it through the task
            raise

    async def get_available_models(self) -> list[str]:
        return list(self.config.models) or [Path(self.options.model_path).name]

    async def health_check(self) -> bool:
        """True once the model is loaded, or when the extra is installed and model_path holds a model."""
        try:
            if self._loaded is not None:
                return True
            require_backend()
            return (Path(self.options.model_path).expanduser() / "config.json").is_file()
        except Exception:  # a yes/no answer; the reason shows on the next real call
            return False


def pipeline_messages(request: LLMRequest, *, provider: str) -> list[dict[str, str]]:
    """The chat the model is given: each message's text, and, when JSON was asked for, the ask
    (with the schema) at the end of the last user message, where every chat template keeps it.
    Nothing constrains the decoding: llmq validates the answer. Tools and images are refused."""
    if request.uses_tools or any(message.images for message in request.messages):
        raise errors.BadRequestError(
            "the in-process transformers pipeline takes neither tools nor images; route the request to a "
            "provider whose capabilities have them", provider=provider, model=request.model,
        )
    messages = [{"role": message.role, "content": message.text} for message in request.messages]
    response_format = request.response_format
    if response_format is not None and response_format.wants_json:
        schema = response_format.schema_dict
        ask = "Answer with one JSON object and nothing else" + (
            f", matching this JSON schema: {json.dumps(schema, separators=(',', ':'))}" if schema is not None else "")
        last_user = max((index for index, message in enumerate(messages) if message["role"] == "user"), default=None)
        if last_user is None:
            messages.append({"role": "user", "content": ask + "."})
        else:
            messages[last_user] = {"role": "user", "content": f"{messages[last_user]['content']}\n\n{ask}."}
    return messages


def _stop_when_set(stop: threading.Event) -> Any:
    """A StoppingCriteria that ends generation once `stop` is set (transformers imported lazily)."""
    import torch
    from transformers import StoppingCriteria

    class _StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return _StopWhenSet()
