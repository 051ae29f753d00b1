"""How refusals read: one message naming the first problem, its place and the fix, and how many more.

Config files, requests and batch files all fail this way, so a person sees the same
shape everywhere: `<where>: <field>: <what is wrong>; <fix> (and N more)`.
"""

from __future__ import annotations

import re
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


#: A pydantic error type -> how to fix it in a config file.
_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove it or fix its spelling (see docs/configuration.md)",
    "int_type": "use a whole number",
    "int_parsing": "use a whole number",
    "float_type": "use a number",
    "float_parsing": "use a number",
    "bool_type": "use true or false",
    "bool_parsing": "use true or false",
    "greater_than": "use a positive number",
    "greater_than_equal": "use a larger number",
    "less_than_equal": "use a smaller number",
    "list_type": "use a YAML list, e.g. [a, b]",
    "dict_type": "use a mapping of key: value",
    "string_type": "use a string",
    "too_short": "add at least one entry",
    "literal_error": "use one of the allowed values",
}


def describe_config_error(where: str, exc: ValidationError, secret_names: re.Pattern[str]) -> str:
    """A config file's refusal: the file, the key path, what is wrong and the fix; never a value that
    may be a secret (`secret_names` matches the keys that hold one)."""
    error = first_error(exc, root=("llm_service",))
    # Never echo a value that may be a key: an unknown key's value, or any secret-named field.
    quiet = error.error_type in {"missing", "extra_forbidden"} or isinstance(error.input, dict) or any(
        secret_names.search(part) for part in error.location.split(".")
    )
    got = "" if quiet else f" (got {error.input!r})"
    fix = _FIXES.get(error.error_type, "see docs/configuration.md")
    return f"{where}: {error.location}: {error.message}{got}; fix: {fix}{error.more}"
