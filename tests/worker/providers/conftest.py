"""The fake servers several test modules share: OpenAI's (the OpenAI, Azure OpenAI and
OpenAI-compatible adapters' tests) and Anthropic's (the adapter's tests and its features' tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fakes.anthropic import FakeAnthropic
from tests.support.fakes.openai import FakeOpenAI


@pytest.fixture(scope="package")
def openai_server() -> Iterator[FakeOpenAI]:
    # One server for the package: stopping one waits out serve_forever's 0.5 s poll.
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake_openai(openai_server: FakeOpenAI) -> FakeOpenAI:
    """The shared server as it was built: no requests, faults, limits or knobs left by another test."""
    openai_server.reset()
    return openai_server


@pytest.fixture(scope="package")
def anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake_anthropic(anthropic_server: FakeAnthropic) -> FakeAnthropic:
    """The shared Anthropic fake with no requests, faults or knobs left by another test."""
    anthropic_server.reset()
    return anthropic_server
