"""Medusa inside exo 1.x's own runner, on exo's real source, against exo's own plain engine.

One run of ``helpers/exo1_driver.py`` in exo's Python 3.13 venv (``scripts/setup_exo1.sh``)
drives exo's ``RunnerSupervisor``, which spawns exo's runner; ``install()`` is in effect,
so each runner chooses Medusa or exo's engine itself. The oracle is exo's
``SequentialGenerator`` (``EXO_NO_BATCH=1``) on the same model, in the same run: greedy
tokens identical on 1 and 2 ranks (a ring on loopback), sampled tokens distributed alike
(a total-variation permutation test, with a negative control), and a model Medusa cannot
run (an unsupported architecture, no heads) left to exo's engine with the reason logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exo_medusa_mlx.core.machine import free_ports
from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID
from helpers.exo1_plan import PYTHON, ROOT, models_folder, run_plan, tiny_folder, venv_reason

N_TV = 30  # sampled requests per engine for the distribution test (about 0.5 s each here)
TV_ALPHA = 1e-3
POEM = "Write a short poem about the sea."
GREEDY = dict(temperature=0.0)
PENALTIES = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
TV_PROMPT = "Tell me about the sea."
TV = dict(temperature=1.5, repetition_penalty=1.3, presence_penalty=1.0, max_output_tokens=4,
          instructions="Be brief.")  # a short system prompt: a short prefill
CARD_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}  # a Qwen3 card's
THINK_PROMPT = "t1 t5 t9 t3"


pytestmark = pytest.mark.skipif(venv_reason() is not None, reason=str(venv_reason()))


def think_ids() -> dict[int, str]:
    """<think> and </think> ids: </think> is the tiny model's 6th greedy token after the prompt, so
    exo's thinking parser sees thinking tokens, the end tag and answer tokens."""
    from mlx_lm.generate import generate_step

    import mlx.core as mx
    from helpers.tiny import CONFIGS
    import importlib
    from mlx.utils import tree_map

    config = dict(CONFIGS["llama"], num_hidden_layers=4, head_dim=16)
    mod = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(0)
    base = mod.Model(mod.ModelArgs.from_dict(config))
    base.update(tree_map(lambda w: w * 2.0, base.parameters()))
    start = 90  # <think>: the last prompt token
    prompt = [int(w[1:]) for w in THINK_PROMPT.split()] + [start]
    out = [int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(prompt), base)), range(12))]
    end = next(t for k, t in enumerate(out) if k >= 5 and t not in out[:k] and t != start)
    return {start: "<think>", end: "</think>"}


def plan(models: Path) -> dict:
    greedy = [dict(name="poem", prompt=POEM, max_output_tokens=40, **GREEDY),
              dict(name="eos", prompt="What is 2+2? Answer in one short sentence.", max_output_tokens=200, **GREEDY),
              dict(name="penalties", prompt=POEM, max_output_tokens=30, **GREEDY, **PENALTIES),
              dict(name="stop", prompt=POEM, max_output_tokens=40, stop=["blue", "never"], **GREEDY),
              dict(name="logprobs", prompt=POEM, max_output_tokens=12, logprobs=True, top_logprobs=3, **GREEDY)]
    card = [dict(name="card", prompt=POEM, max_output_tokens=20, seed=3, card_defaults=True)]
    tv = [dict(name=f"tv-{i}", prompt=TV_PROMPT, seed=1000 + i, **TV) for i in range(N_TV)]
    control = [dict(name=f"control-{i}", prompt=TV_PROMPT, seed=5000 + i, min_p=0.0, **TV)
               for i in range(N_TV)]  # exo's default min-p ignored: what the test must tell apart
    cancel = [dict(name="cancel", prompt=POEM, max_output_tokens=2000, temperature=0.0, cancel_after=5),
              dict(name="after-cancel", prompt=POEM, max_output_tokens=8, **GREEDY)]
    smol = dict(model_id=DEFAULT_MODEL_ID, n_layers=30, hidden_size=576, sampling_defaults=CARD_DEFAULTS)
    think = [dict(name="think", prompt=THINK_PROMPT, max_output_tokens=16, **GREEDY)]
    return {"ports": free_ports(2), "runners": [
        dict(name="plain", env={"EXO_MEDUSA": "off"}, requests=greedy + card + tv + control, **smol),
        dict(name="medusa", requests=greedy + card + tv + cancel, **smol),
        dict(name="medusa-2", ranks=2, requests=greedy[:3], **smol),
        dict(name="gemma", model_id="test/tiny-gemma", n_layers=4, requests=[dict(think[0], prompt="t1 t2 t3")]),
        dict(name="think-plain", model_id="test/tiny-think-noheads", n_layers=4, requests=think),
        dict(name="think-medusa", model_id="test/tiny-think", n_layers=4, requests=think),
    ]}


