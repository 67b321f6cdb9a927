"""``install()``: exo 0.0.x runs our engines with Medusa, in one call before its node is built.

It registers our engines (``registry.register_with_exo``: engine names, model cards, the
engine-rebuild guard, our engines as virtual subclasses of exo's ``InferenceEngine``),
changes exo's ``Node`` for several tokens per ring pass (``exo_node``), and replaces exo's
gRPC state serializer with one that carries our state (``wire``). Safe to call
again: a second call changes nothing and says so. ``mlx_medusa exo`` calls it, then runs
exo's own ``main``; a launcher of one's own can do the same.

Every node of a ring must run under ``install()``: a stock node can neither carry the
protocol's state nor take several tokens from one pass.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from . import node_patch as exo_node
from ..engine import wire
from .registry import register_with_exo

_PEER = "exo.networking.grpc.grpc_peer_handle"
_SERVER = "exo.networking.grpc.grpc_server"
_PB2 = "exo.networking.grpc.node_service_pb2"
_NODE = "exo.orchestration.node"


@dataclass(frozen=True)
class Installation:
    """What ``install`` found and changed."""

    engines: tuple[str, ...]  # our engine names exo now builds
    registration: str  # register_with_exo's account
    patched: tuple[str, ...]  # exo functions this call replaced
    already: bool  # an earlier call had installed everything

    def __str__(self) -> str:
        if self.already:
            return f"exo-medusa: already installed in exo (engines {', '.join(self.engines)}); nothing changed"
        return f"exo-medusa: {self.registration}; patched {', '.join(self.patched)}"


def _serializer(pb2):
    def serialize_inference_state(self, inference_state: dict):
        return wire.state_to_proto(pb2, inference_state)

    return serialize_inference_state


def _deserializer():
    def deserialize_inference_state(self, inference_state_proto) -> dict:
        return wire.state_from_proto(inference_state_proto)

    return deserialize_inference_state


def _patch(cls, name: str, new) -> list[str]:
    if not callable(getattr(cls, name, None)):
        raise ImportError(f"exo's {cls.__name__} has no {name}: this is not exo 0.0.x (install exo from its "
                          "v0.0.15-alpha tag)")
    if getattr(getattr(cls, name), exo_node.MARK, False):
        return []
    functools.update_wrapper(new, getattr(cls, name))
    setattr(new, exo_node.MARK, True)
    setattr(cls, name, new)
    return [f"{cls.__name__}.{name}"]


def install(quiet: bool = False) -> Installation:
    """Make the importable exo 0.0.x run our engines with Medusa; prints what it did unless ``quiet``.

    Raises ImportError when exo 0.0.x cannot be imported.
    """
    reg = register_with_exo()
    if not reg:
        raise ImportError(f"cannot install into exo: {reg.detail}")
    node = importlib.import_module(_NODE)
    peer, server, pb2 = (importlib.import_module(m) for m in (_PEER, _SERVER, _PB2))
    patched = exo_node.patch_node(node.Node)
    patched += _patch(peer.GRPCPeerHandle, "serialize_inference_state", _serializer(pb2))
    patched += _patch(server.GRPCServer, "deserialize_inference_state", _deserializer())
    done = Installation(reg.engines, reg.detail, tuple(patched), already=not patched)
    if not quiet:
        print(done, flush=True)
    return done
