"""``RingClient``: one request through running nodes, several tokens per pass.

The client plays exo's node holding the API: it sends the prompt to the first
node, which forwards along the route; the last shard's ``inference_state``
comes back, and the one ring loop (``engine.ring_loop.ring_steps``) turns it into
tokens (cut at EOS and ``max_tokens``) and the next pass, which goes to the first
node again: the client gives it only the transport, a gRPC call. At the end,
finished or failed, every node is told to free the request's caches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
import numpy as np

from ..engine import protocol as st
from ..engine.ring_loop import check_ring, ring_steps
from ..engine.shard import Shard
from . import node_service_pb2 as pb
from . import node_service_pb2_grpc as pb_grpc
from . import proto
from .auth import token_metadata
from .proto import HOP_MARGIN_S, ORIGIN_KEY, describe

DEFAULT_TIMEOUT_S = 60.0  # per pass, for the whole ring
FINISH_TIMEOUT_S = 2.0


class RingError(RuntimeError):
    """A request failed; the message names the node (address and layers) it failed on."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, node: str | None = None):
        super().__init__(message)
        self.code, self.node = code, node


@dataclass(frozen=True)
class NodeInfo:
    address: str  # host:port
    shard: Shard
    backend: str = "?"

    def __str__(self) -> str:
        return describe(self.address, self.shard)


@dataclass
class NodeTotals:
    """One node's time over a request (seconds)."""

    address: str
    backend: str
    start_layer: int
    end_layer: int
    passes: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0


