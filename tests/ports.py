"""Loopback ports for tests that start a server (or need one nothing listens on)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port free at the time of asking."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
