"""Throw-away TLS material for the fake vendor servers.

One ``trustme`` CA signs one server certificate whose SANs cover the real vendor host
names (so a proxy that keeps SNI/Host ``api.stripe.com`` while connecting to the fake
still verifies) plus the loopback names the fakes actually listen on.
"""

from __future__ import annotations

import fcntl
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme

DEFAULT_SANS: tuple[str, ...] = (
    "api.stripe.com",
    "api.twilio.com",
    "api.resend.com",
    "localhost",
    "127.0.0.1",
    "::1",
)


@dataclass
class FakeTLS:
    """CA + server certificate for the fakes.

    ``ca_pem`` is what clients must trust (``stripe.ca_bundle_path``, ``REQUESTS_CA_BUNDLE``,
    ``session.verify``, mitmproxy ``ssl_verify_upstream_trusted_ca``...).
    ``server_context`` is what the fake servers wrap their sockets with.
    """

    ca: trustme.CA | None  # None when loaded from files (load_or_make_fake_ca)
    leaf: trustme.LeafCert | None
    directory: Path
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    sans: tuple[str, ...]
    server_context: ssl.SSLContext = field(repr=False)

    @property
    def ca_path(self) -> str:
        """``str(ca_pem)``: handy for APIs that want a plain string path."""
        return str(self.ca_pem)

    def client_context(self) -> ssl.SSLContext:
        """A fresh client ``SSLContext`` trusting only the fake CA (e.g. for ``httpx``)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        return ctx


def make_fake_ca(tmpdir: str | Path, extra_sans: tuple[str, ...] = ()) -> FakeTLS:
    """Create a CA and a server cert under ``tmpdir``.

    Writes ``ca.pem`` (the CA certificate), ``server.pem`` (leaf cert + chain) and
    ``server.key`` (leaf private key) into ``tmpdir`` (created if missing).
    """
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    sans = DEFAULT_SANS + tuple(s for s in extra_sans if s not in DEFAULT_SANS)

    ca = trustme.CA(organization_name="Keybrake fake vendor CA")
    leaf = ca.issue_cert(*sans, organization_name="Keybrake fake vendors")

    ca_pem = directory / "ca.pem"
    cert_pem = directory / "server.pem"
    key_pem = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    # Leaf first, then the chain (trustme's CA is the issuer, so chain is just the leaf).
    with cert_pem.open("wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key_pem))

    return FakeTLS(
        ca=ca,
        leaf=leaf,
        directory=directory,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        sans=sans,
        server_context=_server_context(cert_pem, key_pem),
    )


def _server_context(cert_pem: Path, key_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_pem), str(key_pem))
    # Only HTTP/1.1: clients that offer h2 (mitmproxy, httpx[http2]) fall back cleanly.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def load_or_make_fake_ca(tmpdir: str | Path) -> FakeTLS:
    """Reuse ``ca.pem``/``server.pem``/``server.key`` in ``tmpdir`` if all exist, else create.

    Safe when several processes (e.g. ``python -m tests.fakes.serve`` for each vendor) share
    one cert dir: creation happens under an exclusive ``flock``, so they all end up serving
    the same certificate signed by the same ``ca.pem``.
    """
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca_pem, cert_pem, key_pem = (
            directory / "ca.pem",
            directory / "server.pem",
            directory / "server.key",
        )
        if ca_pem.exists() and cert_pem.exists() and key_pem.exists():
            return FakeTLS(
                ca=None,
                leaf=None,
                directory=directory,
                ca_pem=ca_pem,
                cert_pem=cert_pem,
                key_pem=key_pem,
                sans=DEFAULT_SANS,
                server_context=_server_context(cert_pem, key_pem),
            )
        return make_fake_ca(directory)
