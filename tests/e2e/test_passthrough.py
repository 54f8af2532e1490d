"""Only vendor hosts are intercepted: every other HTTPS host is tunnelled untouched.

A local HTTPS server with its own CA (not the Keybrake CA) is reached through the proxy with
CONNECT: the client must see that server's own certificate, and the proxy must not see the
request inside. A CONNECT to ``api.stripe.com`` gets a certificate from the Keybrake CA.
"""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"own server saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OwnServer:
    """An HTTPS server on 127.0.0.1 whose certificate comes from its own trustme CA."""

    def __init__(self) -> None:
        self.ca = trustme.CA(organization_name="Passthrough Test CA")
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def leaf_der(self) -> bytes:
        pem = self.cert.cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    server = OwnServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def connect(kb: KeybrakeProcess, authority: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def get(tls: ssl.SSLSocket, host: str, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    return data


def issuer_of(der: bytes | None) -> x509.Name:
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer


def keybrake_ca_subject(kb: KeybrakeProcess) -> x509.Name:
    pem = (kb.certs / "mitmproxy-ca-cert.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).subject


@pytest.mark.parametrize("authority", ["127.0.0.1", "localhost"])
def test_non_vendor_host_sees_its_own_certificate(
    keybrake_stripe: KeybrakeProcess,
    own_server: OwnServer,
    fake_stripe: FakeStripe,
    authority: str,
) -> None:
    kb = keybrake_stripe
    path = f"/passthrough-{uuid.uuid4().hex}"
    sock = connect(kb, f"{authority}:{own_server.port}")
    # Trusting only the server's own CA: a certificate minted by the proxy would fail here.
    with own_server.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        answer = get(tls, "localhost", path)
    assert der == own_server.leaf_der
    issuer = issuer_of(der)
    assert "Passthrough Test CA" in issuer.rfc4514_string()
    assert issuer != keybrake_ca_subject(kb)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"own server saw {path}".encode())
    # The proxy never decrypted the tunnel: the request path is nowhere in its log.
    log = kb.log()
    assert path not in log
    assert fake_stripe.secret not in log


def test_non_vendor_host_is_not_decrypted_even_for_a_client_trusting_keybrake(
    keybrake_stripe: KeybrakeProcess, own_server: OwnServer
) -> None:
    """A worker trusting only the Keybrake bundle cannot be fooled into trusting it here."""
    sock = connect(keybrake_stripe, f"127.0.0.1:{own_server.port}")
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        keybrake_stripe.ssl_context().wrap_socket(sock, server_hostname="localhost"),
    ):
        pass


def test_vendor_host_gets_a_keybrake_certificate(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    sock = connect(kb, "api.stripe.com:443")
    with kb.ssl_context().wrap_socket(sock, server_hostname="api.stripe.com") as tls:
        der = tls.getpeercert(binary_form=True)
        answer = get(tls, "api.stripe.com", "/v1/payment_intents/pi_123")
    assert issuer_of(der) == keybrake_ca_subject(kb)
    cert = x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.stripe.com" in names.get_values_for_type(x509.DNSName)
    # Decrypted and checked: no credential, so a Keybrake refusal, and the fake saw nothing.
    assert answer.startswith(b"HTTP/1.1 401")
    assert b"vault_key_missing" in answer
    assert fake_stripe.ledger == []
    assert fake_stripe.secret not in kb.log()
