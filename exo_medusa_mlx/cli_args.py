"""What every command's flags and inputs share: argparse types that refuse bad numbers at parse
time, the prompt read as UTF-8, and errors printed as one line.

``type=finite_float`` (and the others) make argparse refuse ``nan``, ``inf`` and
out-of-range values before anything loads, with its usual ``error: argument --temp:
...`` line and exit code 2. ``one_line`` shortens any message to one line;
``fail`` exits with it (code 1). ``interrupt_flag`` makes Ctrl-C stop a generation loop
for sure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading

from .core.slots import DEFAULT_KEEP

MAX_ERROR_CHARS = 400  # a message longer than this is cut (mlx-lm lists every missing weight)
PARALLEL_MODES = ("pipeline", "tensor")  # --parallel: split by layers, or mlx-lm's tensor sharding
DIST_TIMEOUT_S = 120.0  # --dist-timeout: a wait on another rank (a prefill chunk of a large model on a slow rank fits)


def _number(text: str, cast, what: str):
    try:
        value = cast(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number: give {what}")
    return value


def finite_float(text: str) -> float:
    """Any finite float (no nan, inf)."""
    return _number(text, float, "a finite number")


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (a temperature, a weight decay)."""
    v = _number(text, float, "a finite number >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def positive_float(text: str) -> float:
    """A finite float > 0 (seconds, a learning rate, epochs)."""
    v = _number(text, float, "a finite number > 0")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def probability(text: str) -> float:
    """A float in (0, 1] (top-p)."""
    v = _number(text, float, "a number in (0, 1]")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return v


def fraction(text: str) -> float:
    """A float in [0, 1) (a validation split, a noise level)."""
    v = _number(text, float, "a number in [0, 1)")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return v


def positive_int(text: str) -> int:
    v = _number(text, int, "a whole number >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def non_negative_int(text: str) -> int:
    v = _number(text, int, "a whole number >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def port(text: str) -> int:
    v = _number(text, int, "a port number")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text} must be in 0..65535 (0: any free port)")
    return v


def kv_window(text: str) -> int:
    """A committed-token window (``--max-kv-size``): the sink tokens and at least two more."""
    v = _number(text, int, "a whole number of tokens")
    if v < DEFAULT_KEEP + 2:
        raise argparse.ArgumentTypeError(f"{text} is too small: the window keeps {DEFAULT_KEEP} sink tokens, "
                                         f"give at least {DEFAULT_KEEP + 2}")
    return v


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
