"""What Flower shows as a job's task arguments: which job it is, never its prompt or a key.

A `llmq.generate` message carries `(job_id, dispatch)` and nothing else. Celery lets
the sender choose how those arguments are displayed (`argsrepr`, `kwargsrepr`, sent
in the message and in its task-sent event), so each message names its job instead:

    args:   custom_id=row-17 batch_id=batch_01 caller=etl model=gpt-4o-mini via=openai/gpt-4o-mini attempt=2
    kwargs: {'custom_id': 'row-17', 'batch_id': 'batch_01', ..., 'attempt': 2}

The args line is for reading; the kwargs dict is what Flower's search matches
exactly (`kwargs:custom_id=row-17`). `attempt` is the job's attempt number this
message starts (Flower's `retries` is that minus one); `via` is this hop's provider
entry and model.

The producer labels a job's first message. The label (without the attempt) is kept
on the job record, field `label`, so the worker that publishes the job again (a
retry, a fallback, a re-run after a lost worker) shows the same names, with the hop
the engine moved it to and the attempt number read from the record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from llmq.contract.models import Hop, LLMRequest

#: A longer value (a custom id, a caller) is cut to this many characters in the label.
MAX_VALUE_CHARS = 120
_NEEDS_QUOTES = re.compile(r"[\s'\"]")


@dataclass(frozen=True)
class TaskLabel:
    #: The model the caller asked for.
    model: str
    #: This hop's provider entry and model.
    provider: str
    provider_model: str
    custom_id: str | None = None
    batch_id: str | None = None
    #: `request.metadata["caller"]`, when the caller names itself.
    caller: str | None = None
    #: The attempt number the message starts (1 for the first).
    attempt: int = 1

    @classmethod
    def for_job(cls, request: LLMRequest, hop: Hop, *, batch_id: str | None, custom_id: str | None) -> TaskLabel:
        caller = request.metadata.get("caller")
        return cls(model=request.model, provider=hop.provider, provider_model=hop.model, custom_id=custom_id,
                   batch_id=batch_id, caller=None if caller is None else str(caller))

    def on_hop(self, hop: Hop) -> TaskLabel:
        return replace(self, provider=hop.provider, provider_model=hop.model)

    def stored(self) -> str:
        """The job record's `label` field: everything but the attempt number."""
        return json.dumps({"model": self.model, "provider": self.provider, "provider_model": self.provider_model,
                           "custom_id": self.custom_id, "batch_id": self.batch_id, "caller": self.caller},
                          separators=(",", ":"))

    @classmethod
    def from_stored(cls, text: str | None, *, attempt: int) -> TaskLabel | None:
        """None for a record without a label (created before labels existed): Celery then shows the arguments."""
        if not text:
            return None
        try:
            return cls(**json.loads(text), attempt=attempt)
        except (ValueError, TypeError):
            return None

    @cached_property
    def names(self) -> dict[str, Any]:
        """What Flower shows, by name (made once: this runs for every message)."""
        names: dict[str, Any] = {"custom_id": self.custom_id, "batch_id": self.batch_id, "caller": self.caller,
                                 "model": self.model, "provider": self.provider, "provider_model": self.provider_model}
        shown = {name: _cut(value) for name, value in names.items() if value is not None}
        shown["attempt"] = self.attempt
        return shown

    def argsrepr(self) -> str:
        words = [f"{name}={_word(value)}" for name, value in self.names.items()
                 if name not in ("provider", "provider_model", "attempt")]
        words += [f"via={_word(self.names['provider'] + '/' + self.names['provider_model'])}",
                  f"attempt={self.attempt}"]
        return " ".join(words)

    def kwargsrepr(self) -> str:
        return repr(self.names)


def _cut(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 3] + "..."


def _word(value: str) -> str:
    """A value as one word of the args line: quoted when it holds a space or a quote, or is empty."""
    return value if value and not _NEEDS_QUOTES.search(value) else repr(value)
