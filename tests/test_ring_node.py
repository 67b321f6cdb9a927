"""A ring node process (``ring/node.py``) against the bad-input catalogue of messages: a live two-node
ring on loopback (a tiny model, a token, each node told only of the other) refuses every malformed,
oversized or unauthorised message with the right gRPC status and a one-line message, before any work,
and after each one still answers HealthCheck and a normal request, token for token, with no more work
than usual; also under a flood. A third node on a slower tiny model with a long context shows that a
pass stops when its client's deadline passes (its session is gone when the next request is served),
and that SIGTERM stops a busy node cleanly. One ring and one node serve the whole module.

Work is measured as the nodes' CPU time, never as wall-clock time: on a shared machine a request
may wait for a core, but it cannot compute more than it should."""

from __future__ import annotations

import concurrent.futures
import importlib
import os
import signal
import threading
import time
from statistics import median
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("grpc")

import grpc  # noqa: E402
import mlx.core as mx  # noqa: E402

from exo_medusa_mlx.core.heads_format import MedusaConfig  # noqa: E402
from exo_medusa_mlx.core.tree import build_tree, tree_choices  # noqa: E402
from exo_medusa_mlx.exo import Shard  # noqa: E402
from exo_medusa_mlx.engine import protocol as st  # noqa: E402
from exo_medusa_mlx.heads import MedusaHeads  # noqa: E402
from exo_medusa_mlx.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.ring import node_service_pb2 as pb  # noqa: E402
from exo_medusa_mlx.ring import node_service_pb2_grpc as pb_grpc  # noqa: E402
from exo_medusa_mlx.ring import proto  # noqa: E402
from exo_medusa_mlx.ring.launcher import LocalRing  # noqa: E402
from helpers.events import cpu_seconds, wait_until  # noqa: E402
from helpers.folders import save_folder, save_hf_folder  # noqa: E402
from helpers.oracle import PROMPT, reference  # noqa: E402
from helpers.processes import NOISE, NodeProcess, gone  # noqa: E402
from helpers.tiny import CONFIGS, N_LAYERS, VOCAB, random_heads, tiny_base  # noqa: E402

TOKEN = "s3cret-ring-token"
MD = (("ring-token", TOKEN),)
CONTEXT = CONFIGS["llama"]["max_position_embeddings"]  # 512
NORMAL = 8  # tokens of the normal request after each case
SLOW = dict(CONFIGS["llama"], hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            max_position_embeddings=32768)
LONG = 16000  # tokens of a long prompt on the slow node: about a minute of prefill on one core
REFUSAL_CPU_S = 5.0  # a refusal's CPU time at most (the refused passes would take minutes to hours)
Code = grpc.StatusCode


def slow_base():
    mod = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(3)
    model = mod.Model(mod.ModelArgs.from_dict(SLOW))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(4)
    folder = save_hf_folder(tmp / "tiny", "llama", base, heads)
    slow = save_folder(tmp / "slow", SLOW, slow_base(),
                       MedusaHeads(MedusaConfig(num_heads=2, hidden_size=256, vocab_size=VOCAB)))
    ring = LocalRing(["mlx", "mlx"], model=str(folder), tree="cpu-8", threads=1, token=TOKEN,
                     start_timeout=240, log_dir=tmp / "logs")
    ring.start(wait=False)
    node = NodeProcess(["--model", str(slow), "--tree", "chain-1"], tmp / "slow.log")
    try:
        ref = reference(MedusaModel(base, heads, build_tree(tree_choices("cpu-8"))), n=NORMAL)
        ring.wait_ready()
        node.wait_ready()
        env = SimpleNamespace(ring=ring, ref=ref, node=node, baseline=0.0, folder=folder)
        env.baseline = median(normal_request(env)[1] for _ in range(3))
        yield env
    finally:
        ring.close()
        node.stop()
    # A normal stop (SIGTERM from the launcher, stdin closed) is clean: exit 0, no abort in the logs.
    for n in ring._nodes:
        log = n.log.read_text()
        assert n.proc.returncode == 0, log[-2000:]
        assert not any(w in log for w in NOISE), log[-2000:]


def stub(address: str) -> pb_grpc.NodeServiceStub:
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return pb_grpc.NodeServiceStub(grpc.insecure_channel(address, options=unlimited))


