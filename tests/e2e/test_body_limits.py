"""Vendor request bodies are limited to 1 MiB, with or without a Content-Length."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    yield b"amount=100&currency=usd&description="
    while sent < total:
        yield b"x" * size
        sent += size


@pytest.mark.parametrize(("total", "status"), [(16 * 1024, 200), (2 * 1024 * 1024, 413)])
def test_chunked_bodies_are_limited_like_sized_ones(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, total: int, status: int
) -> None:
    key = keybrake_stripe.issue_key()
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        content=_chunks(total),  # a generator: sent with Transfer-Encoding: chunked
        headers={
            "Authorization": f"Bearer {key['vault_key']}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        proxy=keybrake_stripe.proxy_url,
        verify=keybrake_stripe.ssl_context(),
        timeout=30,
    )
    assert r.status_code == status, r.text[:300]
    if status == 413:
        assert r.json()["error"]["code"] == "body_too_large"
        assert fake_stripe.ledger == []
    else:
        assert len(fake_stripe.ledger) == 1


def test_a_declared_length_over_mitmproxys_limit_is_refused_in_the_contract(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    """A declared 20 MB body passes mitmproxy's ``body_size_limit`` (16 MiB): mitmproxy gives
    up on the request before reading it, and the worker gets Keybrake's ``413
    body_too_large`` (not mitmproxy's HTML page); the connection then closes."""
    from tests.reliability.test_hostile import raw_request, tunnel

    kb = keybrake_stripe
    vk = kb.issue_key()["vault_key"]
    sock = tunnel(kb)
    head = raw_request(vk, body=b"").replace(b"Content-Length: 0", b"Content-Length: 20000000")
    sock.sendall(head + b"a" * 1000)  # headers and a first kilobyte, never the rest
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head_text, _, body = data.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 413"), data[:300]
    headers = head_text.decode("latin-1").lower()
    assert "content-type: application/json" in headers
    assert "x-keybrake-error: body_too_large" in headers
    assert "connection: close" in headers
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert fake_stripe.ledger == []
