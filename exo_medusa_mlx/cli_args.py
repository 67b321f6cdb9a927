"""What every command's flags and inputs share: one ``Rule`` per kind of number, the prompt read
as UTF-8, and errors printed as one line.

A ``Rule`` checks a value the same way wherever it arrives. ``type=finite_float`` (and the
others, a rule's ``parse``) make argparse refuse ``nan``, ``inf`` and out-of-range values
before anything loads, with its usual ``error: argument --temp: ...`` line and exit code 2;
options dataclasses and the server's settings call the same rules' ``check`` (``check_fields``).
``one_line`` shortens any message to one line; ``fail`` exits with it (code 1).
``interrupt_flag`` makes Ctrl-C stop a generation loop for sure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .core.slots import DEFAULT_KEEP

MAX_ERROR_CHARS = 400  # a message longer than this is cut (mlx-lm lists every missing weight)
PARALLEL_MODES = ("pipeline", "tensor")  # --parallel: split by layers, or mlx-lm's tensor sharding
DIST_TIMEOUT_S = 120.0  # --dist-timeout: a wait on another rank (a prefill chunk of a large model on a slow rank fits)


@dataclass(frozen=True)
class Rule:
    """What a number flag must be, checked one way wherever the value arrives: argparse refuses a
    bad flag at parse time (``parse``, a ``type=``); an options dataclass or a server setting
    refuses a bad value with a one-line ``ValueError`` naming the flag (``check``); the same words."""

    cast: type  # int or float
    what: str  # what a value must look like: "a whole number >= 1"
    ok: Callable[[Any], bool]
    says: str  # what is wrong with a value out of range: "must be at least 1"

    def parse(self, text: str):
        try:
            value = self.cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"'{text}' is not {self.what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number: give {self.what}")
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"{text} {self.says}")
        return value

    def check(self, flag: str, value):
        """``value`` if it is right for ``flag`` (None: not given), else a ``ValueError`` naming it."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.cast is int and
                                                                              not isinstance(value, int)):
            raise ValueError(f"{flag} {value!r} is not {self.what}")
        if not math.isfinite(value) or not self.ok(value):
            raise ValueError(f"{flag} {value} {self.says or 'must be a finite number'}")
        return value


def int_range(low: int, high: int, note: str = "") -> Rule:
    """A whole number in ``low..high``."""
    return Rule(int, f"a whole number in {low}..{high}", lambda v: low <= v <= high, f"must be in {low}..{high}{note}")


FINITE = Rule(float, "a finite number", lambda v: True, "")
NON_NEGATIVE = Rule(float, "a finite number >= 0", lambda v: v >= 0, "must be >= 0")  # a temperature, a weight decay
POSITIVE = Rule(float, "a finite number > 0", lambda v: v > 0, "must be > 0")  # seconds, a learning rate, epochs
PROBABILITY = Rule(float, "a number in (0, 1]", lambda v: 0 < v <= 1, "must be in (0, 1]")  # top-p
FRACTION = Rule(float, "a number in [0, 1)", lambda v: 0 <= v < 1, "must be in [0, 1)")  # a split, a noise level
POSITIVE_INT = Rule(int, "a whole number >= 1", lambda v: v >= 1, "must be at least 1")
NON_NEGATIVE_INT = Rule(int, "a whole number >= 0", lambda v: v >= 0, "must be >= 0")
PORT = int_range(0, 65535, " (0: any free port)")
# --max-kv-size: the sink tokens and at least two more.
KV_WINDOW = Rule(int, "a whole number of tokens", lambda v: v >= DEFAULT_KEEP + 2,
                 f"is too small: the window keeps {DEFAULT_KEEP} sink tokens, give at least {DEFAULT_KEEP + 2}")

# The argparse types (``type=positive_int``).
finite_float = FINITE.parse
non_negative_float = NON_NEGATIVE.parse
positive_float = POSITIVE.parse
probability = PROBABILITY.parse
fraction = FRACTION.parse
positive_int = POSITIVE_INT.parse
non_negative_int = NON_NEGATIVE_INT.parse
port = PORT.parse
kv_window = KV_WINDOW.parse


def check_fields(options, rules: dict[str, Rule]) -> None:
    """Each field of an options dataclass named in ``rules`` against its rule, the flag named
    ``--field-name`` (what the command's parser refuses for the same value)."""
    for name, rule in rules.items():
        rule.check(f"--{name.replace('_', '-')}", getattr(options, name))


def read_prompt(arg: str, flag: str = "--prompt") -> str:
    """The prompt from its flag, or from stdin for ``-``, as UTF-8 text (one-line ``ValueError`` else)."""
    if arg == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the prompt on stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}): convert it, e.g. with iconv") from None
    try:
        arg.encode("utf-8")  # the command line's undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag} is not UTF-8 text (undecodable byte at character {e.start}): convert it, "
                         f"or pass it on stdin with {flag} -") from None
    return arg


def one_line(message, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` (an exception or text) on one line of at most ``limit`` characters."""
    text = " ".join(str(message).split())
    if len(text) > limit:
        text = f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"
    return text


def fail(message) -> None:
    """Exit with ``error: <message>`` on one line (exit code 1)."""
    sys.exit(f"error: {one_line(message)}")


@contextlib.contextmanager
def interrupt_flag():
    """An Event set by Ctrl-C (SIGINT), which still raises KeyboardInterrupt: a loop that checks it
    stops even when the exception lands where Python only reports it (a finalizer, a callback)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def on_sigint(signum, frame):
        stopped.set()
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, before)