@pytest.fixture(scope="module")
def exo1(tmp_path_factory) -> dict:
    """Every runner's results, from one driver run (exo's venv, exo's source)."""
    tmp = tmp_path_factory.mktemp("exo1")
    models = models_folder(tmp)
    names = think_ids()
    tiny_folder(models / "test--tiny-gemma", "gemma", heads=True)  # heads beside it: the architecture says no
    tiny_folder(models / "test--tiny-think", "llama", names)
    tiny_folder(models / "test--tiny-think-noheads", "llama", names, heads=False)
    out = run_plan(plan(models), tmp, {"EXO_NO_BATCH": "1"}, timeout=900)
    sys.stderr.write("".join(f"{n}: ready in {r['ready_s']:.1f} s\n" for n, r in out["runners"].items()))
    return out


def req(exo1, runner: str, name: str) -> dict:
    return exo1["runners"][runner]["requests"][name]


def test_install_reaches_the_runner_and_says_what_it_chose(exo1):
    assert exo1["entrypoint"] == "exo_medusa_mlx.exo1.install.runner_entrypoint"
    log = exo1["runners"]["medusa"]["log"]
    assert len(log) == 1 and "decodes with Medusa: heads shipped for the default model" in log[0], log
    assert "one task at a time (EXO_NO_BATCH)" in log[0], log
    assert "BLAS: openblas" in log[0] or not sys.platform.startswith("linux"), log[0]  # OpenBLAS before MLX
    assert "runs exo's own engine: EXO_MEDUSA=off" in exo1["runners"]["plain"]["log"][0]


@pytest.mark.parametrize("runner,name", [("medusa", n) for n in ("poem", "eos", "penalties", "stop", "logprobs")]
                         + [("medusa-2", n) for n in ("poem", "eos", "penalties")])
def test_greedy_equals_exos_sequential_generator(exo1, runner, name):
    got, want = req(exo1, runner, name), req(exo1, "plain", name)
    assert got["errors"] == [] and want["errors"] == []
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"] and got["finish"] == want["finish"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # the EOS counted, as exo counts it
        assert got["usage"][key] == want["usage"][key], key
    assert got["prefill"][-1] == [got["usage"]["prompt_tokens"]] * 2 and got["prefill"][0][0] == 0
    if name == "eos":
        assert got["finish"] == "stop" and got["usage"]["completion_tokens"] == len(got["tokens"])
    if name == "stop":
        assert got["finish"] == "stop" and len(got["tokens"]) < 40
    if name == "poem":  # Medusa did accept guesses
        assert got["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 5


def test_logprobs_as_exo_returns_them(exo1):
    got, want = req(exo1, "medusa", "logprobs"), req(exo1, "plain", "logprobs")
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=2e-3)
    assert got["top_logprobs"] == want["top_logprobs"] and all(len(t) == 3 for t in got["top_logprobs"])


def test_a_card_with_top_k_is_served(exo1):
    for runner in ("medusa", "plain"):
        r = req(exo1, runner, "card")
        assert r["sampling"] == {**CARD_DEFAULTS, "seed": 3}  # exo's API filled them from the card
        assert r["errors"] == [] and r["finish"] == "length" and len(r["tokens"]) == 20


