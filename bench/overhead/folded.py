"""Summarise a py-spy folded profile (`--format raw`): where the worker's CPU goes.

    python -m bench.overhead.folded PROFILE.folded [--top 30] [--match engine.py]

Prints the share of samples per thread, per function (inclusive: on the stack;
self: at the top), so a profile reads without a flame graph viewer.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: py-spy frames look like `function (path/to/file.py:123)`; the line number varies per sample.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    short = path.split("site-packages/")[-1] if "site-packages/" in path else "/".join(path.split("/")[-2:])
    return f"{match['function']} ({short})"


def summarise(path: Path, *, top: int, match: str | None, thread: str | None = None) -> str:
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        label, frames = (thread_label(frames[0]), frames[1:]) if frames[0].startswith("thread") else ("?", frames)
        if thread is not None and label != thread:
            continue
        names = [frame_name(frame) for frame in frames]
        total += count
        threads[label] += count
        for name in set(names):
            inclusive[name] += count
        if names:
            self_time[names[-1]] += count
    lines = [f"{total} samples"]
    thread_title = "by thread (ThreadPoolExecutor = Celery pool slots, MainThread = Celery consumer)"
    lines += _table(thread_title, threads, total, top)
    picked = Counter({name: n for name, n in inclusive.items() if match is None or match in name})
    lines += _table("inclusive (on the stack)", picked, total, top)
    lines += _table("self (at the top of the stack)", self_time, total, top)
    return "\n".join(lines)


def thread_label(first_frame: str) -> str:
    """`thread (3150): llmq-loop` -> `llmq-loop`; numbered pool threads fold into one row."""
    name = first_frame.split(":", 1)[-1].strip()
    return re.sub(r"[-_]\d+(_\d+)?$", "", name) or first_frame


def _table(title: str, counts: Counter[str], total: int, top: int) -> list[str]:
    rows = [f"\n{title}:"]
    for name, count in counts.most_common(top):
        rows.append(f"  {100 * count / max(1, total):5.1f}%  {name}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead.folded")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", help="only functions whose name or file contains this (inclusive table)")
    parser.add_argument("--thread", help="only this thread (a name from the by-thread table, e.g. llmq-loop)")
    args = parser.parse_args(argv)
    print(summarise(args.profile, top=args.top, match=args.match, thread=args.thread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
