"""Medusa for exo 1.x (MLX distributed runners): ``MedusaBuilder`` and ``MedusaEngine``.

Importing this package imports exo: it runs inside an exo 1.x runner (Python 3.13,
exo installed). BOOTSTRAP.md shows the lines to change in exo's
``worker/runner/bootstrap.py``.
"""

from .engine import MedusaBuilder, MedusaEngine, agree_ids

__all__ = ["MedusaBuilder", "MedusaEngine", "agree_ids"]
