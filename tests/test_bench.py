"""The bench's arithmetic and outputs (the runs themselves are the benchmark command)."""

import json

from exo_medusa_mlx.bench.main import markdown, plot, summarize
from exo_medusa_mlx.training.prompts import bench_prompts


def _run(tps, toks, acc=None):
    return {"tokens": toks, "generation_tps": tps, "prompt_tps": 100.0, "mean_accepted": acc, "steps": 3,
            "peak_memory_gb": 0.5}


def test_prompts_cover_the_categories():
    ps = bench_prompts()
    assert len(ps) >= 20
    assert {p["category"] for p in ps} == {"writing", "coding", "maths", "extraction", "summarising", "qa"}


def test_summary_uses_total_time_and_flags_differences(tmp_path):
    rows = []
    for a_tps, c_tps, same in ((10.0, 20.0, True), (10.0, 5.0, False)):
        a = _run(a_tps, [1] * 10, 1.0)
        c = _run(c_tps, [1] * 10 if same else [2] * 10, 2.0)
        a["same_tokens"], c["same_tokens"] = True, same  # as run() marks them (the baseline against itself)
        rows.append({"category": "qa", "prompt": "p", "prompt_tokens": 3, "runs": {"a": a, "c": c}})
    s = summarize(rows, ["a", "c"])
    # c: 20 tokens in 0.5 s + 2 s = 8 tok/s overall (not the mean of 20 and 5, 12.5).
    assert abs(s["c"]["generation_tps"] - 8.0) < 1e-9 and abs(s["c"]["speedup"] - 0.8) < 1e-9
    assert not s["c"]["all_same_tokens"] and s["a"]["all_same_tokens"]
    result = {"methods": {"a": "mlx-lm", "c": "Medusa"}, "order": ["a", "c"], "prompts": rows, "overall": s}
    md = markdown(result)
    assert "| (c) Medusa | 8.00 |" in md and "NO" in md
    # Without the baseline nothing was compared: said so, not "yes".
    alone = [{**r, "runs": {"c": {k: v for k, v in r["runs"]["c"].items() if k != "same_tokens"}}} for r in rows]
    s_alone = summarize(alone, ["c"])
    assert s_alone["c"]["all_same_tokens"] is None
    assert "n/a (no baseline run)" in markdown({**result, "order": ["c"], "prompts": alone, "overall": s_alone})
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    json.dumps(result)


def test_outputs_without_medusa_runs(tmp_path):
    # --methods b: no (c) column, no accepted-length histogram; nothing may crash after the runs.
    rows = [{"category": "qa", "prompt": "p", "prompt_tokens": 3, "runs": {"b": _run(10.0, [1] * 4)}}]
    result = {"methods": {"b": "ours --no-medusa"}, "order": ["b"], "prompts": rows, "overall": summarize(rows, ["b"])}
    assert "| - |" in markdown(result)
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp"))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    import pytest

    from exo_medusa_mlx.bench.main import main

    f = tmp_path / "afile"
    f.write_text("x")
    for argv, message in ((["--max-tokens", "0"], "argument --max-tokens: 0 must be at least 1"),
                          (["--limit", "0"], "argument --limit: 0 must be at least 1"),
                          (["--temp", "nan"], "argument --temp: 'nan' is not a finite number"),
                          (["--out", str(f)], f"--out {f}")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        if e.value.code == 2:  # refused by argparse, before anything runs
            assert message in capsys.readouterr().err.splitlines()[-1]
        else:
            assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert f.read_text() == "x"
