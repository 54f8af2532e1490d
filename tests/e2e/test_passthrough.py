"""Only vendor hosts are intercepted: a listed passthrough destination is tunnelled untouched.

Non-vendor destinations are refused unless the operator lists them (``--passthrough``; the
refusals are in ``tests/security/test_egress.py``), and even a listed one must have a global
address. So the destination lives in a network namespace of its own (``tests/netns.py``):
the proxy and the client run in namespace A, an HTTPS server with its own CA (not the
Keybrake CA) in namespace B at 192.88.99.2, and a stub name server in A resolves
``own.example`` to it. Through ``CONNECT`` the client must see that server's own certificate
and bytes, and the proxy must not see the request inside. A ``CONNECT`` to ``api.stripe.com``
gets a certificate from the Keybrake CA.
"""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.conftest import KeybrakeProcess
from tests.dns_stub import StubDNS
from tests.fakes import FakeStripe
from tests.netns import HOST_B, Netns, netns_unusable, two_hosts

pytestmark = pytest.mark.e2e

OWN_NAME = "own.example"
needs_netns = pytest.mark.skipif(
    netns_unusable() is not None, reason=f"needs network namespaces: {netns_unusable()}"
)


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
    """An HTTPS server on HOST_B:443 inside ``ns``, its certificate from its own trustme CA."""

    def __init__(self, ns: Netns) -> None:
        self.ca = trustme.CA(organization_name="Passthrough Test CA")
        self.cert = self.ca.issue_cert(OWN_NAME, HOST_B)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        listener = ns.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST_B, 443))
        listener.listen(16)
        self.httpd = ThreadingHTTPServer((HOST_B, 443), _Hello, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.socket.close()
        self.httpd.socket = ctx.wrap_socket(listener, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def leaf_der(self) -> bytes:
        pem = self.cert.cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@dataclass
class Setup:
    kb: KeybrakeProcess
    client_ns: Netns
    server: OwnServer
    dns: StubDNS


@pytest.fixture
def setup(keybrake_factory: Any) -> Iterator[Setup]:
    with two_hosts() as (a, b):
        udp = a.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))
        server = OwnServer(b)
        server.thread.start()
        try:
            with StubDNS({OWN_NAME: [HOST_B]}, sock=udp) as dns:
                args = ["--set", f"keybrake_dns_servers={dns.address}"]
                args += ["--set", f"keybrake_passthrough={OWN_NAME}:443"]
                args += ["--set", f"keybrake_passthrough={HOST_B}"]
                kb: KeybrakeProcess = keybrake_factory({}, netns=a, extra_args=args)
                try:
                    yield Setup(kb, a, server, dns)
                finally:
                    kb.stop()  # before the namespaces go
        finally:
            server.httpd.shutdown()
            server.httpd.server_close()


def connect(kb: KeybrakeProcess, authority: str, ns: Netns | None = None) -> socket.socket:
    address = ("127.0.0.1", kb.proxy_port)
    sock = ns.connect(address) if ns is not None else socket.create_connection(address, timeout=10)
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


@needs_netns
@pytest.mark.parametrize("authority", [HOST_B, OWN_NAME])
def test_a_listed_host_sees_its_own_certificate_and_bytes(setup: Setup, authority: str) -> None:
    kb, server = setup.kb, setup.server
    path = f"/passthrough-{uuid.uuid4().hex}"
    sock = connect(kb, f"{authority}:443", setup.client_ns)
    # Trusting only the server's own CA: a certificate minted by the proxy would fail here.
    with server.client_context().wrap_socket(sock, server_hostname=OWN_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
        answer = get(tls, OWN_NAME, path)
    assert der == server.leaf_der
    issuer = issuer_of(der)
    assert "Passthrough Test CA" in issuer.rfc4514_string()
    assert issuer != keybrake_ca_subject(kb)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"own server saw {path}".encode())
    # The proxy never decrypted the tunnel: the request path is nowhere in its log.
    assert path not in kb.log()
    # A name is looked up once, by the proxy's resolver, and the tunnel went to that answer.
    assert setup.dns.count(OWN_NAME) == (1 if authority == OWN_NAME else 0)


@needs_netns
def test_a_listed_host_is_not_decrypted_even_for_a_client_trusting_keybrake(setup: Setup) -> None:
    """A worker trusting only the Keybrake bundle cannot be fooled into trusting it here."""
    sock = connect(setup.kb, f"{OWN_NAME}:443", setup.client_ns)
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        setup.kb.ssl_context().wrap_socket(sock, server_hostname=OWN_NAME),
    ):
        pass


@needs_netns
def test_a_listed_name_on_another_port_is_refused(setup: Setup) -> None:
    """``own.example:443`` is listed, ``own.example:8443`` is not."""
    address = ("127.0.0.1", setup.kb.proxy_port)
    with setup.client_ns.connect(address) as sock:
        sock.sendall(f"CONNECT {OWN_NAME}:8443 HTTP/1.1\r\nHost: {OWN_NAME}:8443\r\n\r\n".encode())
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"egress_denied" in head
    assert setup.dns.count(OWN_NAME) == 0


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
