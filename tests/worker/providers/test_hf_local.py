"""The in-process transformers provider on a tiny GPT-2 and tokenizer built here (nothing downloaded).

Skipped when the `transformers` extra (torch + transformers) is not installed, except the
test of the message a worker without the extra gives.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from llmq.contract.config import ProviderConfig
from llmq.contract.models import LLMRequest, LLMResponse
from llmq.worker import errors
from llmq.worker.providers.hf_local import (
    INSTALL_HINT,
    MissingDependencyError,
    TransformersPipelineProvider,
)

SENTENCES = [
    "mine three iron ore and smelt two iron ingots",
    "craft a stone pickaxe then collect five oak logs",
    "what should i do next after the wood ?",
    "build a shelter before the night and craft four torches",
]
SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]
# A chat template in the shape real ones take: role markers, then the assistant's turn opened.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
POSITIONS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_model(tokenizer).save_pretrained(path)
    return path


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    words = SENTENCES + ["system user assistant :"]
    core.train_from_iterator(words, trainer=trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # random weights, but the same ones every run
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=POSITIONS, n_layer=1, n_head=2, n_embd=16,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def provider(model_dir: Path, **options: Any) -> TransformersPipelineProvider:
    config = ProviderConfig(name="local_hf", type="huggingface", models=["tiny-gpt2"],
                            options={"mode": "pipeline", "model_path": str(model_dir), **options})
    return TransformersPipelineProvider(config)


def request(**overrides: Any) -> LLMRequest:
    fields: dict[str, Any] = {
        "messages": [{"role": "system", "content": "craft a stone pickaxe"},
                     {"role": "user", "content": "what should i do next ?"}],
        "model": "tiny-gpt2", "temperature": 0.0, "max_tokens": 12,
    }
    return LLMRequest(**{**fields, **overrides})


async def collect(hf: TransformersPipelineProvider, req: LLMRequest) -> list[LLMResponse]:
    return [chunk async for chunk in hf.stream_generate(req)]


def reference_generation(model_dir: Path, req: LLMRequest) -> tuple[int, list[int]]:
    """Prompt length and new ids from transformers directly, for the counts to match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    messages = [message.model_dump() for message in req.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return int(ids.shape[1]), output[0, ids.shape[1]:].tolist()


def test_generate_counts_real_tokens(model_dir: Path) -> None:
    req = request()
    response = asyncio.run(provider(model_dir).generate(req))
    prompt_tokens, new_ids = reference_generation(model_dir, req)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == len(new_ids) > 0
    assert response.usage.total_tokens == prompt_tokens + len(new_ids)
    assert response.content  # decoded words of the tiny vocabulary
    assert (response.provider, response.model) == ("local_hf", "tiny-gpt2")
    assert response.metadata["finish_reason"] in {"stop", "length"}


def test_greedy_stream_joins_to_the_generate_text(model_dir: Path) -> None:
    async def both() -> tuple[LLMResponse, list[LLMResponse]]:
        hf = provider(model_dir)  # one provider: the model loads once
        return await hf.generate(request()), await collect(hf, request())

    full, chunks = asyncio.run(both())
    *pieces, final = chunks
    assert pieces and "".join(piece.content for piece in pieces) == full.content
    assert all(piece.usage.total_tokens == 0 for piece in pieces)
    assert final.metadata["final"] is True and final.content == ""
    assert final.usage == full.usage
    assert final.metadata["finish_reason"] == full.metadata["finish_reason"]


def test_abandoned_stream_stops_the_model_and_frees_its_slot(model_dir: Path) -> None:
    async def abandon_then_generate() -> LLMResponse:
        hf = provider(model_dir, max_concurrent=1)
        chunks = hf.stream_generate(request(max_tokens=40))
        await chunks.__anext__()
        await chunks.aclose()  # the caller stops reading part-way
        return await asyncio.wait_for(hf.generate(request(max_tokens=2)), timeout=30)

    assert asyncio.run(abandon_then_generate()).usage.completion_tokens <= 2


def test_max_tokens_bounds_the_output(model_dir: Path) -> None:
    response = asyncio.run(provider(model_dir).generate(request(max_tokens=3)))
    assert response.usage.completion_tokens <= 3
    if response.usage.completion_tokens == 3:
        assert response.metadata["finish_reason"] == "length"


def test_sampling_with_temperature_runs(model_dir: Path) -> None:
    response = asyncio.run(provider(model_dir).generate(request(temperature=0.9, max_tokens=4)))
    assert 0 < response.usage.completion_tokens <= 4


def test_prompt_over_the_model_positions_is_context_window_exceeded(model_dir: Path) -> None:
    long_prompt = " ".join(["craft a stone pickaxe"] * POSITIONS)
    with pytest.raises(errors.ContextWindowExceededError):
        asyncio.run(provider(model_dir).generate(request(messages=[{"role": "user", "content": long_prompt}])))


def test_missing_model_dir_is_model_not_found(model_dir: Path, tmp_path: Path) -> None:
    hf = provider(tmp_path / "nowhere")
    assert asyncio.run(hf.health_check()) is False
    with pytest.raises(errors.ModelNotFoundError, match="config.json"):
        asyncio.run(hf.generate(request()))


def test_models_health_and_options(model_dir: Path) -> None:
    hf = provider(model_dir)
    assert asyncio.run(hf.get_available_models()) == ["tiny-gpt2"]
    assert asyncio.run(hf.health_check()) is True
    assert hf.local and not hf.requires_api_key
    with pytest.raises(ValueError, match="model_path"):
        provider(model_dir, model_path=None)
    with pytest.raises(ValueError, match="revision"):
        provider(model_dir, revision="main")


def test_huggingface_entry_in_pipeline_mode_is_served_in_process(model_dir: Path) -> None:
    from llmq.worker.providers.registry import create_provider

    config = ProviderConfig(name="hf_box", type="huggingface",
                            options={"mode": "pipeline", "model_path": str(model_dir)})
    hf = create_provider(config)
    assert isinstance(hf, TransformersPipelineProvider)
    assert asyncio.run(hf.generate(request(max_tokens=2))).provider == "hf_box"


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A None entry in sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError) as caught:
        provider(tmp_path)
    assert INSTALL_HINT in str(caught.value) and "transformers" in str(caught.value)
