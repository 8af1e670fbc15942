"""free_port: ports for children to bind, kept out of the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from scalellm import redis_server
from scalellm.redis_server import free_port


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@pytest.mark.skipif(not Path("/proc/sys/net/ipv4/ip_local_port_range").exists(), reason="Linux only")
def test_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = free_port()
        # Offer only the busy port and a free one (forgotten as handed out): the free one comes back.
        monkeypatch.setattr(redis_server, "_handed_out", set())
        monkeypatch.setattr(redis_server, "_ports_outside_ephemeral_range", lambda: [busy, free])
        assert free_port() == free
        with pytest.raises(OSError, match="no free TCP port"):
            free_port()  # the free one was handed out, the other is busy


def test_without_the_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(redis_server, "_EPHEMERAL_RANGE", tmp_path / "missing")
    port = free_port()
    assert 0 < port < 65536
