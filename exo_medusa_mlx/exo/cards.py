"""Model cards for our engines in exo 0.0.x's ``exo.models.model_cards``.

exo looks a model's repo up by the engine's class name, so each card needs entries under
ours. The MLX engine takes exo's MLX repo (mlx-lm loads its quantized weights). The torch
engine needs float safetensors: it takes the repo in ``FLOAT_REPOS``, else exo's
tinygrad/torch entry (float weights too), and never an MLX quantized repo. Cards exo lacks
(the default model, Mistral 7B) are added with the float repo for both engines, so a
mixed MLX/torch ring holds one set of weights; a card whose layer count disagrees with
the model's config (exo says 28 for Qwen2.5-0.5B, which has 24) is corrected.
"""

from __future__ import annotations

from ..default_model import DEFAULT_MODEL_ID

DEFAULT_CARD = "smollm2-135m"
FLOAT_REPOS = {  # card -> (layers, a Hugging Face repo with float safetensors, ungated)
    DEFAULT_CARD: (30, DEFAULT_MODEL_ID),
    "llama-3.2-1b": (16, "unsloth/Llama-3.2-1B-Instruct"),
    "llama-3.2-3b": (28, "unsloth/Llama-3.2-3B-Instruct"),
    "llama-3.1-8b": (32, "unsloth/Meta-Llama-3.1-8B-Instruct"),
    "qwen-2.5-0.5b": (24, "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen-2.5-1.5b": (28, "Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen-2.5-3b": (36, "Qwen/Qwen2.5-3B-Instruct"),
    "qwen-2.5-7b": (28, "Qwen/Qwen2.5-7B-Instruct"),
    "qwen-2.5-14b": (48, "Qwen/Qwen2.5-14B-Instruct"),
    "mistral-7b": (32, "unsloth/mistral-7b-instruct-v0.3"),
    "mistral-nemo": (40, "unsloth/Mistral-Nemo-Instruct-2407"),
}
# exo's own engine class names, whose repos ours reuse.
MLX_FROM = ("MLXDynamicShardInferenceEngine",)
FLOAT_FROM = ("TorchDynamicShardInferenceEngine", "TinygradDynamicShardInferenceEngine")


def add_model_cards(cards: dict, engines: dict[str, str]) -> tuple[int, list[str]]:
    """Give every card repos under our engine classes (``engines``: name -> class name).

    Returns (repo entries added, layer counts corrected as "card: old -> new").
    """
    corrected = []
    for card_id, (layers, repo) in FLOAT_REPOS.items():
        card = cards.setdefault(card_id, {"layers": layers, "repo": {}})
        if card.get("layers") != layers:
            corrected.append(f"{card_id}: {card.get('layers')} -> {layers}")
            card["layers"] = layers
    added = 0
    for card_id, card in cards.items():
        repo = card.get("repo") if isinstance(card, dict) else None
        if not isinstance(repo, dict):
            continue
        float_repo = FLOAT_REPOS[card_id][1] if card_id in FLOAT_REPOS else next(
            (repo[k] for k in FLOAT_FROM if k in repo), None)
        mlx_repo = next((repo[k] for k in MLX_FROM if k in repo), float_repo)
        for name, cls in engines.items():
            src = mlx_repo if "mlx" in name else float_repo
            if src is not None and cls not in repo:
                repo[cls] = src
                added += 1
    return added, corrected
