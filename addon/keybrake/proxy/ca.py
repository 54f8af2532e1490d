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

__all__ = ["BUNDLE_NAME", "ca_exists", "default_certs_dir", "ensure_ca"]

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


def ensure_ca(certs_dir: Path) -> Path:
    """Create the CA if missing and (re)write the bundle; returns the bundle path.

    >>> ensure_ca(default_certs_dir())  # doctest: +SKIP
    PosixPath('/home/me/.keybrake/certs/keybrake-ca-bundle.pem')
    """
    certs_dir.mkdir(parents=True, exist_ok=True)
    from mitmproxy.certs import CertStore  # here: commands that only read the CA skip mitmproxy

    CertStore.from_store(certs_dir, "mitmproxy", 2048)
    ca_cert = (certs_dir / "mitmproxy-ca-cert.pem").read_text()
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
