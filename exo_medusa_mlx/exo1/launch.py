"""``mlx_medusa exo1 [exo's own arguments]``: exo 1.x's node, with Medusa chosen per model.

Calls ``install()``, then exo's own ``main`` with the arguments given (exo parses them;
``mlx_medusa exo1 --help`` prints exo's help). Run it in exo's environment.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> None:
    from .install import install

    argv = sys.argv[1:] if argv is None else argv
    try:
        install()
    except ImportError as e:
        sys.exit(f"error: {e}")
    try:
        exo_main = importlib.import_module("exo.main")
    except ImportError as e:
        sys.exit(f"error: cannot import exo's node ({e}): install exo 1.x in this environment with its Rust "
                 "bindings (exo-rs), as exo's README says")
    sys.argv = ["exo", *argv]
    exo_main.main()


if __name__ == "__main__":
    main()
