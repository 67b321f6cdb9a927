"""A Hugging Face model folder checked before a backend reads it: one-line errors, no framework.

mlx-lm and transformers read ``config.json`` as a dict and map safetensors files
by the offsets in their headers: a config that is not a JSON object, or a file cut
short (an interrupted download or copy), fails deep inside them with a traceback,
or worse. These checks read only the config and each file's header.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")  # a causal LM's decoder layers, as mlx-lm and transformers name them


def read_config(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict, or a one-line ``ValueError`` naming the file."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: pass a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a model config") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix or replace the model folder") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings: "
                         "fix or replace the model folder")
    return config


def check_safetensors(file: str | Path) -> list[str]:
    """The file's header is readable JSON and every tensor lies inside the file; returns the tensor names."""
    file = Path(file)
    size = file.stat().st_size
    fix = "re-download or re-save the model"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is truncated ({size} bytes, no header): {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{file} is truncated or not safetensors (header of {n} bytes in a {size}-byte "
                             f"file): {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError(f"{file}: its safetensors header is not valid JSON: {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: its safetensors header is not a JSON object: {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{file}: tensor '{name}' has no valid data_offsets in the header: {fix}")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ValueError(f"{file} is truncated: its tensors need {8 + n + end} bytes, the file has {size}: {fix}")
    return [k for k in header if k != "__metadata__"]


def check_model_folder(folder: str | Path) -> dict:
    """The folder's config (a dict) after checking every ``*.safetensors`` file in it, and that
    the weights hold the config's ``num_hidden_layers`` (mlx-lm would list every missing weight)."""
    folder = Path(folder)
    config = read_config(folder)
    layers = set()
    for file in sorted(folder.glob("*.safetensors")):
        layers.update(int(m.group(1)) for name in check_safetensors(file) if (m := _LAYER.match(name)))
    n = config.get("num_hidden_layers")
    if layers and isinstance(n, int) and n != max(layers) + 1:
        raise ValueError(f"{folder / 'config.json'} says num_hidden_layers {n} but the weights hold "
                         f"{max(layers) + 1} layers: fix the config or the weights")
    return config


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_context(config: dict) -> int | None:
    """The context length a model config states (its text model's, for multimodal ones), or None."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            for key in CONTEXT_KEYS:
                n = cfg.get(key)
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    return n
    return None
