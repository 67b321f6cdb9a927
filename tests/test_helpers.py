"""The test helpers are what they say: no test module imports another (shared code lives in
``helpers/`` or ``conftest.py``), no test asserts on a clock, the torch tiny sizes are the MLX ones,
and a folder saved from a tiny MLX model holds its weights as transformers loads them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent


def imported(file: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``file``, function bodies included."""
    out = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_no_test_module_imports_another():
    """Nor a helper by its bare name (``import tiny``): a second copy of the module, and not in helpers/."""
    files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "helpers").glob("*.py"))
    helpers = {p.stem for p in (TESTS / "helpers").glob("*.py")}
    bad = [f"{file.relative_to(TESTS)}:{line} imports {name}" for file in files for line, name in imported(file)
           if name.split(".")[0].startswith("test_") or name.split(".")[0] in helpers]
    assert bad == [], "shared test code goes in tests/helpers/ (or a fixture in conftest.py): " + "; ".join(bad)


CLOCKS = {"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns"}


def reads_a_clock(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CLOCKS
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "time" for n in ast.walk(node))


def test_no_test_asserts_on_a_clock():
    """A shared machine makes any wall-clock bound flaky: assert what happened (helpers/events.py).
    A tripwire, not a proof: it sees clock reads in an assert, or names bound to one (or elapsed, took)."""
    bad = []
    for file in sorted(TESTS.glob("test_*.py")) + sorted((TESTS / "helpers").glob("*.py")):
        tree = ast.parse(file.read_text())
        timed = {"elapsed", "took"} | {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                                       and reads_a_clock(n.value) for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Assert) and (reads_a_clock(n.test) or any(
                    isinstance(x, ast.Name) and x.id in timed for x in ast.walk(n.test))):
                bad.append(f"{file.relative_to(TESTS)}:{n.lineno}")
    assert bad == [], "asserts on elapsed time: " + ", ".join(bad)


def test_helpers_are_modules_of_the_helpers_package():
    """tests/ holds test modules and conftest.py; anything else is a helper in the wrong place."""
    loose = [p.name for p in TESTS.glob("*.py") if p.name != "conftest.py" and not p.name.startswith("test_")]
    assert loose == []


def test_sizes_are_tinys():
    pytest.importorskip("torch")
    from helpers import tiny
    from helpers.torch_models import HIDDEN, VOCAB

    assert (HIDDEN, VOCAB) == (tiny.CONFIGS["llama"]["hidden_size"], tiny.VOCAB)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_folder_has_the_mlx_weights(family, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mlx.utils import tree_flatten

    from helpers.tiny import CONFIGS
    from helpers.torch_models import tiny_pair

    base, tb, _ = tiny_pair(family, tmp_path)
    ours = {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    theirs = {k: v.numpy() for k, v in tb.state_dict().items()}
    if CONFIGS[family]["tie_word_embeddings"]:
        assert "lm_head.weight" not in ours
        np.testing.assert_array_equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
