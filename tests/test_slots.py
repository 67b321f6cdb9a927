"""Committed slots (``core/slots.py``): the one prefill loop commits chunk by chunk and stops before the
next chunk when its check raises. (The slot map's positions and masks are checked against mlx-lm in
``test_cache.py`` and on the device in ``test_torch_static.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from exo_medusa_mlx.core.limits import Cancelled, CancelToken
from exo_medusa_mlx.core.slots import run_committed


class Placed:
    """A cache context that only counts what it commits."""

    committed = 0

    def begin(self, n):
        pass

    def commit(self, caches, nodes):
        self.committed += len(nodes)


def test_run_committed_stops_at_the_next_chunk():
    ctx, ran = Placed(), []
    token = CancelToken()

    def run(s, e):
        ran.append(s)
        if len(ran) == 2:
            token.cancel("stop")
        return np.zeros((e - s, 1))

    with pytest.raises(Cancelled, match="stop"):
        run_committed(ctx, None, 10, run, step=2, check=token.check)
    assert ran == [0, 2] and ctx.committed == 4  # two chunks committed, the third never began
