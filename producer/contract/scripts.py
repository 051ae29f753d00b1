"""Where Lua scripts live: every script in a `lua/` folder beside the module that runs it.

Each script's header lists every KEY and ARGV it takes; the module that loads it is
the only Python that calls it.
"""

from __future__ import annotations

from pathlib import Path


def read_script(module_file: str, name: str) -> str:
    """The source of `lua/<name>` next to `module_file` (pass `__file__`)."""
    return (Path(module_file).parent / "lua" / name).read_text()
