"""The bad-input catalogue, commands and files: every case exits with one error line (no traceback),
the right code (2: argparse refused a flag; 1: any other refusal; 130: Ctrl-C), before any model
loads wherever the input alone is wrong. Most run in this process (fast); the few whose exit code
or crash only a real process shows run as one (Ctrl-C, a node or a ring that cannot start)."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from helpers.events import opened_files
from helpers.folders import save_hf_folder
from helpers.processes import ROOT, clean, error_line, run_cli, run_main
from helpers.tiny import N_LAYERS, random_heads, tiny_base


def _main(command: str):
    import importlib

    from exo_medusa_mlx.cli import COMMANDS

    return importlib.import_module(COMMANDS[command]).main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_hf_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama", tiny_base("llama", layers=N_LAYERS),
                          random_heads(3))


# --------------------------------------------------------------------------- flags argparse refuses (exit 2)

FLAGS = [
    ("generate", ["--temp", "nan"], "argument --temp: 'nan' is not a finite number"),
    ("generate", ["--temp", "inf"], "argument --temp: 'inf' is not a finite number"),
    ("generate", ["--temp", "-1"], "argument --temp: -1 must be >= 0"),
    ("generate", ["--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
    ("generate", ["--top-p", "nan"], "argument --top-p: 'nan' is not a finite number"),
    ("generate", ["--top-p", "1.5"], "argument --top-p: 1.5 must be in (0, 1]"),
    ("generate", ["--max-tokens", "0"], "argument --max-tokens/-m: 0 must be at least 1"),
    ("generate", ["--max-tokens", "ten"], "argument --max-tokens/-m: 'ten' is not a whole number"),
    ("generate", ["--seed", "-1"], "argument --seed: -1 must be >= 0"),
    ("generate", ["--max-kv-size", "1"], "argument --max-kv-size: 1 is too small"),
    ("generate", ["--max-kv-size", "5"], "argument --max-kv-size: 5 is too small: the window keeps 4 sink tokens, give at least 6"),
    ("ring", ["--timeout", "0"], "argument --timeout: 0 must be > 0"),
    ("ring", ["--timeout", "-1"], "argument --timeout: -1 must be > 0"),
    ("ring", ["--timeout", "nan"], "argument --timeout: 'nan' is not a finite number"),
    ("ring", ["--temp", "nan"], "argument --temp: 'nan' is not a finite number"),
    ("ring", ["--temp", "inf"], "argument --temp: 'inf' is not a finite number"),
    ("ring", ["--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
    ("ring", ["--nodes", "0"], "argument --nodes: 0 must be at least 1"),
    ("ring", ["--port", "70000"], "argument --port: 70000 must be in 0..65535"),
    ("ring", ["--max-tokens", "0"], "argument --max-tokens: 0 must be at least 1"),
    ("ring", ["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ("ring", ["--max-kv-size", "1"], "argument --max-kv-size: 1 is too small"),
    ("node", ["--max-kv-size", "1"], "argument --max-kv-size: 1 is too small"),
    ("node", ["--port", "-1"], "argument --port: -1 must be in 0..65535"),
    ("node", ["--start-layer", "-1"], "argument --start-layer: -1 must be >= 0"),
    ("node", ["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ("bench", ["--temp", "nan"], "argument --temp: 'nan' is not a finite number"),
    ("bench", ["--temp", "inf"], "argument --temp: 'inf' is not a finite number"),
    ("bench", ["--cache-len", "0"], "argument --cache-len: 0 must be at least 1"),
    ("server", ["--temp", "nan"], "argument --temp: 'nan' is not a finite number"),
    ("server", ["--top-p", "inf"], "argument --top-p: 'inf' is not a finite number"),
    ("server", ["--request-timeout", "nan"], "argument --request-timeout: 'nan' is not a finite number"),
    ("server", ["--max-kv-size", "1"], "argument --max-kv-size: 1 is too small"),
    ("server", ["--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
    ("server", ["--port", "-1"], "argument --port: -1 must be in 0..65535"),
    ("server", ["--queue-size", "-1"], "argument --queue-size: -1 must be >= 0"),
    ("tune", ["--max-nodes", "1000"], "argument --max-nodes: 1000 must be in 1..64"),
    ("generate", ["--dist-timeout", "nan"], "argument --dist-timeout: 'nan' is not a finite number"),
    ("tune", ["--pass-overhead-ms", "nan"], "argument --pass-overhead-ms: 'nan' is not a finite number"),
    ("tune", ["--pass-overhead-ms", "-1"], "argument --pass-overhead-ms: -1 must be >= 0"),
    ("launch", ["--timeout", "inf"], "argument --timeout: 'inf' is not a finite number"),
    ("bench", ["--distributed", "--dist-timeout", "0"], "argument --dist-timeout: 0 must be > 0"),
    ("train", ["-o", "x", "--learning-rate", "nan"], "argument --learning-rate: 'nan' is not a finite number"),
    ("train", ["-o", "x", "--learning-rate", "0"], "argument --learning-rate: 0 must be > 0"),
    ("train", ["-o", "x", "--temp", "inf"], "argument --temp: 'inf' is not a finite number"),
    ("train", ["-o", "x", "--val-split", "1"], "argument --val-split: 1 must be in [0, 1)"),
    ("train", ["-o", "x", "--weight-decay", "nan"], "argument --weight-decay: 'nan' is not a finite number"),
    ("train", ["-o", "x", "--noise", "-0.1"], "argument --noise: -0.1 must be >= 0"),
    ("train", ["-o", "x", "--epochs", "0"], "argument --epochs: 0 must be > 0"),
]


@pytest.mark.parametrize("command,argv,fragment", FLAGS, ids=[f"{c} {' '.join(a)}" for c, a, _ in FLAGS])
def test_flags_are_refused_at_parse_time(command, argv, fragment, capsys, monkeypatch):
    main = _main(command)
    with opened_files(monkeypatch) as opened:
        code, line = run_main(main, argv, capsys)
    prog = "mlx_medusa bench --distributed" if "--distributed" in argv else f"mlx_medusa {command}"
    assert code == 2 and f"{prog}: error: {fragment}" in line, line
    assert opened == []  # nothing read, so no model loaded


# --------------------------------------------------------------------------- refused before any model loads (exit 1)

BEFORE_LOAD = [
    ("generate", ["--prompt", "-"], b"t1 \xff", "the prompt on stdin is not UTF-8 text (byte 0xff at offset 3)"),
    ("generate", ["--prompt", "t1 \udcff"], None, "--prompt is not UTF-8 text"),
    ("ring", ["--prompt", "-"], b"\xc3\x28", "the prompt on stdin is not UTF-8 text (byte 0xc3 at offset 0)"),
    ("ring", ["--prompt", "t2 \udce9"], None, "--prompt is not UTF-8 text"),
    ("ring", ["--timeout", "1.5", "--nodes", "2"], None, "--timeout 1.5 s leaves no time per hop"),
    ("ring", ["--memory-gb", "nan,1"], None, "--memory-gb: 'nan' is not a finite number"),
    ("ring", ["--backends", "mlx,cuda"], None, "give one of mlx, torch per node"),
    ("ring", ["--nodes", "40", "--model", "{tiny}"], None, "cannot split 4 layers over 40 nodes"),
    ("node", ["--peers", "nohost"], None, "--peers: 'nohost' is not host:port"),
    ("node", ["--start-layer", "3", "--end-layer", "1"], None, "--end-layer 1 is before --start-layer 3"),
    ("node", ["--model", "{tiny}", "--end-layer", "7"], None, "outside its 4 layers"),
    ("generate", ["--device", "cuda", "--backend", "mlx", "--model", "{tiny}"], None, "--device is for --backend torch"),
]


@pytest.mark.parametrize("command,argv,stdin,fragment", BEFORE_LOAD,
                         ids=[f"{c} {' '.join(a)}" for c, a, _, _ in BEFORE_LOAD])
def test_inputs_are_refused_before_the_model_loads(command, argv, stdin, fragment, tiny, capsys, monkeypatch):
    argv = [a.format(tiny=tiny) for a in argv]
    code, line = run_main(_main(command), argv, capsys, stdin, monkeypatch)
    assert code == 1 and line.startswith("error: ") and fragment in line, line


# --------------------------------------------------------------------------- broken files (exit 1, one line)


def _break(folder, how: str, tmp_path):
    """A copy of the tiny model folder (or a tree file) broken one way; returns the flags to pass."""
    if how.startswith("tree"):
        tree = tmp_path / "tree.json"
        if how == "tree_deep":
            tree.write_text("[" * 200_000 + "]" * 200_000)
        elif how == "tree_5000":
            tree.write_text(json.dumps({"choices": [[0]] + [[0, i] for i in range(4999)]}))
        elif how == "tree_rank":
            tree.write_text(json.dumps([[10**30]]))
        elif how == "tree_huge_file":
            tree.write_text(json.dumps({"choices": [[0]], "padding": "x" * (2 << 20)}))
        elif how == "tree_folder":
            tree.mkdir()
        return ["--model", str(folder), "--tree", str(tree)]
    bad = tmp_path / how
    shutil.copytree(folder, bad)
    weights, config = bad / "model.safetensors", bad / "config.json"
    if how == "config_list":
        config.write_text("[1, 2]")
    elif how == "config_not_json":
        config.write_text('{"num_hidden_layers": 4,')
    elif how == "config_deep":
        config.write_text("[" * 200_000 + "]" * 200_000)
    elif how == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif how == "weights_garbage":
        weights.write_bytes(struct.pack("<Q", 10**12) + b"\0" * 64)
    elif how == "weights_bad_header":
        weights.write_bytes(struct.pack("<Q", 5) + b"nope!" + b"\0" * 64)
    elif how == "layers_4000":
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 4000}))
    elif how == "heads_truncated":
        heads = bad / "medusa" / "medusa_lm_head.safetensors"
        heads.write_bytes(heads.read_bytes()[:1000])
    return ["--model", str(bad), "--heads", str(bad / "medusa")]


FILES = [
    ("config_list", "config.json holds a JSON list, not an object"),
    ("config_not_json", "config.json is not valid JSON"),
    ("config_deep", "config.json is nested too deeply"),
    ("weights_truncated", "model.safetensors is truncated: its tensors need"),
    ("weights_garbage", "model.safetensors is truncated or not safetensors"),
    ("weights_bad_header", "its safetensors header is not valid JSON"),
    ("layers_4000", f"says num_hidden_layers 4000 but the weights hold {N_LAYERS} layers"),
    ("heads_truncated", "not a readable safetensors file"),
    ("tree_deep", "is nested too deeply: a tree is a list of paths"),
    ("tree_5000", "tree has 5001 nodes, more than the limit of 256"),
    ("tree_rank", "must hold non-negative integer ranks below 4096"),
    ("tree_huge_file", "bytes; a tree of at most 256 nodes"),
    ("tree_folder", "is a folder: pass a tree JSON file"),
]


@pytest.mark.parametrize("how,fragment", FILES, ids=[h for h, _ in FILES])
def test_generate_refuses_broken_files_in_one_line(how, fragment, tiny, tmp_path, capsys):
    code, line = run_main(_main("generate"), _break(tiny, how, tmp_path) + ["--max-tokens", "2"], capsys)
    assert code == 1 and line.startswith("error: ") and fragment in line, line
    assert len(line) < 500


def test_node_refuses_a_config_that_is_a_list(tiny, tmp_path, capsys):
    code, line = run_main(_main("node"), _break(tiny, "config_list", tmp_path)[:2], capsys)
    assert code == 1 and "config.json holds a JSON list" in line, line


# --------------------------------------------------------------------------- as processes


def test_node_with_truncated_weights_exits_in_one_line(tiny, tmp_path):
    rc, out, err = run_cli(["node"] + _break(tiny, "weights_truncated", tmp_path)[:2])
    code, line = error_line(rc, err)
    assert rc == 1 and "model.safetensors is truncated" in line, err[-2000:]


def test_node_refuses_a_window_of_one_at_start(tiny):
    rc, out, err = run_cli(["node", "--model", str(tiny), "--max-kv-size", "1"])
    code, line = error_line(rc, err)
    assert rc == 2 and "--max-kv-size: 1 is too small" in line and "ready" not in out


def test_ring_start_up_error_quotes_the_log_not_a_deleted_file(tiny, tmp_path):
    rc, out, err = run_cli(["ring"] + _break(tiny, "weights_truncated", tmp_path)[:2] + ["--nodes", "2"], timeout=180)
    code, line = error_line(rc, err)
    assert rc == 1 and "exited with code 1 while starting" in line and "model.safetensors is truncated" in line, err
    assert "log:" not in line  # the temporary logs are gone: the error quotes them instead


def test_ctrl_c_during_generate_prints_what_was_generated(tiny):
    p = subprocess.Popen([sys.executable, "-m", "exo_medusa_mlx", "generate", "--model", str(tiny), "--prompt", "t1 t2",
                          "--max-tokens", "100000", "--max-kv-size", "64", "--json"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while not any(w.startswith("t") and w[1:].isdigit() for w in seen.split()[:-1]):  # a generated token
            c = p.stderr.read(1)  # the streamed text (stdout holds the JSON): it is generating
            assert c, f"generate ended before generating: {seen[-2000:]}"
            seen += c
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    clean(err)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finish_reason"] == "interrupted" and len(result["tokens"]) >= 1


# --------------------------------------------------------------------------- results that cannot be written


def test_bench_says_where_results_went_when_it_cannot_write_them(tiny, tmp_path, capsys):
    (tmp_path / "latency.json").mkdir()  # the result file's name is taken by a folder
    code, line = run_main(_main("bench"), ["--latency", "--model", str(tiny), "--no-torch", "--cache-len", "8",
                                            "--out", str(tmp_path)], capsys)
    assert code == 1 and f"cannot write {tmp_path / 'latency.json'}" in line, line
    spare = line.rsplit("the results are in ", 1)[1]
    assert "mlx" in json.loads(open(spare).read())
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- server bodies (the schema)

BODIES = [
    (b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "not valid JSON"),
    (b'{"prompt": "hi", "temperature": NaN}', "invalid 'temperature': Input should be a finite number"),
    (b'{"prompt": "hi", "temperature": 1e999}', "invalid 'temperature': Input should be a finite number"),
]


@pytest.mark.parametrize("raw,fragment", BODIES, ids=["deep JSON", "NaN temperature", "inf temperature"])
def test_server_refuses_bad_bodies_in_one_line(raw, fragment):
    from exo_medusa_mlx.server.schema import APIError, CompletionRequest, parse

    with pytest.raises(APIError) as e:
        parse(CompletionRequest, raw)
    assert e.value.status == 400 and fragment in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize("host,token,warned", [("0.0.0.0", None, True), ("0.0.0.0", "t", False),
                                               ("127.0.0.1", None, False), ("::1", None, False)])
def test_node_warns_when_it_binds_beyond_loopback_without_a_token(host, token, warned, capsys, monkeypatch):
    from exo_medusa_mlx.ring import node

    monkeypatch.delenv("MLX_MEDUSA_RING_TOKEN", raising=False)
    args = node.setup_arg_parser().parse_args(["--host", host] + (["--token", token] if token else []))
    node.check_args(args)
    err = capsys.readouterr().err
    assert ("warning: binding 0.0.0.0 without a token" in err) == warned, err
