"""``keybrake_passthrough`` entries: which non-vendor destinations may be tunnelled.

Kept apart from the addon so the command line can validate ``--passthrough`` before it
starts mitmproxy, with the same messages.
"""

from __future__ import annotations

import fnmatch
import re
from typing import NamedTuple

from keybrake.proxy._addresses import IPAddress, parse_ip_host, why_forbidden

__all__ = ["PassthroughRule", "parse_passthrough"]

_LABEL = re.compile(r"[a-z0-9_*-]{1,63}")


class PassthroughRule(NamedTuple):
    """One ``keybrake_passthrough`` entry: a host glob (or one IP address) and maybe a port."""

    host: str
    port: int | None
    ip: IPAddress | None

    def matches(self, host: str, ip: IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.ip is not None or ip is not None:
            return self.ip == ip
        return fnmatch.fnmatchcase(host, self.host)


def _split_port(entry: str) -> tuple[str, str | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else (rest or None)
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None


def parse_passthrough(entry: str) -> PassthroughRule:
    """Parse one passthrough entry; raises ``ValueError`` saying what is wrong with it.

    ``*`` matches any characters, dots included: ``*.googleapis.com`` matches
    ``storage.googleapis.com`` and ``a.b.googleapis.com``, not ``googleapis.com``. No port
    means any port. Case does not matter.

    >>> parse_passthrough("*.GoogleAPIs.com:443")
    PassthroughRule(host='*.googleapis.com', port=443, ip=None)
    """
    text = entry.strip().lower()
    host, port_text = _split_port(text)
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    host = host.removesuffix(".")
    ip = parse_ip_host(host)
    if ip is not None:
        if str(ip) != host:
            raise ValueError(f"{entry!r}: write the address as {ip}")
        if (reason := why_forbidden(ip)) is not None:
            raise ValueError(f"{entry!r}: {ip} is {reason}: never reachable through Keybrake")
        return PassthroughRule(str(ip), port, ip)
    labels = host.split(".")
    if not host or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{entry!r}: expected a host name or glob such as storage.googleapis.com or "
            "*.googleapis.com (letters, digits, '-', '_', '.', '*'), optionally with :port"
        )
    if "*" in labels[-1] or labels[-1].isdigit():
        raise ValueError(
            f"{entry!r}: the last label must be spelled out (a pattern like '*' or 'example.*' "
            "or a partial IP address would pass far more than intended)"
        )
    return PassthroughRule(host, port, None)
