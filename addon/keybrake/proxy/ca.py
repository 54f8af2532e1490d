"""The Keybrake CA: mitmproxy's own CA machinery with ``confdir`` pointed at the certs dir.

The certs dir is ``~/.keybrake/certs`` unless ``--certs-dir`` / ``KEYBRAKE_CERTS_DIR`` names
another: one well-known place per user, like mitmproxy's ``~/.mitmproxy``, so a command run
from another directory finds the CA workers already trust instead of making a new one.
`ensure_ca` creates ``mitmproxy-ca.pem`` there (and the public ``mitmproxy-ca-cert.pem``) on
first use and writes ``keybrake-ca-bundle.pem`` = certifi's roots + the Keybrake CA, the file
to give workers as ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``stripe.ca_bundle_path``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import certifi

__all__ = ["BUNDLE_NAME", "BadCA", "ca_exists", "default_certs_dir", "ensure_ca"]

BUNDLE_NAME = "keybrake-ca-bundle.pem"
# mitmproxy's name for the CA's private key and certificate (confdir/mitmproxy-ca.pem).
CA_KEY_NAME = "mitmproxy-ca.pem"


def default_certs_dir() -> Path:
    """``~/.keybrake/certs``: where the CA lives unless a command is told otherwise.

    >>> default_certs_dir()  # doctest: +SKIP
    PosixPath('/home/me/.keybrake/certs')
    """
    return Path.home() / ".keybrake" / "certs"


def ca_exists(certs_dir: Path) -> bool:
    """Whether ``certs_dir`` already holds a CA (`ensure_ca` would reuse it, not make one)."""
    return (certs_dir / CA_KEY_NAME).is_file()


class BadCA(ValueError):
    """The certs dir's ``mitmproxy-ca.pem`` is not a private key with its CA certificate."""


def _ca_certificate(key_file: Path) -> str:
    """The certificate (PEM) of the CA in ``key_file``, checked to be the key's.

    The key is parsed without RSA's consistency checks: they cost ~40 ms at every start and
    mitmproxy, which loads the same file next, makes them.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = key_file.read_bytes()
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        key = serialization.load_pem_private_key(data, None, unsafe_skip_rsa_key_validation=True)
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as e:
        problem = str(e).split(".")[0] or type(e).__name__
        raise BadCA(f"{key_file}: not a CA private key and certificate ({problem})") from None
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise BadCA(f"{key_file}: the certificate is not the private key's")
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def ensure_ca(certs_dir: Path) -> Path:
    """Create the CA if missing and (re)write the bundle; returns the bundle path. Raises
    `BadCA` when the CA there is not a key with its certificate.

    >>> ensure_ca(default_certs_dir())  # doctest: +SKIP
    PosixPath('/home/me/.keybrake/certs/keybrake-ca-bundle.pem')
    """
    certs_dir.mkdir(parents=True, exist_ok=True)
    if not ca_exists(certs_dir):
        # Here: commands that only read the CA skip importing mitmproxy.
        from mitmproxy.certs import CertStore

        CertStore.from_store(certs_dir, "mitmproxy", 2048)
    ca_cert = _ca_certificate(certs_dir / CA_KEY_NAME)
    bundle = certs_dir / BUNDLE_NAME
    text = Path(certifi.where()).read_text().rstrip("\n") + "\n\n# Keybrake CA\n" + ca_cert
    # A private temporary name per writer: several proxies may start at once on one certs dir,
    # and a shared name would let one rename a file another is still writing.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{BUNDLE_NAME}.", dir=certs_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.chmod(0o644)  # public certificates: workers running as other users read it
        tmp.replace(bundle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return bundle
