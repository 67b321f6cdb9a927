"""This machine (``core/machine.py``): free ports for the launchers, distinct, and a host that cannot
be bound named in one line."""

from __future__ import annotations

import pytest

from exo_medusa_mlx.core.machine import free_ports


def test_free_ports_are_distinct_and_a_host_that_cannot_bind_is_named():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)
    with pytest.raises(ValueError, match=r"--host 192\.0\.2\.1: cannot bind it"):  # TEST-NET-1: never local
        free_ports(1, "192.0.2.1")
