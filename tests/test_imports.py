"""What importing does: the package's import graph has no cycle; ``import exo_medusa_mlx`` imports
nothing heavy; MLX gets OpenBLAS through the entry points (``load()``, ``cli.main``), not through
an import.

The graph counts every ``import`` statement of every module, at module level and inside
functions alike: a lazy import that closes a loop is still two modules that need each other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "exo_medusa_mlx"
HEAVY = ("torch", "transformers", "mlx", "mlx_lm", "numpy", "exo_medusa_mlx._blas")
SHIM = "libexo_medusa_cblas.so"  # the BLAS shim ``setup_blas`` loads (``_blas.py``)


def module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in sorted(PKG.rglob("*.py"))}


def owner(name: str) -> str | None:
    """The package module ``name`` or its nearest enclosing one (``a.b.func`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (a submodule's parent
    package, which Python imports first, is not counted: every ``__init__`` would be a cycle)."""
    file = MODULES[module]
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "exo_medusa_mlx"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "exo_medusa_mlx":
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
                out |= {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else owner(source) for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.args[0].value  # importlib.import_module("exo_medusa_mlx.x") or (".x", __name__)
            out.add(owner(package + name if name.startswith(".") else name))
    return out - {None, module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [path_back(graph, set(g), min(g)) for g in groups]


def path_back(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``group``."""
    paths = {w: [start, w] for w in sorted(graph[start] & group)}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def test_the_package_has_no_import_cycle():
    graph = {m: imported(m) for m in MODULES}
    found = [" -> ".join(c) for c in cycles(graph)]
    assert found == [], "import cycles: " + "; ".join(found)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # ``imported`` sees an import inside a function body.
    assert "exo_medusa_mlx.loading" in imported("exo_medusa_mlx")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **env})


def test_importing_the_package_imports_nothing_heavy():
    p = run_python("import sys, exo_medusa_mlx\n"
                   f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}))")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def shim_loaded_after(code: str) -> tuple[bool, str]:
    """(whether the BLAS shim is mapped into the process after ``code`` runs, the process's stderr)."""
    p = run_python(f"{code}\nprint({SHIM!r} in open('/proc/self/maps').read())", EXO_MEDUSA_BLAS="")
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1] == "True", p.stderr


def mlx_cuda_build() -> bool:
    from importlib import metadata

    return any(d.metadata["Name"].startswith("mlx-cuda") for d in metadata.distributions())


linux_cpu = pytest.mark.skipif(not sys.platform.startswith("linux") or mlx_cuda_build(),
                               reason="OpenBLAS is loaded for MLX's CPU build on Linux only")


@linux_cpu
def test_importing_the_package_then_mlx_does_not_load_openblas():
    loaded, _ = shim_loaded_after("import exo_medusa_mlx, mlx.core")
    assert not loaded


@linux_cpu
def test_load_gives_mlx_openblas():
    """The README's example: ``import exo_medusa_mlx`` then ``load()``; MLX is imported by ``load``."""
    loaded, err = shim_loaded_after("import exo_medusa_mlx\nexo_medusa_mlx.load()\n"
                                    "from exo_medusa_mlx._blas import blas_info\nassert blas_info().startswith('openblas')")
    assert loaded and "reference BLAS" not in err


@linux_cpu
def test_the_cli_gives_mlx_openblas():
    loaded, err = shim_loaded_after("from exo_medusa_mlx import cli\n"
                                    "cli.main(['generate', '--prompt', 'Hi', '--max-tokens', '2', '--verbose', 'false'])")
    assert loaded and "reference BLAS" not in err


@linux_cpu
def test_the_training_module_command_gives_mlx_openblas():
    """``python -m exo_medusa_mlx.training.train`` (the shipped recipe's and the kinds data run's
    command) imports MLX at module level, before its main: the package sets BLAS up first."""
    loaded, err = shim_loaded_after("import runpy, sys\nsys.argv = ['train', '--help']\n"
                                    "try:\n    runpy.run_module('exo_medusa_mlx.training.train', run_name='__main__')\n"
                                    "except SystemExit:\n    pass")
    assert loaded and "reference BLAS" not in err, err[-500:]
