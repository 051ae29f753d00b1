"""`${VAR}` and `${VAR:-default}` in a config's strings, from the environment.

An unset variable without a default is recorded by key path rather than raised, so the
loader can mark the provider entry that needs it as not configured and keep the rest.
"""

from __future__ import annotations

import re
from typing import Any

_VAR_PATTERN = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any, environ: dict[str, str], missing: dict[str, list[str]], path: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string, recording unset variables by key path."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ, missing, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ, missing, f"{path}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        found = environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        missing.setdefault(path, []).append(name)
        return ""

    return _VAR_PATTERN.sub(substitute, value)
