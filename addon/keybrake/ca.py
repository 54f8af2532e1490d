"""The Keybrake CA: mitmproxy's own CA machinery with ``confdir`` pointed at ``certs/``.

`ensure_ca` creates ``certs/mitmproxy-ca.pem`` (and the public ``mitmproxy-ca-cert.pem``) on
first use and writes ``certs/keybrake-ca-bundle.pem`` = certifi's roots + the Keybrake CA, the
file to give workers as ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``stripe.ca_bundle_path``.
"""

from __future__ import annotations

from pathlib import Path

import certifi
from mitmproxy.certs import CertStore

__all__ = ["BUNDLE_NAME", "ensure_ca"]

BUNDLE_NAME = "keybrake-ca-bundle.pem"


def ensure_ca(certs_dir: Path) -> Path:
    """Create the CA if missing and (re)write the bundle; returns the bundle path.

    >>> ensure_ca(Path("certs"))  # doctest: +SKIP
    PosixPath('certs/keybrake-ca-bundle.pem')
    """
    certs_dir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(certs_dir, "mitmproxy", 2048)
    ca_cert = (certs_dir / "mitmproxy-ca-cert.pem").read_text()
    bundle = certs_dir / BUNDLE_NAME
    tmp = bundle.with_suffix(".tmp")
    tmp.write_text(Path(certifi.where()).read_text().rstrip("\n") + "\n\n# Keybrake CA\n" + ca_cert)
    tmp.replace(bundle)
    return bundle
