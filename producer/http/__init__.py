"""llmq.http: OpenAI's API over HTTP in front of the queue, with API keys of its own (`llmq serve`).

Any OpenAI SDK, any language, any agent framework talks to llmq by changing its base URL.
It composes the client like the command line does: it imports `llmq.client` and
`llmq.contract`, and of the worker only the shared limiter (`llmq.worker.limiter.callers`)
for each key's own requests/min and daily budget.

- `app`: the Starlette app and `serve` (uvicorn); `routes`: the endpoints under /v1;
- `front`: what every endpoint shares: who is calling (keys) and whether they may;
- `chat`: the one mapping between OpenAI's chat body and `LLMRequest`, and back;
- `embeddings`, `batches`: OpenAI's Embeddings and Batch APIs over llmq;
- `apikeys`, `records`, `database`: keys, files and batches in SQL;
- `errors`: every error answered, in OpenAI's error JSON.

It needs the `serve` extra: `pip install 'llmq[serve]'`.
"""
