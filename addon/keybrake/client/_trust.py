"""Which CA a worker trusts for Keybrake (Python 3.9+)."""

from __future__ import annotations

import os
import ssl
from typing import Any, Final

__all__ = ["CA_BUNDLE_ENV", "SYSTEM_CA", "ca_bundle_path", "tls_verify"]

CA_BUNDLE_ENV: Final = "KEYBRAKE_CA_BUNDLE"
SYSTEM_CA: Final = "system"


def ca_bundle_path(value: str | os.PathLike[str] | None = None) -> str | None:
    """The CA file a worker trusts for Keybrake: ``value``, else ``$KEYBRAKE_CA_BUNDLE``;
    ``"system"`` is the operating system's CA file; ``None`` means the library's default.

    What each SDK reads on its own, for code that builds its clients itself: stripe none
    (``stripe.ca_bundle_path``), requests-based SDKs (twilio, resend) ``REQUESTS_CA_BUNDLE``,
    httpx and Python's ``ssl`` ``SSL_CERT_FILE``.

    >>> ca_bundle_path("/etc/keybrake/ca.pem")
    '/etc/keybrake/ca.pem'
    """
    raw = os.fspath(value) if value is not None else os.environ.get(CA_BUNDLE_ENV, "")
    if not raw:
        return None
    if raw == SYSTEM_CA:
        paths = ssl.get_default_verify_paths()
        return paths.cafile or paths.openssl_cafile
    return raw


def tls_verify(ca_bundle: str | os.PathLike[str] | None = None, default: Any = True) -> Any:
    """What httpx's ``verify=`` takes for `ca_bundle_path` (``default`` when there is none)."""
    if ca_bundle is not None and os.fspath(ca_bundle) == SYSTEM_CA:
        return ssl.create_default_context()
    path = ca_bundle_path(ca_bundle)
    if path is None:
        return default
    return ssl.create_default_context(cafile=path)
