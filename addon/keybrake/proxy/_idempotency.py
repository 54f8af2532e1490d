"""Idempotent replay helpers: which calls share a scope, and what of a response is kept."""

from __future__ import annotations

import hashlib

from mitmproxy import http

from keybrake.store import StoredResponse
from keybrake.wire import HEADER_PREFIX, REPLAYED_HEADER

__all__ = [
    "HOP_BY_HOP",
    "body_fingerprint",
    "replay_response",
    "stored_from",
    "vendor_idempotency_key",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "content-length",
        "date",
    }
)


def body_fingerprint(method: str, path: str, body: bytes) -> str:
    """SHA-256 over method, canonical path and body: "the same request"."""
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(b"\0")
    h.update(path.encode())
    h.update(b"\0")
    h.update(body)
    return h.hexdigest()


def vendor_idempotency_key(key_id: str | None, worker_key: str) -> str:
    """The idempotency key forwarded to the vendor for a worker's key, namespaced by vault key.

    Vendors scope idempotency keys to the account, which every vault key of the vendor
    shares; this one depends on the vault key's id, so two keys never share it, and is
    deterministic, so every replica forwards the same key for a retry.

    >>> vendor_idempotency_key("key_a", "order-1") != vendor_idempotency_key("key_b", "order-1")
    True
    """
    digest = hashlib.sha256(f"{key_id}\0{worker_key}".encode("utf-8", "surrogateescape"))
    return f"kb_{digest.hexdigest()}"


def stored_from(response: http.Response) -> StoredResponse:
    """What is kept for replay: status, end-to-end headers (no cookies, no Keybrake spend
    headers, which describe the first call) and the decoded body."""
    headers = tuple(
        (k, v)
        for k, v in response.headers.items(multi=True)
        if k.lower() not in HOP_BY_HOP
        and not k.lower().startswith(HEADER_PREFIX)
        and k.lower() != "content-encoding"
    )
    return StoredResponse(response.status_code, headers, response.content or b"")


def replay_response(stored: StoredResponse) -> http.Response:
    """A fresh response from a stored one, marked ``X-Keybrake-Replayed: true``."""
    resp = http.Response.make(
        stored.status_code,
        stored.body,
        [(k.encode(), v.encode()) for k, v in stored.headers],
    )
    resp.headers[REPLAYED_HEADER] = "true"
    return resp
