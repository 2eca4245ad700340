"""The Python package's layering: no import cycles between tessera's subpackages or between the modules of one,
counting imports inside functions too (a lazy import is a cycle waiting for a refactor), and the public names."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import tessera

ROOT = Path(tessera.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """tessera modules `path` imports anywhere in its body (names resolved to modules where they are modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tessera"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tessera"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_cycles_between_subpackages():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        src = _package_of(name)
        if src == "tessera":
            continue  # the top-level __init__ re-exports everything
        for dep in _imports(path, modules):
            dst = _package_of(dep)
            if dst != src and dst != "tessera":
                graph.setdefault(src, set()).add(dst)
    assert _cycle(graph) is None, f"import cycle between subpackages: {' -> '.join(_cycle(graph))}"


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's __init__ importing its own modules is how packages work
        graph[name] = {d for d in _imports(path, modules) if modules[d].name != "__init__.py" and d != name}
    assert _cycle(graph) is None, f"import cycle between modules: {' -> '.join(_cycle(graph))}"


def test_every_module_imports_first():
    # Each module imported as the first tessera module of a fresh interpreter would take minutes (torch's import per
    # process); instead one interpreter imports them deepest-name first, which is where a cycle bites.
    names = sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="tessera.")
                   if not m.name.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    result = subprocess.run([sys.executable, "-c", code, *reversed(names)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_shard_is_both_the_package_and_the_function():
    import tessera.shard.api

    assert callable(tessera.shard)
    assert tessera.shard.api.shard.__name__ == "shard"
    assert importlib.import_module("tessera.shard") is tessera.shard
    assert tessera.ShardingStrategy is tessera.shard.types.ShardingStrategy


def test_import_tessera_brings_process_and_version():
    # The README tells users to call tessera.process.end_spawned_rank() after `import tessera` alone; and
    # `tessera --version` names tessera's and torch's versions. A fresh interpreter: here tessera.process may
    # have been imported by other tests already.
    code = ("import sys, tessera\n"
            "assert 'tessera.process' in sys.modules, 'import tessera did not import tessera.process'\n"
            "assert callable(tessera.process.end_spawned_rank)\n"
            "from tessera.cli import main\n"
            "sys.exit(main(['--version']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    assert result.stdout.startswith(f"tessera {tessera.__version__} (torch {torch.__version__}, Python "), \
        result.stdout
