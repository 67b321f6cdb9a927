"""Hugging Face model folders written from tiny MLX models: the one writer every test uses."""

from __future__ import annotations

import json
from pathlib import Path

ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM"}


def save_folder(folder: Path, config: dict, base, heads=None, chat_template: str | None = None) -> Path:
    """A Hugging Face folder for an mlx-lm ``base`` built from ``config``: float32 weights, a word-level
    tokenizer ("t0".."t{V-1}", with ``chat_template`` if given), heads in medusa/."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(base.parameters())))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if heads is not None:
        heads.save(folder / "medusa")
    return folder


def save_hf_folder(folder: Path, family: str, base, heads=None, *, transformers: bool = False,
                   chat_template: str | None = None) -> Path:
    """``save_folder`` for a ``tiny.tiny_base(family, ...)``, its layer count read from ``base``.

    ``transformers``: a config transformers reads as mlx-lm does (its class named, no EOS so
    ``generate`` runs to the end, no sliding window for mistral: mlx-lm's llama class has none).
    """
    from helpers.tiny import CONFIGS

    config = {**CONFIGS[family], "num_hidden_layers": len(base.layers)}
    if transformers:
        config.update(architectures=[ARCH[family]], torch_dtype="float32", bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
        if family == "mistral":
            config["sliding_window"] = None
    return save_folder(folder, config, base, heads, chat_template)
