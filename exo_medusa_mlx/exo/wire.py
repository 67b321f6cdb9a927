"""exo's wire format for arrays and ``inference_state``, as dicts: bytes, shapes, dtypes and one JSON string.

exo's ``Tensor`` is raw C-order bytes, a shape and ``str(dtype)``; its
``InferenceState`` carries arrays as tensors and everything else as one JSON
object. These functions build and check those dicts; ``ring/proto.py`` moves them
in and out of protobuf messages. Nothing but JSON and raw array bytes is decoded.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .state import parse_request

# Wire dtypes numpy can rebuild with np.frombuffer (no object or bfloat16).
WIRE_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64")


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
