"""``mlx_medusa bench --suite kinds``: per-kind arithmetic and outputs, and one run on a tiny model
with one prompt per kind and four trees (the tuned one, a preset, dynamic:N, best:N) against the
same plain run."""

import json

import pytest

from exo_medusa_mlx.bench.kinds import PLAIN, markdown, plot, summarize
from exo_medusa_mlx.training.kinds import KINDS


def _run(tps, toks, acc=None, steps=None):
    return {"tokens": toks, "generation_tps": tps, "prompt_tps": 50.0, "mean_accepted": acc,
            "steps": steps if steps is not None else len(toks), "peak_memory_gb": 0.1}


def test_summary_per_kind_and_over_all(tmp_path):
    rows = []
    for kind, plain_tps, med_tps, same, acc in (("qa", 10.0, 20.0, True, 2.0), ("qa", 10.0, 5.0, False, 1.0),
                                                 ("math", 10.0, 15.0, True, 3.0)):
        med = _run(med_tps, [1] * 12 if same else [2] * 12, acc, steps=int(12 / acc))
        med["same_tokens"] = same
        rows.append({"kind": kind, "prompt_tokens": 5, "runs": {PLAIN: _run(plain_tps, [1] * 12), "t": med}})
    s = summarize(rows, ["t"])
    assert list(s) == ["qa", "math", "all"]
    qa = s["qa"]["trees"]["t"]
    # 24 tokens in 0.6 s + 2.4 s = 8 tok/s (not the mean of 20 and 5); plain 10 tok/s.
    assert abs(qa["medusa_tps"] - 8.0) < 1e-9 and abs(qa["speedup"] - 0.8) < 1e-9
    assert abs(qa["mean_accepted"] - 24 / 18) < 1e-9  # tokens per step over the kind's steps
    assert not qa["identical"] and qa["identical_prompts"] == 1 and s["math"]["trees"]["t"]["identical"]
    assert s["all"]["prompts"] == 3 and abs(s["all"]["trees"]["t"]["mean_accepted"] - 36 / 22) < 1e-9
    result = {"summary": s, "trees": {"t": {"size": 4}}, "accuracy": {"qa": {"rows": 7, "top1": [0.5, 0.25]}}}
    md = markdown(result)
    assert "| qa | 2 | 10.0 | t | 8.0 | 0.80x | 1.33 | 4.00 | NO (1/2) |" in md
    assert "| math | 1 | 10.0 | t | 15.0 | 1.50x | 3.00 | 4.00 | yes |" in md
    assert "| qa | 7 | 0.500 | 0.250 |" in md
    plot(result, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers.folders import save_hf_folder
    from helpers.tiny import N_LAYERS, tiny_base
    from helpers.tiny import random_heads

    from exo_medusa_mlx.core.tree import save_tree

    base = tiny_base("llama", layers=N_LAYERS)
    folder = save_hf_folder(tmp_path_factory.mktemp("model"), "llama", base, random_heads(3))
    # A tuned tree file as mlx_medusa tune writes it: best:N takes its longest tree's first N-1 paths.
    save_tree(folder / "medusa" / "tree.json", [[0], [1], [0, 0]], max_nodes_choices=[[0], [0, 0], [1], [2]])
    prompts = {k: [" ".join(f"t{4 + (i * 7 + j) % 90}" for j in range(6 + 3 * i))] for i, k in enumerate(KINDS)}
    prompts["chat"] = [[{"role": "user", "content": "t5 t6 t7"}, {"role": "assistant", "content": "t8 t9"},
                        {"role": "user", "content": "t10 t11 t12"}]]
    path = folder / "kinds.json"
    path.write_text(json.dumps({"kinds": prompts}))
    return folder, path


def test_suite_kinds_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    from exo_medusa_mlx.bench.main import main

    folder, prompts = tiny
    monkeypatch.setenv("EXO_MEDUSA_CACHE", str(tmp_path / "cache"))  # the held-out answers --accuracy builds
    out, trees = tmp_path / "out", ["default", "chain-2", "dynamic:4", "best:3"]
    main(["--suite", "kinds", "--model", str(folder), "--heads", str(folder / "medusa"), "--prompts", str(prompts),
          "--trees", ",".join(trees), "--max-tokens", "10", "--accuracy", "--out", str(out)])
    res = json.loads((out / "kinds.json").read_text())
    assert list(res["summary"]) == [*KINDS, "all"] and list(res["trees"]) == trees
    assert res["trees"]["chain-2"]["size"] == 3 and res["trees"]["best:3"]["choices"] == [[0], [0, 0]]
    assert res["trees"]["dynamic:4"]["choices"] == "dynamic" and res["trees"]["default"]["size"] == 4
    for kind, s in res["summary"].items():
        assert s["prompts"] == (len(KINDS) if kind == "all" else 1) and s["plain_tps"] > 0
        for t, m in s["trees"].items():  # greedy Medusa is plain decoding, token for token
            assert m["identical"] and m["speedup"] > 0 and m["mean_accepted"] >= 1.0, (kind, t)
    for row in res["prompts"]:
        assert len(row["runs"][PLAIN]["tokens"]) == 10 and set(row["runs"]) == {PLAIN, *trees}
    assert set(res["accuracy"]) == set(KINDS)
    assert all(a["rows"] > 0 and len(a["top1"]) == 3 and all(0 <= x <= 1 for x in a["top1"])
               for a in res["accuracy"].values())
    md = (out / "kinds.md").read_text()
    assert "| chat | 1 |" in md and "| all | 8 |" in md and "head 2" in md
    assert (out / "kinds.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--trees", "default,default"], "--trees 'default,default': name each tree once"),
    (["--kinds", "qa,poems"], "--kinds 'qa,poems'"),
    (["--trees", "no-such-tree"], "unknown tree 'no-such-tree'"),
])
def test_bad_flags_are_one_line_errors(tiny, tmp_path, argv, message):
    from exo_medusa_mlx.bench.main import main

    folder, prompts = tiny
    with pytest.raises(SystemExit) as e:
        main(["--suite", "kinds", "--model", str(folder), "--heads", str(folder / "medusa"), "--prompts",
              str(prompts), "--out", str(tmp_path / "o"), *argv])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in e.value.code
