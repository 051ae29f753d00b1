"""The house rules of the layout, as a test that fails when one is broken.

Every module under producer/ (the `llmq` namespace) and worker/ (`llmq.worker`) is
parsed with `ast` and its imports resolved to the project's own modules, including
imports inside functions, but not those under `if TYPE_CHECKING:` (they never run).
On that graph: no import loops; the parts import only downward

    llmq.cli  ->  llmq.client  ->  llmq.contract
    llmq.cli  ->  llmq.worker  ->  llmq.contract
    llmq.cli  ->  llmq.http    ->  llmq.client, llmq.contract, llmq.worker.limiter (and no other worker part)
                  llmq.langchain  ->  llmq.client, llmq.contract (an optional extra: no other part imports it)

no module or Lua script over MAX_LINES; pyproject.toml lists exactly the package
folders; and nothing imports the folder names `producer` or `worker`.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Folder -> the import name it is installed under (pyproject.toml's package-dir says the same).
ROOTS = {"producer": "llmq", "worker": "llmq.worker"}
MAX_LINES = 400
#: Files over MAX_LINES today, each being split. The test fails when one is no longer over
#: the limit, so take it off this list then.
OVER_THE_LIMIT_FOR_NOW: set[str] = set()
#: part -> the parts it must never import.
FORBIDDEN_IMPORTS = {
    "llmq.contract": ("llmq.client", "llmq.cli", "llmq.worker", "llmq.http", "llmq.langchain"),
    "llmq.client": ("llmq.worker", "llmq.cli", "llmq.http", "llmq.langchain"),
    "llmq.worker": ("llmq.client", "llmq.cli", "llmq.http", "llmq.langchain"),
    "llmq.http": ("llmq.cli", "llmq.langchain"),
    "llmq.cli": ("llmq.langchain",),
    # A caller's library like any other: what callers import, never the worker, the CLI or the front.
    "llmq.langchain": ("llmq.worker", "llmq.cli", "llmq.http"),
}
#: The one part of the worker the HTTP front may import: the shared limiter (each key's own limits).
HTTP_WORKER_PART = "llmq.worker.limiter"
BARE_FOLDER_NAMES = frozenset({"producer", "worker"})


@dataclass(frozen=True)
class Import:
    """One imported name, as written: `candidates` are the dotted names it may refer to, longest first."""

    module: str
    line: int
    candidates: tuple[str, ...]


def source_files(suffix: str) -> Iterator[Path]:
    for folder in ROOTS:
        yield from sorted(path for path in (REPO / folder).rglob(f"*{suffix}") if "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join((ROOTS[folder], *parts))


def in_part(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import `module` runs, with relative imports made absolute."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            nodes: list[ast.AST] = list(node.orelse)
        else:
            nodes = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.extend(Import(module, node.lineno, (alias.name,)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.extend(Import(module, node.lineno, (f"{base}.{alias.name}", base)) for alias in node.names)
        for child in nodes:
            visit(child)

    visit(ast.parse(source))
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for path in source_files(".py"):
        found += imports_in(path.read_text(), module_name(path), path.name == "__init__.py")
    return tuple(found)


@cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: the line of the first such import}."""
    modules = {module_name(path) for path in source_files(".py")}
    graph: dict[str, dict[str, int]] = {module: {} for module in modules}
    for item in all_imports():
        target = next((name for name in item.candidates if name in modules), None)
        if target is None:  # a name inside a module: the nearest enclosing module is what is imported
            target = next((prefix for prefix in _prefixes(item.candidates[-1]) if prefix in modules), None)
        if target is not None and target != item.module:
            graph[item.module].setdefault(target, item.line)
    return graph


def _prefixes(dotted: str) -> Iterator[str]:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, {}):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return cycles


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- the reading of imports itself -----------------------------------------------------------------


def test_imports_are_read_as_python_runs_them() -> None:
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import typing
import llmq.contract.keys as keys
from llmq.contract import models
from . import sibling
from ..client.errors import JobFailedError
if TYPE_CHECKING:
    from llmq.worker.runtime import Runtime
