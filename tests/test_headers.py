"""`keybrake.proxy._headers`: one-pass header work means what mitmproxy's `Headers` means."""

from __future__ import annotations

import pytest
from mitmproxy import http

from keybrake.proxy._headers import HeaderView, redact, rewrite

FIELDS = [
    (b"Host", b"api.stripe.com"),
    (b"authorization", b"Bearer kb_live_x"),
    (b"X-Keybrake-Actor", b"worker-1"),
    (b"Idempotency-Key", b"a"),
    (b"x-keybrake-message-id", b"m"),
    (b"Idempotency-Key", b"b"),
    (b"Content-Type", b"application/x-www-form-urlencoded"),
]


def _by_mitmproxy(fields: list[tuple[bytes, bytes]], values: dict[str, str]) -> http.Headers:
    h = http.Headers(fields)
    for name in [n for n in h if n.lower().startswith("x-keybrake-")]:
        del h[name]
    for name, value in values.items():
        h[name] = value
    return h


@pytest.mark.parametrize(
    "values",
    [
        {"Authorization": "Bearer sk_real"},
        {"Authorization": "Bearer sk_real", "Idempotency-Key": "kb_ns_a"},
        {"x-api-key": "sk_real"},  # not there: appended
        {},
    ],
)
def test_rewrite_is_delete_then_set(values: dict[str, str]) -> None:
    h = http.Headers(FIELDS)
    rewrite(h, values, drop_prefix="x-keybrake-")
    assert h.fields == _by_mitmproxy(FIELDS, values).fields


def test_rewrite_without_prefix_keeps_other_headers() -> None:
    h = http.Headers([(b"X-Keybrake-Spent-Usd", b"1.00"), (b"Request-Id", b"req_1")])
    rewrite(h, {"X-Keybrake-Spent-Usd": "2.00", "X-Keybrake-Remaining-Usd": "3.00"})
    assert h.fields == (
        (b"X-Keybrake-Spent-Usd", b"2.00"),
        (b"Request-Id", b"req_1"),
        (b"X-Keybrake-Remaining-Usd", b"3.00"),
    )


def test_view_reads_as_mitmproxy_headers() -> None:
    h, view = http.Headers(FIELDS), HeaderView(FIELDS)
    for name in (
        "idempotency-key",
        "IDEMPOTENCY-KEY",
        "Authorization",
        "missing",
        "x-keybrake-actor",
    ):
        assert view.get(name) == h.get(name)
        assert view.get_all(name) == h.get_all(name)
        assert (name in view) == (name in h)


def test_redact_hides_every_credential_header_once() -> None:
    h = http.Headers(
        [
            (b"Authorization", b"Bearer sk_real"),
            (b"X-Api-Key", b"sk_real"),
            (b"authorization", b"Basic c2s6"),
            (b"Accept", b"*/*"),
        ]
    )
    redact(h, "[redacted]")
    assert h.fields == (
        (b"Authorization", b"[redacted]"),
        (b"X-Api-Key", b"[redacted]"),
        (b"Accept", b"*/*"),
    )
    before = h.fields
    redact(h, "[redacted]")  # already clean: left as it is
    assert h.fields is before
    assert b"sk_real" not in bytes(h)
