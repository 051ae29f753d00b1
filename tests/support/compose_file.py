"""Reading docker-compose.yml and the Dockerfile the way Docker would, for tests on a
machine without a Docker engine: variable interpolation, environments, and commands
mapped from the container onto this checkout (venv scripts, local paths and ports)."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
DOCKERFILE_PATH = REPO_ROOT / "Dockerfile"

# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR.
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset: compose refuses to start."""


def interpolate(value: Any, host_env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: interpolate(item, host_env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, host_env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        found = host_env.get(name)
        unset = found is None or (found == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return found or ""

    return _VARIABLE.sub(substitute, value)


def variables(value: Any) -> set[str]:
    """Every variable a compose value reads."""
    text = yaml.safe_dump(value)
    return {match.group("name") or match.group("bare") for match in _VARIABLE.finditer(text) if match.group(0) != "$$"}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE_PATH.read_text())
    rows = [row.strip() for row in joined.splitlines() if row.strip() and not row.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_workdir() -> str:
    return [arguments for instruction, arguments in dockerfile_instructions() if instruction == "WORKDIR"][-1]


@dataclass
class Service:
    """One compose service, interpolated with a host environment."""

    name: str
    spec: dict[str, Any]
    host_env: dict[str, str]

    @property
    def command(self) -> list[str]:
        command = self.spec.get("command", [])
        command = shlex.split(command) if isinstance(command, str) else list(command)
        return [str(part) for part in interpolate(command, self.host_env)]

    @property
    def environment(self) -> dict[str, str]:
        """What the container sees: the image's ENV, then compose's environment; a key
        without a value takes the host's value, or stays unset when the host has none."""
        env = dict(dockerfile_env()) if "build" in self.spec else {}
        raw = self.spec.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
        for key, value in raw.items():
            if value is None:
                if key in self.host_env:
                    env[key] = self.host_env[key]
            else:
                env[key] = str(interpolate(value, self.host_env))
        return env

    @property
    def passed_through(self) -> set[str]:
        raw = self.spec.get("environment") or {}
        if isinstance(raw, list):
            return {item for item in raw if "=" not in item}
        return {key for key, value in raw.items() if value is None}


def services(host_env: dict[str, str]) -> dict[str, Service]:
    return {name: Service(name, spec, host_env) for name, spec in load_compose()["services"].items()}


@dataclass
class LocalMapping:
    """How a container's command and environment become runnable on this machine."""

    #: Where the compose service `redis` answers here, e.g. "127.0.0.1:6390".
    redis_address: str
    database_url: str
    home: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The image copies this checkout to WORKDIR; LLMQ_HOME is the image's data dir.
        self.paths = {dockerfile_workdir().rstrip("/") + "/": REPO_ROOT, dockerfile_env()["LLMQ_HOME"]: self.home,
                      **self.paths}

    def path(self, text: str) -> str:
        for container, local in self.paths.items():
            if text.startswith(container):
                return str(local / text[len(container):].lstrip("/"))
            if f"={container}" in text:
                option, _, rest = text.partition("=")
                return f"{option}={self.path(rest)}"
        return text

    def command(self, command: list[str]) -> list[str]:
        scripts = Path(sys.executable).parent
        program = scripts / command[0]
        return [str(program) if program.exists() else command[0], *(self.path(part) for part in command[1:])]

    def environment(self, service: Service) -> dict[str, str]:
        env = {key: self.path(value) for key, value in service.environment.items()}
        if "LLMQ_REDIS_URL" in env:
            # Only the host changes: the password is the one compose gives the service.
            url = env["LLMQ_REDIS_URL"]
            if "@redis:6379/" not in url:
                raise ValueError(f"{service.name}: LLMQ_REDIS_URL does not name the redis service: {url!r}")
            env["LLMQ_REDIS_URL"] = url.replace("@redis:6379/", f"@{self.redis_address}/")
        if "LLMQ_DATABASE_URL" in env:
            env["LLMQ_DATABASE_URL"] = self.database_url
        return env
