"""The Medusa ring protocol (``docs/protocol.md``): the keys of exo's ``inference_state``, parsed and checked.

Every check of a pass runs here, before a shard touches its cache, with the model's
facts passed in: well-formed keys (``parse_request``), the input's shape and size
(``check_input``), and whether the pass fits the request's cache on this shard and
the model's ``Limits``: context, window, tree size (``check_pass``). A pass over a
limit raises ``LimitError`` (a ``ValueError``; RESOURCE_EXHAUSTED on a ring node).

A pass whose state carries no ``medusa_`` key comes from stock exo's node: the engines
then run it plainly and return no state (``speaks_protocol``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.limits import MAX_TREE_NODES, LimitError, Limits
from ..core.step import Advanced

COMMIT = "medusa_commit"
DEPTHS = "medusa_depths"
TREE_MASK = "medusa_tree_mask"
POSITIONS = "medusa_positions"
TOKENS = "medusa_tokens"
EMITTED = "medusa_emitted"
FINISH = "medusa_finish"  # "length": the last shard's output ends the request (the context is full)
NEXT = "medusa_next_"  # prefix of the next pass's arrays in the last shard's output

TEMP = "medusa_temp"
TOP_P = "medusa_top_p"
ACCEPTANCE = "medusa_acceptance"
SEED = "medusa_seed"
MEDUSA = "medusa_enabled"
SETTINGS = (TEMP, TOP_P, ACCEPTANCE, SEED, MEDUSA)
ACCEPTANCES = ("auto", "greedy", "exact", "typical")
FINISHES = ("length",)


@dataclass(frozen=True)
class Settings:
    temp: float = 0.0
    top_p: float = 1.0
    acceptance: str = "auto"
    seed: int | None = None
    medusa: bool | None = None  # None: the engine's default


@dataclass(frozen=True)
class StepRequest:
    """One ring pass's Medusa facts, validated. Arrays are None when absent."""

    commit: np.ndarray | None  # (A,) int64
    depths: np.ndarray | None  # (T,) int64: a tree forward
    tree_mask: np.ndarray | None  # (T, T) bool
    positions: np.ndarray | None  # (T,) int64
    tokens: np.ndarray | None  # (T,) int64
    settings: Settings

    @property
    def is_tree(self) -> bool:
        return self.depths is not None


def _describe(a) -> str:
    return f"{a.dtype} array of shape {tuple(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__


def _array(state: dict, key: str, kind: str, ndim: int, shape: tuple | None = None) -> np.ndarray | None:
    """``state[key]`` as int64 (kind "int") or bool (kind "bool"), or None; one-line errors."""
    v = state.get(key)
    if v is None:
        return None
    want = f"{kind} array of {ndim} dims" if shape is None else f"{kind} array of shape {shape}"
    if isinstance(v, (list, tuple)) or (hasattr(v, "__array__") and not isinstance(v, np.ndarray)):
        try:
            v = np.asarray(v)
        except (TypeError, ValueError):
            raise ValueError(f"inference_state['{key}']: expected {want}, got a ragged {type(v).__name__}") from None
    if not isinstance(v, np.ndarray):
        raise ValueError(f"inference_state['{key}']: expected {want}, got {_describe(v)}")
    ok_dtype = v.dtype.kind in "iu" if kind == "int" else v.dtype == np.bool_
    ok_shape = v.ndim == ndim and (shape is None or tuple(v.shape) == shape)
    if not (ok_dtype and ok_shape) or (v.ndim >= 1 and v.shape[0] == 0):
        raise ValueError(f"inference_state['{key}']: expected non-empty {want}, got {_describe(v)}")
    return v.astype(np.int64 if kind == "int" else np.bool_, copy=False)


def _scalar(state: dict, key: str, types: tuple, default):
    v = state.get(key, default)
    if v is None or (isinstance(v, types) and not isinstance(v, bool)) or (bool in types and isinstance(v, bool)):
        return v
    names = "/".join(t.__name__ for t in types)
    raise ValueError(f"inference_state['{key}']: expected {names}, got {type(v).__name__} {v!r}")


