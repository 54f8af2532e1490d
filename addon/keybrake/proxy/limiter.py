"""Per-source failure counting: invalid vault keys and wrong admin tokens."""

from __future__ import annotations

import time

from mitmproxy import http

__all__ = ["FailureLimiter", "source_of"]


def source_of(flow: http.HTTPFlow) -> str:
    """The client's address (without the port), ``"?"`` when unknown."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else "?"


class FailureLimiter:
    """Counts failed attempts (invalid vault keys, wrong admin tokens) per source address
    in a sliding window; ``blocked`` once ``limit`` are inside it.

    Vault keys and generated admin tokens carry 256 bits, so guessing is hopeless anyway;
    this keeps a confused or hostile client from hammering the store with lookups, and
    bounds guesses at an operator-chosen (possibly weaker) admin token.
    """

    def __init__(self, limit: int = 30, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, list[float]] = {}

    def _recent(self, source: str) -> list[float]:
        cutoff = time.monotonic() - self.window
        hits = [t for t in self._hits.get(source, []) if t > cutoff]
        if hits:
            self._hits[source] = hits
        else:
            self._hits.pop(source, None)
        return hits

    def blocked(self, source: str) -> bool:
        return len(self._recent(source)) >= self.limit

    def record(self, source: str) -> None:
        if len(self._hits) > 10_000:
            self._hits.clear()  # bounded memory under a spray of sources
        self._recent(source)
        self._hits.setdefault(source, []).append(time.monotonic())
