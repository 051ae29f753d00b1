"""The `llmq` command. Errors are one clear line; `--verbose` adds the detail.

Each command group is a module with `add_commands(command)`: `jobs` (submit,
status, results, cancel, chat, tail, models), `reports` (providers, usage),
`worker`, `stack` (up), `serve` (serve, keys: the HTTP front) and `demo`. A new command is one function in one of them.
Commands that run worker code import it inside the command, so the client's
commands start without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from llmq.cli import demo, jobs, reports, serve, stack, worker
from llmq.cli.output import EXIT_ERROR, EXIT_USAGE, hint, one_line
from llmq.contract.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for people, the trace with --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"llmq: error: {one_line(exc)}{hint(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, ValueError)) else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmq", description="A centralized LLM service on a queue.")
    parser.add_argument("--config", help="config file (default: $LLMQ_CONFIG or config/llm_service.yaml)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show details and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        # Also after the command (`llmq submit FILE -v`); SUPPRESS keeps a flag given before it.
        sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show details and tracebacks")
        return sub

    for module in (jobs, reports, worker, stack, serve, demo):
        module.add_commands(command)
    return parser


if __name__ == "__main__":
    sys.exit(main())
