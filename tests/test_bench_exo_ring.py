"""scripts/bench_exo_ring.py: its one-line errors (always), and one tiny run against exo 0.0.x's own
source when it is present (EXO_SRC, else ../shared/exo-0.0.x/): a stock ring and an ``mlx_medusa exo``
ring on one bench prompt give the same text, stock at one token per pass, Medusa at no more passes."""

from __future__ import annotations

import json
import os

import pytest

from helpers.exo_harness import exo_source
from helpers.processes import load_script

SRC, WHY = exo_source()
REQUIRE = os.environ.get("EXO_MEDUSA_REQUIRE_ALL") == "1" and os.environ.get("EXO_SRC")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_exo_ring")


def one_line_error(bench, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_missing_exo_source_says_where_to_put_it(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("EXO_SRC", str(tmp_path / "nowhere"))
    message = one_line_error(bench, ["--limit", "1"])
    assert "EXO_SRC" in message and "exo 0.0.x source not found" in message
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("EXO_SRC", str(tmp_path / "empty"))
    assert "exo-src-*.tar.gz" in one_line_error(bench, ["--limit", "1"])


@pytest.mark.parametrize("argv, flag", [(["--engines", "mlx,cuda"], "--engines"), (["--nodes", "0"], "--nodes"),
                                        (["--limit", "0"], "--limit"), (["--max-tokens", "0"], "--max-tokens")])
def test_bad_flags_are_named(bench, argv, flag):
    assert flag in one_line_error(bench, argv)


@pytest.mark.skipif(SRC is None and not REQUIRE, reason=WHY)
def test_tiny_run_stock_and_medusa_rings_agree(bench, tmp_path, capsys):
    try:
        summary = bench.main(["--limit", "1", "--max-tokens", "6", "--json", "--log-dir", str(tmp_path / "logs")])
    except SystemExit as e:
        if str(e.code).startswith("error: exo's imports failed") and not REQUIRE:
            pytest.skip(str(e.code))
        raise
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    [row] = summary["prompts"]
    stock, medusa = row["stock"], row["medusa"]
    assert row["same_text"] and stock["text"] == medusa["text"] and stock["text"]
    assert 0 < stock["tokens"] <= 6 and medusa["tokens"] == stock["tokens"]
    assert stock["passes"] == stock["tokens"]  # a stock ring: one token per pass
    assert 1 <= medusa["passes"] <= medusa["tokens"]  # counted from the last node's exo-medusa line
    total = summary["total"]
    assert total["same_text"] == 1 and total["medusa"]["passes"] == medusa["passes"]
    assert "text identical to the stock ring: 1 of 1 prompts" in out and "ring passes" in out
    print(f"bench_exo_ring --limit 1 --max-tokens 6: {medusa['tokens']} tokens in {medusa['passes']} passes")
