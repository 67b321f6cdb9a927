"""The gRPC ring across processes, on loopback: 3 nodes (MLX 0-9, torch 10-19, MLX 20-29) on the
default model give exactly a single process's tokens; a node that dies or hangs fails the request
quickly, naming it, and rejoins after a restart; malformed messages are refused and the node keeps
serving. One ring serves the whole module (starting processes is the slow part)."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("torch")

import grpc  # noqa: E402

from exo_medusa_mlx.engine import protocol as st  # noqa: E402
from exo_medusa_mlx.ring import node_service_pb2 as pb  # noqa: E402
from exo_medusa_mlx.ring import node_service_pb2_grpc as pb_grpc  # noqa: E402
from exo_medusa_mlx.ring import proto  # noqa: E402
from exo_medusa_mlx.ring.client import RingError  # noqa: E402
from exo_medusa_mlx.ring.launcher import LocalRing  # noqa: E402

BACKENDS = ("mlx", "torch", "mlx")
TREE = "cpu-8"
PROMPT = "Write a short story about a robot who learns to paint."
N = 24
SHIPPED = os.path.join(os.path.dirname(__file__), "..", "exo_medusa_mlx", "shipped", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def heads():
    # The shipped heads are tracked in git: without them the ring would test nothing speculative.
    assert os.path.isfile(os.path.join(SHIPPED, "medusa_lm_head.safetensors")), f"shipped heads missing in {SHIPPED}"
    return SHIPPED


def reference(heads) -> dict:
    """Single-process MLX tokens: the text prompt (raw) and the chat-templated one, N each."""
    from exo_medusa_mlx.core.step import generate_step
    from exo_medusa_mlx.core.tokens import apply_template, encode_prompt
    from exo_medusa_mlx.heads import load_heads
    from exo_medusa_mlx.loading import load
    from exo_medusa_mlx.model import MedusaModel
    from exo_medusa_mlx.core.tree import build_tree, tree_choices

    model, tokenizer = load(None, tree=TREE)
    model = MedusaModel(model.base, load_heads(heads, model.hidden_size, model.vocab_size),
                        build_tree(tree_choices(TREE)))

    def run(ids):
        out = []
        for s in generate_step(ids, model):
            out += s.tokens
            if len(out) >= N:
                return out[:N]

    raw = encode_prompt(tokenizer, PROMPT)
    chat = np.asarray(apply_template(tokenizer, PROMPT, None, True))
    return {"raw_ids": raw.tolist(), "raw": run(raw), "chat_ids": chat.tolist(), "chat": run(chat)}


@pytest.fixture(scope="module")
def setup(heads, tmp_path_factory):
    ring = LocalRing(BACKENDS, heads=heads, tree=TREE, threads=1, start_timeout=240,
                     log_dir=tmp_path_factory.mktemp("ring-logs"))
    ring.start(wait=False)
    try:
        ref = reference(heads)  # while the nodes load
        ring.wait_ready()
        yield ring, ref
    finally:
        ring.close()


@pytest.fixture
def ring(setup):
    return setup[0]


@pytest.fixture
def ref(setup):
    return setup[1]


def stub(address: str, **options) -> pb_grpc.NodeServiceStub:
    return pb_grpc.NodeServiceStub(grpc.insecure_channel(address, options=list(options.items())))


def healthy(ring) -> list[bool]:
    return [stub(n.address).HealthCheck(pb.HealthCheckRequest(), timeout=5).is_healthy for n in ring.nodes]


# --------------------------------------------------------------------------- exactness


def test_three_processes_equal_a_single_process_medusa_on(ring, ref):
    passes = []
    with ring.client(timeout=60) as client:
        result = client.generate(PROMPT, N, medusa=True, on_tokens=passes.append)  # the first node encodes
    assert result.prompt_tokens == ref["raw_ids"]
    assert result.tokens == ref["raw"]
    # Streamed pass by pass, with every node's timings.
    assert sum(passes, []) == result.tokens and len(passes) == result.passes + 1
    assert [(t.backend, t.start_layer, t.end_layer) for t in result.nodes] == [
        ("mlx", 0, 9), ("torch", 10, 19), ("mlx", 20, 29)]
    assert all(t.passes == result.passes + 1 and t.compute_s > 0 for t in result.nodes)
    # The shipped heads accept about 1.3 tokens per pass on this raw prompt (single process, cpu-8).
    assert result.mean_accepted > 1.1 and result.transport_s > 0


def test_three_processes_equal_a_single_process_medusa_off(ring, ref):
    with ring.client(timeout=60) as client:
        result = client.generate(ref["chat_ids"], N, medusa=False)  # token ids: SendTensor
    assert result.tokens == ref["chat"]
    assert result.passes == N - 1


# --------------------------------------------------------------------------- bad messages


def test_malformed_messages_are_refused_and_the_node_keeps_serving(ring, ref):
    first, middle, last = ring.nodes
    route = [pb.Peer(address=last.address, shard=proto.shard_to_proto(last.shard))]
    good = np.zeros((1, 3, 576), np.float32)

    def send(tensor=None, state=None, shard=middle.shard, to=middle, route=route, channel_opts=None, **tensor_kw):
        t = tensor if tensor is not None else proto.tensor_to_proto(good)
        for k, v in tensor_kw.items():
            setattr(t, k, v)
        request = pb.TensorRequest(shard=proto.shard_to_proto(shard), tensor=t, request_id="bad", route=route,
                                   inference_state=state if state is not None else proto.state_to_proto({}))
        with pytest.raises(grpc.RpcError) as info:
            stub(to.address, **(channel_opts or {})).SendTensor(request, timeout=30)
        return info.value.code(), info.value.details()

    def expect_invalid(fragment, **kw):
        code, details = send(**kw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert fragment in details and (kw.get("to") or middle).address in details, details

    expect_invalid("hidden states of shape (1, T, 576)", tensor=proto.tensor_to_proto(np.zeros((1, 3, 577), np.float32)))
    expect_invalid("hidden states of shape (1, T, 576)", tensor=proto.tensor_to_proto(np.zeros((1, 3, 576))))  # float64
    expect_invalid("tensor dtype 'float128' is not one of", dtype="float128")
    expect_invalid("tensor dtype 'bfloat16' is not one of", dtype="bfloat16")
    expect_invalid("needs 6912 bytes, got 6908", tensor_data=good.tobytes()[:-4])
    expect_invalid("non-negative ints", tensor=pb.Tensor(tensor_data=b"", shape=[1, -3, 576], dtype="float32"))
    expect_invalid("not valid JSON", state=pb.InferenceState(other_data_json="{not json"))
    expect_invalid("must hold an object", state=pb.InferenceState(other_data_json="[1, 2]"))
    expect_invalid("['x']: tensor dtype 'float128'", state=pb.InferenceState(
        tensor_list_data={"x": pb.TensorList(tensors=[pb.Tensor(tensor_data=b"", shape=[0], dtype="float128")])}))
    expect_invalid("expected non-empty int array", state=pb.InferenceState(
        tensor_data={st.DEPTHS: proto.tensor_to_proto(np.zeros(3, np.float32))}))
    expect_invalid("holds", shard=first.shard)  # not this node's layers
    expect_invalid("route ends at layer 19", route=[])
    expect_invalid("token ids of shape (1, T)", to=first, shard=first.shard, route=[
        pb.Peer(address=n.address, shard=proto.shard_to_proto(n.shard)) for n in (middle, last)])
    # Over the 256 MiB limit: refused by gRPC itself (a client with no send limit).
    code, _ = send(tensor=pb.Tensor(tensor_data=b"\0" * (257 << 20), shape=[1, 1, 1], dtype="uint8"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert healthy(ring) == [True, True, True]
    with ring.client(timeout=60) as client:
        assert client.generate(ref["raw_ids"], 8).tokens == ref["raw"][:8]


# --------------------------------------------------------------------------- failures


def test_a_hung_node_fails_the_request_in_time_naming_it(ring, ref):
    last = ring.nodes[2]
    pid = ring.pids()[2]
    outcome: list[BaseException] = []

    def ask():
        with ring.client(timeout=6) as client:
            try:
                client.generate(ref["raw_ids"], N)
            except RingError as e:
                outcome.append(e)

    os.kill(pid, signal.SIGSTOP)
    try:
        # The request ends by its own deadline while the node is still stopped (it would never answer);
        # the join's bound only ends a client that waits past its deadline.
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        asker.join(60)
        assert not asker.is_alive(), "the client kept waiting for a node that will not answer"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert outcome, "the request did not fail"
    assert f"node {last.address} (layers 20-29) did not answer" in str(outcome[0])
    with ring.client(timeout=60) as client:
        assert client.generate(ref["raw_ids"], 8).tokens == ref["raw"][:8]


def test_a_killed_node_fails_the_request_naming_it_and_rejoins_after_restart(ring, ref):
    middle = ring.nodes[1]
    old_pid = ring.pids()[1]
    killed = []

    def kill_after_first_pass(tokens):
        if not killed:
            ring.kill(1)
            killed.append(1)

    with ring.client(timeout=60) as client:
        with pytest.raises(RingError) as info:
            client.generate(ref["raw_ids"], N, on_tokens=kill_after_first_pass)
        # Unreachable (the connection refused), not "did not answer": failed at once, not at the deadline.
        assert f"node {middle.address} (layers 10-19) is unreachable" in str(info.value)
        assert info.value.node == middle.address
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)
        # The others still serve; the restarted node takes its old address and the ring works again.
        for n in (ring.nodes[0], ring.nodes[2]):
            assert stub(n.address).HealthCheck(pb.HealthCheckRequest(), timeout=5).is_healthy
        assert ring.restart(1) == middle and ring.pids()[1] != old_pid
        assert client.generate(ref["raw_ids"], N).tokens == ref["raw"]  # the same client: it reconnects


def test_close_leaves_no_process(ring):
    pids = [p for p in ring.pids() if p is not None]
    assert len(pids) == 3
    ring.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
