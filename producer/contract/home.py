"""Where a local stack keeps its files: `$LLMQ_HOME`, else `./.llmq`.

It holds the SQLite ledger (`schema.database_url`), `llmq up`'s logs, Redis data
and Flower password, and, while `llmq up` runs, the URL of its embedded Redis
(`redis.url`): the commands run in the same directory read it when
`LLMQ_REDIS_URL` is unset, so a second terminal finds the stack without copying
a URL. That file holds the Redis password, so it is written readable by its
owner only (mode 0600).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LLMQ_HOME"
DEFAULT_HOME = ".llmq"
#: The URL of the Redis `llmq up` runs, under the home, while it runs.
STACK_REDIS_URL_FILE = "redis.url"


def llmq_home() -> Path:
    """The local stack's directory ($LLMQ_HOME, default ./.llmq), as an absolute path."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def stack_redis_url_path(home: Path | None = None) -> Path:
    return (home or llmq_home()) / STACK_REDIS_URL_FILE


def read_stack_redis_url(home: Path | None = None) -> str | None:
    """The URL `llmq up` wrote under this home (default `llmq_home()`), or None when there is none."""
    try:
        url = stack_redis_url_path(home).read_text().strip()
    except OSError:
        return None
    return url or None


def write_stack_redis_url(url: str, home: Path | None = None) -> Path:
    """Write the URL for other terminals: owner-only from its first byte, replaced whole (never half-written)."""
    path = stack_redis_url_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # an older file of that name kept its own mode
        os.write(descriptor, (url + "\n").encode())
    finally:
        os.close(descriptor)
    os.replace(partial, path)
    return path


def remove_stack_redis_url(url: str, home: Path | None = None) -> None:
    """Remove the file if it still names `url` (another `llmq up` may have written its own since)."""
    if read_stack_redis_url(home) == url:
        stack_redis_url_path(home).unlink(missing_ok=True)
