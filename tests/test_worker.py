"""The engines' worker thread (``engine/worker.py``): closing it reports whether it finished its task."""

from __future__ import annotations

import threading

from exo_medusa_mlx.engine.worker import WorkerThread


def test_close_cancels_and_reports_a_busy_worker():
    w = WorkerThread("busy")
    release = threading.Event()
    w.submit(release.wait, 10)
    assert w.shutdown(timeout=0.2) is False  # still in its task
    release.set()
    assert w.shutdown(timeout=5) is True