def ring_cpu(env) -> float:
    """CPU seconds the ring's node processes have used so far."""
    return sum(cpu_seconds(pid) for pid in env.ring.pids())


def normal_request(env) -> tuple[list[int], float]:
    """A normal request's tokens and the CPU seconds the ring spent meanwhile."""
    cpu = ring_cpu(env)
    with env.ring.client(timeout=30) as client:
        tokens = client.generate(PROMPT, NORMAL).tokens
    return tokens, ring_cpu(env) - cpu


def still_serves(env) -> None:
    """HealthCheck on every node (within its deadline), then a normal request: the same tokens, and no
    more work than a normal request does (leftover work from the case would show here)."""
    for n in env.ring.nodes:
        assert stub(n.address).HealthCheck(pb.HealthCheckRequest(), timeout=5, metadata=MD).is_healthy
    tokens, cpu = normal_request(env)
    assert tokens == env.ref
    assert cpu < 3 * env.baseline + 1.0, (cpu, env.baseline)


# --------------------------------------------------------------------------- the catalogue


def ids(n: int, value: int = 1):
    return proto.tensor_to_proto(np.full((1, n), value, np.int64))


def hidden(n: int, width: int = 64, dtype=np.float32):
    return proto.tensor_to_proto(np.zeros((1, n, width), dtype))


def state(**values):
    return proto.state_to_proto({**st.initial_state(), **values})


def raw_state(text: str):
    return pb.InferenceState(other_data_json=text)


def arrays_state(**arrays):
    """A state carrying ``arrays`` as they are, past the sender's own checks."""
    msg = state()
    for k, v in arrays.items():
        msg.tensor_data[k].CopyFrom(proto.tensor_to_proto(v))
    return msg


def tree_state(n: int):
    """A state naming a tree of ``n`` nodes (checked before its mask is)."""
    return arrays_state(**{st.DEPTHS: np.arange(n, dtype=np.int64)})


def request(env, to: int, tensor=None, st_=None, route=None, shard=None, rid=None, method="SendTensor", prompt=None):
    nodes = env.ring.nodes
    own = proto.shard_to_proto(nodes[to].shard if shard is None else shard)
    if route is None:
        route = [pb.Peer(address=n.address, shard=proto.shard_to_proto(n.shard)) for n in nodes[to + 1:]]
    common = dict(shard=own, request_id=rid if rid is not None else f"bad-{time.monotonic_ns()}",
                  inference_state=st_ if st_ is not None else state(), route=route)
    if method == "SendPrompt":
        return pb.PromptRequest(prompt=prompt, **common)
    return pb.TensorRequest(tensor=tensor if tensor is not None else ids(3), **common)


def peer(address: str, start: int, end: int):
    return pb.Peer(address=address, shard=proto.shard_to_proto(Shard("x", start, end, N_LAYERS)))


