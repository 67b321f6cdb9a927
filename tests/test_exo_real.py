"""Our engines in exo 0.0.x's own code (EXO_SRC, else ../shared/exo-0.0.x/: see helpers/exo_harness.py).

In this process, on a tiny model: exo's own ``test_inference_engine()`` through exo's
downloader, with heads beside the model, from a heads repo in the model card, or none;
exo's serializer on both of its branches (numpy on Linux, MLX on macOS); ``install()``.
As processes, on the default model, one BLAS thread each: ``exo/main.py`` rings on
loopback, stock and under ``mlx_medusa exo``, answering as mlx-lm's own greedy decoding.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import os
import re
import sys

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.default_model import default_model_path
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, install
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine.wire import state_from_proto as from_proto, state_to_proto as to_proto
from exo_medusa_mlx.engine.results import process_result
from exo_medusa_mlx.model import MedusaModel
from helpers.exo_harness import EXO_MODULES, MEDUSA, STOCK, ExoRing, exo_source, seed_download
from helpers.engines import OracleEngine, llama, stock_ring  # noqa: F401 (llama: a fixture)
from helpers.folders import save_hf_folder
from helpers.oracle import N, PROMPT, reference
from helpers.tiny import N_LAYERS, random_heads, tiny_base

SRC, WHY = exo_source()
REQUIRE = os.environ.get("EXO_MEDUSA_REQUIRE_ALL") == "1" and os.environ.get("EXO_SRC")
if SRC is None and REQUIRE:
    raise RuntimeError(f"EXO_SRC is set for this run but unusable: {WHY}")
pytestmark = pytest.mark.skipif(SRC is None, reason=WHY)

OURS = ("MedusaMLXInferenceEngine", "MedusaTorchInferenceEngine")
QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.")


@pytest.fixture(scope="module")
def exo_src():
    """exo importable in this process for the module's tests, then forgotten again (other
    modules test a stand-in exo package of the same name)."""
    os.environ.setdefault("DEV", "PYTHON")
    sys.path.insert(0, str(SRC))
    try:
        for name in EXO_MODULES:
            importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("EXO_MEDUSA_REQUIRE_ALL") == "1":
            raise
        pytest.skip(f"exo's imports are not installed ({e}); pip install -e '.[test]'")
    yield SRC
    sys.path.remove(str(SRC))
    for name in [m for m in sys.modules if m == "exo" or m.startswith("exo.")]:
        del sys.modules[name]


@pytest.fixture
def exo_home(exo_src, tmp_path, monkeypatch):
    """exo's home and temporary files under tmp_path, no network."""
    import tempfile

    home = tmp_path / "exo-home"
    (home / "tmp").mkdir(parents=True)
    monkeypatch.setenv("EXO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(home / "tmp"))  # exo keeps its file lists there
    return home


def exos_engine_test(src):
    """exo's own ``test_inference_engine`` coroutine, taken from its module without running the
    module (at import it runs exo's MLX engine on a model it downloads)."""
    from exo.inference.inference_engine import InferenceEngine
    from exo.inference.shard import Shard as ExoShard

    path = src / "exo" / "inference" / "test_inference_engine.py"
    fn = next(n for n in ast.parse(path.read_text()).body
              if isinstance(n, ast.AsyncFunctionDef) and n.name == "test_inference_engine")
    ns = {"InferenceEngine": InferenceEngine, "Shard": ExoShard, "np": np}
    exec(compile(ast.Module([fn], []), str(path), "exec"), ns)
    return ns["test_inference_engine"]


async def medusa_ring(pairs, prompt, n: int, hop, rid: str = "medusa"):
    """Our protocol through ``pairs``, every state through ``hop`` (a serializer) before each shard."""
    x, state, out = prompt[None], st.initial_state(), []
    while True:
        for engine, shard in pairs:
            x, state = await engine.infer_tensor(rid, shard, x, hop(state))
        step = await process_result(pairs[-1][0], x, state, n_generated=len(out), max_tokens=n)
        out += step.tokens
        if step.finished:
            return out
        x, state = step.next_input, step.next_state


# --------------------------------------------------------------------------- in this process


@pytest.mark.parametrize("heads_at", ["beside", "card", "none"])
def test_exos_engine_test_through_exos_downloader(exo_home, tmp_path, heads_at, caplog):
    from exo.download.new_shard_download import new_shard_downloader
    from exo.models import model_cards

    model_id = f"tiny-{heads_at}"  # one per case: a model without heads is reported once per process
    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(4)
    folder = save_hf_folder(tmp_path / "model", "llama", base, heads if heads_at == "beside" else None)
    seed_download(exo_home, f"test/{model_id}", folder)
    card = {"layers": N_LAYERS, "repo": dict.fromkeys(OURS, f"test/{model_id}")}
    if heads_at == "card":
        heads.save(tmp_path / "heads")
        seed_download(exo_home, "test/tiny-heads", tmp_path / "heads")
        card["medusa"] = "test/tiny-heads"
    model_cards[model_id] = card
    try:
        dl = new_shard_downloader()  # exo's own, as its main builds it
        e1, e2 = (MedusaMLXInferenceEngine(dl, tree="cpu-8") for _ in range(2))
        with caplog.at_level("WARNING", logger="exo_medusa_mlx.exo"):
            asyncio.run(exos_engine_test(SRC)(e1, e2, model_id, N_LAYERS))
        assert (e2.model.heads is not None) == (heads_at != "none")  # e2 holds the last layer
        said = [r for r in caplog.records if f"no Medusa heads for '{model_id}'" in r.getMessage()]
        assert len(said) == (heads_at == "none")  # two engines loaded the last layer; said once
        # Medusa through the same engines and exo's downloader: plain greedy decoding's tokens.
        pairs = [(e1, Shard(model_id, 0, 1, N_LAYERS)), (e2, Shard(model_id, 2, N_LAYERS - 1, N_LAYERS))]
        got = asyncio.run(medusa_ring(pairs, PROMPT, N, hop=lambda s: s))
        assert got == reference(MedusaModel(base, None), medusa=False)
        assert model_id + "/medusa" not in model_cards  # the heads repo's transient card is gone
    finally:
        model_cards.pop(model_id, None)


@pytest.mark.parametrize("branch", ["linux", "macos"])
def test_exos_serializer_branches(exo_src, llama, monkeypatch, branch):
    from exo.networking.grpc import grpc_peer_handle, grpc_server, node_service_pb2
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.networking.grpc.grpc_server import GRPCServer

    if branch == "macos":  # exo imports mlx.core as mx on Apple Silicon, numpy as mx elsewhere
        monkeypatch.setattr(grpc_peer_handle, "mx", mx)
        monkeypatch.setattr(grpc_server, "mx", mx)
    peer, server = GRPCPeerHandle("p", "127.0.0.1:1", "test", None), GRPCServer(None, "127.0.0.1", 1)
    stock_out, stock_in = (getattr(f, "__wrapped__", f) for f in (GRPCPeerHandle.serialize_inference_state,
                                                                 GRPCServer.deserialize_inference_state))

    def stock_hop(state):
        return stock_in(server, stock_out(peer, state))

    plain = reference(MedusaModel(llama.base, None), medusa=False)
    pairs = [(MedusaMLXInferenceEngine(llama.dl), Shard(llama.name, a, b, N_LAYERS)) for a, b in ((0, 1), (2, 3))]
    # Stock exo: our engines hand it nothing its serializer cannot carry.
    assert asyncio.run(stock_ring(pairs, PROMPT, N, hop=stock_hop))[0] == plain
    # ... which our protocol's state would break: why the engines return none there.
    x, state = asyncio.run(pairs[0][0].infer_tensor("probe", pairs[0][1], PROMPT[None], st.initial_state()))
    _, state = asyncio.run(pairs[1][0].infer_tensor("probe", pairs[1][1], x, state))  # numpy arrays in it now
    with pytest.raises(TypeError):
        stock_out(peer, state)
    # Our serializer carries it on either branch (MLX arrays too) and checks it on arrival.
    assert asyncio.run(medusa_ring(pairs, PROMPT, N, hop=lambda s: from_proto(to_proto(node_service_pb2, s)))) == plain
    back = from_proto(to_proto(node_service_pb2, {**state, "extra": mx.array([1.5, 2.5]), "n": 3}))
    assert isinstance(back["extra"], np.ndarray) and back["extra"].tolist() == [1.5, 2.5] and back["n"] == 3
    with pytest.raises(ValueError, match="medusa_positions"):
        from_proto(to_proto(node_service_pb2, {**state, st.POSITIONS: np.array([3, 7])}))


class Quiet:
    """exo's gRPC server and discovery for a node alone: nothing to serve, no peers."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def discover_peers(self, wait_for_peers: int = 0) -> list:
        return []


def test_hooked_node_streams_new_tokens_and_frees_caches(exo_src, llama, capsys):
    """exo's own Node, installed, alone: heads that know the greedy continuation make passes
    of several tokens; the API's callback must see each token once, the caches go at the end."""
    from exo.inference.shard import Shard as ExoShard
    from exo.orchestration.node import Node
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    install(quiet=True)
    plain = reference(MedusaModel(llama.base, None), n=N + 8, medusa=False)
    engine = OracleEngine(llama.dl, np.concatenate([PROMPT, plain]), (0, 1), tree="cpu-8")

    async def ask():
        node = Node("solo", Quiet(), engine, Quiet(), llama.dl, max_generate_tokens=N,
                    partitioning_strategy=RingMemoryWeightedPartitioningStrategy())
        await node.start()
        got, done = [], asyncio.Event()
        node.on_token.register("api").on_next(lambda rid, tokens, fin: (got.extend(tokens), fin and done.set()))
        await node.process_prompt(ExoShard(llama.name, 0, 0, N_LAYERS), " ".join(f"t{i}" for i in PROMPT), "r")
        await asyncio.wait_for(done.wait(), 120)
        for _ in range(3000):  # the caches are freed by a task the finish started: wait for it (30 s at most)
            if not engine.request_ids:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(ask()) == plain[:N]
    assert engine.request_ids == []
    said = re.search(r"request r: (\d+) tokens in (\d+) ring passes", capsys.readouterr().out)
    tokens, passes = map(int, said.groups())
    assert tokens == N and passes < N / 2


def test_install_is_idempotent_and_says_what_it_did(exo_src, capsys):
    from exo.inference import inference_engine as ie
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.orchestration.node import Node

    install()
    again = install()
    printed = capsys.readouterr().out
    assert again.already and again.patched == () and "already installed" in printed and "medusa-mlx" in printed
    for fn in (Node.process_prompt, Node.process_inference_result, Node.start,
               GRPCPeerHandle.serialize_inference_state, GRPCServer.deserialize_inference_state):
        assert getattr(fn, "__exo_medusa_hook__", False) and not getattr(fn.__wrapped__, "__exo_medusa_hook__", False)
    engine = ie.get_inference_engine("medusa-mlx", LocalShardDownloader())
    assert isinstance(engine, MedusaMLXInferenceEngine) and isinstance(engine, ie.InferenceEngine)
    with pytest.raises(NotImplementedError, match="mlx_medusa train"):
        asyncio.run(engine.train("r", Shard("m", 0, 0, 1), None, None, None))


# --------------------------------------------------------------------------- exo/main.py processes

MAX_TOKENS = 12  # per chat request: short, and enough for several Medusa passes
RINGS = {  # engines in ring order: the first holds the first layers
    "stock-mlx-2": (STOCK, ["medusa-mlx", "medusa-mlx"]),
    "stock-mixed-3": (STOCK, ["medusa-mlx", "medusa-torch", "medusa-mlx"]),
    "medusa-mlx-2": (MEDUSA, ["medusa-mlx", "medusa-mlx"]),
    "medusa-mixed-2": (MEDUSA, ["medusa-mlx", "medusa-torch"]),  # torch verifies and proposes
}


@pytest.fixture(scope="module")
def plain_answers():
    """mlx-lm's own greedy answers to exo's chat prompts (its template), MAX_TOKENS at most."""
    from mlx_lm import load, stream_generate
    from transformers import AutoTokenizer

    path = str(default_model_path())
    model, tokenizer = load(path)  # the default model's weights are float32
    hf = AutoTokenizer.from_pretrained(path)
    answers = []
    for q in QUESTIONS:
        prompt = hf.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)]  # EOS included
        answers.append(hf.decode(tokens))
    return answers


@pytest.mark.parametrize("ring", RINGS)
def test_exo_ring_answers_as_plain_decoding(exo_src, plain_answers, tmp_path, ring):
    launch, engines = RINGS[ring]
    with ExoRing(exo_src, tmp_path / "exo-home", launch, engines, max_tokens=MAX_TOKENS) as nodes:
        # Asked at the node holding the first layers, then at the last one (it forwards the prompt).
        replies = [nodes.ask(q, at) for at, q in zip((0, -1), QUESTIONS)]
        passes = nodes.passes(expect=[r.request_id for r in replies] if launch is MEDUSA else ())
        logs = nodes.logs()
    assert [r.text for r in replies] == plain_answers, logs[-4000:]
    if launch is STOCK:
        assert passes == {}
        return
    assert sorted(passes) == sorted(r.request_id for r in replies), logs[-4000:]
    assert [passes[r.request_id][0] for r in replies] == [r.tokens for r in replies]
    tokens, ring_passes = map(sum, zip(*passes.values()))
    print(f"{ring}: {tokens} tokens in {ring_passes} ring passes ({tokens / ring_passes:.2f} per pass)")
    assert tokens / ring_passes > 1.0
