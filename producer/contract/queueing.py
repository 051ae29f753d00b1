"""The Celery client both sides share: broker URL, serialization, transport options.

The producer only publishes (by task name, never importing worker code); the
worker builds its app on the same settings and adds the consuming side.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from celery import Celery
from kombu import Producer, pools
from kombu.exceptions import KombuError
from kombu.pools import ProducerPool
from kombu.utils.scheduling import round_robin_cycle
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from llmq.contract import keys
from llmq.contract.config import LLMConfig
from llmq.contract.home import read_stack_redis_url, stack_redis_url_path
from llmq.contract.labels import TaskLabel

log = logging.getLogger(__name__)

AppT = TypeVar("AppT", bound=Celery)

REDIS_URL_ENV = "LLMQ_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url(explicit: str | None = None) -> str:
    """`explicit`, else `$LLMQ_REDIS_URL`, else the Redis of the `llmq up` running here
    (`$LLMQ_HOME/redis.url`), else the default local Redis."""
    return explicit or os.environ.get(REDIS_URL_ENV) or read_stack_redis_url() or DEFAULT_REDIS_URL


def redact_url(url: str) -> str:
    """A URL fit to print: its password replaced by ***."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def redis_url_source(explicit: str | None = None) -> str:
    """Where `redis_url(explicit)` came from, for messages about a Redis that does not answer."""
    if explicit:
        return "given"
    if os.environ.get(REDIS_URL_ENV):
        return f"from {REDIS_URL_ENV}"
    if read_stack_redis_url():
        return f"from {stack_redis_url_path()}, written by `llmq up`"
    return "the default"


#: A Redis restart or a dropped link is ridden through: commands retry with backoff for ~30 s.
REDIS_RETRY_ATTEMPTS = 30


def async_redis(url: str, **options: Any) -> aioredis.Redis:
    """The asyncio Redis client every llmq process uses: decoded strings, retries across restarts.

    Job-state scripts are safe to retry: each checks the job's state and dispatch first,
    so a script that ran before its reply was lost does nothing the second time.
    """
    return aioredis.from_url(
        url,
        decode_responses=True,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_RETRY_ATTEMPTS),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=25,
        **options,
    )


def visibility_timeout_s(config: LLMConfig) -> int:
    """Longer than any job can live: a message is only redelivered by the broker as a last resort.

    Jobs of dead workers are re-run far sooner through leases (see worker/runtime.py);
    retries never use countdowns (they wait in the delayed set), so the job
    deadline bounds how long any message can be outstanding.
    """
    return int(max(2 * config.service.jobs.deadline_s, 6 * 3600))


def celery_settings(config: LLMConfig, broker_url: str) -> dict[str, object]:
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s(config),
            # A restarted Redis (or a brief network cut) must not lose publishes.
            "retry_on_timeout": True,
            "health_check_interval": 25,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # The job record in Redis is the source of truth; Celery's result backend is not used.
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": keys.queue_name("default"),
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "enable_utc": True,
    }


class LaneFirstCycle(round_robin_cycle):
    """The order a worker's BRPOP polls its queues in: every interactive queue before any batch queue,
    round robin within each lane (kombu's default is round robin over all of them). So an interactive
    message is taken at the next fetch, never after a queue of batch messages, and one provider's
    batch backlog never keeps another's waiting. Named in the worker's `queue_order_strategy`."""

    def consume(self, n: int) -> list[str]:
        queues = super().consume(n)
        return ([queue for queue in queues if keys.is_interactive_queue(queue)]
                + [queue for queue in queues if not keys.is_interactive_queue(queue)])


#: The worker's `broker_transport_options` entry that makes kombu poll with LaneFirstCycle.
LANE_FIRST_ORDER = {"queue_order_strategy": f"{__name__}:LaneFirstCycle"}


def make_celery(
    config: LLMConfig, broker_url: str | None = None, name: str = "llmq", app_class: type[AppT] = Celery,  # type: ignore[assignment]
) -> AppT:
    app = app_class(name, set_as_current=False)
    app.conf.update(celery_settings(config, redis_url(broker_url)))
    return app


#: Redis commands per pipelined round trip: each message is an LPUSH and its task-sent event's PUBLISH.
PUBLISH_BATCH_COMMANDS = 1000


