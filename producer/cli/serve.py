"""`llmq serve`: OpenAI's API over HTTP in front of the queue (llmq.http), and `llmq keys`.

The server is imported inside the command: it needs the `serve` extra, and the other
commands start without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llmq.cli.output import CommandRegistrar
from llmq.contract.config import load_config

#: Environment variables for the settings a container sets (docker-compose.yml).
HOST_ENV, PORT_ENV, CORS_ENV = "LLMQ_SERVE_HOST", "LLMQ_SERVE_PORT", "LLMQ_SERVE_CORS_ORIGINS"
MIB = 1024 * 1024


def add_commands(command: CommandRegistrar) -> None:
    """Register the commands on the CLI's `command(name, handler, help)` helper."""
    serve = command("serve", cmd_serve, "serve OpenAI's API (/v1) over HTTP in front of the queue")
    serve.add_argument("--host", default=os.environ.get(HOST_ENV, "127.0.0.1"),
                       help=f"address to bind (default ${HOST_ENV}, else 127.0.0.1: this machine only; "
                            "put a TLS proxy in front before binding wider)")
    serve.add_argument("--port", type=int, default=int(os.environ.get(PORT_ENV, "8000")), help="port (default 8000)")
    serve.add_argument("--cors-origin", action="append", default=_env_list(CORS_ENV), metavar="ORIGIN",
                       help="a browser origin allowed to call (repeatable; default none: no CORS)")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest JSON body, MiB (default 32)")
    serve.add_argument("--max-file-mb", type=float, default=100, help="largest file upload, MiB (default 100)")
    serve.add_argument("--request-timeout", type=float, default=600,
                       help="seconds an interactive job may take before the answer is 504 (default 600)")
    serve.add_argument("--access-log", action="store_true", help="log one line per request (never keys or bodies)")

    keys = command("keys", cmd_keys, "API keys of the HTTP front: create, list, revoke")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key; it is printed once and stored only as a hash")
    create.add_argument("--name", required=True, help="the caller this key names (usage, budgets, `llmq usage --by caller`)")
    create.add_argument("--daily-usd", type=float, help="daily budget in USD (UTC day)")
    create.add_argument("--rpm", type=int, help="requests per minute, across every front")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    listing = actions.add_parser("list", help="every key: name, first characters, limits, revoked or not")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key (within a few seconds on every front)")
    revoke.add_argument("name")
    for sub in (create, listing, revoke):
        sub.add_argument("--database-url", help="SQLAlchemy URL (default $LLMQ_DATABASE_URL)")


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def cmd_serve(args: argparse.Namespace) -> int:
    from llmq.http.app import serve
    from llmq.http.front import ServeSettings

    settings = ServeSettings(
        host=args.host, port=args.port, cors_origins=tuple(args.cors_origin),
        max_body_bytes=int(args.max_body_mb * MIB), max_file_bytes=int(args.max_file_mb * MIB),
        request_timeout_s=args.request_timeout, access_log=args.access_log,
    )
    serve(load_config(args.config), settings)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from llmq.http.apikeys import KeyStore
    from llmq.http.database import open_database

    engine = open_database(args.database_url)
    try:
        store = KeyStore(engine)
        if args.action == "create":
            models = [model.strip() for model in args.models.split(",") if model.strip()] if args.models else None
            record, key = store.create(args.name, daily_usd=args.daily_usd, requests_per_minute=args.rpm, models=models)
            print(key)
            limits = ", ".join(f"{name} {value}" for name, value in (
                ("daily_usd", args.daily_usd), ("rpm", args.rpm), ("models", args.models)) if value is not None)
            print(f"key for {record.name!r} ({limits or 'no limits'}): shown once, stored only as a hash; "
                  "send it as 'Authorization: Bearer <key>'", file=sys.stderr)
        elif args.action == "list":
            keys = [record.describe() for record in store.list()]
            if args.json:
                print(json.dumps(keys, indent=2))
            for key in [] if args.json else keys:
                state = f"revoked {key['revoked_at']}" if key["revoked_at"] else "active"
                print(f"{key['name']:<24} {key['key']:<16} daily_usd={key['daily_usd']} rpm={key['rpm']} "
                      f"models={','.join(key['models']) if key['models'] else 'all'}  {state}")
        else:
            store.revoke(args.name)
            print(f"revoked {args.name!r}: every front refuses it within a few seconds")
    finally:
        engine.dispose()
    return 0
