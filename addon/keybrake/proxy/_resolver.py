"""How the proxy turns a destination name into addresses, once per decision.

The egress check judges the addresses a name resolves to, and the connection then goes to the
address that was judged: the name is never handed to the operating system again, so a DNS
answer that changes between check and connect (DNS rebinding) changes nothing.

Two resolvers:

- `SystemResolver` (default): ``getaddrinfo``, i.e. ``/etc/hosts`` and ``/etc/resolv.conf``,
  exactly what mitmproxy itself would have used.
- `NameServerResolver`: asks the given name servers directly (``keybrake_dns_servers``, each
  ``IP`` or ``IP:port``), without ``/etc/hosts``. For operators who want egress names resolved
  by one trusted resolver, and for tests, whose stub name server listens on a loopback port.
  mitmproxy's own ``dns_name_servers`` option cannot serve here: its resolver (mitmproxy_rs)
  takes no port.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from ipaddress import ip_address
from typing import Protocol

from keybrake.proxy._addresses import IPAddress

__all__ = [
    "NameServerResolver",
    "ResolveError",
    "Resolver",
    "SystemResolver",
    "parse_name_server",
]

DNS_TIMEOUT_SECONDS = 5.0


class ResolveError(Exception):
    """A name could not be resolved (no such name, no answer, or no name server answered)."""


class Resolver(Protocol):
    """Anything that resolves a host name to addresses."""

    async def addresses(self, host: str) -> list[IPAddress]:
        """Every address of ``host`` (IPv4 first); raises `ResolveError`."""
        ...


def _unique(addresses: list[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


class SystemResolver:
    """``getaddrinfo``: ``/etc/hosts``, then the name servers of ``/etc/resolv.conf``."""

    async def addresses(self, host: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), DNS_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError, UnicodeError) as e:
            raise ResolveError(str(e) or type(e).__name__) from None
        found = [ip_address(info[4][0]) for info in infos]
        found.sort(key=lambda a: a.version)
        if not found:
            raise ResolveError("no addresses")
        return _unique(found)


def parse_name_server(entry: str) -> tuple[str, int]:
    """``"10.0.0.2"``, ``"127.0.0.1:5353"`` or ``"[::1]:53"`` → (address, port).

    >>> parse_name_server("127.0.0.1:5353")
    ('127.0.0.1', 5353)
    """
    text = entry.strip()
    port = "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: expected [IPv6]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text
    try:
        address = ip_address(host)
    except ValueError:
        raise ValueError(
            f"{entry!r}: a name server must be an IP address (IP or IP:port)"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r}: port must be 1-65535")
    return str(address), int(port)


class NameServerResolver:
    """Asks the given name servers (A, then AAAA); ``/etc/hosts`` is not consulted."""

    def __init__(self, servers: Sequence[tuple[str, int]]) -> None:
        # dnspython is imported only by a proxy told to use name servers (a tenth of a second
        # at every start otherwise).
        import dns.asyncresolver
        import dns.nameserver

        self.servers = list(servers)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in self.servers]
        resolver.lifetime = DNS_TIMEOUT_SECONDS
        resolver.cache = None  # one lookup per decision; nothing is reused later
        self._resolver = resolver

    async def addresses(self, host: str) -> list[IPAddress]:
        import dns.exception
        import dns.resolver

        found: list[IPAddress] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(
                    host, rdtype, search=False, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                raise ResolveError("no such name") from None
            except dns.exception.DNSException as e:
                raise ResolveError(str(e) or type(e).__name__) from None
            found += [ip_address(rr.to_text()) for rr in answer]
        if not found:
            raise ResolveError("no addresses")
        return _unique(found)