if typing.TYPE_CHECKING:
    import llmq.cli
else:
    from llmq.contract import jobs
def later():
    from llmq.worker import engine
"""
    found = imports_in(source, "llmq.contract.example", is_package=False)
    assert [item.candidates[0] for item in found if item.candidates[0].startswith("llmq")] == [
        "llmq.contract.keys", "llmq.contract.models", "llmq.contract.sibling", "llmq.client.errors.JobFailedError",
        "llmq.contract.jobs", "llmq.worker.engine",
    ]


def test_the_graph_resolves_names_to_modules() -> None:
    graph = import_graph()
    assert "llmq.contract.jobs" in graph["llmq.client.service"]  # from llmq.contract.jobs import JobStore
    assert "llmq.contract.keys" in graph["llmq.contract.jobs"]  # from llmq.contract import keys
    assert "llmq.contract.models" in graph["llmq"]
    assert import_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


# --- the rules ------------------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph()
    loops = [" -> ".join(cycle) for cycle in import_cycles(graph)]
    assert not loops, "import loops (break each by moving what both sides need to the part below):\n" + "\n".join(loops)


@pytest.mark.parametrize("part", sorted(FORBIDDEN_IMPORTS))
def test_parts_import_only_downward(part: str) -> None:
    wrong = [
        f"{module} imports {target} (line {line})"
        for module, targets in sorted(import_graph().items()) if in_part(module, part)
        for target, line in sorted(targets.items())
        if any(in_part(target, forbidden) for forbidden in FORBIDDEN_IMPORTS[part])
    ]
    assert not wrong, f"{part} must not import {', '.join(FORBIDDEN_IMPORTS[part])}:\n" + "\n".join(wrong)


def test_the_http_front_uses_only_the_worker_s_limiter() -> None:
    wrong = [
        f"{module} imports {target} (line {line})"
        for module, targets in sorted(import_graph().items()) if in_part(module, "llmq.http")
        for target, line in sorted(targets.items())
        if in_part(target, "llmq.worker") and not in_part(target, HTTP_WORKER_PART)
    ]
    assert not wrong, f"llmq.http may import only {HTTP_WORKER_PART} of the worker:\n" + "\n".join(wrong)


def test_nothing_imports_the_bare_folder_names() -> None:
    wrong = [
        f"{item.module} (line {item.line}) imports {item.candidates[-1]}"
        for item in all_imports() if item.candidates[-1].split(".")[0] in BARE_FOLDER_NAMES
    ]
    fix = "import through the llmq namespace (producer/ is llmq, worker/ is llmq.worker)"
    assert not wrong, f"{fix}:\n" + "\n".join(wrong)


def test_no_module_or_script_is_over_the_line_limit() -> None:
    files = [*source_files(".py"), *source_files(".lua")]
    sizes = {relative(path): len(path.read_text().splitlines()) for path in files}
    over = {name for name, lines in sizes.items() if lines > MAX_LINES}
    new = sorted(f"{name}: {sizes[name]} lines" for name in over - OVER_THE_LIMIT_FOR_NOW)
    assert not new, f"over {MAX_LINES} lines; split by concern:\n" + "\n".join(new)
    done = sorted(OVER_THE_LIMIT_FOR_NOW - over)
    assert not done, f"no longer over {MAX_LINES} lines: take them off OVER_THE_LIMIT_FOR_NOW: {', '.join(done)}"


def test_pyproject_maps_the_folders_to_one_namespace() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in ROOTS.items()}


def test_pyproject_lists_exactly_the_package_folders() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(path) for path in source_files("__init__.py")}
    assert not folders - listed, f"add to [tool.setuptools] packages: {', '.join(sorted(folders - listed))}"
    assert not listed - folders, f"no such package folder: {', '.join(sorted(listed - folders))}"


def test_every_folder_holding_modules_is_a_package() -> None:
    folders = {path.parent for path in source_files(".py")}
    loose = sorted(relative(folder) for folder in folders if not (folder / "__init__.py").exists())
    assert not loose, f"modules outside a package are not installed; add __init__.py to: {', '.join(loose)}"
