"""exo 1.x's hookup without exo: importing it costs nothing, install() and the command refuse clearly,
and the card field is read the way exo stores models (the runner itself: test_exo1_runner.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exo_medusa_mlx.exo1.cards import card_entry, resolve_entry


def test_importing_exo1_imports_no_exo_and_no_mlx():  # (the package's BLAS set-up may import torch)
    code = ("import sys, exo_medusa_mlx.exo1 as e; assert callable(e.install); "
            "print(sorted(m for m in sys.modules if m == 'exo' or m.startswith(('exo.', 'mlx.core'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_install_and_the_command_without_exo_1x_say_so(monkeypatch):
    from exo_medusa_mlx.cli import main
    from exo_medusa_mlx.exo1 import install

    monkeypatch.setitem(sys.modules, "exo", None)  # no exo importable, whatever this machine has
    with pytest.raises(ImportError, match="exo 1.x's runner"):
        install()
    with pytest.raises(SystemExit, match="error: cannot import exo 1.x's runner"):
        main(["exo1", "--help"])


def test_card_entry_and_where_it_points(tmp_path):
    cards, models = tmp_path / "cards", tmp_path / "models"
    (models / "org--heads").mkdir(parents=True)
    cards.mkdir()
    (cards / "a.toml").write_text('model_id = "org/model"\nn_layers = 2\nmedusa = "org/heads"\n')
    (cards / "b.toml").write_text('model_id = "org/other"\nn_layers = 2\n')
    (cards / "broken.toml").write_text('model_id = "org/model" medusa = [\n')  # exo skips it too
    assert card_entry("org/model", [cards, tmp_path / "absent"]) == ("org/heads", cards / "a.toml")
    assert card_entry("org/other", [cards]) == (None, None)
    assert resolve_entry("org/heads", [models]) == models / "org--heads"
    assert resolve_entry("org/missing", [models]) is None
    assert resolve_entry(str(models / "org--heads"), []) == models / "org--heads"
    (cards / "c.toml").write_text('model_id = "org/bad"\nmedusa = 3\n')
    with pytest.raises(ValueError, match="'medusa' must name a heads folder"):
        card_entry("org/bad", [cards])
