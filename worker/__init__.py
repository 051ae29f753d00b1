"""llmq's worker side: the Celery app, the generate task, adapters, limits and stores."""