def tv_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Summed over positions: the total variation between the two samples' token distributions there."""
    out = 0.0
    for k in range(a.shape[1]):
        cells = np.unique(np.concatenate([a[:, k], b[:, k]]))
        pa = (a[:, k][:, None] == cells).mean(axis=0)
        pb = (b[:, k][:, None] == cells).mean(axis=0)
        out += 0.5 * np.abs(pa - pb).sum()
    return out


def permutation_p(a: np.ndarray, b: np.ndarray, n: int = 2000) -> float:
    """P(a random split of the pooled samples is at least as far apart), fixed permutations."""
    rng, pooled, seen = np.random.default_rng(0), np.concatenate([a, b]), tv_statistic(a, b)
    hits = sum(tv_statistic(*np.split(pooled[rng.permutation(len(pooled))], [len(a)])) >= seen for _ in range(n))
    return (hits + 1) / (n + 1)


def samples(exo1, runner: str, prefix: str) -> np.ndarray:
    rows = [req(exo1, runner, f"{prefix}-{i}")["tokens"] for i in range(N_TV)]
    assert all(len(r) == TV["max_output_tokens"] for r in rows)
    return np.array(rows)


def test_sampled_tokens_are_distributed_as_exos_plain_sampling(exo1):
    """exo's default min-p (0.05), repetition and presence penalties at temperature 1.5: Medusa vs exo, and
    the same test telling exo without min-p from exo with it (the exact math: test_processors.py)."""
    medusa, plain, control = samples(exo1, "medusa", "tv"), samples(exo1, "plain", "tv"), \
        samples(exo1, "plain", "control")
    p = permutation_p(medusa, plain)
    assert p > TV_ALPHA, f"TV {tv_statistic(medusa, plain):.3f}, permutation p {p:.1e}"
    p_control = permutation_p(control, plain)
    assert p_control <= TV_ALPHA, f"without min-p passed: TV {tv_statistic(control, plain):.3f}, p {p_control:.1e}"


def test_cancellation_stops_the_request_and_the_runner_serves_on(exo1):
    r = req(exo1, "medusa", "cancel")
    assert 5 <= len(r["tokens"]) < 2000 and r["finish"] is None
    after = req(exo1, "medusa", "after-cancel")
    assert after["tokens"] == req(exo1, "plain", "poem")["tokens"][:8]


def test_unsupported_architecture_runs_exos_engine_and_says_why(exo1):
    r = exo1["runners"]["gemma"]
    assert "runs exo's own engine: model type 'gemma' is not supported by Medusa" in r["log"][0], r["log"]
    assert r["requests"]["think"]["errors"] == [] and len(r["requests"]["think"]["tokens"]) == 16


def test_thinking_tags_through_exos_parser_and_a_model_without_heads(exo1):
    plain, medusa = exo1["runners"]["think-plain"], exo1["runners"]["think-medusa"]
    assert "runs exo's own engine: no Medusa heads" in plain["log"][0], plain["log"]
    assert "decodes with Medusa: heads beside the model" in medusa["log"][0], medusa["log"]
    got, want = medusa["requests"]["think"], plain["requests"]["think"]
    assert got["tokens"] == want["tokens"] and got["thinking"] == want["thinking"]
    assert True in got["thinking"] and False in got["thinking"]  # the end tag came: thinking, then the answer


def test_every_text_card_of_exo_is_served_with_its_sampling_defaults(tmp_path):
    """No refusal for any card's defaults (top_k, min_p, penalties; thinking on, off, unset), as
    exo's API fills them into a request: built by the engine's set-up, one exact draw each."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EXO_HOME": str(tmp_path), "EXO_DASHBOARD_DIR": str(tmp_path),
           "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([str(PYTHON), str(ROOT / "tests" / "helpers" / "exo1_cards.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["cards"] >= 100 and result["with_top_k"] >= 50, result  # exo b5375f8: 123 text cards
    assert result["refused"] == [], result["refused"][:5]
