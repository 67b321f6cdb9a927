"""``mlx_medusa <command>``: one dispatcher, one module with ``main()`` per command.

``main`` sets up MLX's BLAS (``setup_blas``) before a command module imports MLX.
"""

from __future__ import annotations

import importlib
import sys

from ._blas import setup_blas

COMMANDS = {
    "generate": "exo_medusa_mlx.generate",
    "train": "exo_medusa_mlx.training.train",
    "tune": "exo_medusa_mlx.tune",
    "bench": "exo_medusa_mlx.bench.main",
    "node": "exo_medusa_mlx.ring.node",
    "ring": "exo_medusa_mlx.ring.command",
    "server": "exo_medusa_mlx.server.main",
    "exo": "exo_medusa_mlx.exo.launch",
    "exo1": "exo_medusa_mlx.exo1.launch",
    "launch": "exo_medusa_mlx.launch",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mlx_medusa {" + ",".join(COMMANDS) + "} [options]")
        print("Run 'mlx_medusa <command> --help' for a command's options.")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"error: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}")
    setup_blas()  # before the command imports mlx
    importlib.import_module(COMMANDS[name]).main(rest)


if __name__ == "__main__":
    main()
