"""``mlx_medusa node``: one shard of a model on one backend, served over gRPC.

A pass comes in (``SendTensor``, or ``SendPrompt`` on the first shard) with the nodes
after this one in its ``route``; the node runs its layers, forwards to the next and
returns the reply that comes back (the last shard's state, every node's timings). Each
hop gets the caller's deadline less a margin, errors name the node they are about
(``ring-origin`` metadata), every pass is checked against the model's limits first and
stops when its caller gives up; the node forwards only to its ``--peers``, checks an
optional token (``auth.py``) and stops within seconds on SIGTERM, SIGINT or a closed stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import traceback

import grpc
import numpy as np

from ..cli_args import fail, kv_window, non_negative_int, one_line, port, positive_int
from ..core.limits import Cancelled, LimitError
from ..engine import protocol as st
from ..engine.shard import Shard
from . import node_service_pb2 as pb
from . import node_service_pb2_grpc as pb_grpc
from . import proto
from .auth import TokenCheck, env_token, is_loopback, parse_peers, token_metadata
from .proto import HOP_MARGIN_S, ORIGIN_KEY, describe

NO_DEADLINE_HOP_S = 60.0  # a forward's deadline when the caller set none: every RPC has one
MIN_HOP_S = 0.1
BACKENDS = ("mlx", "torch")
STOP_GRACE_S = 1.0  # in-flight calls get this long to end once the node stops
WORKER_STOP_S = 2.5  # then the engine's worker this long to leave its layer; past it the process exits anyway
MAX_DETAILS_CHARS = 1000  # status details travel in a header: keep them short


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RingNodeError(Exception):
    """An RPC outcome to report: a status code and a message naming the node it is about."""

    def __init__(self, code: grpc.StatusCode, message: str, origin: str):
        super().__init__(message)
        self.code, self.origin = code, origin


class NodeService(pb_grpc.NodeServiceServicer):
    """The servicer: one engine, one shard."""

    def __init__(self, engine, shard: Shard, backend: str, address: str, peers: frozenset[str] = frozenset(),
                 token: str | None = None):
        self.engine, self.shard, self.backend, self.address = engine, shard, backend, address
        self.peers, self._metadata = peers, token_metadata(token)
        self.name = describe(address, shard)
        self._channels: dict[str, grpc.aio.Channel] = {}

    # ----------------------------------------------------------------- RPCs

    async def SendPrompt(self, request: pb.PromptRequest, context) -> pb.PassResult:
        async def run():
            shard = self._own_shard(request.shard)
            if not shard.is_first_layer():
                raise ValueError(f"{self.name} is not the first shard: send the prompt to the node holding layer 0")
            self._route(request.route)
            state = proto.state_from_proto(request.inference_state) if request.HasField("inference_state") else None
            ids = np.asarray(await self.engine.encode(shard, request.prompt)).reshape(1, -1)
            result = await self._pass(request.request_id, ids, state, request.route, context, 0.0)
            result.prompt_tokens.extend(ids[0].tolist())
            return result

        return await self._guard(run(), context)

    async def SendTensor(self, request: pb.TensorRequest, context) -> pb.PassResult:
        async def run():
            t0 = time.perf_counter()
            self._own_shard(request.shard)
            self._route(request.route)
            st.check_size(self.shard, list(request.tensor.shape), self.engine.limits)  # before decoding the bytes
            x = proto.tensor_from_proto(request.tensor)
            state = proto.state_from_proto(request.inference_state) if request.HasField("inference_state") else None
            return await self._pass(request.request_id, x, state, request.route, context, time.perf_counter() - t0)

        return await self._guard(run(), context)

    async def SendResult(self, request: pb.SendResultRequest, context) -> pb.Empty:
        if request.is_finished and request.request_id:
            await self.engine.finish_request(request.request_id)
        return pb.Empty()

    async def HealthCheck(self, request: pb.HealthCheckRequest, context) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(is_healthy=True, shard=proto.shard_to_proto(self.shard), backend=self.backend,
                                      pid=os.getpid())

    # ----------------------------------------------------------------- the pass

    def _own_shard(self, msg: pb.Shard) -> Shard:
        shard = proto.shard_from_proto(msg)
        if shard != self.shard:
            raise ValueError(f"{self.name} holds {self.shard}, not {shard}")
        return shard

    def _route(self, route) -> list[tuple[str, Shard]]:
        """The peers after this node, checked to hold the rest of the model's layers in order."""
        peers = [(p.address, proto.shard_from_proto(p.shard)) for p in route]
        expect = self.shard.end_layer + 1
        for address, s in peers:
            if not address:
                raise ValueError("route: every peer needs an address (host:port)")
            if address not in self.peers:
                known = ", ".join(sorted(self.peers)) if self.peers else "none: start it with --peers"
                raise PermissionError(f"route names {one_line(address, 100)}, which is not among this node's "
                                      f"peers ({known})")
            if (s.model_id, s.n_layers) != (self.shard.model_id, self.shard.n_layers) or s.start_layer != expect:
                raise ValueError(f"route: after layer {expect - 1} of '{self.shard.model_id}' comes "
                                 f"{describe(address, s)} of '{s.model_id}'; the route must hold the next layers")
            expect = s.end_layer + 1
        if expect != self.shard.n_layers:
            raise ValueError(f"route ends at layer {expect - 1} but '{self.shard.model_id}' has "
                             f"{self.shard.n_layers} layers: the last node must hold the last layer")
        return peers

    async def _pass(self, request_id: str, x, state, route, context, decode_s: float) -> pb.PassResult:
        peers = self._route(route)
        t0 = time.perf_counter()
        out, out_state = await self.engine.infer_tensor(request_id, self.shard, x, state)
        t1 = time.perf_counter()
        stats = pb.NodeStats(address=self.address, shard=proto.shard_to_proto(self.shard), backend=self.backend,
                             tokens=int(np.shape(x)[1]), compute_s=t1 - t0, decode_s=decode_s)
        if not peers:
            result = pb.PassResult(inference_state=proto.state_to_proto(out_state))
            stats.encode_s = time.perf_counter() - t1
            result.stats.append(stats)
            return result
        (address, shard), rest = peers[0], peers[1:]
        request = pb.TensorRequest(shard=proto.shard_to_proto(shard), tensor=proto.tensor_to_proto(out),
                                   request_id=request_id, inference_state=proto.state_to_proto(out_state),
                                   route=[pb.Peer(address=a, shard=proto.shard_to_proto(s)) for a, s in rest])
        t2 = time.perf_counter()
        stats.encode_s = t2 - t1
        reply = await self._forward(address, shard, request, context)
        stats.downstream_s = time.perf_counter() - t2
        return pb.PassResult(inference_state=reply.inference_state, stats=[stats, *reply.stats])

    async def _forward(self, address: str, shard: Shard, request: pb.TensorRequest, context) -> pb.PassResult:
        remaining = context.time_remaining()
        timeout = NO_DEADLINE_HOP_S if remaining is None else max(MIN_HOP_S, remaining - HOP_MARGIN_S)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=proto.CHANNEL_OPTIONS)
        try:
            return await pb_grpc.NodeServiceStub(channel).SendTensor(request, timeout=timeout,
                                                                     metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            origin = dict(e.trailing_metadata() or ()).get(ORIGIN_KEY)
            if origin:  # the peer (or one after it) reported: relay as is
                raise RingNodeError(e.code(), e.details(), origin) from None
            # The peer itself failed: gone, unreachable or too slow. For a gone one, a fresh
            # channel next time, so a restarted peer is not kept behind a reconnect backoff.
            if e.code() == grpc.StatusCode.UNAVAILABLE and self._channels.get(address) is channel:
                del self._channels[address]
                await channel.close()
            what = proto.peer_failure(e.code(), timeout)
            raise RingNodeError(e.code(), f"{describe(address, shard)} {what} ({e.code().name}: {e.details()})",
                                address) from None

    async def _guard(self, coro, context):
        """Run an RPC body; report errors with a status code and the node they are about."""
        try:
            return await coro
        except RingNodeError as e:
            code, message, origin = e.code, str(e), e.origin
        except LimitError as e:  # over the model's limits (context, window, tree); refused before computing
            code, message, origin = grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {e}", self.address
        except ValueError as e:  # bad input: shapes, dtypes, state, shard; the engine refused before computing
            code, message, origin = grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}", self.address
        except PermissionError as e:  # a route beyond the peers this node was told about
            code, message, origin = grpc.StatusCode.PERMISSION_DENIED, f"{self.name}: {e}", self.address
        except Cancelled as e:  # the node is stopping (a caller that gave up no longer listens)
            code, message, origin = grpc.StatusCode.CANCELLED, f"{self.name}: {e}", self.address
        except Exception as e:  # noqa: BLE001 - any other failure becomes a status, the node keeps serving
            traceback.print_exc(file=sys.stderr)
            code, message, origin = grpc.StatusCode.INTERNAL, f"{self.name}: {type(e).__name__}: {e}", self.address
        await context.abort(code, one_line(message, MAX_DETAILS_CHARS), trailing_metadata=((ORIGIN_KEY, origin),))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


