"""The flags' argparse types and one-line errors (``cli_args.py``); every command's refusals are in
``test_hostile_cli.py``."""

from __future__ import annotations

import argparse

import pytest

from exo_medusa_mlx import cli_args


@pytest.mark.parametrize("fn,text,ok", [
    (cli_args.finite_float, "-2.5", -2.5), (cli_args.non_negative_float, "0", 0.0),
    (cli_args.positive_float, "1e-3", 1e-3), (cli_args.probability, "1", 1.0), (cli_args.fraction, "0", 0.0),
    (cli_args.positive_int, "3", 3), (cli_args.port, "0", 0), (cli_args.kv_window, "6", 6),
])
def test_argparse_types_accept_good_values(fn, text, ok):
    assert fn(text) == ok


@pytest.mark.parametrize("fn,text", [
    (cli_args.finite_float, "nan"), (cli_args.finite_float, "-inf"), (cli_args.non_negative_float, "-0.1"),
    (cli_args.positive_float, "0"), (cli_args.probability, "0"), (cli_args.fraction, "1"),
    (cli_args.positive_int, "1.5"), (cli_args.port, "65536"), (cli_args.kv_window, "5"),
])
def test_argparse_types_refuse_bad_values(fn, text):
    with pytest.raises(argparse.ArgumentTypeError):
        fn(text)


def test_one_line_keeps_errors_short():
    text = cli_args.one_line(ValueError("Missing 9000 parameters:\n" + "model.layers.1.x, " * 10_000))
    assert "\n" not in text and len(text) <= cli_args.MAX_ERROR_CHARS and "more characters" in text
