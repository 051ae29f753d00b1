"""How refusals read: one message naming the first problem, its place and the fix, and how many more.

Config files, requests and batch files all fail this way, so a person sees the same
shape everywhere: `<where>: <field>: <what is wrong>; <fix> (and N more)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

#: A batch refusal names this many problems before "(and N more)".
PROBLEMS_SHOWN = 3
#: Tags pydantic puts in an error's location after a field that is a tagged union (a message's
#: content is text or parts): not part of the field's path as the person wrote it.
UNION_TAGS = {"content": frozenset({"text", "parts"})}


@dataclass(frozen=True)
class FirstError:
    """The first of a pydantic ValidationError's errors, ready to print."""

    location: str
    message: str
    error_type: str
    input: Any
    #: " (and N more)" when the error has others, else "".
    more: str


def first_error(exc: ValidationError, root: tuple[str, ...] = ()) -> FirstError:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in _without_union_tags((*root, *error["loc"])))
    return FirstError(
        location=location,
        message=error["msg"].removeprefix("Value error, "),
        error_type=error["type"],
        input=error.get("input"),
        more=and_more(exc.error_count() - 1),
    )


def _without_union_tags(location: tuple[str | int, ...]) -> list[str | int]:
    kept: list[str | int] = []
    for part in location:
        if not (kept and isinstance(kept[-1], str) and part in UNION_TAGS.get(kept[-1], ())):
            kept.append(part)
    return kept


def and_more(count: int, noun: str = "") -> str:
    return f" (and {count} more{' ' + noun if noun else ''})" if count > 0 else ""


def summarize_problems(problems: list[tuple[str, str]], noun: str = "") -> str:
    """The first few `where: message` problems of a batch, then how many more there are."""
    shown = "; ".join(f"{where}: {message}" for where, message in problems[:PROBLEMS_SHOWN])
    return shown + and_more(len(problems) - PROBLEMS_SHOWN, noun)
