"""Listener addresses as the command line and the addons read them (``host:port``).

Pure functions, apart from mitmproxy: ``keybrake run`` checks its listener flags before it
loads the proxy.
"""

from __future__ import annotations

import ipaddress

from keybrake.proxy._addresses import parse_ip_host

__all__ = ["format_listen", "is_loopback_host", "parse_listen"]


def is_loopback_host(host: str) -> bool:
    """Whether a listener bound to ``host`` is reachable from this machine only.

    ``""`` (mitmproxy's default) is every interface; names other than ``localhost`` may
    resolve anywhere.

    >>> [is_loopback_host(h) for h in ("127.0.0.1", "[::1]", "localhost", "", "0.0.0.0")]
    [True, True, True, False, False]
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    ip = parse_ip_host(host)
    if ip is None:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → ``(host, port)``; raises ``ValueError``.

    >>> parse_listen("0.0.0.0:8443"), parse_listen("[::1]:8081"), parse_listen("kb.internal:1")
    (('0.0.0.0', 8443), ('::1', 8081), ('kb.internal', 1))
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: give host:port, e.g. 127.0.0.1:8081 or [::1]:8081")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:8081")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def format_listen(host: str, port: int) -> str:
    """The inverse of `parse_listen` (brackets around IPv6 addresses)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