def parse_settings(state: dict) -> Settings:
    temp = _scalar(state, TEMP, (float, int), 0.0)
    top_p = _scalar(state, TOP_P, (float, int), 1.0)
    acceptance = _scalar(state, ACCEPTANCE, (str,), "auto")
    seed = _scalar(state, SEED, (int,), None)
    medusa = _scalar(state, MEDUSA, (bool,), None)
    if temp is None or not 0 <= temp < math.inf:
        raise ValueError(f"inference_state['{TEMP}']: temperature {temp!r} must be a finite number >= 0")
    if top_p is None or not 0.0 < top_p <= 1.0:
        raise ValueError(f"inference_state['{TOP_P}']: top-p {top_p!r} must be in (0, 1]")
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"inference_state['{ACCEPTANCE}']: '{acceptance}' is not one of {', '.join(ACCEPTANCES)}")
    return Settings(float(temp), float(top_p), acceptance, seed, medusa)


def parse_request(state: dict | None, T: int | None = None, max_tree: int = MAX_TREE_NODES) -> StepRequest:
    """Validate the Medusa keys of ``state`` for a pass of ``T`` tokens (None: infer T).

    Keys that are not ours are ignored: exo may carry its own. A tree of more than
    ``max_tree`` nodes is refused (``LimitError``) before its mask is looked at.
    """
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ValueError(f"inference_state must be a dict or None, got {type(state).__name__}")
    depths = _array(state, DEPTHS, "int", 1)
    positions = _array(state, POSITIONS, "int", 1)
    tokens = _array(state, TOKENS, "int", 1)
    if T is None:
        T = next((len(a) for a in (depths, positions, tokens) if a is not None), None)
    for key, a in ((DEPTHS, depths), (POSITIONS, positions), (TOKENS, tokens)):
        if a is not None and len(a) != T:
            raise ValueError(f"inference_state['{key}']: has {len(a)} entries but this pass carries {T} tokens")
    if depths is not None and len(depths) > max_tree:
        raise LimitError(f"inference_state['{DEPTHS}']: a tree of {len(depths)} nodes, more than the limit of "
                         f"{max_tree}")
    tree_mask = _array(state, TREE_MASK, "bool", 2, None if T is None else (T, T))
    if (tree_mask is None) != (depths is None):
        raise ValueError(f"inference_state: '{DEPTHS}' and '{TREE_MASK}' come together (a tree), got only one")
    if depths is not None:
        if (depths[0] != 0 or not tree_mask.diagonal().all() or np.triu(tree_mask, 1).any()
                or not np.array_equal(tree_mask.sum(axis=1) - 1, depths)):
            raise ValueError(f"inference_state['{DEPTHS}']/['{TREE_MASK}']: not a tree (the root first at depth 0, "
                             "each token seeing itself and its depth-many ancestors, all earlier)")
        if positions is not None and not np.array_equal(positions - positions[0], depths):
            raise ValueError(f"inference_state['{POSITIONS}']: positions must be the root's position plus the depths")
    elif positions is not None and not np.array_equal(positions - positions[0], np.arange(len(positions))):
        raise ValueError(f"inference_state['{POSITIONS}']: a plain pass has consecutive positions")
    if positions is not None and positions[0] < 0:
        raise ValueError(f"inference_state['{POSITIONS}']: positions must be >= 0")
    commit = _array(state, COMMIT, "int", 1)
    if commit is not None and (commit[0] != 0 or (commit < 0).any()):
        raise ValueError(f"inference_state['{COMMIT}']: accepted nodes start at the root (0), got {commit.tolist()}")
    return StepRequest(commit, depths, tree_mask, positions, tokens, parse_settings(state))


def speaks_protocol(state: dict | None) -> bool:
    """Whether a pass follows this protocol: its state carries a ``medusa_`` key (a node that
    speaks it puts ``initial_state`` in the first pass). Stock exo's passes carry none; the
    engines then decode as exo's own engines do and return no state, which exo's serializer
    could not carry."""
    return isinstance(state, dict) and any(isinstance(k, str) and k.startswith("medusa_") for k in state)


