"""TLS on the admin and base-URL listeners of a real ``keybrake run``.

An operator's certificate (``--tls-cert/--tls-key``, read again on ``SIGHUP`` without
dropping open connections), or one issued from the Keybrake CA for the names given
(``--tls-name``). With either, plain HTTP on those listeners is ``403 tls_required``. Workers
trust the CA with ``ca_bundle=`` (stripe SDK through `stripe_client`, `KeybrakeClient`).
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from tests.conftest import KeybrakeProcess, free_port
from tests.fakes import FakeStripe

from keybrake.client import KeybrakeClient
from keybrake.integrations import is_cap_hit, stripe_client

pytestmark = pytest.mark.e2e

CHARGE = {"currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}


def write_pair(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def served_certificate(port: int, server_name: str, cafile: Path) -> bytes:
    """The DER certificate a new TLS connection to ``127.0.0.1:port`` is given."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def get_on(sock: ssl.SSLSocket, path: str) -> int:
    """One keep-alive ``GET`` on an open TLS connection: the status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def operator_proxy(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> tuple[KeybrakeProcess, trustme.CA, Path, int]:
    ca = trustme.CA(organization_name="Operator CA")
    ca_pem = tmp_path / "operator-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert, key = write_pair(ca, tmp_path, "localhost", "127.0.0.1")
    base_port = free_port()
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        start=False,
        run_args=[
            "--base-url-listen",
            f"127.0.0.1:{base_port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
    )
    kb.admin_verify = ssl.create_default_context(cafile=str(ca_pem))
    kb.start()
    return kb, ca, ca_pem, base_port


def test_operator_certificate_on_both_listeners(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    kb, _, ca_pem, base_port = operator_proxy(keybrake_factory, fake_stripe, tmp_path)
    with KeybrakeClient(kb.admin_url, kb.admin_token, ca_bundle=ca_pem) as admin:
        issued = admin.issue_key(
            vendor="stripe",
            daily_usd_cap=3,
            allowed_endpoints=["POST /v1/payment_intents"],
            expires_in="1h",
            agent_run_label="tls/operator",
        )
        assert admin.health()["status"] == "ok"
    # The stripe SDK trusts the operator's CA for this client only (no process-wide setting).
    client = stripe_client(issued.vault_key, f"https://localhost:{base_port}", ca_bundle=ca_pem)
    assert client.v1.payment_intents.create(params={"amount": 300, **CHARGE}).status == (
        "succeeded"
    )
    with pytest.raises(Exception) as capped:
        client.v1.payment_intents.create(params={"amount": 100, **CHARGE})
    assert is_cap_hit(capped.value)
    assert fake_stripe.charged_usd_micros() == 3_000_000

    # Plain HTTP is refused on both listeners, in the error contract.
    for port in (kb.admin_port, base_port):
        for path in ("/vault/keys", "/stripe/v1/payment_intents", "/healthz"):
            r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "tls_required"
            assert r.headers["X-Keybrake-Error"] == "tls_required"
    # Nobody else's CA vouches for it: not the Keybrake CA, not the system's.
    with pytest.raises(httpx.ConnectError):
        keybrake_ca = ssl.create_default_context(cafile=str(kb.bundle))
        httpx.get(f"https://localhost:{base_port}/healthz", verify=keybrake_ca, timeout=10)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://localhost:{base_port}/healthz", timeout=10)
    assert issued.vault_key not in kb.log() and kb.admin_token not in kb.log()


def test_sighup_reloads_the_certificate_without_dropping_connections(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    kb, ca, ca_pem, base_port = operator_proxy(keybrake_factory, fake_stripe, tmp_path)
    first = served_certificate(base_port, "localhost", ca_pem)
    context = ssl.create_default_context(cafile=str(ca_pem))
    raw = socket.create_connection(("127.0.0.1", base_port), timeout=10)
    held = context.wrap_socket(raw, server_hostname="localhost")
    try:
        assert get_on(held, "/healthz") == 200
        write_pair(ca, tmp_path, "localhost", "127.0.0.1")  # the renewed certificate
        assert kb.proc is not None
        kb.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS certificate reloaded" not in kb.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "TLS certificate reloaded" in kb.log()
        renewed = served_certificate(base_port, "localhost", ca_pem)
        assert renewed != first
        assert served_certificate(kb.admin_port, "localhost", ca_pem) == renewed
        # The connection opened before the reload still works.
        assert get_on(held, "/readyz") == 200
    finally:
        held.close()
    assert kb.proc.poll() is None

    # A broken file at the next SIGHUP: the running certificate stays, the error is logged.
    (tmp_path / "tls-key.pem").write_text("not a key\n")
    kb.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificate not reloaded" not in kb.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS certificate not reloaded, keeping the old one" in kb.log()
    assert served_certificate(base_port, "localhost", ca_pem) == renewed


def test_certificate_from_the_keybrake_ca_for_the_names_given(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        start=False,
        run_args=["--tls-name", "keybrake.internal", "--tls-name", "127.0.0.1"],
    )
    kb.admin_verify = ssl.create_default_context(cafile=str(kb.bundle))
    kb.start()
    key = kb.issue_key(daily_usd_cap="5")
    # An IP address (no SNI) and the name both verify against the Keybrake CA bundle.
    with KeybrakeClient(
        f"https://127.0.0.1:{kb.admin_port}", kb.admin_token, ca_bundle=kb.bundle
    ) as admin:
        assert admin.get_key(key["key_id"]).status == "active"
    der = served_certificate(kb.admin_port, "keybrake.internal", kb.bundle)
    # Whatever name a client asks for, the certificate is the one for the names given.
    assert served_certificate(kb.admin_port, "127.0.0.1", kb.bundle) == der
    with pytest.raises(ssl.SSLCertVerificationError):
        served_certificate(kb.admin_port, "localhost", kb.bundle)
    client = stripe_client(
        key["vault_key"], f"https://127.0.0.1:{kb.admin_port}", ca_bundle=kb.bundle
    )
    assert client.v1.payment_intents.create(params={"amount": 100, **CHARGE}).status == (
        "succeeded"
    )
    r = httpx.get(f"http://127.0.0.1:{kb.admin_port}/vault/keys", timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "tls_required"
