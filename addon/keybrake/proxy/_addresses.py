"""Which IP addresses the proxy may ever connect to on a worker's behalf (DESIGN §1, egress).

A forward proxy that will connect anywhere is a way into its own host's network: Redis on
loopback, the cloud metadata service on link-local, internal APIs on private ranges. The rule
here is deliberately short: an address is reachable only if `ipaddress` calls it global and it
is not multicast, judged on the IPv4 address that IPv6 transition forms carry inside them
(``::ffff:127.0.0.1`` *is* 127.0.0.1, and Python even calls ``::127.0.0.1`` global), and never
if it belongs to the proxy host itself (its own listeners, whatever their address).

`why_forbidden` is pure and table-tested; `refusal_reason` adds the one impure check (is the
address assigned to this host?). `parse_ip_host` reads a host the way the operating system
would: ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` are all 127.0.0.1 to
``inet_aton``, so they must be judged as 127.0.0.1 too.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

__all__ = ["IPAddress", "is_local_address", "parse_ip_host", "refusal_reason", "why_forbidden"]

IPAddress = IPv4Address | IPv6Address

_THIS_NETWORK = IPv4Network("0.0.0.0/8")  # 0.0.0.0 and friends reach the host itself on Linux
_SHARED = IPv4Network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
_RFC1918 = (IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))
_BROADCAST = IPv4Address("255.255.255.255")
_UNIQUE_LOCAL = IPv6Network("fc00::/7")
# IPv6 forms whose meaning is an IPv4 address: judged by that address alone.
_MAPPED = IPv6Network("::ffff:0:0/96")  # IPv4-mapped
_COMPATIBLE = IPv6Network("::/96")  # IPv4-compatible (deprecated); also holds :: and ::1
_TRANSLATED = IPv6Network("::ffff:0:0:0/96")  # SIIT IPv4-translated (RFC 2765)
_NAT64 = IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
# Local-use NAT64 (RFC 8215): a translator on the operator's own network, and the IPv4
# address sits at a position that depends on the prefix length in use. Never reachable.
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
# IANA special-purpose ranges that are not globally reachable but that some Python versions
# still call global (``is_global`` follows the registry only from 3.12.4/3.13 on).
_SPECIAL_V4 = (IPv4Network("192.0.0.0/24"),)  # IETF protocol assignments
_SPECIAL_V6 = (
    IPv6Network("100::/64"),  # discard-only
    IPv6Network("2001::/23"),  # IETF protocol assignments (Teredo, benchmarking, ORCHID)
    IPv6Network("3fff::/20"),  # documentation (RFC 9637)
    IPv6Network("5f00::/16"),  # SRv6 SIDs (RFC 9602)
)
_NUMERIC = frozenset("0123456789abcdefxABCDEFX.")


def parse_ip_host(host: str) -> IPAddress | None:
    """The address ``host`` denotes as the operating system would read it; ``None`` for a name.

    Brackets and one trailing dot are ignored; IPv4 in the legacy ``inet_aton`` forms counts.

    >>> parse_ip_host("2130706433"), parse_ip_host("[::1]"), parse_ip_host("api.stripe.com")
    (IPv4Address('127.0.0.1'), IPv6Address('::1'), None)
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text.endswith("."):
        text = text[:-1]
    try:
        return ip_address(text)
    except ValueError:
        pass
    if text and set(text) <= _NUMERIC:
        try:
            return IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _why_v4(ip: IPv4Address) -> str | None:
    if ip in _THIS_NETWORK:
        return "'this host' (0.0.0.0/8)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (169.254.0.0/16, where cloud metadata services answer)"
    if ip in _SHARED:
        return "shared address space (100.64.0.0/10)"
    if ip.is_multicast:
        return "multicast"
    if ip == _BROADCAST:
        return "broadcast"
    if any(ip in net for net in _RFC1918):
        return "private (RFC 1918)"
    if not ip.is_global or any(ip in net for net in _SPECIAL_V4):
        return "reserved or documentation space"
    return None


def _embedded_ipv4(ip: IPv6Address) -> tuple[list[IPv4Address], bool]:
    """IPv4 addresses carried inside ``ip``, and whether they alone decide (pure IPv4 forms)."""
    if ip in _MAPPED or ip in _TRANSLATED or ip in _COMPATIBLE or ip in _NAT64:
        return [IPv4Address(int(ip) & 0xFFFFFFFF)], True
    if ip.sixtofour is not None:
        return [ip.sixtofour], False
    if ip.teredo is not None:
        return list(ip.teredo), False  # (server, client): either could be steered inward
    return [], False


def why_forbidden(ip: IPAddress) -> str | None:
    """Why ``ip`` may never be reached through the proxy, or ``None`` if it may.

    Pure: says nothing about addresses of the proxy host itself (see `refusal_reason`).

    >>> why_forbidden(ip_address("169.254.169.254"))
    'link-local (169.254.0.0/16, where cloud metadata services answer)'
    >>> why_forbidden(ip_address("::127.0.0.1"))
    'loopback: IPv4 127.0.0.1 inside an IPv6 address'
    >>> why_forbidden(ip_address("192.88.99.1")) is None
    True
    """
    if isinstance(ip, IPv4Address):
        return _why_v4(ip)
    if ip.is_unspecified:
        return "unspecified (::)"
    if ip.is_loopback:
        return "loopback"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64 (64:ff9b:1::/48)"
    embedded, decisive = _embedded_ipv4(ip)
    for v4 in embedded:
        if (reason := _why_v4(v4)) is not None:
            return f"{reason}: IPv4 {v4} inside an IPv6 address"
    if decisive:
        return None
    if ip.is_link_local:
        return "link-local (fe80::/10)"
    if ip.is_site_local:
        return "site-local (fec0::/10)"
    if ip in _UNIQUE_LOCAL:
        return "unique-local (fc00::/7)"
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global or any(ip in net for net in _SPECIAL_V6):
        return "reserved or documentation space"
    return None


def is_local_address(ip: IPAddress) -> bool:
    """True if ``ip`` is assigned to this host (binding a UDP socket to it succeeds).

    Covers every interface and every listener of the proxy, whatever address it uses. With
    ``net.ipv4.ip_nonlocal_bind`` (or its IPv6 twin) set, every bind succeeds and every
    destination is refused: fail closed.
    """
    family = socket.AF_INET if isinstance(ip, IPv4Address) else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def refusal_reason(ip: IPAddress) -> str | None:
    """`why_forbidden`, plus: an address of the proxy host itself is never reachable."""
    reason = why_forbidden(ip)
    if reason is None and is_local_address(ip):
        reason = "an address of the proxy host itself"
    return reason
