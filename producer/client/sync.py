"""`SyncLLMService`: `LLMService`'s API for scripts, each call on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from llmq.client.service import LLMService
from llmq.contract.config import LLMConfig


class SyncLLMService:
    """The same API for scripts: each call runs on a private event loop thread."""

    def __init__(self, config: LLMConfig | str | None = None, *, redis_url: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmq-client", daemon=True)
        self._thread.start()
        self.service = LLMService(config, redis_url=redis_url)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.service, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self._run(attribute(*args, **kwargs))

    def close(self) -> None:
        self._run(self.service.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncLLMService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
