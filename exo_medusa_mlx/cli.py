"""``mlx_medusa <command>``: one dispatcher, one module with ``main()`` per command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "generate": "exo_medusa_mlx.generate",
    "train": "exo_medusa_mlx.train",
    "tune": "exo_medusa_mlx.tune",
    "bench": "exo_medusa_mlx.bench",
    "node": "exo_medusa_mlx.ring.node",
    "ring": "exo_medusa_mlx.ring.launcher",
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
    module = COMMANDS[name]
    if name == "generate" and _backend(rest) == "torch":
        module = "exo_medusa_mlx.torch_compat.generate"
    importlib.import_module(module).main(rest)


def _backend(argv: list[str]) -> str:
    """--backend, with auto meaning MLX where it is installed, else torch."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", default="auto")
    backend = pre.parse_known_args(argv)[0].backend
    if backend == "auto":
        return "mlx" if importlib.util.find_spec("mlx") is not None else "torch"
    return backend


if __name__ == "__main__":
    main()