def initial_state(temp: float = 0.0, top_p: float = 1.0, acceptance: str = "auto", seed: int | None = None,
                  medusa: bool | None = None) -> dict[str, Any]:
    """The first pass's state: the sampling settings the last shard applies."""
    state = {TEMP: float(temp), TOP_P: float(top_p), ACCEPTANCE: acceptance, SEED: seed, MEDUSA: medusa}
    parse_settings(state)
    return state


def settings_state(settings: Settings) -> dict[str, Any]:
    return {TEMP: settings.temp, TOP_P: settings.top_p, ACCEPTANCE: settings.acceptance,
            SEED: settings.seed, MEDUSA: settings.medusa}


def emitted_tokens(state: dict | None) -> np.ndarray | None:
    """The tokens the last shard emitted in this pass, (n,) int64, or None (not a Medusa engine)."""
    if not state or state.get(EMITTED) is None:
        return None
    return _array(state, EMITTED, "int", 1)


def finish_reason(state: dict | None) -> str | None:
    """Why the last shard ended the request in this pass ("length": the context is full), or None."""
    v = state.get(FINISH) if isinstance(state, dict) else None
    if v is not None and v not in FINISHES:
        raise ValueError(f"inference_state['{FINISH}']: expected one of {', '.join(FINISHES)}, got {v!r}")
    return v


def pass_output(state: dict | None, settings: Settings, nxt: Advanced, tree_pass: bool) -> dict[str, Any]:
    """The last shard's output state: ``state`` without our keys, the settings, the tokens this
    pass emits, and the next pass (``next_request`` reads it), or ``FINISH`` when there is none.
    ``tree_pass``: this pass was a tree, whose accepted nodes the next pass commits."""
    out = {k: v for k, v in (state or {}).items() if not k.startswith("medusa_")}
    out.update(settings_state(settings))
    out[EMITTED] = np.asarray(nxt.acc.tokens, dtype=np.int64)
    if nxt.finish is not None:
        out[FINISH] = nxt.finish
        return out
    if tree_pass:
        out[NEXT + "commit"] = np.asarray(nxt.acc.nodes, dtype=np.int64)
    out[NEXT + "tokens"] = nxt.tokens
    out[NEXT + "positions"] = (nxt.root + nxt.tree.depths).astype(np.int64)
    if nxt.tree.size > 1:
        out[NEXT + "depths"] = nxt.tree.depths.astype(np.int64)
        out[NEXT + "tree_mask"] = nxt.tree.mask.copy()
    return out


def next_request(state: dict) -> tuple[np.ndarray, dict[str, Any]]:
    """The first shard's input (1, T') and state for the next pass, from the last shard's output."""
    tokens = _array(state, NEXT + "tokens", "int", 1)
    if tokens is None:
        raise ValueError(f"inference_state has no '{NEXT}tokens': it is not a Medusa last shard's output")
    nxt = {k: state[k] for k in SETTINGS if k in state}
    for name in (COMMIT, DEPTHS, TREE_MASK, POSITIONS):
        v = state.get(NEXT + name.removeprefix("medusa_"))
        if v is not None:
            nxt[name] = v
    parse_request(nxt, len(tokens))
    return tokens.reshape(1, -1), nxt


# --------------------------------------------------------------------------- checks of one pass


def where(shard) -> str:
    return f"shard {shard.start_layer}-{shard.end_layer} of '{shard.model_id}'"


def check_size(shard, shape, limits: Limits | None) -> None:
    """A pass's declared shape, (1, T) or (1, T, H), against the model's context: checked before
    the tensor is decoded or anything is computed (26M token ids once asked a node for 60 GB)."""
    if limits is not None and len(shape) >= 2:
        limits.check_pass(int(shape[1]), what=f"{where(shard)}: the pass")


