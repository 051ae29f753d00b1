# The llmq image: every service of docker-compose.yml (workers, beat, Flower, the HTTP api) runs it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Sources first, then install: a config-only change rebuilds one cheap layer.
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install ".[postgres,bedrock,serve]"
COPY config ./config

# Never run as root; LLMQ_HOME is the one writable place (beat's schedule, SQLite if no DATABASE_URL).
RUN useradd --system --create-home --home-dir /var/lib/llmq --shell /usr/sbin/nologin llmq
USER llmq
ENV LLMQ_CONFIG=/app/config/llm_service.yaml \
    LLMQ_HOME=/var/lib/llmq

CMD ["llmq", "--help"]