@dataclass
class RingResult:
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str  # "stop" (EOS) or "length"
    passes: int  # generation passes after the prompt's
    prompt_s: float  # the prompt's pass, end to end
    generation_s: float  # the other passes
    transport_s: float  # all passes' wall time less the nodes' compute: gRPC, bytes and the wire format
    nodes: list[NodeTotals] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Tokens per generation pass (the prompt's pass gives the first token)."""
        return (len(self.tokens) - 1) / self.passes if self.passes else float(bool(self.tokens))

    @property
    def generation_tps(self) -> float:
        return (len(self.tokens) - 1) / self.generation_s if self.generation_s > 0 else 0.0

    def to_dict(self) -> dict:
        n = self.passes + 1
        return {"tokens": self.tokens, "prompt_tokens": len(self.prompt_tokens), "finish_reason": self.finish_reason,
                "passes": self.passes, "mean_accepted": self.mean_accepted, "prompt_s": self.prompt_s,
                "generation_s": self.generation_s, "generation_tps": self.generation_tps,
                "transport_ms_per_pass": 1000 * self.transport_s / n,
                "nodes": [vars(t) for t in self.nodes]}


@dataclass
class _Run:
    """One request's tally as its passes come back."""

    totals: list[NodeTotals]
    tokens: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    prompt_s: float = 0.0
    compute: float = 0.0  # the nodes' compute, summed over passes
    sent: int = 0  # passes sent, the prompt's included

    @property
    def passes(self) -> int:
        """Generation passes after the prompt's."""
        return max(self.sent - 1, 0)

    def add(self, result: pb.PassResult) -> pb.PassResult:
        """Count a pass and its per-node stats."""
        self.sent += 1
        for t, s in zip(self.totals, result.stats):
            t.passes += 1
            t.tokens += s.tokens
            t.compute_s += s.compute_s
            t.decode_s += s.decode_s
            t.encode_s += s.encode_s
        self.compute += sum(s.compute_s for s in result.stats)
        return result


class RingClient:
    """Drives requests through ``nodes`` (in layer order) over gRPC.

    Args:
        nodes: the ring's nodes, the first holding layer 0 and the last the last layer.
        timeout: seconds one pass may take through the whole ring; a node that does not
            answer in time fails the request with its name.
        token: the ring's shared token, sent with every call (``auth.py``); None: none.
    """

    def __init__(self, nodes: Iterable[NodeInfo], timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None):
        self.nodes = list(nodes)
        if not self.nodes:
            raise ValueError("the ring has no nodes")
        check_ring([n.shard for n in self.nodes])
        if timeout <= HOP_MARGIN_S * len(self.nodes):
            raise ValueError(f"timeout {timeout} s leaves no time per hop: give more than "
                             f"{HOP_MARGIN_S * len(self.nodes):.1f} s for {len(self.nodes)} nodes")
        self.timeout = timeout
        self._metadata = token_metadata(token)
        self._channels: dict[str, grpc.Channel] = {}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> "RingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stub(self, address: str) -> pb_grpc.NodeServiceStub:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=proto.CHANNEL_OPTIONS)
        return pb_grpc.NodeServiceStub(self._channels[address])

    def _drop(self, address: str) -> None:
        """Forget a failed channel: the next call reconnects at once (a restarted node rejoins)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def _error(self, node: NodeInfo, e: grpc.RpcError, timeout: float) -> RingError:
        origin = dict(e.trailing_metadata() or ()).get(ORIGIN_KEY)
        if origin:  # a node reported it, naming the node it is about
            return RingError(e.details(), e.code(), origin)
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            self._drop(node.address)
        what = proto.peer_failure(e.code(), timeout)
        return RingError(f"{node} {what} ({e.code().name}: {e.details()})", e.code(), node.address)

    def health(self, timeout: float = 5.0) -> list[pb.HealthCheckResponse]:
        """Every node's health check; raises ``RingError`` naming the first that fails."""
        out = []
        for node in self.nodes:
            try:
                out.append(self._stub(node.address).HealthCheck(pb.HealthCheckRequest(), timeout=timeout,
                                                                 metadata=self._metadata))
            except grpc.RpcError as e:
                raise self._error(node, e, timeout) from None
        return out

    def _route(self) -> list[pb.Peer]:
        return [pb.Peer(address=n.address, shard=proto.shard_to_proto(n.shard)) for n in self.nodes[1:]]

    def _call(self, method: str, request) -> pb.PassResult:
        first = self.nodes[0]
        try:
            return getattr(self._stub(first.address), method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(first, e, self.timeout) from None

    def generate(self, prompt: str | Iterable[int], max_tokens: int, medusa: bool = True, *,
                 eos_token_ids: Iterable[int] | None = None, temp: float = 0.0, top_p: float = 1.0,
                 acceptance: str = "auto", seed: int | None = None, request_id: str | None = None,
                 on_tokens: Callable[[list[int]], None] | None = None) -> RingResult:
        """Generate up to ``max_tokens`` tokens for ``prompt`` (text, encoded by the first node, or ids).

        ``on_tokens`` is called with each pass's accepted tokens as they arrive.
        Raises ``RingError`` naming the node when a pass fails.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens {max_tokens} must be at least 1")
        rid = request_id or uuid.uuid4().hex
        eos = None if eos_token_ids is None else [int(i) for i in eos_token_ids]
        state = st.initial_state(temp, top_p, acceptance, seed, medusa)
        run = _Run([NodeTotals(n.address, n.backend, n.shard.start_layer, n.shard.end_layer) for n in self.nodes])
        loop = asyncio.new_event_loop()  # ring_loop.ring_steps is async; the gRPC calls here block
        try:
            loop.run_until_complete(self._drive(run, rid, prompt, state, max_tokens, eos, on_tokens))
        finally:
            loop.close()
            self._finish(rid, run.tokens)
        wall = time.perf_counter() - run.start
        reason = "stop" if eos and run.tokens and run.tokens[-1] in eos else "length"
        return RingResult(run.tokens, run.prompt_ids, reason, run.passes, run.prompt_s, wall - run.prompt_s,
                          max(0.0, wall - run.compute), run.totals)

    async def _drive(self, run: _Run, rid: str, prompt, state: dict, max_tokens: int, eos, on_tokens) -> None:
        """The request's passes through ``ring_steps``, over gRPC: the first as the prompt, then tensors."""
        shard0 = proto.shard_to_proto(self.nodes[0].shard)

        async def send(x: np.ndarray, state: dict):
            request = pb.TensorRequest(shard=shard0, tensor=proto.tensor_to_proto(x), request_id=rid,
                                       inference_state=proto.state_to_proto(state), route=self._route())
            return None, self._result_state(run.add(self._call("SendTensor", request)))

        if isinstance(prompt, str):
            request = pb.PromptRequest(shard=shard0, prompt=prompt, request_id=rid,
                                       inference_state=proto.state_to_proto(state), route=self._route())
            result = run.add(self._call("SendPrompt", request))
            run.prompt_ids = list(result.prompt_tokens)
            first = None, self._result_state(result)
        else:
            run.prompt_ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
            first = await send(np.array([run.prompt_ids]), state)
        run.prompt_s = time.perf_counter() - run.start
        async for step in ring_steps(send, first, max_tokens=max_tokens, eos=eos):
            run.tokens += step.tokens
            if on_tokens is not None and step.tokens:
                on_tokens(step.tokens)

    def _result_state(self, result: pb.PassResult) -> dict:
        last = self.nodes[-1]
        try:
            out_state = proto.state_from_proto(result.inference_state)
        except ValueError as e:
            raise RingError(f"{last} returned a malformed inference_state: {e}", node=last.address) from None
        if st.emitted_tokens(out_state) is None:
            raise RingError(f"{last} emitted no tokens (no '{st.EMITTED}' in its inference_state): "
                            "is it a Medusa engine?", node=last.address)
        return out_state

    def _finish(self, request_id: str, tokens: list[int]) -> None:
        """Tell every node the request is over (exo's SendResult broadcast); dead nodes are skipped."""
        msg = pb.SendResultRequest(request_id=request_id, result=tokens, is_finished=True)
        for node in self.nodes:
            try:
                self._stub(node.address).SendResult(msg, timeout=FINISH_TIMEOUT_S, metadata=self._metadata)
            except grpc.RpcError as e:  # a dead node holds nothing to free; a live one evicts it in time
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self._drop(node.address)

