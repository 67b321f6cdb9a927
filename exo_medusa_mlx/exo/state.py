"""The Medusa ring protocol: what travels in exo's ``inference_state``.

A ring pass carries T tokens: a plain run (the prompt, or one token when Medusa
is off) or a Medusa tree. Every shard keeps a tree forward's K/V in a scratch
region until the next pass says which nodes were accepted; a plain run is
committed at once. Only numpy arrays and JSON scalars travel (exo's wire format:
arrays as tensors, everything else as one JSON string).

Into every shard (arrays; int arrays are int64, T = tokens in this pass):

- ``medusa_commit`` (A,) int: nodes of the previous tree forward to keep, root
  first; every shard commits them before this forward.
- ``medusa_depths`` (T,) int: marks a tree forward; depth of each token, root 0.
- ``medusa_tree_mask`` (T, T) bool: token i sees token j (itself, its ancestors).
- ``medusa_positions`` (T,) int: absolute positions, committed + depths; each
  shard checks them against its own cache (a lost or repeated pass fails loudly).
- ``medusa_tokens`` (T,) int: the tree's tokens, for the last shard to verify
  (the first shard adds them).

Settings (JSON, read by the last shard when it first sees the request):
``medusa_temp`` float, ``medusa_top_p`` float, ``medusa_acceptance`` str
(auto/greedy/exact/typical), ``medusa_seed`` int or null, ``medusa_use_heads`` bool.

Out of the last shard: ``medusa_emitted`` (n,) int, the tokens this pass emits
(accepted candidates then the bonus token; the first pass: the token after the
prompt), and the next pass as ``medusa_next_tokens`` (T',) int plus
``medusa_next_positions`` / ``medusa_next_commit`` / ``medusa_next_depths`` /
``medusa_next_tree_mask``. ``next_request`` turns them into the next pass's
input; the ``next_`` names keep a node that echoes the state unchanged (stock
exo) from confusing them with the current pass.

A pass whose state carries no ``medusa_`` key comes from stock exo's node: the engines
then run it plainly and return no state (``speaks_protocol``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

COMMIT = "medusa_commit"
DEPTHS = "medusa_depths"
TREE_MASK = "medusa_tree_mask"
POSITIONS = "medusa_positions"
TOKENS = "medusa_tokens"
EMITTED = "medusa_emitted"
NEXT = "medusa_next_"  # prefix of the next pass's arrays in the last shard's output

TEMP = "medusa_temp"
TOP_P = "medusa_top_p"
ACCEPTANCE = "medusa_acceptance"
SEED = "medusa_seed"
USE_HEADS = "medusa_use_heads"
SETTINGS = (TEMP, TOP_P, ACCEPTANCE, SEED, USE_HEADS)
ACCEPTANCES = ("auto", "greedy", "exact", "typical")

# Wire dtypes numpy can rebuild with np.frombuffer (no object or bfloat16).
WIRE_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64")


@dataclass(frozen=True)
class Settings:
    temp: float = 0.0
    top_p: float = 1.0
    acceptance: str = "auto"
    seed: int | None = None
    use_heads: bool | None = None  # None: the engine's default


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
    use_heads = _scalar(state, USE_HEADS, (bool,), None)
    if temp is None or temp < 0:
        raise ValueError(f"inference_state['{TEMP}']: temperature {temp!r} must be a number >= 0")
    if top_p is None or not 0.0 < top_p <= 1.0:
        raise ValueError(f"inference_state['{TOP_P}']: top-p {top_p!r} must be in (0, 1]")
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"inference_state['{ACCEPTANCE}']: '{acceptance}' is not one of {', '.join(ACCEPTANCES)}")
    return Settings(float(temp), float(top_p), acceptance, seed, use_heads)


def parse_request(state: dict | None, T: int | None = None) -> StepRequest:
    """Validate the Medusa keys of ``state`` for a pass of ``T`` tokens (None: infer T).

    Keys that are not ours are ignored: exo may carry its own.
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
    state = {TEMP: float(temp), TOP_P: float(top_p), ACCEPTANCE: acceptance, SEED: seed, USE_HEADS: medusa}
    parse_settings(state)
    return state


def settings_state(settings: Settings) -> dict[str, Any]:
    return {TEMP: settings.temp, TOP_P: settings.top_p, ACCEPTANCE: settings.acceptance,
            SEED: settings.seed, USE_HEADS: settings.use_heads}


def emitted_tokens(state: dict | None) -> np.ndarray | None:
    """The tokens the last shard emitted in this pass, (n,) int64, or None (not a Medusa engine)."""
    if not state or state.get(EMITTED) is None:
        return None
    return _array(state, EMITTED, "int", 1)


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


# --------------------------------------------------------------------------- wire format


def encode_tensor(a: np.ndarray) -> dict[str, Any]:
    """exo's ``Tensor`` message as a dict: raw C-order bytes, shape, ``str(dtype)``."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(a).__name__}")
    if str(a.dtype) not in WIRE_DTYPES:
        raise ValueError(f"dtype {a.dtype} cannot travel; use one of {', '.join(WIRE_DTYPES)}")
    return {"tensor_data": np.ascontiguousarray(a).tobytes(), "shape": list(a.shape), "dtype": str(a.dtype)}


def decode_tensor(t: dict[str, Any]) -> np.ndarray:
    if not isinstance(t, dict) or not {"tensor_data", "shape", "dtype"} <= set(t):
        raise ValueError("tensor must be a dict with tensor_data, shape and dtype")
    data, shape, dtype = t["tensor_data"], t["shape"], t["dtype"]
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"tensor dtype '{dtype}' is not one of {', '.join(WIRE_DTYPES)}")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"tensor_data must be bytes, got {type(data).__name__}")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != len(data):
        raise ValueError(f"tensor of shape {list(shape)} and dtype {dtype} needs {size} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def encode_state(state: dict | None) -> dict[str, Any]:
    """exo's ``InferenceState`` as a dict: arrays in ``tensor_data``, the rest as one JSON string."""
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ValueError(f"inference_state must be a dict or None, got {type(state).__name__}")
    parse_request(state)
    tensors, other = {}, {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"inference_state key {k!r} must be a string")
        if isinstance(v, np.ndarray):
            try:
                tensors[k] = encode_tensor(v)
            except ValueError as e:
                raise ValueError(f"inference_state['{k}']: {e}") from None
        elif v is None or isinstance(v, (bool, int, float, str)):
            other[k] = v
        else:
            raise ValueError(f"inference_state['{k}']: {type(v).__name__} cannot travel; use a numpy array "
                             "or a JSON scalar")
    return {"tensor_data": tensors, "other_data_json": json.dumps(other, allow_nan=False)}


def decode_state(wire: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``encode_state``, validated (a malformed state fails here, in one line)."""
    if not isinstance(wire, dict) or not isinstance(wire.get("tensor_data", {}), dict):
        raise ValueError("wire inference_state must be a dict with a 'tensor_data' dict and 'other_data_json'")
    text = wire.get("other_data_json") or "{}"
    try:
        other = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"inference_state other_data_json is not valid JSON: {e}") from None
    if not isinstance(other, dict):
        raise ValueError(f"inference_state other_data_json must hold an object, got {type(other).__name__}")
    state = dict(other)
    for k, t in wire.get("tensor_data", {}).items():
        if k in state:
            raise ValueError(f"inference_state['{k}'] is both a tensor and a JSON value")
        try:
            state[k] = decode_tensor(t)
        except ValueError as e:
            raise ValueError(f"inference_state['{k}']: {e}") from None
    parse_request(state)
    return state
