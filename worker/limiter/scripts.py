"""The limiter's Lua scripts: one per operation, each run behind the shared prelude.

A call passes one JSON object of named values and named groups (ARGV[1]) and declares in KEYS
every key it names (each field whose name ends in `key`); a script answers a flat list of
alternating names and values, read here into a dict of strings. lua/prelude.lua says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import redis.asyncio as aioredis

from llmq.contract.scripts import read_script

OPERATIONS = ("acquire", "settle", "release", "renew", "penalize", "snapshot")
PRELUDE = read_script(__file__, "prelude.lua")
#: Operation -> the source Redis runs: the prelude, then the operation's own script.
SOURCES: dict[str, str] = {op: f"{PRELUDE}\n{read_script(__file__, f'{op}.lua')}" for op in OPERATIONS}


class LimiterScripts:
    """The scripts registered on one Redis client (redis-py loads each by its SHA on first use)."""

    def __init__(self, redis: aioredis.Redis, sources: Mapping[str, str] = SOURCES) -> None:
        self._scripts = {op: redis.register_script(source) for op, source in sources.items()}

    async def run(self, op: str, call: Mapping[str, Any]) -> dict[str, str]:
        """Run `op` with `call` as its named arguments; its answer as names and values."""
        keys = sorted(set(_keys_named(call)))
        reply = await self._scripts[op](keys=keys, args=[json.dumps(call, separators=(",", ":"))])
        texts = [_text(item) for item in reply]
        return dict(zip(texts[::2], texts[1::2], strict=True))


def _keys_named(value: Any) -> Iterator[str]:
    """Every key a call names: the values of fields whose names end in `key`, at any depth."""
    if isinstance(value, Mapping):
        for field, item in value.items():
            if field.endswith("key") and isinstance(item, str):
                yield item
            else:
                yield from _keys_named(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_named(item)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
