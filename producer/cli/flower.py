"""How `llmq up` and `llmq demo` start Flower (docker-compose.yml runs the same flags).

- The tasks page shows the columns that say which job a row is and how it ended
  (docs/flower.md): the job id, its state, its label (args), the summary or the
  typed error, the retries.
- Basic auth, always: Flower 2 serves its HTTP API only behind authentication
  (or with FLOWER_UNAUTHENTICATED_API, which also opens it to any web page the
  browser visits), so the UI and the API answer to the same credentials. They are
  FLOWER_USER / FLOWER_PASSWORD when both are set (as for docker compose), else
  user `llmq` with a password made once and kept in LLMQ_HOME/flower-password
  (mode 0600). Flower reads them from its environment (FLOWER_BASIC_AUTH), not
  its command line, which every local user can see.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

#: Flower's tasks page, in this order (Flower's own default hides args, result and exception).
TASK_COLUMNS = "name,uuid,state,args,result,exception,retries,received,started,runtime,worker"
LOCAL_USER = "llmq"
PASSWORD_FILE = "flower-password"


@dataclass(frozen=True)
class FlowerCredentials:
    user: str
    password: str
    #: Where the password comes from, to tell the user (never the password itself).
    source: str

    def env(self) -> dict[str, str]:
        if "," in self.user + self.password:
            raise ValueError("FLOWER_USER and FLOWER_PASSWORD must not contain a comma "
                             "(Flower splits FLOWER_BASIC_AUTH at commas); choose another password")
        return {"FLOWER_BASIC_AUTH": f"{self.user}:{self.password}"}


def flower_command(port: int, *, address: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "llmq.worker.app", "flower", f"--port={port}",
            f"--address={address}", f"--tasks_columns={TASK_COLUMNS}"]


def local_credentials(home: Path) -> FlowerCredentials:
    """FLOWER_USER / FLOWER_PASSWORD if both are set, else `llmq` and the password kept under `home`."""
    user, password = os.environ.get("FLOWER_USER"), os.environ.get("FLOWER_PASSWORD")
    if user and password:
        return FlowerCredentials(user, password, "FLOWER_PASSWORD")
    path = home / PASSWORD_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another `llmq up` made it just now
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_urlsafe(18) + "\n")
    return FlowerCredentials(LOCAL_USER, path.read_text().strip(), str(path))


def how_to_reach(port: int, credentials: FlowerCredentials) -> list[str]:
    """What `llmq up` prints about Flower: the UI, its API, and where the password is."""
    secret = f"${credentials.source}" if credentials.source == "FLOWER_PASSWORD" else f"$(cat {credentials.source})"
    url = f"http://127.0.0.1:{port}"
    return [f"Flower: {url} (user {credentials.user}, password in {credentials.source})",
            f"  its API: curl -u \"{credentials.user}:{secret}\" {url}/api/tasks  (docs/flower.md)"]
