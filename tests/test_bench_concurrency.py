"""``mlx_medusa bench --concurrency`` on a tiny model at concurrency 1,2 (both backends): every method
runs, ours gives each request the tokens it gives alone, the figures hold together; the roofline's
arithmetic."""

import json

import pytest

from exo_medusa_mlx.bench.concurrency import main, markdown, run_concurrency
from exo_medusa_mlx.bench.roofline import roofline, step_flops
from helpers.server import TREE, folder  # noqa: F401
from helpers.tiny import CONFIGS


def check(result, methods):
    assert [row["concurrency"] for row in result["levels"]] == [1, 2]
    assert result["matmul_peak_gflops"] > 0
    for row in result["levels"]:
        assert set(row["methods"]) == set(methods)
        for m, s in row["methods"].items():
            assert len(s["identical"]) == row["concurrency"] and s["tokens"] > 0
            assert 0 < s["latency_p50_s"] <= s["latency_p95_s"] <= s["wall_s"] + 1e-9
            assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["wall_s"])
            assert s["rows_per_step"] >= 1 and s["step_ms"] > 0 and 0 < s["peak_fraction"] < 10
        for m in ("plain", "medusa"):  # ours: lossless per request, batched or not
            assert row["methods"][m]["all_identical"], (row["concurrency"], m)
        assert row["methods"]["plain"]["rows_per_step"] <= row["concurrency"] + 1e-9
    # Two requests at once: our batch verifies both in one forward.
    assert result["levels"][1]["methods"]["plain"]["rows_per_step"] > 1


def test_mlx_at_concurrency_1_2(folder, tmp_path):  # noqa: F811
    main(["--concurrency", "1,2", "--model", str(folder), "--heads", str(folder / "medusa"), "--tree", TREE,
          "--max-tokens", "6", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "concurrency.json").read_text())
    check(result, ("mlx_lm", "plain", "medusa"))
    assert "| 2 | ours Medusa batched |" in (tmp_path / "concurrency.md").read_text()
    assert (tmp_path / "concurrency.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp"))


def test_torch_at_concurrency_1_2(folder):  # noqa: F811
    pytest.importorskip("transformers")
    result = run_concurrency(str(folder), folder / "medusa", TREE, (1, 2), 6, "torch", progress=False)
    check(result, ("hf", "plain", "medusa"))
    assert "transformers generate, batched" in markdown(result)


def test_roofline_counts_the_model_shapes():
    c = CONFIGS["llama"]  # hidden 64, 2 layers, MLP 96, 4 heads of 16, 2 KV heads, vocab 96
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    assert step_flops(c, 1, 0) == 2 * (2 * per_layer + 64 * 96)
    assert step_flops(c, 3, 10) == 3 * step_flops(c, 1, 10)
    assert step_flops(c, 1, 10) - step_flops(c, 1, 0) == 2 * 2 * (2 * 64 * 10)
    r = roofline(steps=4, rows=8, seconds=0.02, config=c, context=10, peak=1e9)
    assert r["rows_per_step"] == 2 and r["step_ms"] == pytest.approx(5.0)
    assert r["peak_fraction"] == pytest.approx(step_flops(c, 2, 10) / 0.005 / 1e9)
    assert roofline(0, 0, 0.0, c, 10, 1e9)["peak_fraction"] == 0.0


def test_bad_levels_are_refused_at_parse_time(capsys):
    from exo_medusa_mlx.bench.main import main as bench_main

    for bad in ("0,2", "x", ""):
        with pytest.raises(SystemExit) as e:
            bench_main(["--concurrency", bad])
        assert e.value.code == 2 and "argument --concurrency" in capsys.readouterr().err
