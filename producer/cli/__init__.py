"""The `llmq` command: the only part that composes the client and the worker."""