# --------------------------------------------------------------------------- the process


def make_engine(backend: str, model: str, heads=None, tree=None, max_kv_size=None, device=None, medusa=True):
    from ..engine.downloader import LocalShardDownloader

    dl = LocalShardDownloader()
    if backend == "mlx":
        from .._blas import setup_blas

        setup_blas()  # before the engine imports mlx
        from ..engine.mlx_backend import MedusaMLXInferenceEngine

        return MedusaMLXInferenceEngine(dl, heads=heads, tree=tree, max_kv_size=max_kv_size, medusa=medusa)
    if backend == "torch":
        from ..engine.torch_backend import MedusaTorchInferenceEngine

        return MedusaTorchInferenceEngine(dl, heads=heads, tree=tree, max_kv_size=max_kv_size, device=device,
                                          medusa=medusa)
    raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")


def resolve_heads_and_tree(model: str, heads: str | None, tree: str | None,
                           backend: str = "mlx") -> tuple[str | None, str | None]:
    """The heads and tree the last shard will use, resolved here so the ready line can say so:
    the given ones, else the model's (shipped) heads and the tree tuned beside them for
    this node's ``backend`` (``default_tree_for``)."""
    from pathlib import Path

    from ..engine.downloader import LocalShardDownloader
    from ..core.heads_format import default_tree_for

    if heads is None:
        found = LocalShardDownloader().heads_path(model)
        heads = None if found is None else str(found)
    if tree is None and heads is not None:
        tree = str(default_tree_for(Path(heads), backend))  # a str: tree files are named by string
    return heads, tree


