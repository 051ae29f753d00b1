"""The benchmark's batch: requests of varied sizes built from the shipped agent prompts.

Each request takes one of the 60 prompts of producer/data/agent_requests.jsonl, its user
message cut short or repeated (prompt lengths from ~40 to ~700 words), and a max_tokens drawn
log-uniformly from 16 to 1,024. A fixed seed makes every run send the same batch. `counted_tokens`
is what the fake OpenAI server counts against tokens/min at admission (its prompt tokens plus
max_tokens), so the theoretical minimum uses the provider's own count.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fakes.openai import prompt_tokens

DATA = Path(__file__).resolve().parents[2] / "producer" / "data" / "agent_requests.jsonl"
MODEL = "gpt-4o-mini"
#: The user message is scaled by one of these factors (cut below 1, repeated above).
PROMPT_SCALES = (0.25, 0.5, 1.0, 1.0, 1.0, 2.0, 3.0, 6.0)
MAX_TOKENS_RANGE = (16, 1024)


@dataclass(frozen=True)
class Workload:
    bodies: list[dict[str, Any]]  # OpenAI chat bodies (model, messages, max_tokens, temperature)
    counted_tokens: list[int]  # per body: what the provider counts at admission

    @property
    def requests(self) -> int:
        return len(self.bodies)

    @property
    def total_tokens(self) -> int:
        return sum(self.counted_tokens)

    def minimum_s(self, requests_per_minute: int, tokens_per_minute: int) -> float:
        """The theoretical minimum makespan: the larger of requests/rpm and tokens/tpm (in seconds)."""
        return 60.0 * max(self.requests / requests_per_minute, self.total_tokens / tokens_per_minute)


def scale_text(text: str, factor: float) -> str:
    if factor >= 1:
        return "\n".join([text] * int(factor))
    words = text.split(" ")
    return " ".join(words[: max(1, math.ceil(len(words) * factor))])


def build(count: int, seed: int = 7) -> Workload:
    prompts = [json.loads(line)["body"] for line in DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    low, high = MAX_TOKENS_RANGE
    bodies: list[dict[str, Any]] = []
    for index in range(count):
        source = prompts[index % len(prompts)]
        factor = rng.choice(PROMPT_SCALES)
        messages = [
            {"role": message["role"], "content": scale_text(message["content"], factor) if message["role"] == "user" else message["content"]}
            for message in source["messages"]
        ]
        max_tokens = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        bodies.append({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    counted = [prompt_tokens(body["messages"]) + body["max_tokens"] for body in bodies]
    return Workload(bodies, counted)
