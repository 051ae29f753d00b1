"""llmq's own overhead against a bare Celery task and direct httpx calls (see README.md)."""