def model_layers(model: str) -> int:
    from ..engine.downloader import LocalShardDownloader, config_layers

    folder = LocalShardDownloader().model_path(model)
    n = config_layers(folder)
    if n is None:
        raise ValueError(f"{folder / 'config.json'} does not give num_hidden_layers")
    return n


def setup_arg_parser() -> argparse.ArgumentParser:
    from ..default_model import DEFAULT_MODEL_ID

    p = argparse.ArgumentParser(prog="mlx_medusa node", allow_abbrev=False, description="Serve one shard of a model to a Medusa ring.")
    p.add_argument("--backend", choices=BACKENDS, default="mlx")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; bind others explicitly)")
    p.add_argument("--port", type=port, default=0, help="port (0: any free one; the ready line gives it)")
    p.add_argument("--model", default=DEFAULT_MODEL_ID, help="model id or local Hugging Face folder")
    p.add_argument("--heads", default=None, help="Medusa heads folder (the last shard uses them)")
    p.add_argument("--tree", default=None, help="tree preset, JSON file, choices or dynamic[:N] (default: the heads' tuned tree)")
    p.add_argument("--start-layer", type=non_negative_int, default=0)
    p.add_argument("--end-layer", type=non_negative_int, default=None, help="inclusive (default: the last layer)")
    p.add_argument("--max-kv-size", type=kv_window, default=None, help="committed KV window per request (rotating)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--peers", default=None,
                   help="comma-separated host:port of the nodes this one may forward to (the launcher passes the "
                        "ring's); without it the node forwards to none, so it can only be the last")
    p.add_argument("--token", default=None,
                   help="shared secret every call must carry (default: $MLX_MEDUSA_RING_TOKEN, else none)")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (the launcher's lifeline)")
    return p


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin closes. Reads the raw descriptor: a thread blocked in ``sys.stdin``'s
    buffered reader holds its lock, and the interpreter aborts when it exits ("Fatal Python error:
    _enter_buffered_busy")."""
    def watch():
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGTERM / SIGINT stops the node; a second one exits at once."""
    def handle(sig: int) -> None:
        if stop.is_set():
            os._exit(128 + sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


async def _load_or_stop(engine, shard: Shard, stop: asyncio.Event) -> bool:
    """Load the shard unless the node is told to stop first; True when loaded."""
    load = asyncio.ensure_future(engine.ensure_shard(shard))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if load.done():
        try:
            load.result()
        except (RuntimeError, OSError) as e:  # the framework's loaders: a file they could not read
            raise ValueError(f"cannot load the model: {e}") from None
        return True
    load.cancel()
    return False


def _exit_now(name: str, why: str) -> None:
    print(f"[{name}] {why}: exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(143)


async def serve(args) -> None:
    n_layers = model_layers(args.model)
    end = n_layers - 1 if args.end_layer is None else args.end_layer
    shard = Shard(args.model, args.start_layer, end, n_layers)
    if args.threads is not None and args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    heads, tree = resolve_heads_and_tree(args.model, args.heads, args.tree, args.backend) if shard.is_last_layer() else (None, None)
    engine = make_engine(args.backend, args.model, heads, tree, args.max_kv_size, args.device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _on_signals(loop, stop)
    if args.watch_stdin:
        _watch_stdin(loop, stop)
    name = describe(format_address(args.host, args.port), shard)
    # Load before serving (a ready node answers at once), unless told to stop meanwhile.
    if not await _load_or_stop(engine, shard, stop):
        if not engine.close(timeout=WORKER_STOP_S):
            _exit_now(name, "stopped while loading its shard")
        return

    interceptors = [TokenCheck(args.token)] if args.token else []
    server = grpc.aio.server(options=proto.SERVER_OPTIONS, interceptors=interceptors)
    try:
        bound = server.add_insecure_port(format_address(args.host, args.port))
    except RuntimeError as e:
        raise SystemExit(f"error: cannot bind {format_address(args.host, args.port)}: {one_line(e)}") from None
    address = format_address(args.host, bound)
    service = NodeService(engine, shard, args.backend, address, args.peers, args.token)
    for check in interceptors:
        check.name = service.name
    pb_grpc.add_NodeServiceServicer_to_server(service, server)
    await server.start()
    print(json.dumps({"event": "ready", "address": address, "pid": os.getpid(), "backend": args.backend,
                      "shard": shard.to_dict(), "heads": heads, "tree": tree}), flush=True)
    print(f"[{service.name}] {args.backend} serving '{args.model}'", file=sys.stderr, flush=True)
    await stop.wait()
    engine.cancel_all()  # a pass in flight stops at its next layer
    await server.stop(grace=STOP_GRACE_S)
    await service.close()
    if not engine.close(timeout=WORKER_STOP_S):
        _exit_now(service.name, f"its worker was still computing {WORKER_STOP_S} s after the stop")


def check_args(args) -> None:
    """Refusals before anything loads (argparse's types did the numbers)."""
    args.token = args.token or env_token()
    args.peers = parse_peers(args.peers)
    if args.end_layer is not None and args.end_layer < args.start_layer:
        raise ValueError(f"--end-layer {args.end_layer} is before --start-layer {args.start_layer}")
    if not is_loopback(args.host) and not args.token:
        print(f"warning: binding {args.host} without a token: anyone who reaches this port can run the model. "
              "Set --token or $MLX_MEDUSA_RING_TOKEN on every node and the client.", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        check_args(args)
        # Until serve() takes the signals over: SIGTERM exits as Ctrl-C does, without a traceback.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        asyncio.run(serve(args))
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
