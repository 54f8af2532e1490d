"""Loopback ports for the processes a test starts.

One helper for the whole suite. The kernel may hand the same ephemeral port to two
``bind(0)`` calls in a row once the first socket is closed, so a test that asks for two
ports (a proxy and its admin listener) could get one port twice; ``free_port`` remembers
what it gave out in this process and never returns a port twice.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port"]

_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that is free now and that this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _lock:
            if port not in _given:
                _given.add(port)
                return port
