"""``cli_args.Rule``: a number flag is refused one way wherever its value arrives: by the command's
parser (exit 2, ``argument --x: ...``), by the options dataclasses (``TrainOptions.validate``,
``TuneOptions.check``) and by the server's ``Settings`` and ``Scheduler`` (one-line ``ValueError``),
with the same words."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest

from exo_medusa_mlx import cli_args
from exo_medusa_mlx.cli_args import (FRACTION, KV_WINDOW, NON_NEGATIVE, NON_NEGATIVE_INT, PORT, POSITIVE,
                                     POSITIVE_INT, PROBABILITY, Rule, int_range)

# (rule, values it takes, values it refuses); the values as text, as a command line gives them.
CASES = [
    (NON_NEGATIVE, ["0", "2.5"], ["-0.1", "nan", "inf"]),
    (POSITIVE, ["1e-3"], ["0", "-1", "nan"]),
    (PROBABILITY, ["1", "0.5"], ["0", "1.5", "nan"]),
    (FRACTION, ["0", "0.99"], ["1", "-0.5"]),
    (POSITIVE_INT, ["1", "7"], ["0", "-3"]),
    (NON_NEGATIVE_INT, ["0"], ["-1"]),
    (PORT, ["0", "65535"], ["65536", "-1"]),
    (KV_WINDOW, ["6"], ["5"]),
    (int_range(1, 64), ["1", "64"], ["0", "65"]),
]


@pytest.mark.parametrize("rule, good, bad", CASES)
def test_parse_and_check_agree(rule: Rule, good, bad):
    for text in good:
        value = rule.parse(text)
        assert rule.check("--x", value) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as parsed:
            rule.parse(text)
        with pytest.raises(ValueError) as checked:
            rule.check("--x", rule.cast(text))
        if "finite" not in str(parsed.value):  # the range's words are the same both ways
            assert str(checked.value) == f"--x {rule.cast(text)} {rule.says}"
            assert str(parsed.value) == f"{text} {rule.says}"
        assert "\n" not in str(checked.value)


def test_check_refuses_the_wrong_type_and_passes_none():
    assert POSITIVE_INT.check("--iters", None) is None
    for value in (1.5, "3", True):
        with pytest.raises(ValueError, match="--iters .* is not a whole number >= 1"):
            POSITIVE_INT.check("--iters", value)
    with pytest.raises(ValueError, match="--temp nan must be >= 0"):
        NON_NEGATIVE.check("--temp", float("nan"))
    assert cli_args.positive_int is not None and cli_args.positive_int("3") == 3


def parser_types(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.type for a in parser._actions if a.type is not None}


@pytest.mark.parametrize("module, options", [("exo_medusa_mlx.training.options", "TrainOptions"),
                                             ("exo_medusa_mlx.tune", "TuneOptions")])
def test_options_dataclasses_check_what_their_parser_refuses(module, options):
    import importlib

    mod = importlib.import_module(module)
    cls = getattr(mod, options)
    types = parser_types(mod.setup_arg_parser())
    assert set(mod.RULES) <= {f.name for f in fields(cls)}
    for name, rule in mod.RULES.items():
        assert types[name] == rule.parse, name  # the parser's type is the rule the dataclass checks
    required = {"output": "x"} if options == "TrainOptions" else {}
    validate = getattr(cls, "validate", None) or getattr(cls, "check")
    for name, rule in mod.RULES.items():
        bad = rule.cast(next(v for v in (0, -1, 10**9) if not rule.ok(v)))
        with pytest.raises(ValueError, match=re.escape(f"--{name.replace('_', '-')} {bad} {rule.says}")):
            validate(cls(**required, **{name: bad}))
    validate(cls(**required))  # the defaults pass


def test_server_settings_and_scheduler_check_what_the_server_parser_refuses():
    from exo_medusa_mlx.server.app import Settings
    from exo_medusa_mlx.server.main import setup_arg_parser
    from exo_medusa_mlx.server.scheduler import Scheduler

    types = parser_types(setup_arg_parser())
    for dest, rule in (("max_tokens", POSITIVE_INT), ("max_body_bytes", POSITIVE_INT), ("temp", NON_NEGATIVE),
                       ("top_p", PROBABILITY), ("queue_size", NON_NEGATIVE_INT), ("request_timeout", POSITIVE),
                       ("port", PORT)):
        assert types[dest] == rule.parse, dest
    for field, value, message in (("max_tokens", 0, "--max-tokens 0 must be at least 1"),
                                  ("top_p", 0.0, r"--top-p 0.0 must be in \(0, 1\]"),
                                  ("temp", -1.0, "--temp -1.0 must be >= 0")):
        with pytest.raises(ValueError, match=message):
            Settings("m", **{field: value})
    with pytest.raises(ValueError, match="--queue-size -1 must be >= 0"):
        Scheduler(lambda: None, queue_size=-1)
    with pytest.raises(ValueError, match="--request-timeout 0 must be > 0"):
        Scheduler(lambda: None, time_limit=0)


# --------------------------------------------------------------------------- the argparse types, one line


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
