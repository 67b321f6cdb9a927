"""``MedusaTorchInferenceEngine``: one shard of a transformers model, Medusa across the ring.

The model is built on the meta device and only the shard's weights are read from
the safetensors files (the embedding on the first shard; the final norm, lm_head
and Medusa heads on the last), so a shard holds its own layers, not the model's.
The shard's decoder layers run as transformers' own modules over the torch twin's
``MedusaCache`` (``torch_compat.cache``), which is indexed by global layer number:
a shard's cache has a slot for every layer, and only its own are ever filled.
Activations leave as float32 numpy, whatever the compute dtype.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from ..core.attach import attach
from ..torch_compat.cache import make_cache
from ..torch_compat.generate import load_tokenizer
from ..torch_compat.loading import default_device, resolve_dtype
from ..torch_compat.model import MedusaModel
from .loaded import LoadedShard
from .sessions import Session
from .shard_engine import MedusaShardEngine
from .shard import Shard

_INDEX_FILE = "model.safetensors.index.json"


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or a sharded checkpoint."""
    from safetensors import safe_open

    index = path / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        return {k: path / v for k, v in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights; give a Hugging Face model folder")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def _shard_prefixes(shard: Shard, tied: bool) -> tuple[str, ...]:
    keep = tuple(f"model.layers.{i}." for i in range(shard.start_layer, shard.end_layer + 1))
    if shard.is_first_layer() or (shard.is_last_layer() and tied):
        keep += ("model.embed_tokens.",)
    if shard.is_last_layer():
        keep += ("model.norm.", "lm_head.")
    return keep


def _assign(base, files: dict[str, Path], keep: tuple[str, ...], device, dtype) -> set[str]:
    """Read the tensors named ``keep*`` into ``base`` (in place of its meta ones); their names."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        if name.startswith(keep):
            by_file.setdefault(f, []).append(name)
    weights = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            weights.update({k: sf.get_tensor(k).to(device=device, dtype=dtype) for k in names})
    base.load_state_dict(weights, strict=False, assign=True)
    return set(weights)


def load_shard_model(shard: Shard, path: Path, heads=None, tree=None, dtype=None, device=None):
    """(MedusaModel, tokenizer) holding only ``shard``'s weights; the other layers stay on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(str(path))
    n = config.num_hidden_layers
    if n != shard.n_layers:
        raise ValueError(f"shard of '{shard.model_id}' says {shard.n_layers} layers but {path} has {n}; "
                         f"use n_layers={n}")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    base.eval()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = _weight_files(path)
    loaded = _assign(base, files, _shard_prefixes(shard, tied), device, dtype)
    inner = base.model
    if shard.is_last_layer() and "lm_head.weight" not in loaded:
        if not tied:
            raise ValueError(f"{path}: no lm_head.weight and the config does not tie it to the embedding")
        base.lm_head.weight = inner.embed_tokens.weight
    # Buffers built at init (RoPE frequencies) were made on meta: build them again for real.
    inner.rotary_emb = type(inner.rotary_emb)(config=config).to(device)
    model = attach(base, heads, tree, MedusaModel, model_id=shard.model_id, probe=False)  # a shard cannot probe
    # Next-token heads read the embedding of the base model's next token on the last shard.
    next_token = model.heads is not None and model.heads.config.next_token
    if shard.is_last_layer() and next_token and not (shard.is_first_layer() or tied):
        _assign(base, files, ("model.embed_tokens.",), device, dtype)
    held = [inner.layers[i] for i in range(shard.start_layer, shard.end_layer + 1)]
    if shard.is_first_layer() or (shard.is_last_layer() and next_token):
        held.append(inner.embed_tokens)
    if shard.is_last_layer():
        held += [inner.norm, base.lm_head]
    missing = [f"{type(m).__name__}.{k}" for m in held for k, t in [*m.named_parameters(), *m.named_buffers()]
               if t.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks weights of shard {shard.start_layer}-{shard.end_layer}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model, load_tokenizer(path)


class TorchShard(LoadedShard):
    """A shard's transformers layers over the torch twin's ``MedusaCache`` (one per request)."""

    def __init__(self, shard: Shard, tokenizer, model: MedusaModel, device: torch.device):
        super().__init__(shard, tokenizer, model)
        self.device = device
        self.dtype = model.dtype  # what hidden states are computed in (the lm_head's, on meta or not)
        params = inspect.signature(model.base.model.layers[shard.start_layer].forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, max_kv_size: int | None, keep: int):
        base = self.model.base
        return make_cache(self.shard.n_layers, max_kv_size, keep, device=self.device, dtype=self.dtype,
                          implicit_causal=base.config._attn_implementation == "sdpa")

    def running(self):
        return torch.inference_mode()

    def device_array(self, x: np.ndarray) -> torch.Tensor:
        # exo's gRPC server hands over read-only np.frombuffer arrays: torch wants writable ones.
        t = torch.from_numpy(np.require(x, requirements="CW")).to(self.device)
        return t if x.dtype.kind in "iu" else t.to(self.dtype)

    def layers(self, h: torch.Tensor, sess: Session, transposed: bool, check) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        base = self.model.base
        ctx, caches = sess.ctx, sess.caches
        # As the model's own forward: the cache's 4D tree mask passes through untouched, a
        # first prompt chunk gets sdpa's implicit causal mask.
        mask = create_causal_mask(config=base.config, inputs_embeds=h, attention_mask=ctx.mask,
                                  **{self.cache_arg: caches}, position_ids=ctx.positions)
        rope = base.model.rotary_emb(h, ctx.positions)
        layers = base.model.layers[self.shard.start_layer : self.shard.end_layer + 1]
        with self.model.placed(caches, transposed):
            for layer in layers:
                h = layer(h, attention_mask=mask, position_ids=ctx.positions, use_cache=True,
                          position_embeddings=rope, **{self.cache_arg: caches})
                self.layer_done(h, check)
        return h


class MedusaTorchInferenceEngine(MedusaShardEngine):
    """exo's engine contract on PyTorch + transformers, with Medusa speculative decoding across shards.

    Constructed like exo's engines, ``MedusaTorchInferenceEngine(shard_downloader)``;
    ``device`` (default CUDA when available, else CPU) and ``dtype`` (default float32
    on CPU, bfloat16 on CUDA) are torch's; other keyword options are in ``MedusaShardEngine``.
    """

    def __init__(self, shard_downloader=None, *, device: str | torch.device | None = None, **kw):
        super().__init__(shard_downloader, **kw)
        self.device = torch.device(device) if device is not None else default_device()

    def _load_backend(self, shard: Shard, path: Path, heads, tree) -> TorchShard:
        model, tokenizer = load_shard_model(shard, path, heads, tree, self.dtype, self.device)
        return TorchShard(shard, tokenizer, model, self.device)

    async def load_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Load weights (safetensors, Hugging Face names) over the shard's layers; other names are ignored."""
        await self.ensure_shard(shard)

        def load():
            from safetensors.torch import load_file

            base = self.model.base
            keep = _shard_prefixes(self.shard, bool(getattr(base.config, "tie_word_embeddings", False)))
            own = dict(base.named_parameters(remove_duplicate=False))  # tied lm_head too
            with torch.no_grad():
                for k, v in load_file(str(path)).items():
                    if k.startswith(keep) and k in own:
                        own[k].copy_(v.to(own[k].dtype))

        await self._run(load)

    async def save_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Write this shard's weights (its layers, and the embedding / norm / lm_head it holds)."""
        await self.ensure_shard(shard)

        def save():
            from safetensors.torch import save_file

            base = self.model.base
            keep = _shard_prefixes(self.shard, False)
            weights = {k: v.detach().clone() for k, v in base.state_dict().items()
                       if k.startswith(keep) and not v.is_meta}
            if "model.embed_tokens.weight" in weights and getattr(base.config, "tie_word_embeddings", False):
                weights.pop("lm_head.weight", None)  # tied: the embedding is the lm_head
            save_file(weights, str(path))

        await self._run(save)
