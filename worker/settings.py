"""What one worker process is told when it starts: one typed object, handed to the app factory.

`llmq worker` builds it from its flags; `celery -A llmq.worker.app` (beat, Flower)
builds it from the environment (`LLMQ_CONFIG`, `LLMQ_REDIS_URL`, `LLMQ_METRICS_PORT`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmq.contract import keys
from llmq.contract.config import LLMConfig, load_config
from llmq.contract.queueing import redis_url

#: Prometheus port when `--metrics-port` is not given (0 or unset: off).
METRICS_PORT_ENV = "LLMQ_METRICS_PORT"


@dataclass(frozen=True)
class WorkerSettings:
    config: LLMConfig
    redis_url: str
    #: Queues this process consumes (`llm.<provider>` and `llm.<provider>.interactive`); empty: both
    #: lanes' queues of every provider entry.
    queues: tuple[str, ...] = ()
    #: Port of this process's Prometheus endpoint; None or 0: no endpoint.
    metrics_port: int | None = None
    #: Job slots in this process (`llmq worker --concurrency`); None when not told.
    concurrency: int | None = None

    @classmethod
    def from_environment(
        cls, config: LLMConfig | None = None, broker_url: str | None = None, *, queues: tuple[str, ...] = (),
        metrics_port: int | None = None, concurrency: int | None = None,
    ) -> WorkerSettings:
        if metrics_port is None and os.environ.get(METRICS_PORT_ENV):
            metrics_port = int(os.environ[METRICS_PORT_ENV])
        return cls(config or load_config(), redis_url(broker_url), queues, metrics_port, concurrency)

    @property
    def consumed_queues(self) -> tuple[str, ...]:
        return self.queues or tuple(queue for name in self.config.providers for queue in keys.lane_queues(name))
