"""Which adapter class serves which `type:`: one registry, the `llmq.providers` entry points.

llmq's own adapters are entry points of that group in its pyproject.toml, declared
exactly as an outside package declares one (`name = "package.module:Class"`), so
built-ins and plugins are found one way, and the config's `type:` check
(`llmq.contract.config.known_provider_types`) reads the names from package metadata
without importing the worker. A class is imported on first use, so the Bedrock
extra is needed only by those who use Bedrock. `register()` adds one at runtime
(tests, an application embedding the worker). A plugin cannot take a built-in's
name: llmq's own entry point wins. Aliases (`google` -> `gemini`, ...) are the
contract's `PROVIDER_TYPE_ALIASES`.
"""

from __future__ import annotations

import logging
from importlib import metadata as importlib_metadata
from typing import Any

from llmq.contract.config import (
    ENTRY_POINT_GROUP,
    PROVIDER_TYPE_ALIASES,
    REINSTALL_HINT,
    ProviderConfig,
)
from llmq.worker.providers.base import LLMProvider

logger = logging.getLogger(__name__)

#: The distribution whose entry points are the built-ins.
OWN_DISTRIBUTION = "llmq"

_registered: dict[str, type[LLMProvider]] = {}


def register(type_name: str, adapter: type[LLMProvider]) -> None:
    """Register an adapter class under a `type:` name (overrides an entry point of that name)."""
    _registered[type_name] = adapter


def entry_points() -> dict[str, importlib_metadata.EntryPoint]:
    """The group's entry points by name: llmq's own first, so no plugin shadows a built-in; each part by name."""
    found: dict[str, importlib_metadata.EntryPoint] = {}
    points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry in sorted(points, key=lambda entry: (not _is_own(entry), entry.name)):
        if entry.name in found:
            logger.warning("ignoring %s = %s: the provider type %r is taken", entry.name, entry.value, entry.name)
            continue
        found[entry.name] = entry
    return found


def _is_own(entry: importlib_metadata.EntryPoint) -> bool:
    return entry.dist is not None and entry.dist.name == OWN_DISTRIBUTION


def adapter_class(type_name: str) -> type[LLMProvider]:
    """The class registered for a `type:` (or one of its aliases); KeyError when there is none."""
    type_name = PROVIDER_TYPE_ALIASES.get(type_name, type_name)
    if type_name not in _registered:
        points = entry_points()
        if type_name not in points:
            hint = f"; {REINSTALL_HINT}" if not points else ""
            raise KeyError(f"no adapter for provider type {type_name!r}{hint}")
        _registered[type_name] = _checked(points[type_name].load(), points[type_name].value)
    return _registered[type_name]


def _checked(adapter: Any, target: str) -> type[LLMProvider]:
    if not (isinstance(adapter, type) and issubclass(adapter, LLMProvider)):
        raise TypeError(f"{target} is not an LLMProvider subclass")
    return adapter


def adapter_types() -> list[str]:
    """Every `type:` an adapter is registered for: llmq's own, outside packages', then `register()`ed ones."""
    names = list(entry_points())
    return names + [name for name in _registered if name not in names]


def create_provider(config: ProviderConfig, **kwargs: Any) -> LLMProvider:
    """An adapter instance for one config entry (kwargs reach the adapter, e.g. an httpx transport)."""
    return adapter_class(config.adapter_type)(config, **kwargs)
