"""Vendor request bodies are limited to 1 MiB, with or without a Content-Length."""

from __future__ import annotations

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