class Message(NamedTuple):
    """One `llmq.generate` message: the job id is the task id on every hop; `dispatch` numbers the
    job's messages (a stale one is dropped at claim); `label` is what Flower shows (contract/labels.py)."""

    job_id: str
    dispatch: int
    queue: str
    label: TaskLabel | None = None


#: Per app: the process that made it (kombu closes pools in a forked child) and the pool.
_batch_producers: weakref.WeakKeyDictionary[Celery, tuple[int, ProducerPool]] = weakref.WeakKeyDictionary()


def publish_messages(app: Celery, messages: list[Message]) -> None:
    """Publish generate messages, pipelined: one round trip per ~500.

    The job id is the Celery task id on every hop; the arguments carry nothing else, and
    Flower shows the message's label in their place (argsrepr/kwargsrepr). Celery's
    `send_task` builds each message and its task-sent event as always; kombu's `Producer.batch`
    only buffers the final Redis commands. Sent one by one, a batch of 2,000 took a round trip
    each (26-76 s while workers kept Redis busy). kombu only pipelines on a connection that does
    not retry commands by itself (a retried pipeline may deliver twice), so batches go through
    their own producer pool without `retry_on_timeout`. When a pipeline fails, delivery is
    uncertain: the messages are sent again the ordinary way, with Celery's retries, and any
    duplicate is dropped when a worker claims the job (claim.lua).
    """
    if not messages:
        return
    try:
        with _batch_producer_pool(app).acquire(block=True) as producer, producer.batch(PUBLISH_BATCH_COMMANDS):
            _send(app, producer, messages, buffered=True)
    except (KombuError, redis.exceptions.RedisError, OSError) as exc:
        log.warning("pipelined publish of %d messages failed (%s); sending them one by one", len(messages), exc)
        with app.producer_or_acquire() as producer:
            _send(app, producer, messages)


def _send(app: Celery, producer: Producer, messages: list[Message], *, buffered: bool = False) -> None:
    """`buffered`: into a pipeline, where nothing reaches Redis until it runs, so retrying each
    message is moot, and each queue is declared once (kombu copies the queue to check that on
    every message)."""
    declared: set[str] = set()
    for message in messages:
        queue, label = message.queue, message.label
        options: dict[str, Any] = {"retry": False, "declare": [] if queue in declared else None} if buffered else {}
        declared.add(queue)
        if label is not None:
            # Flower's `retries` counts the attempts before this one.
            options.update(argsrepr=label.argsrepr(), kwargsrepr=label.kwargsrepr(), retries=label.attempt - 1)
        app.send_task(
            keys.TASK_GENERATE, args=[message.job_id, message.dispatch], task_id=message.job_id, queue=queue,
            routing_key=queue, producer=producer, **options,
        )


class TaskEvent(NamedTuple):
    """A Celery task event (what Flower shows) about a job no message of which could say it."""

    type: str
    job_id: str
    fields: dict[str, Any]


def publish_events(app: Celery, events: list[TaskEvent], hostname: str) -> None:
    """Send task events, pipelined like messages, as the worker `hostname` (Flower lists any other
    sender of a task event as a worker). They only inform: a failure is logged, never raised."""
    if not events:
        return
    try:
        with _batch_producer_pool(app).acquire(block=True) as producer, producer.batch(PUBLISH_BATCH_COMMANDS):
            # Disabled: it opens nothing of its own; `publish` sends through the producer given, as
            # Celery sends task-sent events.
            dispatcher = app.events.Dispatcher(producer.connection, hostname=hostname, enabled=False,
                                               buffer_while_offline=False)
            for event in events:
                dispatcher.publish(event.type, {"uuid": event.job_id, **event.fields}, producer)
    except (KombuError, redis.exceptions.RedisError, OSError) as exc:
        log.warning("%d task events for Flower not sent: %s", len(events), exc)


def _batch_producer_pool(app: Celery) -> ProducerPool:
    """The app's broker connection without redis-py's own retry, as kombu needs for pipelining."""
    made_by, pool = _batch_producers.get(app, (0, None))
    if pool is None or made_by != os.getpid():
        connection = app.connection_for_write(transport_options={"retry_on_timeout": False})
        pool = pools.producers[connection]
        _batch_producers[app] = (os.getpid(), pool)
    return pool
