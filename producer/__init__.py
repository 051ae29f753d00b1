"""llmq: one queue-backed service for every LLM call (ADR-0015).

The package has four parts, and imports run one way:

    llmq.cli  ──>  llmq.client  ──>  llmq.contract
    llmq.cli  ──>  llmq.worker  ──>  llmq.contract
    llmq.cli  ──>  llmq.http    ──>  llmq.client, llmq.contract (and llmq.worker.limiter)

- `llmq.contract` (producer/contract/): what both sides agree on: the request and
  response models, the config, the Redis keyspace, the job state machine and its
  Lua scripts, the SQL schema.
- `llmq.client` (producer/client/): what callers import: `LLMService`, its sync
  twin, batch files, streams, status. It sends tasks by name and never imports
  the worker.
- `llmq.worker` (worker/): the Celery app and pool, the engine, middleware, the
  limiter, providers and stores.
- `llmq.http` (producer/http/): OpenAI's API over HTTP (`llmq serve`) with API keys of
  its own; it composes the client like the command line does, and takes from the worker
  only the shared limiter (each key's requests/min and budget).
- `llmq.cli` (producer/cli/): the `llmq` command, which composes client, worker and the
  HTTP front.
"""

from llmq.contract.models import JobState, LLMRequest, LLMResponse, Message, Usage

__all__ = [
    "BatchItem", "JobFailedError", "JobState", "LLMRequest", "LLMResponse", "LLMService", "Message",
    "RequestError", "SyncLLMService", "Usage",
]

_CLIENT_NAMES = {"LLMService", "SyncLLMService", "BatchItem", "RequestError", "JobFailedError"}


def __getattr__(name: str) -> object:
    # The client pulls in redis and Celery: import it only when asked for.
    if name in _CLIENT_NAMES:
        import llmq.client

        return getattr(llmq.client, name)
    raise AttributeError(name)
