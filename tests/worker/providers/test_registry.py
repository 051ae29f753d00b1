"""The provider registry: built-ins and outside packages found through one entry-point group."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmq.contract.config import (
    ENTRY_POINT_GROUP,
    PROVIDER_TYPE_ALIASES,
    ConfigError,
    ProviderConfig,
    known_provider_types,
    parse_config,
)
from llmq.worker.providers import registry
from llmq.worker.providers.base import LLMProvider
from llmq.worker.providers.mock import MockProvider

PLUGIN_MODULE = "llmq_test_plugin_echo"
PLUGIN_SOURCE = '''
from llmq.worker.providers.mock import MockProvider


class EchoProvider(MockProvider):
    type_name = "echoer"
    description = "an outside package's adapter"
    price_provider_id = "groq"


class Impostor(MockProvider):
    type_name = "openai"
'''
PLUGIN_ENTRY_POINTS = f"""[{ENTRY_POINT_GROUP}]
echoer = {PLUGIN_MODULE}:EchoProvider
openai = {PLUGIN_MODULE}:Impostor
"""


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No class loaded or registered by another test."""
    monkeypatch.setattr(registry, "_registered", {})


@pytest.fixture
def outside_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An installed distribution, as pip would leave it: a module and its dist-info on sys.path."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "llmq_test_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmq-test-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(PLUGIN_MODULE, None)


def own_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.distribution("llmq").entry_points
            if entry.group == ENTRY_POINT_GROUP}


def test_every_builtin_is_an_entry_point_of_the_llmq_distribution() -> None:
    own = own_entry_points()
    assert {"openai", "anthropic", "gemini", "bedrock", "ollama", "mock"} <= set(own)
    for name, entry in own.items():
        adapter = registry.adapter_class(name)
        assert adapter is entry.load() and issubclass(adapter, LLMProvider)
        assert adapter.type_name == name
    assert registry.adapter_types()[: len(own)] == sorted(own)
    # The contract reads the same names from metadata, without importing the worker.
    assert known_provider_types() == set(own) | set(PROVIDER_TYPE_ALIASES)


def test_aliases_resolve_to_their_adapter() -> None:
    for alias, target in PROVIDER_TYPE_ALIASES.items():
        assert registry.adapter_class(alias) is registry.adapter_class(target)
        assert ProviderConfig(name="x", type=alias).adapter_type == target


def test_without_entry_points_nothing_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """No second list of built-ins hides behind the entry points: without them, nothing resolves."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: importlib.metadata.EntryPoints(()))
    with pytest.raises(KeyError, match="pip install -e"):
        registry.adapter_class("openai")
    with pytest.raises(ConfigError, match="no adapters are registered"):
        parse_config("llm_service:\n  providers:\n    m: {type: mock}\n", environ={})


def test_an_outside_package_adds_a_provider(outside_package: None) -> None:
    config = parse_config("llm_service:\n  providers:\n    echo: {type: echoer, models: [m]}\n", environ={})
    assert "echoer" in known_provider_types()
    adapter = registry.adapter_class("echoer")
    assert adapter.__module__ == PLUGIN_MODULE and adapter.price_table_key("llama-3") == ("groq", "llama-3")
    assert "echoer" in registry.adapter_types()
    provider = registry.create_provider(config.provider("echo"))
    assert isinstance(provider, MockProvider) and provider.name == "echo"


def test_an_outside_package_cannot_take_a_builtin_name(outside_package: None) -> None:
    claims = [entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    assert claims.count("openai") == 2
    assert registry.adapter_class("openai") is own_entry_points()["openai"].load()
    assert registry.adapter_types().count("openai") == 1


def test_register_adds_an_adapter_at_runtime() -> None:
    class Local(MockProvider):
        type_name = "in_process"

    registry.register("in_process", Local)
    assert registry.adapter_class("in_process") is Local
    assert registry.adapter_types()[-1] == "in_process"
