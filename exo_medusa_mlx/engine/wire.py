"""exo's wire format for arrays and ``inference_state``, as dicts: bytes, shapes, dtypes and one JSON string.

exo's ``Tensor`` is raw C-order bytes, a shape and ``str(dtype)``; its
``InferenceState`` carries arrays as tensors, lists of arrays as tensor lists and
everything else as one JSON object. These functions build and check those dicts
and the messages of either our ring's or exo's protobuf module (the same shapes).
Nothing but JSON and raw array bytes is decoded: no pickle.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .protocol import parse_request

# Wire dtypes numpy can rebuild with np.frombuffer (no object or bfloat16).
WIRE_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64")


MAX_DIMS = 8  # exo's tensors have 1 to 3


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        raise ValueError(f"tensor shape must be a list of non-negative ints, got {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"tensor shape has {len(shape)} dims; at most {MAX_DIMS} travel")
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != len(data):
        raise ValueError(f"tensor of shape {list(shape)} and dtype {dtype} needs {size} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _is_array(v) -> bool:
    """A numpy array or scalar, or another framework's array numpy can read (MLX's)."""
    return isinstance(v, (np.ndarray, np.generic)) or (
        hasattr(v, "__array__") and hasattr(v, "shape") and hasattr(v, "dtype"))


def _tensor(key: str, v) -> dict[str, Any]:
    try:
        return encode_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"inference_state['{key}']: {e}") from None


def encode_state(state: dict | None) -> dict[str, Any]:
    """exo's ``InferenceState`` as a dict: arrays in ``tensor_data``, lists of arrays in
    ``tensor_list_data``, the rest as one JSON object. Our protocol's keys are checked first."""
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ValueError(f"inference_state must be a dict or None, got {type(state).__name__}")
    parse_request(state)
    tensors, lists, other = {}, {}, {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"inference_state key {k!r} must be a string")
        if _is_array(v):
            tensors[k] = _tensor(k, v)
        elif isinstance(v, list) and v and all(_is_array(a) for a in v):
            lists[k] = [_tensor(k, a) for a in v]
        else:
            other[k] = v
    try:
        text = json.dumps(other, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"inference_state: {e}; only arrays, lists of arrays and JSON values travel") from None
    return {"tensor_data": tensors, "tensor_list_data": lists, "other_data_json": text}


def _array(key: str, t) -> np.ndarray:
    try:
        return decode_tensor(t)
    except ValueError as e:
        raise ValueError(f"inference_state['{key}']: {e}") from None


def _no_constant(name: str):
    raise ValueError(f"inference_state other_data_json holds {name}: only finite numbers travel")


def decode_state(wire: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``encode_state``, validated (a malformed state fails here, in one line)."""
    if not isinstance(wire, dict) or not isinstance(wire.get("tensor_data", {}), dict) \
            or not isinstance(wire.get("tensor_list_data", {}), dict):
        raise ValueError("wire inference_state must be a dict with 'tensor_data' and 'tensor_list_data' dicts and "
                         "'other_data_json'")
    text = wire.get("other_data_json") or "{}"
    try:
        other = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"inference_state other_data_json is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError("inference_state other_data_json is nested too deeply") from None
    if not isinstance(other, dict):
        raise ValueError(f"inference_state other_data_json must hold an object, got {type(other).__name__}")
    state = dict(other)
    arrays = {k: _array(k, t) for k, t in wire.get("tensor_data", {}).items()}
    arrays |= {k: [_array(k, t) for t in ts] for k, ts in wire.get("tensor_list_data", {}).items()}
    for k, v in arrays.items():
        if k in state:
            raise ValueError(f"inference_state['{k}'] is both a tensor and a JSON value")
        state[k] = v
    parse_request(state)
    return state


# ----------------------------------------------------------------- protobuf (ours and exo's: the same messages)


def _tensor_dict(t) -> dict[str, Any]:
    return {"tensor_data": t.tensor_data, "shape": list(t.shape), "dtype": t.dtype}


def state_to_proto(pb2, state: dict | None):
    """``state`` as the ``InferenceState`` message of ``pb2`` (ours or exo's ``node_service_pb2``)."""
    encoded = encode_state(state)
    msg = pb2.InferenceState(other_data_json=encoded["other_data_json"])
    for k, t in encoded["tensor_data"].items():
        msg.tensor_data[k].CopyFrom(pb2.Tensor(**t))
    for k, ts in encoded["tensor_list_data"].items():
        msg.tensor_list_data[k].tensors.extend(pb2.Tensor(**t) for t in ts)
    return msg


def state_from_proto(msg) -> dict[str, Any]:
    """The inverse of ``state_to_proto``, validated (``decode_state``)."""
    return decode_state({"tensor_data": {k: _tensor_dict(t) for k, t in msg.tensor_data.items()},
                         "tensor_list_data": {k: [_tensor_dict(t) for t in tl.tensors]
                                              for k, tl in msg.tensor_list_data.items()},
                         "other_data_json": msg.other_data_json})
