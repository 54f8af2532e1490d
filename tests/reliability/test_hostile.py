"""Hostile input through a real proxy: target/Host/SNI tricks, smuggling shapes, oversized
requests, HTTP/2, the admin API and vault-key brute force. Whatever the trick, the fake
vendor must never see a vault key, and never a request that skipped the checks."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.reliability.conftest import charge, code_of, healthy

pytestmark = pytest.mark.e2e

FORM = b"amount=100&currency=usd&confirm=true&payment_method=pm_card_visa"
BOGUS_KEY = "kbv_stripe_" + "A" * 43


def no_vault_key_reached_vendor(fake: FakeStripe, *vault_keys: str) -> None:
    for entry in fake.ledger:
        blob = (entry.path + json.dumps(entry.headers)).encode() + entry.body
        for vk in vault_keys:
            assert vk.encode() not in blob, entry
        assert entry.header("Authorization") == f"Bearer {fake.secret}", entry


def tunnel(
    kb: KeybrakeProcess, target: str = "api.stripe.com:443", sni: str = "api.stripe.com"
) -> ssl.SSLSocket:
    """A TLS connection to ``target`` through the proxy's CONNECT, with the given SNI."""
    raw = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=15)
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return kb.ssl_context().wrap_socket(raw, server_hostname=sni)


def exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read until the connection closes or a full response arrived."""
    sock.sendall(request)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    finally:
        sock.close()
    if not data.startswith(b"HTTP/"):
        return -1, data
    return int(data.split(b" ", 2)[1]), data


def raw_request(
    vk: str,
    *,
    target: str = "/v1/payment_intents",
    host: str = "api.stripe.com",
    extra: str = "",
    body: bytes = FORM,
    auth: str | None = None,
) -> bytes:
    auth_lines = auth if auth is not None else f"Authorization: Bearer {vk}\r\n"
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{auth_lines}"
        f"Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


# -------------------------------------------------------------------------- targets & hosts


@pytest.mark.parametrize(
    ("request_target", "host"),
    [
        ("/v1/payment_intents", "evil.example"),  # Host differs from CONNECT/SNI
        ("https://evil.example/v1/payment_intents", "api.stripe.com"),  # absolute-form
        ("https://api.stripe.com.evil.example/v1/payment_intents", "api.stripe.com"),
        ("/v1/payment_intents", "api.stripe.com@evil.example"),
        pytest.param(
            "/v1/payment_intents",
            "api.stripe.com:443, evil.example",
        ),
    ],
)
def test_host_tricks_in_the_tunnel_are_refused(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe, request_target: str, host: str
) -> None:
    status, data = exchange(tunnel(kb), raw_request(vk, target=request_target, host=host))
    assert status in (400, 403), data[:400]
    assert fake_stripe.ledger == []


def test_connect_to_other_host_with_vendor_sni_never_reaches_vendor(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    try:
        sock = tunnel(kb, target="127.0.0.1:9", sni="api.stripe.com")
    except (AssertionError, ssl.SSLError, OSError):
        # Refused at CONNECT (403 egress_denied: loopback is never reachable) or at TLS. The
        # same trick through a listed passthrough host: tests/security/test_egress.py.
        sock = None
    if sock is not None:
        status, data = exchange(sock, raw_request(vk))
        assert status != 200, data[:400]
    assert fake_stripe.ledger == []
    assert healthy(kb)


def test_duplicate_authorization_and_key_in_query(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    dup = f"Authorization: Bearer {vk}\r\nAuthorization: Bearer {vk}\r\n"
    status, data = exchange(tunnel(kb), raw_request(vk, auth=dup))
    assert status == 403 and b"credential_ambiguous" in data, data[:400]
    other = f"Authorization: Bearer {vk}\r\nauthorization: Basic {BOGUS_KEY}\r\n"
    status, data = exchange(tunnel(kb), raw_request(vk, auth=other))
    assert status in (401, 403), data[:400]
    status, data = exchange(tunnel(kb), raw_request(vk, target=f"/v1/payment_intents?key={vk}"))
    assert status == 403 and b"vault_key_in_query" in data, data[:400]
    assert fake_stripe.ledger == []


def test_percent_encoded_vault_key_in_query_is_refused(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    target = f"/v1/payment_intents?x=%6B%62v_{vk[4:]}"
    status, data = exchange(tunnel(kb), raw_request(vk, target=target))
    assert status in (401, 403), data[:400]
    assert fake_stripe.ledger == []


PATH_TRICKS = [
    "/v1/payment%5Fintents",  # encoded "_"
    "/v1/%70ayment_intents",  # encoded "p"
    "//v1//payment_intents/",
    "/v1/./payment_intents",
    "/v1/x/../payment_intents",
    "/V1/Payment_Intents",
    "/v1/payment_intents%2F..%2Frefunds",
    "/v1/payment_intents/..%2Frefunds",
    "/v1/p\u0430yment_intents",  # Cyrillic a
    "/v1/payment\uff3fintents",  # fullwidth low line
    "/v1/payment_intents%00",
    "/v1/payment_intents;refunds",
    "/v1/%2570ayment_intents",  # double encoding
    "/v1/refunds#/v1/payment_intents",
]


def test_path_encodings_are_refused_or_normalised(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    for target in PATH_TRICKS:
        n = len(fake_stripe.ledger)
        wire = target.encode("utf-8").decode("latin-1")
        status, data = exchange(tunnel(kb), raw_request(vk, target=wire))
        new = [e.route for e in fake_stripe.ledger[n:]]
        if status == 200:
            # Normalised: the vendor got exactly the allowed endpoint, with the real secret.
            assert new == ["/v1/payment_intents"], target
        else:
            assert status in (400, 403, 404), (target, data[:400])
            assert new == [], target
    no_vault_key_reached_vendor(fake_stripe, vk)


# ---------------------------------------------------------------------------- smuggling


@pytest.mark.parametrize(
    "extra",
    [
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Content-Length: 3\r\n",
        "Transfer-Encoding: \tchunked\r\n",
        "Transfer-Encoding: xchunked\r\n",
    ],
)
def test_conflicting_length_headers_are_not_smuggled(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe, extra: str
) -> None:
    # Second request hidden in the body: it must never reach the vendor on its own.
    hidden = raw_request(vk, target="/v1/refunds")
    body = b"0\r\n\r\n" + hidden
    status, data = exchange(tunnel(kb), raw_request(vk, extra=extra, body=body))
    assert status in (400, 403, 413, 501, -1), data[:400]
    assert [e for e in fake_stripe.ledger if e.route != "/v1/payment_intents"] == []
    no_vault_key_reached_vendor(fake_stripe, vk)
    assert healthy(kb)


def test_oversized_body_and_headers_are_refused_before_buffering(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    # Refused on the Content-Length alone (the body is drained, not forwarded or parsed).
    status, data = exchange(tunnel(kb), raw_request(vk, body=b"a" * 2_000_000))
    assert status == 413 and b"body_too_large" in data, data[:400]
    many = "".join(f"X-Pad-{i}: {i}\r\n" for i in range(150))
    status, data = exchange(tunnel(kb), raw_request(vk, extra=many))
    assert status in (413, 431, 400), data[:400]
    huge = f"X-Big: {'a' * 200_000}\r\n"
    status, data = exchange(tunnel(kb), raw_request(vk, extra=huge))
    assert status in (413, 431, 400, -1), data[:400]
    assert fake_stripe.ledger == []
    assert healthy(kb)
    assert charge(kb, vk, 100).status_code == 200


# ---------------------------------------------------------------------------- brute force


def test_invalid_vault_keys_are_rate_limited_per_source(
    kb: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    codes = []
    for i in range(35):
        r = charge(kb, f"kbv_stripe_{i:043d}", 100)
        codes.append(code_of(r))
    assert codes[:30] == ["vault_key_unknown"] * 30
    assert codes[30:] == ["rate_limited"] * 5
    assert fake_stripe.ledger == []


# ---------------------------------------------------------------------------- admin API


def _issue(kb: KeybrakeProcess, **fields: Any) -> httpx.Response:
    body = {
        "vendor": "stripe",
        "daily_usd_cap": 5,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "1h",
        "agent_run_label": "hostile/test",
    }
    body.update(fields)
    return kb.admin("POST", "/vault/keys", body)


def _raw_admin(kb: KeybrakeProcess, content: bytes, token: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{kb.admin_url}/vault/keys",
        content=content,
        headers={"Authorization": f"Bearer {token or kb.admin_token}"},
        timeout=20,
    )


def test_admin_token_is_required(kb: KeybrakeProcess) -> None:
    for token in ("wrong", kb.admin_token[:-1], kb.admin_token + "x", kb.admin_token.upper()):
        r = kb.admin("GET", "/vault/keys", token=token)
        assert r.status_code in (401, 403), token
    r = httpx.get(f"{kb.admin_url}/vault/keys", timeout=10)
    assert r.status_code in (401, 403)
    assert kb.admin("GET", "/vault/keys").status_code == 200


def test_wrong_admin_tokens_are_rate_limited_per_source(kb: KeybrakeProcess) -> None:
    """30 wrong tokens a minute from one address, then that address is refused (even with
    the right token) while another address is not. Missing tokens are not counted."""
    for _ in range(5):
        assert httpx.get(f"{kb.admin_url}/vault/keys", timeout=10).status_code == 401
    codes = [code_of(kb.admin("GET", "/vault/keys", token=f"guess-{i}")) for i in range(32)]
    assert codes == ["admin_token_invalid"] * 30 + ["rate_limited"] * 2
    blocked = kb.admin("GET", "/vault/keys")
    assert (blocked.status_code, code_of(blocked)) == (429, "rate_limited")
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=other, timeout=10) as c:
        r = c.get(
            f"{kb.admin_url}/vault/keys", headers={"Authorization": f"Bearer {kb.admin_token}"}
        )
    assert r.status_code == 200, r.text


def test_admin_token_check_hashes_both_sides_before_comparing() -> None:
    """The comparison is over fixed-length digests: its time depends on neither the length of
    the real token nor how much of it a guess gets right (measured in bench/admin_timing.py)."""
    from keybrake.proxy.core import Runtime

    rt = Runtime()
    assert not rt.admin_token_matches("anything")  # no token configured: nothing matches
    rt.admin_token = "kba_" + "s" * 43
    assert rt.admin_token_matches(rt.admin_token)
    for guess in ("", "kba_", rt.admin_token[:-1], rt.admin_token + "s", "\udcff", "ü" * 50):
        assert not rt.admin_token_matches(guess), guess


JSON_BOMBS = [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"[" * 30_000,
    json.dumps({"allowed_endpoints": ["POST /v1/payment_intents"] * 5000}).encode(),
    b'{"vendor":"stripe","daily_usd_cap":' + b"9" * 5000 + b"}",
    b"\xff\xfe\x00garbage",
]


def test_admin_json_bombs_are_refused(kb: KeybrakeProcess) -> None:
    for content in JSON_BOMBS:
        r = _raw_admin(kb, content)
        assert r.status_code in (400, 413, 422), (content[:40], r.text[:300])
        assert r.json()["error"]["code"]
    assert healthy(kb)


HOSTILE_FIELDS: list[dict[str, Any]] = [
    {"expires_in": "99999999999d"},
    {"expires_in": "P9999999999Y"},
    {"expires_in": "-1h"},
    {"expires_in": "0s"},
    {"daily_usd_cap": -1},
    {"daily_usd_cap": "-0.01"},
    {"daily_usd_cap": "NaN"},
    {"daily_usd_cap": "Infinity"},
    {"daily_usd_cap": "1e309"},
    {"daily_usd_cap": "0x10"},
    {"daily_usd_cap": 10**30},
    {"daily_usd_cap": True},
    {"usd_cap": "nan"},
    {"agent_run_label": "run\nFAKE LOG LINE"},
    {"agent_run_label": "<script>alert(1)</script>"},
    {"agent_run_label": "a" * 500},
    {"agent_run_label": "run\u202eevil"},
    {"vendor": "../../etc/passwd"},
    {"allowed_endpoints": ["POST /v1/payment_intents\r\nX: y"]},
]


def test_admin_rejects_hostile_fields(kb: KeybrakeProcess) -> None:
    for fields in HOSTILE_FIELDS:
        r = _issue(kb, **fields)
        assert r.status_code in (400, 422), (fields, r.status_code, r.text[:300])
    assert kb.admin("GET", "/vault/keys").status_code == 200


def test_admin_rejects_raw_nan_and_overflowing_numbers(kb: KeybrakeProcess) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e309", b"1.5e2"):
        body = (
            b'{"vendor":"stripe","daily_usd_cap":' + literal + b',"allowed_endpoints":'
            b'["POST /v1/payment_intents"],"expires_in":"1h","agent_run_label":"x"}'
        )
        r = _raw_admin(kb, body)
        assert r.status_code in (400, 422), (literal, r.text[:300])
    assert healthy(kb)
