"""LiteLLM's Router against the fake, with the same requests/min and tokens/min. Runs in its own
venv (bench/out/litellm-venv, made by run.py), so it imports only the standard library and litellm.

    <venv>/bin/python bench/ratelimit/litellm_router.py --url URL --api-key KEY --rpm N --tpm N --bodies FILE

Prints one JSON line: makespan_s, succeeded, failed, and the first few error messages.
The Router enforces deployment rpm/tpm with its usage-based-routing-v2 strategy (the one that
checks both limits before a call); every call may be retried `--num-retries` times, the Router
honouring the provider's retry-after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price list
os.environ.setdefault("LITELLM_LOG", "ERROR")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402


async def one(router: Router, body: dict, errors: list[str]) -> bool:
    try:
        await router.acompletion(
            model="bench", messages=body["messages"], max_tokens=body["max_tokens"], temperature=body["temperature"]
        )
        return True
    except Exception as exc:  # a failed job is a figure here, not a crash
        if len(errors) < 5:
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        return False


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rpm", type=int, required=True)
    parser.add_argument("--tpm", type=int, required=True)
    parser.add_argument("--bodies", required=True, help="JSON file: a list of chat bodies")
    parser.add_argument("--num-retries", type=int, default=20)
    args = parser.parse_args()
    litellm.telemetry = False
    bodies = json.loads(open(args.bodies).read())
    router = Router(
        model_list=[{
            "model_name": "bench",
            "litellm_params": {
                "model": "openai/gpt-4o-mini", "api_base": args.url + "/v1", "api_key": args.api_key,
                "rpm": args.rpm, "tpm": args.tpm, "timeout": 120,
            },
        }],
        routing_strategy="usage-based-routing-v2",
        num_retries=args.num_retries,
    )
    errors: list[str] = []
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(one(router, body, errors) for body in bodies))
    makespan_s = time.perf_counter() - began
    succeeded = sum(1 for ok in outcomes if ok)
    print(json.dumps({"makespan_s": makespan_s, "succeeded": succeeded, "failed": len(bodies) - succeeded,
                      "errors": errors, "litellm_version": _version()}), flush=True)
    # LiteLLM leaves threads in the loop's default executor that asyncio.run would wait for forever.
    os._exit(0)


def _version() -> str:
    from importlib.metadata import version

    return version("litellm")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
