"""The layers are visible in the folder tree: ``core/`` is numpy alone; the torch backend and what a
torch node runs (exo engines, the gRPC ring) never import an MLX module; only the MLX backend does.

Module-level imports are checked here; imports inside functions choose a backend at run time
(``backends.load``, ``exo.__getattr__``, ``node.make_engine``), and ``test_no_mlx.py`` runs those
paths end to end with MLX made unimportable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "exo_medusa_mlx"
# Top-level modules of the MLX backend and the tools built on it.
MLX_MODULES = {"array_ops", "cache", "model", "heads", "lookahead", "loading", "train", "train_ckpt", "train_data", "heads_loss", "tune",
               "distill", "shards", "self_instruct", "bench", "distributed", "bench_distributed", "launch"}


def module_level(tree: ast.AST):
    """The nodes executed when the module is imported (function bodies are not)."""
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield node
            yield from module_level(node)


def imports(file: Path) -> list[tuple[int, str]]:
    """(level, dotted name) of every import ``file`` runs when it is imported."""
    out = []
    for node in module_level(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.level, node.module or "")] + [(node.level, f"{node.module}.{a.name}" if node.module
                                                         else a.name) for a in node.names]
    return out


def package_target(file: Path, level: int, name: str) -> str | None:
    """The package-relative module an import names ("core.tree", "model"), or None if it is not ours."""
    if level == 0:
        return name.removeprefix("exo_medusa_mlx.") if name.startswith("exo_medusa_mlx.") else None
    here = file.parent.relative_to(PKG).parts
    base = here[: len(here) - (level - 1)] if level > 1 else here
    return ".".join([*base, name]) if name else ".".join(base)


def offences(folder: str, forbidden_roots: set[str], forbidden_ours) -> list[str]:
    bad = []
    for file in sorted((PKG / folder).rglob("*.py")):
        for level, name in imports(file):
            target = package_target(file, level, name)
            if level == 0 and name.split(".")[0] in forbidden_roots:
                bad.append(f"{file.relative_to(PKG)} imports {name}")
            elif target is not None and forbidden_ours(target):
                bad.append(f"{file.relative_to(PKG)} imports exo_medusa_mlx.{target}")
    return bad


def test_core_is_numpy_alone():
    assert offences("core", {"mlx", "mlx_lm", "torch", "transformers", "grpc"},
                    lambda t: not t.startswith("core")) == []


@pytest.mark.parametrize("folder", ["torch_compat", "exo", "ring"])
def test_the_torch_side_never_imports_mlx(folder):
    def mlx_module(target: str) -> bool:
        return target.split(".")[0] in MLX_MODULES or target in ("exo.mlx_engine",)

    bad = offences(folder, {"mlx", "mlx_lm"}, mlx_module)
    # The MLX engine is the MLX backend's; nothing else in exo/ may reach it or MLX.
    assert [b for b in bad if not b.startswith("exo/mlx_engine.py")] == []


def test_the_mlx_module_list_is_complete():
    """Every top-level module that imports MLX when imported is in MLX_MODULES (what the checks above forbid)."""
    for file in PKG.glob("*.py"):
        if any(level == 0 and name.split(".")[0] in ("mlx", "mlx_lm") for level, name in imports(file)):
            assert file.stem in MLX_MODULES, f"{file.name} imports MLX: add it to MLX_MODULES"
