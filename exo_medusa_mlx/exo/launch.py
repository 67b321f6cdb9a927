"""``mlx_medusa exo [exo's own arguments]``: exo 0.0.x's node and API, with Medusa.

Calls ``install()``, then runs exo's own ``main`` with the arguments given (exo parses
them; ``mlx_medusa exo --help`` prints exo's help). Without ``--inference-engine`` the
node runs ``medusa-mlx`` where MLX is installed, else ``medusa-torch``. exo must be
importable: install it from its v0.0.15-alpha tag.
"""

from __future__ import annotations

import importlib
import sys

from ..backends import resolve_backend


def default_engine() -> str:
    return f"medusa-{resolve_backend('auto')}"


def exo_argv(argv: list[str]) -> list[str]:
    """exo's arguments, with our engine unless one is named."""
    if any(a == "--inference-engine" or a.startswith("--inference-engine=") for a in argv):
        return list(argv)
    return ["--inference-engine", default_engine(), *argv]


def main(argv: list[str] | None = None) -> None:
    from .install import install

    argv = exo_argv(sys.argv[1:] if argv is None else argv)
    try:
        install()
    except ImportError as e:
        sys.exit(f"error: {e}")
    sys.argv = ["exo", *argv]
    exo_main = importlib.import_module("exo.main")  # parses sys.argv and builds the node as it loads
    exo_main.run()


if __name__ == "__main__":
    main()
