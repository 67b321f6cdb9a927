"""exo's gRPC ``InferenceState`` message, carrying our ring state: arrays as tensors, the rest as JSON.

exo 0.0.x's ``GRPCPeerHandle.serialize_inference_state`` tests ``isinstance(v, mx.array)``
with ``mx`` numpy on Linux (``np.array`` is a function: any entry raises TypeError) and
MLX on macOS (numpy arrays then fall to ``json.dumps`` and fail). ``to_proto`` and
``from_proto`` replace exo's pair (``install``): numpy and MLX arrays, lists of them and
JSON values travel on every platform, arrays come back as numpy, and the receiver checks
our protocol's keys (``state.parse_request``) before any engine sees them. No pickle.
"""

from __future__ import annotations

import json

import numpy as np

from . import state as st


def _is_array(v) -> bool:
    """A numpy array or scalar, or an array from another framework (MLX) numpy can read."""
    return isinstance(v, (np.ndarray, np.generic)) or (
        hasattr(v, "__array__") and hasattr(v, "shape") and hasattr(v, "dtype"))


def _tensor(pb2, key: str, v):
    try:
        t = st.encode_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"inference_state['{key}']: {e}") from None
    return pb2.Tensor(tensor_data=t["tensor_data"], shape=t["shape"], dtype=t["dtype"])


def to_proto(pb2, state: dict):
    """``state`` as exo's ``InferenceState`` (``pb2``: exo's ``node_service_pb2``)."""
    if not isinstance(state, dict):
        raise ValueError(f"inference_state must be a dict or None, got {type(state).__name__}")
    proto = pb2.InferenceState()
    other = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"inference_state key {k!r} must be a string")
        if _is_array(v):
            proto.tensor_data[k].CopyFrom(_tensor(pb2, k, v))
        elif isinstance(v, list) and v and all(_is_array(a) for a in v):
            proto.tensor_list_data[k].tensors.extend(_tensor(pb2, k, a) for a in v)
        else:
            other[k] = v
    if other:
        try:
            proto.other_data_json = json.dumps(other, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"inference_state: {e}; only arrays, lists of arrays and JSON values travel") from None
    return proto


def _array(key: str, t) -> np.ndarray:
    try:
        return st.decode_tensor({"tensor_data": t.tensor_data, "shape": list(t.shape), "dtype": t.dtype})
    except ValueError as e:
        raise ValueError(f"inference_state['{key}']: {e}") from None


def from_proto(proto) -> dict:
    """The inverse of ``to_proto``, our protocol's keys checked (one-line ``ValueError``)."""
    state: dict = {k: _array(k, t) for k, t in proto.tensor_data.items()}
    for k, tl in proto.tensor_list_data.items():
        state[k] = [_array(k, t) for t in tl.tensors]
    if proto.other_data_json:
        try:
            other = json.loads(proto.other_data_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"inference_state other_data_json is not valid JSON: {e}") from None
        if not isinstance(other, dict):
            raise ValueError(f"inference_state other_data_json must hold an object, got {type(other).__name__}")
        both = sorted(set(other) & set(state))
        if both:
            raise ValueError(f"inference_state['{both[0]}'] is both a tensor and a JSON value")
        state.update(other)
    st.parse_request(state)
    return state
