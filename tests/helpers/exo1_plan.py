"""Run a plan through ``exo1_driver.py`` in exo 1.x's venv (built by ``scripts/setup_exo1.sh``), from
the project's own Python, with the models it serves: for the exo 1.x runner tests and
``scripts/bench_exo1.py``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXO1_HOME = Path(os.environ.get("EXO1_HOME", Path.home() / ".cache" / "exo_medusa_mlx" / "exo1"))
PYTHON = EXO1_HOME / "venv" / "bin" / "python"
DRIVER = ROOT / "tests" / "helpers" / "exo1_driver.py"


def venv_reason() -> str | None:
    """Why exo 1.x's runner cannot run here, or None when it can."""
    if not PYTHON.exists():
        return (f"no exo 1.x venv at {EXO1_HOME / 'venv'}: scripts/setup_exo1.sh builds it (needs Python 3.13 "
                "and exo's source tarball; it printed why it did not)")
    if not list((EXO1_HOME / "venv").glob(".setup-*")):
        return f"exo 1.x venv at {EXO1_HOME / 'venv'} is half built: rerun scripts/setup_exo1.sh"
    return None


def models_folder(tmp: Path) -> Path:
    """exo's models folder under ``tmp``, holding the default model (a link to the converted one)."""
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID, default_model_path

    models = tmp / "models"
    models.mkdir(exist_ok=True)
    link = models / DEFAULT_MODEL_ID.replace("/", "--")
    if not link.exists():
        link.symlink_to(default_model_path())
    return models


def tiny_folder(folder: Path, model_type: str, vocab_names: dict[int, str] | None = None, heads: bool = True):
    """A tiny random model in exo's models folder, with a chat template and optionally heads beside it."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_map

    from helpers.folders import save_folder
    from helpers.tiny import CONFIGS, random_heads

    config = dict(CONFIGS["llama"], model_type=model_type, num_hidden_layers=4, head_dim=16)
    mod = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    base = mod.Model(mod.ModelArgs.from_dict(config))
    base.update(tree_map(lambda w: w * 2.0, base.parameters()))
    mx.eval(base.parameters())
    save_folder(folder, config, base, random_heads(4) if heads else None)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i, name in (vocab_names or {}).items():  # thinking tags as single tokens, as Qwen3's
        vocab[name] = vocab.pop(f"t{i}")
        tok.setdefault("added_tokens", []).append({"id": i, "content": name, "single_word": False, "lstrip": False,
                                                   "rstrip": False, "normalized": False, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                + ("{% if add_generation_prompt %}<think>{% endif %}" if vocab_names else ""))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "chat_template": template}))
    return folder


def run_plan(plan: dict, tmp: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """The driver's result for ``plan`` (exo's home and dashboard under ``tmp``, models in
    ``models_folder(tmp)``); ``env``: more for the driver's process. RuntimeError when it fails."""
    plan_file = tmp / "plan.json"
    plan_file.write_text(json.dumps({"project": str(ROOT), **plan}))
    full = {**os.environ, "PYTHONPATH": str(ROOT), "EXO_HOME": str(tmp / "exo-home"), "EXO_DASHBOARD_DIR": str(tmp),
            "EXO_DEFAULT_MODELS_DIR": str(models_folder(tmp)), "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run([str(PYTHON), str(DRIVER), str(plan_file)], env=full, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"the exo 1.x driver failed:\n{p.stderr[-4000:]}")
    (tmp / "result.json").write_text(p.stdout)  # for a look after a failure
    return json.loads(p.stdout)
