"""The fake servers several test modules share, one per package (stopping one waits out
serve_forever's 0.5 s poll): OpenAI's (the OpenAI, Azure OpenAI and OpenAI-compatible adapters'
tests), Anthropic's, Gemini's and Ollama's (each adapter's tests and its features' tests).

Each is two fixtures: `<name>_server`, started once, and `fake_<name>`, the same server as it was
built: no requests, faults, limits, models or knobs left by another test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.fakes.anthropic import FakeAnthropic
from tests.support.fakes.base import FakeProviderServer
from tests.support.fakes.gemini import FakeGemini
from tests.support.fakes.ollama import FakeOllama
from tests.support.fakes.openai import FakeOpenAI


def shared_fake(name: str, make: Callable[[], FakeProviderServer]) -> tuple[Any, Any]:
    """The fixtures `<name>_server` (package scope) and `fake_<name>` (reset for each test)."""

    def server() -> Iterator[FakeProviderServer]:
        with make() as fake:
            yield fake

    def fresh(request: pytest.FixtureRequest) -> FakeProviderServer:
        found: FakeProviderServer = request.getfixturevalue(f"{name}_server")
        found.reset()
        return found

    return pytest.fixture(scope="package", name=f"{name}_server")(server), pytest.fixture(name=f"fake_{name}")(fresh)


openai_server, fake_openai = shared_fake("openai", FakeOpenAI)
anthropic_server, fake_anthropic = shared_fake("anthropic", FakeAnthropic)
gemini_server, fake_gemini = shared_fake("gemini", FakeGemini)
ollama_server, fake_ollama = shared_fake("ollama", FakeOllama)