# (name, node, build(env) -> request, status, fragment); node 0 holds layers 0-1, node 1 layers 2-3.
R = Code.RESOURCE_EXHAUSTED
I = Code.INVALID_ARGUMENT
CASES = [
    ("26M token ids (the MLX segfault)", 0, lambda e: request(e, 0, ids(26_000_000, 0)), R,
     "the pass carries 26000000 tokens, more than the model's context of 512"),
    ("a 1M-token prompt", 0, lambda e: request(e, 0, ids(1_000_000)), R, "1000000 tokens, more than the model's context"),
    ("a prompt one over the context", 0, lambda e: request(e, 0, ids(CONTEXT + 1)), R, "513 tokens, more than"),
    ("a prompt filling the context", 0, lambda e: request(e, 0, ids(CONTEXT)), R,
     "the prompt has 512 tokens, the model's context is 512"),
    ("hidden states over the context", 1, lambda e: request(e, 1, hidden(600)), R, "600 tokens, more than"),
    ("a text prompt of 9M characters", 0, lambda e: request(e, 0, method="SendPrompt", prompt="t1 " * 3_000_000), R,
     "prompt has 9000000 characters"),
    ("a text prompt of 600 tokens", 0, lambda e: request(e, 0, method="SendPrompt", prompt="t1 " * 600), R,
     "600 tokens, more than"),
    ("a tree of 300 nodes", 1, lambda e: request(e, 1, hidden(300), tree_state(300)), R,
     "a tree of 300 nodes, more than the limit of 256"),
    ("a 257 MiB message", 0, lambda e: request(e, 0, pb.Tensor(tensor_data=b"\0" * (257 << 20), shape=[1, 1],
                                                             dtype="uint8")), R, ""),
    ("a route to an unknown address", 0, lambda e: request(e, 0, route=[peer("10.0.0.1:80", 2, 3)]),
     Code.PERMISSION_DENIED, "route names 10.0.0.1:80, which is not among this node's peers"),
    ("a route back to the first node", 1, lambda e: request(e, 1, hidden(3), route=[
        peer(e.ring.nodes[0].address, 0, 1)]), I, "the route must hold the next layers"),
    ("a route to a port of this host", 1, lambda e: request(e, 1, hidden(3), route=[
        peer("127.0.0.1:22", 0, 1)]), Code.PERMISSION_DENIED, "route names 127.0.0.1:22, which is not among"),
    ("a route with an empty address", 0, lambda e: request(e, 0, route=[peer("", 2, 3)]), I,
     "every peer needs an address"),
    ("a route that stops short", 0, lambda e: request(e, 0, route=[]), I, "route ends at layer 1"),
    ("a route to the right peer with other layers", 0,
     lambda e: request(e, 0, route=[pb.Peer(address=e.ring.nodes[1].address, shard=proto.shard_to_proto(
         Shard(e.ring.nodes[0].shard.model_id, 3, 3, N_LAYERS)))]), I, "the route must hold the next layers"),
    ("a state nested 100k deep", 0, lambda e: request(e, 0, st_=raw_state("[" * 100_000 + "]" * 100_000)), I,
     "other_data_json is nested too deeply"),
    ("NaN in the state", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_temp": NaN}')), I,
     "other_data_json holds NaN"),
    ("Infinity in the state", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_top_p": Infinity}')), I,
     "other_data_json holds Infinity"),
    ("a temperature of 1e999", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_temp": 1e999}')), I,
     "temperature inf must be a finite number >= 0"),
    ("a negative temperature", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_temp": -1}')), I,
     "temperature -1 must be"),
    ("top-p 0", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_top_p": 0}')), I, "top-p 0 must be in (0, 1]"),
    ("an unknown acceptance", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_acceptance": "fast"}')), I,
     "'fast' is not one of"),
    ("a seed that is a string", 0, lambda e: request(e, 0, st_=raw_state('{"medusa_seed": "7"}')), I, "expected int"),
    ("a state that is a JSON list", 0, lambda e: request(e, 0, st_=raw_state("[1, 2]")), I, "must hold an object"),
    ("a state that is not JSON", 0, lambda e: request(e, 0, st_=raw_state("{nope")), I, "is not valid JSON"),
    ("token ids past the vocabulary", 0, lambda e: request(e, 0, ids(3, VOCAB)), I, "token ids must be in [0, 96)"),
    ("negative token ids", 0, lambda e: request(e, 0, ids(3, -1)), I, "token ids must be in [0, 96)"),
    ("floats to the first node", 0, lambda e: request(e, 0, hidden(3)), I, "token ids of shape (1, T)"),
    ("hidden states of the wrong width", 1, lambda e: request(e, 1, hidden(3, 65)), I, "hidden states of shape (1, T, 64)"),
    ("float64 hidden states", 1, lambda e: request(e, 1, hidden(3, dtype=np.float64)), I, "float32 or float16"),
    ("a tensor of 9 dims", 0, lambda e: request(e, 0, pb.Tensor(tensor_data=b"\0" * 8, shape=[1] * 9, dtype="int64")),
     I, "tensor shape has 9 dims; at most 8 travel"),
    ("bytes short of the shape", 0, lambda e: request(e, 0, pb.Tensor(tensor_data=b"\0" * 10, shape=[1, 3],
                                                                    dtype="int64")), I, "needs 24 bytes, got 10"),
    ("an object dtype", 0, lambda e: request(e, 0, pb.Tensor(tensor_data=b"", shape=[1, 0], dtype="object")), I,
     "tensor dtype 'object' is not one of"),
    ("a negative dimension", 0, lambda e: request(e, 0, pb.Tensor(tensor_data=b"", shape=[1, -3], dtype="int64")), I,
     "non-negative ints"),
    ("another node's layers", 0, lambda e: request(e, 0, shard=e.ring.nodes[1].shard), I, "holds"),
    ("layers beyond the model", 0, lambda e: request(e, 0, shard=SimpleNamespace(
        model_id="m", start_layer=5, end_layer=9, n_layers=8)), I, "outside its 8 layers"),
    ("the prompt to the second node", 1, lambda e: request(e, 1, method="SendPrompt", prompt="t1 t2"), I,
     "is not the first shard"),
    ("a commit for an unknown request", 0, lambda e: request(e, 0, st_=state(**{st.COMMIT: np.array([0, 1])})), I,
     "unknown request id"),
    ("positions of an unknown request", 0, lambda e: request(e, 0, st_=state(**{st.POSITIONS: np.array([5, 6, 7])})), I,
     "unknown request id"),
    ("a mask that is not a tree", 1, lambda e: request(e, 1, hidden(3), arrays_state(**{
        st.DEPTHS: np.array([0, 1, 1]), st.TREE_MASK: np.eye(3, dtype=bool)})), I, "not a tree"),
    ("tokens that disagree with the ids", 0, lambda e: request(e, 0, ids(3), state(**{st.TOKENS: np.array([2, 2, 2])})),
     I, "differs from the input token ids"),
    ("an empty request id", 0, lambda e: request(e, 0, rid=""), I, "request_id must be a non-empty string"),
]


@pytest.mark.parametrize("name,to,build,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_message_is_refused_and_the_ring_still_serves(setup, name, to, build, code, fragment):
    node = setup.ring.nodes[to]
    req = build(setup)
    method = "SendPrompt" if isinstance(req, pb.PromptRequest) else "SendTensor"
    cpu = ring_cpu(setup)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub(node.address), method)(req, timeout=30, metadata=MD)
    cpu = ring_cpu(setup) - cpu
    e = info.value
    assert e.code() == code, (e.code(), e.details())
    assert fragment in e.details() and "\n" not in e.details() and len(e.details()) <= 1000, e.details()
    if code != Code.RESOURCE_EXHAUSTED or fragment:  # the node answered (not gRPC's own size limit)
        assert node.address in e.details()
        assert cpu < REFUSAL_CPU_S, cpu  # refused before any work: no long computation
    still_serves(setup)


@pytest.mark.parametrize("how", ["no token", "a wrong token", "a tensor without a token"])
def test_calls_without_the_token_are_refused(setup, how):
    node = setup.ring.nodes[0]
    with pytest.raises(grpc.RpcError) as info:
        if how == "no token":
            stub(node.address).HealthCheck(pb.HealthCheckRequest(), timeout=5)
        elif how == "a wrong token":
            stub(node.address).HealthCheck(pb.HealthCheckRequest(), timeout=5, metadata=(("ring-token", "guess"),))
        else:
            stub(node.address).SendTensor(request(setup, 0), timeout=5)
    assert info.value.code() == Code.UNAUTHENTICATED and node.address in info.value.details()
    still_serves(setup)


def test_a_prompt_that_is_not_utf8_is_refused(setup):
    """Bytes no client library would send in a string field: gRPC's own decoder refuses them
    (UNKNOWN, one line, before the servicer runs) and the node keeps serving."""
    first = setup.ring.nodes[0]
    raw = request(setup, 0, method="SendPrompt", prompt="t1 XX").SerializeToString().replace(b"t1 XX", b"t1 \xff\xfe")
    channel = grpc.insecure_channel(first.address)
    call = channel.unary_unary("/exo_medusa_ring.NodeService/SendPrompt", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=10, metadata=MD)
    assert info.value.code() == Code.UNKNOWN and "bad UTF-8" in info.value.details()
    assert "\n" not in info.value.details()
    still_serves(setup)


def test_a_pass_past_the_context_end_is_refused(setup):
    """A known request near the end of the context: a pass that would run past it is refused."""
    node = setup.ring.nodes[0]
    rid = "near-the-end"
    s = stub(node.address)
    s.SendTensor(request(setup, 0, ids(500), rid=rid), timeout=30, metadata=MD)  # fits: 500 of 512
    with pytest.raises(grpc.RpcError) as info:
        s.SendTensor(request(setup, 0, ids(20), state(**{st.POSITIONS: np.arange(500, 520)}), rid=rid), timeout=30,
                     metadata=MD)
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    assert "would fill positions 500..519, past the model's context of 512 tokens" in info.value.details()
    still_serves(setup)


def test_a_flood_of_oversized_requests_leaves_the_ring_serving(setup):
    first = setup.ring.nodes[0]
    big = request(setup, 0, ids(1_000_000))
    health: list = []  # each HealthCheck during the flood: True, or the error that ended it
    flooding, stop = threading.Event(), threading.Event()

    def check_health():
        assert flooding.wait(60)
        while not stop.is_set() or not health:  # at least one while the flood arrives
            try:
                health.append(stub(first.address).HealthCheck(pb.HealthCheckRequest(), timeout=5,
                                                              metadata=MD).is_healthy)
            except grpc.RpcError as e:
                health.append(e.code())
            time.sleep(0.05)

    def flood(_):
        flooding.set()
        try:
            stub(first.address).SendTensor(big, timeout=60, metadata=MD)
        except grpc.RpcError as e:
            return e.code()

    watcher = threading.Thread(target=check_health, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(flood, range(24)))
            still_serves(setup)  # while the flood may still be arriving
    finally:
        stop.set()
        watcher.join(30)
    assert codes == [Code.RESOURCE_EXHAUSTED] * 24
    assert health and all(h is True for h in health), health  # each answered within its deadline
    still_serves(setup)


# --------------------------------------------------------------------------- deadlines and SIGTERM (slow node)


def slow_request(node: NodeProcess, ids_: np.ndarray, rid: str, values: dict | None = None) -> pb.TensorRequest:
    shard = Shard(**node.ready["shard"])
    return pb.TensorRequest(shard=proto.shard_to_proto(shard), tensor=proto.tensor_to_proto(ids_[None]),
                            request_id=rid, inference_state=state(**(values or {})))


@pytest.fixture(scope="module")
def slow(setup):
    return setup.node


def test_a_pass_whose_deadline_passed_stops_and_the_next_is_served_at_once(slow):
    s = stub(slow.address)
    long = np.random.default_rng(0).integers(0, VOCAB, LONG)
    with pytest.raises(grpc.RpcError) as info:
        s.SendTensor(slow_request(slow, long, "long"), timeout=1.5)
    assert info.value.code() == Code.DEADLINE_EXCEEDED
    # The node's one worker serves passes in turn: the short one is answered after the long one stopped.
    result = s.SendTensor(slow_request(slow, np.arange(1, 9), "short"), timeout=120)
    assert len(st.emitted_tokens(proto.state_from_proto(result.inference_state))) == 1
    # ... stopped, not finished: a finished prefill would have kept the request's cache.
    with pytest.raises(grpc.RpcError) as info:
        s.SendTensor(slow_request(slow, np.arange(1, 2), "long", {st.POSITIONS: np.array([LONG])}), timeout=30)
    assert info.value.code() == Code.INVALID_ARGUMENT and "unknown request id 'long'" in info.value.details()


def test_sigterm_stops_a_busy_node_within_seconds_cleanly(slow):
    s = stub(slow.address)
    long = np.random.default_rng(1).integers(0, VOCAB, LONG)
    outcome: list = []

    def call():
        try:
            s.SendTensor(slow_request(slow, long, "busy"), timeout=120)
            outcome.append("answered")
        except grpc.RpcError as e:
            outcome.append(e.code())

    cpu = cpu_seconds(slow.proc.pid)
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    # Inside the prefill: the idle node has computed a CPU second of it.
    assert wait_until(lambda: cpu_seconds(slow.proc.pid) - cpu >= 1.0, 120), "the node never began the pass"
    os.kill(slow.proc.pid, signal.SIGTERM)
    rc = slow.proc.wait(timeout=60)
    caller.join(10)
    log = slow.log.read_text()
    # 0: the worker left its layer within the node's own bound (WORKER_STOP_S), not the 143 fallback.
    assert rc == 0, (rc, log[-2000:])
    assert not any(w in log for w in NOISE), log[-2000:]
    assert outcome and outcome[0] in (Code.CANCELLED, Code.UNAVAILABLE), outcome
    assert gone(slow.proc.pid, 1)
