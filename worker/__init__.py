"""llmq's worker side: the Celery app and pool, the engine, middleware, limiter, providers, stores."""
