"""The ring's gRPC transport: protobuf messages <-> exo's wire dicts (``exo/wire.py``), channel options,
and what node and client share about errors.

The checks are ``exo.wire``'s and ``exo.state``'s; this module only moves fields
between protobuf and the dicts those functions take.
"""

from __future__ import annotations

import numpy as np

from ..engine import wire
from ..engine.shard import Shard
from . import node_service_pb2 as pb

ORIGIN_KEY = "ring-origin"  # trailing metadata: the address of the node an error is about
HOP_MARGIN_S = 1.0  # each forward gets the caller's remaining time less this
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # exo's limit, on every server and channel
# Fail fast on a dead peer, and reconnect quickly to a restarted one.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second node on a taken port fails instead of sharing it
]


def shard_to_proto(shard: Shard) -> pb.Shard:
    return pb.Shard(model_id=shard.model_id, start_layer=shard.start_layer, end_layer=shard.end_layer,
                    n_layers=shard.n_layers)


def shard_from_proto(msg: pb.Shard) -> Shard:
    return Shard(msg.model_id, msg.start_layer, msg.end_layer, msg.n_layers)  # validates the ranges


def tensor_to_proto(a: np.ndarray) -> pb.Tensor:
    return pb.Tensor(**wire.encode_tensor(a))


def tensor_from_proto(msg: pb.Tensor) -> np.ndarray:
    return wire.decode_tensor({"tensor_data": msg.tensor_data, "shape": list(msg.shape), "dtype": msg.dtype})


def state_to_proto(state: dict | None) -> pb.InferenceState:
    return wire.state_to_proto(pb, state)


def state_from_proto(msg: pb.InferenceState) -> dict:
    return wire.state_from_proto(msg)


def peer_failure(code, timeout: float | None) -> str:
    """What a status that no node reported (the peer itself failed) says about the peer."""
    name = getattr(code, "name", str(code))
    if name == "DEADLINE_EXCEEDED":
        return "did not answer in time" if timeout is None else f"did not answer within {timeout:.1f} s"
    return "is unreachable" if name == "UNAVAILABLE" else "failed"


def describe(address: str, shard: Shard | pb.Shard) -> str:
    """How errors name a node: its address and the layers it holds."""
    return f"node {address} (layers {shard.start_layer}-{shard.end_layer})"
