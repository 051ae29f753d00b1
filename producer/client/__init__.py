"""What callers import: `LLMService` (async), `SyncLLMService`, batch files, streams, status.

The client validates at the edge, writes job records and sends tasks by name;
it never imports the worker.
"""

from llmq.client.errors import JobFailedError, RequestError
from llmq.client.service import BatchItem, LLMService
from llmq.client.sync import SyncLLMService

__all__ = ["BatchItem", "JobFailedError", "LLMService", "RequestError", "SyncLLMService"]