def check_input(shard, x, hidden_size: int, vocab_size: int, limits: Limits | None = None) -> np.ndarray:
    """The pass's input: token ids (1, T) on the first shard, hidden states (1, T, H) elsewhere,
    with T within ``limits`` (the model's context)."""
    if not isinstance(x, np.ndarray) and hasattr(x, "__array__"):
        x = np.asarray(x)
    check_size(shard, getattr(x, "shape", ()), limits)
    if shard.is_first_layer():
        ok = isinstance(x, np.ndarray) and x.dtype.kind in "iu" and x.ndim == 2 and x.shape[0] == 1
        if not ok or x.shape[1] == 0:
            raise ValueError(f"{where(shard)}: input must be token ids of shape (1, T), int, got {_describe(x)}")
        if x.min() < 0 or x.max() >= vocab_size:
            raise ValueError(f"{where(shard)}: token ids must be in [0, {vocab_size}), got {x.min()}..{x.max()}")
        return x.astype(np.int64)
    ok = (isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float16) and x.ndim == 3
          and x.shape[0] == 1 and x.shape[1] > 0 and x.shape[2] == hidden_size)
    if not ok:
        raise ValueError(f"{where(shard)}: input must be hidden states of shape (1, T, {hidden_size}), "
                         f"float32 or float16, got {_describe(x)}")
    return x


def check_pass(request_id: str, req: StepRequest, shard, known: bool, committed: int,
               pending: tuple[np.ndarray, np.ndarray] | None, T: int = 1, limits: Limits | None = None) -> None:
    """Whether this pass fits the request's cache on this shard, checked before the cache is touched.

    ``known``: the shard holds a cache for the request; ``committed``: its position;
    ``pending``: (depths, mask) of its tree forward not yet committed; ``T``: the
    pass's tokens; ``limits``: the model's (context, window, tree size).
    """
    name = f"shard {shard.start_layer}-{shard.end_layer}"
    if not known:
        if req.commit is not None or req.is_tree or (req.positions is not None and req.positions[0] > 0):
            raise ValueError(f"unknown request id '{request_id}' on {name}: it has no cache here (finished, "
                             "evicted or never started); start it with a prompt")
    elif req.commit is not None:
        if pending is None:
            raise ValueError(f"request '{request_id}': inference_state['{COMMIT}'] given but no tree forward "
                             "is pending on this shard")
        check_path(request_id, req.commit, *pending)
        committed += len(req.commit)
    elif pending is not None:
        raise ValueError(f"request '{request_id}': the last tree forward is not committed; this pass must carry "
                         f"inference_state['{COMMIT}']")
    if req.positions is not None and req.positions[0] != committed:
        raise ValueError(f"request '{request_id}': {name} is at position {committed} but this pass starts at "
                         f"{req.positions[0]}: the ring is out of sync (a lost or repeated pass)")
    if limits is not None:
        if req.is_tree:
            limits.check_tree(T, f"request '{request_id}': the pass's tree")
        elif not known:
            limits.check_prompt(T, f"request '{request_id}': the prompt")
        # A tree's T tokens sit in scratch at positions committed + depths; a plain pass's in slots.
        span = int(req.depths.max()) + 1 if req.is_tree else T
        limits.check_pass(span, committed, f"request '{request_id}' on {name}: the pass")


def check_path(request_id: str, nodes: np.ndarray, depths: np.ndarray, mask: np.ndarray) -> None:
    """``nodes`` is a root-to-node path of the pending tree (depths, mask)."""
    T = len(depths)
    ok = nodes.max() < T and all(mask[b, a] and depths[b] == depths[a] + 1 for a, b in zip(nodes[:-1], nodes[1:]))
    if not ok:
        raise ValueError(f"request '{request_id}': inference_state['{COMMIT}'] {nodes.tolist()} is not a "
                         f"root-to-node path of the pending {T}-node tree")


def check_tree_pass(request_id: str, req: StepRequest, tokens, tree) -> None:
    """On the last shard: a tree pass has its ``tokens`` and is the tree this shard laid out for it
    (``tree``; None: it laid out none, or not a tree)."""
    if not req.is_tree:
        return
    if tokens is None:
        raise ValueError(f"request '{request_id}': a tree pass reaching the last shard needs "
                         f"inference_state['{TOKENS}']")
    if tree is None or not (np.array_equal(req.depths, tree.depths) and np.array_equal(req.tree_mask, tree.mask)):
        proposed = "none" if tree is None else f"{tree.size} nodes"
        raise ValueError(f"request '{request_id}': the tree in inference_state ({len(req.depths)} nodes) "
                         f"is not the one this shard laid out ({proposed})")
