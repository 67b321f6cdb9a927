"""Medusa over MLX distributed on loopback: 2 ranks (ring backend) == one process.

One launch of ``distributed_worker.py`` decodes every case on both ranks; the
oracle is the same folder decoded in this process (plain greedy, which
test_decode checks against mlx-lm). Then the CLI under ``mlx_medusa launch``, the
default model, and ranks that die or hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed_worker import decode, load_case
from exo_medusa_mlx import distributed as dist
from exo_medusa_mlx.cli_args import DIST_TIMEOUT_S, PARALLEL_MODES
from exo_medusa_mlx.launch import launch, rank_env, write_hostfile, free_ports
from test_exo_engine import save_hf_folder, tiny_base
from tiny import random_heads

HERE = Path(__file__).parent
PROMPT = [1, 5, 9, 3, 7, 2, 8, 11, 4]
FAMILIES = ("llama", "qwen2")  # qwen2: biases, tied embeddings, mlx-lm's PipelineMixin model
N, WINDOW, N_WINDOW = 32, 16, 48
KINDS = ("plain", "medusa", "oracle", "window", "dynamic")
DEATH_LIMIT_S = 15.0  # a rank whose peer died must fail within this (in practice: at once)
HANG_TIMEOUT_S = 3.0  # --dist-timeout for the hung-peer test; the watchdog fires within about this


def cases_for(folder: Path, family: str, parallel: str) -> list[dict]:
    base = dict(folder=str(folder), parallel=parallel)
    ref = decode(load_case({**base, "n": N})[0], {"medusa": False, "n": N}, PROMPT)["tokens"]
    ref_w = decode(load_case(base)[0], {"medusa": False, "n": N_WINDOW, "max_kv_size": WINDOW}, PROMPT)["tokens"]
    sample = {"medusa": True, "n": N, "temp": 0.8, "seed": 7}
    name = f"{family}-{parallel}"
    return [
        {**base, "name": f"{name}-plain", "medusa": False, "n": N, "ref": ref},
        {**base, "name": f"{name}-medusa", "medusa": True, "n": N, "ref": ref},
        {**base, "name": f"{name}-oracle", "medusa": True, "n": N, "ref": ref, "future": PROMPT + ref},
        {**base, "name": f"{name}-window", "medusa": True, "n": N_WINDOW, "max_kv_size": WINDOW, "ref": ref_w,
         "future": PROMPT + ref_w},
        {**base, "name": f"{name}-sample", **sample, "ref": decode(load_case(base)[0], sample, PROMPT)["tokens"]},
        {**base, "name": f"{name}-dynamic", "medusa": True, "n": N, "ref": ref, "tree": "dynamic:8"},
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {f: save_hf_folder(tmp_path_factory.mktemp(f), f, tiny_base(f), random_heads(4)) for f in FAMILIES}


@pytest.fixture(scope="module")
def two_ranks(folders, tmp_path_factory):
    """Every case decoded on 2 ranks, in one launch: ({name: case}, [rank0 results, rank1 results])."""
    cases = [c for f in FAMILIES for p in PARALLEL_MODES for c in cases_for(folders[f], f, p)]
    for family, split in (("llama", "3,1"), ("qwen2", "memory")):  # 3,1: rank 1's one layer receives and sends
        c = next(c for c in cases if c["name"] == f"{family}-pipeline-oracle")
        cases.append({**c, "name": f"{family}-pipeline-split", "split": split})
    out = tmp_path_factory.mktemp("ranks")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"prompt": PROMPT, "cases": cases}))
    code = launch([sys.executable, str(HERE / "distributed_worker.py"), str(spec), str(out)], 2, timeout_s=300)
    assert code == 0
    return {c["name"]: c for c in cases}, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("parallel", PARALLEL_MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_split_equals_one_process(two_ranks, family, parallel, kind):
    cases, ranks = two_ranks
    name = f"{family}-{parallel}-{kind}"
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"] == cases[name]["ref"]


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_and_memory_splits_equal_one_process(two_ranks, family):
    cases, ranks = two_ranks
    name = f"{family}-pipeline-split"
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"] == cases[name]["ref"]


@pytest.mark.parametrize("parallel", PARALLEL_MODES)
def test_oracle_heads_accept_deep_on_every_rank(two_ranks, parallel):
    _, ranks = two_ranks
    for r in ranks:
        assert N / r[f"llama-{parallel}-oracle"]["steps"] > 2.0
        assert N_WINDOW / r[f"qwen2-{parallel}-window"]["steps"] > 2.0  # through several wrap-arounds


@pytest.mark.parametrize("parallel", PARALLEL_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_sampling_same_tokens_on_every_rank(two_ranks, family, parallel):
    cases, ranks = two_ranks
    name = f"{family}-{parallel}-sample"
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"]
    if parallel == "pipeline":  # the same logits, bit for bit, as one process: the same draws
        assert ranks[0][name]["tokens"] == cases[name]["ref"]
    greedy = cases[f"{family}-{parallel}-plain"]["ref"]
    assert ranks[0][name]["tokens"] != greedy  # it did sample


# --------------------------------------------------------------------------- the CLI


def cli(*args, ranks=None, check=True):
    cmd = [sys.executable, "-m", "exo_medusa_mlx"] + (["launch", "-n", str(ranks), "--"] if ranks else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def last_json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def generate_args(folder: Path) -> list[str]:
    return ["generate", "--model", str(folder), "--heads", str(folder / "medusa"), "--tree", "cpu-8",
            "--prompt", "t1 t5 t9 t3 t7", "--max-tokens", "24", "--json", "--ignore-chat-template"]


@pytest.fixture(scope="module")
def one_process(folders):
    # llama: the word-level test tokenizer loads as itself (for qwen2, as a Qwen2Tokenizer)
    return last_json(cli(*generate_args(folders["llama"])))


@pytest.mark.parametrize("parallel", PARALLEL_MODES)
def test_cli_launch_equals_one_process(folders, one_process, parallel):
    one = one_process
    p = cli(*generate_args(folders["llama"]), "--parallel", parallel, ranks=2)
    two = last_json(p)
    assert two["tokens"] == one["tokens"] and len(one["tokens"]) == 24
    assert two["ranks"] == 2 and two["parallel"] == parallel and two["comm_seconds"] > 0
    assert len([line for line in p.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 alone prints


def test_cli_default_model_pipeline_equals_one_process():
    from exo_medusa_mlx.generate import stream_generate
    from exo_medusa_mlx.loading import load

    prompt = "Write a short story about a robot who learns to paint."
    model, tok = load()  # the shipped heads and tree
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ref = [r.token for r in stream_generate(model, tok, ids, max_tokens=16)]
    del model
    two = last_json(cli("generate", "--prompt", prompt, "--max-tokens", "16", "--json", "--parallel", "pipeline",
                        ranks=2))
    assert two["tokens"] == ref[: len(two["tokens"])] and len(two["tokens"]) >= 15
    assert two["medusa"] and two["mean_accepted"] > 1.0


@pytest.mark.parametrize("args,msg", [
    (["generate", "--parallel", "pipeline"], "MLX_RANK and MLX_HOSTFILE are not set"),
    (["generate", "--parallel", "tensor", "--pipeline-split", "2,1"], "--pipeline-split is for --parallel pipeline"),
    (["launch", "-n", "2"], "no command to launch"),
    (["generate", "--parallel", "pipeline", "--prompt", "-"], "reaches one rank only"),
])
def test_bad_flags_give_one_line_errors(args, msg):
    p = cli(*args, check=False)
    assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr


def test_tensor_parallel_refuses_indivisible_heads():
    base = tiny_base("llama")  # 4 attention heads, 2 key/value heads: not over 3 ranks
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\), num_key_value_heads \(2\) divisible by 3"):
        dist.tensor(base, SimpleNamespace(size=3))


def test_bench_distributed_runs_one_and_two_ranks(folders, tmp_path):
    folder = folders["llama"]
    p = cli("bench", "--distributed", "--model", str(folder), "--heads", str(folder / "medusa"), "--tree", "cpu-8",
            "--limit", "1", "--max-tokens", "8", "--ranks", "1,2", "--parallel", "pipeline", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_distributed.json").read_text())["rows"]
    assert [(r["ranks"], r["parallel"]) for r in rows] == [(1, "-"), (2, "pipeline")]
    for r in rows:
        res = r["result"]
        assert res["same_tokens"] and res["off"]["generation_tps"] > 0 and res["on"]["mean_accepted"] >= 1.0
    assert len(rows[1]["result"]["on"]["comm_ms_per_step"]) == 2  # each rank's waiting time
    assert "| 2 | pipeline |" in p.stdout


def test_pipeline_split_weights():
    two = SimpleNamespace(size=2)
    assert dist.split_weights("even", two) is None
    assert dist.split_weights("2,1", two) == [2.0, 1.0]
    for bad, msg in (("1", "1 weights for 2 ranks"), ("a,b", "use even, memory")):
        with pytest.raises(ValueError, match=msg):
            dist.split_weights(bad, two)
    assert dist.memory_gb() > 0.1
    with pytest.raises(ValueError, match="--dist-timeout 0"):
        dist.Watchdog(0, 0)


# --------------------------------------------------------------------------- failures


def start_pair(folder: Path, tmp_path: Path, timeout_s: float) -> list[subprocess.Popen]:
    """Two ranks decoding without end (a wrapping window); rank 0's stdout streams the text."""
    hostfile = tmp_path / "hosts.json"
    write_hostfile(hostfile, free_ports(2))
    args = [sys.executable, "-m", "exo_medusa_mlx", "generate", "--model", str(folder), "--heads",
            str(folder / "medusa"), "--tree", "cpu-8", "--prompt", "t1 t5 t9", "--ignore-chat-template",
            "--max-tokens", "100000000", "--max-kv-size", "32", "--parallel", "pipeline",
            "--dist-timeout", str(timeout_s)]
    return [subprocess.Popen(args, env=rank_env(r, hostfile, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True) for r in range(2)]


def wait_decoding(rank0: subprocess.Popen, limit_s: float = 120.0) -> None:
    got = threading.Event()
    threading.Thread(target=lambda: (rank0.stdout.read(8), got.set()), daemon=True).start()
    assert got.wait(limit_s), "rank 0 printed nothing"


def fail_time(rank0: subprocess.Popen, limit_s: float) -> tuple[float, str]:
    tic = time.monotonic()
    try:
        rank0.wait(limit_s)
    finally:
        if rank0.poll() is None:
            rank0.kill()
    return time.monotonic() - tic, rank0.stderr.read().decode(errors="replace")


@pytest.fixture
def pair(folders, tmp_path, request):
    procs = start_pair(folders["llama"], tmp_path, getattr(request, "param", DIST_TIMEOUT_S))
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGCONT)
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_dead_rank_makes_the_other_fail_at_once(pair):
    wait_decoding(pair[0])
    pair[1].kill()
    took, err = fail_time(pair[0], DEATH_LIMIT_S)
    assert pair[0].returncode not in (0, None), "rank 0 kept running"
    assert took < DEATH_LIMIT_S and "error: rank 0:" in err and "Traceback" not in err


@pytest.mark.parametrize("pair", [HANG_TIMEOUT_S], indirect=True)
def test_hung_rank_trips_the_watchdog(pair):
    wait_decoding(pair[0])
    os.killpg(pair[1].pid, signal.SIGSTOP)  # alive, sockets open, silent
    took, err = fail_time(pair[0], HANG_TIMEOUT_S + 10)
    assert pair[0].returncode == dist.WATCHDOG_EXIT
    assert took < HANG_TIMEOUT_S + 3 and "no answer within 3 s (--dist-timeout)" in err
