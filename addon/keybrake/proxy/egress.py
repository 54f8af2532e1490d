"""The `Egress` addon: where the forward proxy may connect, besides the vendors (DESIGN §1).

``allow_hosts`` only decides what is decrypted. Without this addon every other ``CONNECT``
(and every absolute-form ``GET http://…``) was relayed to wherever the worker asked: the
proxy's own Redis, the cloud metadata service, any internal API of its network. Now:

- A vendor host (named in ``policies/``) is the guard's business, as before; flows whose
  host, SNI or Host header names one are left to `VaultGuard`, which refuses mismatches.
- Any other destination is refused (``403 egress_denied``, audited) unless it matches
  ``keybrake_passthrough`` (``--passthrough``): host globs such as ``*.googleapis.com`` or
  ``storage.googleapis.com:443``. Listed destinations are tunnelled untouched, never decrypted.
  An unlisted name is refused by name: it is never even looked up.
- Never, listed or not: loopback, private, shared, link-local, unique-local, unspecified,
  multicast, reserved addresses and the proxy host's own (see `keybrake.proxy._addresses`), in
  whatever spelling the operating system would accept (``2130706433`` is 127.0.0.1).

**Resolution and pinning.** The decision is made on the *resolved* address, once, and the
connection goes to that address; the name is never handed to the operating system again, so
a DNS answer that changes in between (rebinding) is never consulted. A ``CONNECT`` gets its
host rewritten to the checked IP (mitmproxy then takes the server address from it); a plain
request is approved for its client connection and pinned when its server connection opens;
an admitted vendor call is pinned by `VendorPin` (after `VaultGuard`), once per client
connection, so mitmproxy keeps reusing one vendor connection. Names are resolved by
``getaddrinfo`` (``/etc/hosts``, ``/etc/resolv.conf``) unless ``keybrake_dns_servers`` names
the servers to ask, ``IP`` or ``IP:port`` (see `keybrake.proxy._resolver`): the tests point it at a
stub name server on a loopback UDP port they own. mitmproxy's own ``dns_name_servers`` could
not serve: its resolver takes no port.

**The last gate.** ``server_connect`` runs before every outgoing connection, whichever code
path asked for it: only a vendor policy's ``upstream`` override (operator configuration:
exactly its host and port, as configured), a vendor host on 443 (pinned, or resolved, checked
and pinned there) or a destination this addon approved for the same client connection is
opened; everything else (the admin listener's placeholder upstream ``127.0.0.1:1`` included)
is killed before a packet is sent. Only the ``regular`` and ``reverse`` listeners Keybrake
starts are supported: other modes (transparent, SOCKS, upstream) fail closed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from ipaddress import ip_address

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake.core.errors import Refusal, refusal_response
from keybrake.proxy._addresses import IPAddress, parse_ip_host, refusal_reason
from keybrake.proxy._passthrough import PassthroughRule, parse_passthrough
from keybrake.proxy._resolver import (
    NameServerResolver,
    ResolveError,
    Resolver,
    SystemResolver,
    parse_name_server,
)
from keybrake.proxy.calls import BREADCRUMB, CallState, call_of, track
from keybrake.proxy.core import Runtime

__all__ = ["Egress", "PassthroughRule", "VendorPin", "parse_passthrough"]

log = logging.getLogger("keybrake")

VENDOR_PORT = 443
MAX_PINS_PER_CLIENT = 1024
_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")


def _env_list(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


class Egress:
    """Refuses every destination that is neither a vendor nor listed, and pins the rest."""

    name = "keybrake_egress"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.rules: tuple[PassthroughRule, ...] = ()
        self.resolver: Resolver = SystemResolver()
        # Per client connection: (host as asked, port) → the address that was checked.
        self._pinned: dict[str, dict[tuple[str, int], IPAddress]] = {}
        # Per client connection: (vendor host, port) → its checked address, and back
        # (address text, port) → vendor host, for the SNI of the connection (`VendorPin`).
        self._vendor_addresses: dict[str, dict[tuple[str, int], IPAddress]] = {}
        self._vendor_names: dict[str, dict[tuple[str, int], str]] = {}

    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add(
            "keybrake_passthrough",
            Sequence[str],
            _env_list("KEYBRAKE_PASSTHROUGH"),
            "Non-vendor destinations tunnelled untouched (host globs like *.googleapis.com, "
            "optionally :port); everything else is refused with 403 egress_denied.",
        )
        add(
            "keybrake_dns_servers",
            Sequence[str],
            _env_list("KEYBRAKE_DNS_SERVERS"),
            "Name servers (IP or IP:port) that resolve egress destinations and vendor hosts; "
            "empty: the system resolver (getaddrinfo).",
        )

    def configure(self, updated: set[str]) -> None:
        if "keybrake_passthrough" in updated:
            try:
                self.rules = tuple(parse_passthrough(e) for e in ctx.options.keybrake_passthrough)
            except ValueError as e:
                raise exceptions.OptionsError(f"keybrake_passthrough: {e}") from None
        if "keybrake_dns_servers" in updated:
            try:
                servers = [parse_name_server(e) for e in ctx.options.keybrake_dns_servers]
            except ValueError as e:
                raise exceptions.OptionsError(f"keybrake_dns_servers: {e}") from None
            self.resolver = NameServerResolver(servers) if servers else SystemResolver()

    # -- decisions -----------------------------------------------------------------------------
    def _is_vendor_host(self, name: str | None) -> bool:
        policies = self.runtime.policies
        if not name or policies is None:
            return False
        host = name[1:].partition("]")[0] if name.startswith("[") else name.rpartition(":")[0]
        return any(policies.for_host(n) is not None for n in (name, host) if n)

    async def _checked_address(self, host: str, port: int) -> IPAddress:
        """The address a non-vendor destination may be reached at; raises `Refusal`."""
        ip = parse_ip_host(host)
        name = host.lower().removesuffix(".")
        if ip is not None and (reason := refusal_reason(ip)) is not None:
            raise Refusal(
                "egress_denied", f"{_shown(host, ip)} is {reason}: never reachable through Keybrake"
            )
        if not any(rule.matches(name, ip, port) for rule in self.rules):
            raise Refusal(
                "egress_denied",
                f"{_authority(host, port)} is not a vendor host and not in the proxy's "
                "passthrough list (keybrake_passthrough); nothing was connected",
            )
        if ip is not None:
            return ip
        if not _NAME.fullmatch(name):
            raise Refusal("egress_denied", f"{host!r} is not a valid host name")
        try:
            return await self._resolve_checked(name)
        except ResolveError as e:
            raise Refusal("egress_denied", f"{host} {e}; nothing was connected") from None

    async def _resolve_checked(self, name: str) -> IPAddress:
        """The first address of ``name`` that may be reached; raises `ResolveError` saying
        why there is none."""
        try:
            addresses = await self.resolver.addresses(name)
        except ResolveError as e:
            raise ResolveError(f"could not be resolved ({e})") from None
        reasons = [(a, refusal_reason(a)) for a in addresses]
        for address, reason in reasons:
            if reason is None:
                return address
        address, reason = reasons[0]
        raise ResolveError(
            f"resolves to {address}, which is {reason}: never reachable through Keybrake"
        )

    def _pin(self, client: connection.Client, host: str, port: int, ip: IPAddress) -> None:
        pins = self._pinned.setdefault(client.id, {})
        if len(pins) >= MAX_PINS_PER_CLIENT:
            # One keep-alive connection naming ever new hosts must not grow this without
            # bound; a connection to the forgotten host not yet opened is then refused.
            del pins[next(iter(pins))]
        pins[(host.lower(), port)] = ip

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal, method: str, target: str) -> None:
        call = CallState(vendor="", method=method, path=target, outcome="refused")
        call.code, call.status, call.latency_ms = refusal.code, refusal.status, 0.0
        track(flow, call)
        flow.metadata[BREADCRUMB] = call.breadcrumb()
        flow.response = refusal_response(refusal)
        flow.comment = f"keybrake refused: {refusal.code}"
        flow.marked = ":no_entry:"
        log.info("keybrake: egress refused: %s %s: %s", method, target, refusal.message)

    # -- hooks ---------------------------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Judge a CONNECT; a listed destination is pinned to the address that was checked."""
        if flow.response or flow.error or not flow.live:
            return
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return
        host, port = flow.request.host, flow.request.port
        if self._is_vendor_host(host):
            return  # decrypted and checked by VaultGuard; its calls are pinned by VendorPin
        try:
            ip = await self._checked_address(host, port)
        except Exception as e:
            self._refuse(flow, _as_refusal(e), "CONNECT", _authority(host, port)[:200])
            return
        # mitmproxy sets context.server.address from the request's host right after this hook.
        flow.request.host = str(ip)
        self._pin(flow.client_conn, str(ip), port, ip)

    async def request(self, flow: http.HTTPFlow) -> None:
        """Judge a plain request's destination (absolute-form, or Host header to the proxy)."""
        if flow.response or flow.error or not flow.live:
            return
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return
        req = flow.request
        if any(self._is_vendor_host(n) for n in (req.host, req.host_header, flow.client_conn.sni)):
            return  # VaultGuard's: it refuses host, Host and SNI that disagree
        pinned = self._pinned.get(flow.client_conn.id, {})
        if (req.host.lower(), req.port) in pinned:
            return  # inside a tunnel to an address already checked and pinned
        try:
            ip = await self._checked_address(req.host, req.port)
        except Exception as e:
            target = f"{req.scheme}://{_authority(req.host, req.port)}{req.path.partition('?')[0]}"
            self._refuse(flow, _as_refusal(e), req.method[:16], target[:200])
            return
        self._pin(flow.client_conn, req.host, req.port, ip)

    async def pin_vendor(self, flow: http.HTTPFlow) -> None:
        """Send a checked vendor call to one checked address of its vendor host.

        Called by `VendorPin` after `VaultGuard` chose the destination. Only the request's
        destination changes (``request.data.host``): the Host header and ``:authority`` keep
        the vendor's name, and `server_connect` sets the TLS SNI back to it. The address is
        kept for the client connection, so every call on it reuses one vendor connection
        (pinning inside ``server_connect`` alone would give mitmproxy a different address
        than it asked for, and it would open a new vendor connection for every call).
        """
        req, client = flow.request, flow.client_conn
        host, port = req.host.lower().removesuffix("."), req.port
        if port != VENDOR_PORT or not self._is_vendor_host(host):
            return  # an upstream override (or no vendor): server_connect decides
        chosen = self._vendor_addresses.setdefault(client.id, {})
        names = self._vendor_names.setdefault(client.id, {})
        ip = chosen.get((host, port))
        if ip is None:
            try:
                ip = await self._resolve_checked(host)
            except ResolveError as e:
                log.warning("keybrake: vendor host %s %s", host, e)
                return  # unpinned: server_connect refuses it too
            if names.get((str(ip), port), host) != host:
                return  # another vendor host on the same address: never share a connection
            chosen[(host, port)] = ip
            names[(str(ip), port)] = host
        req.data.host = str(ip)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The last gate before any outgoing connection: kill what was not approved."""
        server = data.server
        if server.address is None or server.error:
            return
        host, port = server.address[0], server.address[1]
        try:
            target, why = await self._gate(data.client, server, host, port)
        except Exception:
            log.exception("keybrake: internal error in the egress gate (connection killed)")
            target, why = None, "internal error"
        if target is None:
            server.error = f"keybrake: connection to {_authority(host, port)} refused: {why}"
            log.warning("keybrake: killed a connection to %s: %s", _authority(host, port), why)
        elif target is not True:
            server.address = (str(target), port)

    async def _gate(
        self, client: connection.Client, server: connection.Server, host: str, port: int
    ) -> tuple[IPAddress | bool | None, str]:
        """(True: connect as is | an address: connect there instead | None: never, why)."""
        policies = self.runtime.policies
        if policies is None:
            return None, "no policies loaded"
        upstreams = {
            _upstream_address(p.upstream.url) for p in policies.vendors.values() if p.upstream
        }
        if (host.lower(), port) in upstreams:
            return True, "a vendor upstream"
        vendor = self._vendor_names.get(client.id, {}).get((host.lower(), port))
        if vendor is not None:
            ip = parse_ip_host(host)
            if ip is None or (reason := refusal_reason(ip)) is not None:
                return None, f"{host} is {reason if ip else 'not an address'}"
            if server.sni in (None, host):
                server.sni = vendor  # VendorPin changed only the address: TLS names the vendor
            return True, "a vendor host, pinned"
        if policies.for_host(host) is not None:
            # A vendor connection VendorPin did not see (an eager connect at CONNECT time):
            # pinned here, at the cost of the connection not being reused.
            if port != VENDOR_PORT:
                return None, f"vendor hosts are reached on port {VENDOR_PORT} only"
            try:
                return await self._resolve_checked(host), "a vendor host"
            except ResolveError as e:
                return None, str(e)
        ip = self._pinned.get(client.id, {}).get((host.lower(), port))
        if ip is None:
            return None, "not a vendor, not a vendor upstream and not approved by the egress check"
        if (reason := refusal_reason(ip)) is not None:
            return None, f"{ip} is {reason}"
        return ip, "approved"

    def client_disconnected(self, client: connection.Client) -> None:
        for table in (self._pinned, self._vendor_addresses, self._vendor_names):
            table.pop(client.id, None)


class VendorPin:
    """Pins each admitted vendor call to a checked address (see `Egress.pin_vendor`).

    A separate addon because it must run after `VaultGuard` has checked the call and chosen
    its destination; registered right after it.
    """

    name = "keybrake_vendor_pin"

    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self.runtime = egress.runtime  # the one Runtime all of Keybrake's addons share

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        call = call_of(flow)
        if call is None or call.outcome != "forwarded":
            return
        try:
            await self.egress.pin_vendor(flow)
        except Exception:
            # Unpinned, the call is still judged (and pinned, or killed) by server_connect.
            log.exception("keybrake: internal error pinning a vendor call")


def _as_refusal(e: Exception) -> Refusal:
    """Hooks never raise: an unexpected error refuses the destination (fail closed)."""
    if isinstance(e, Refusal):
        return e
    log.error("keybrake: internal error in the egress check (refused)", exc_info=e)
    return Refusal("internal_error", "internal error in keybrake; nothing was connected")


def _shown(host: str, ip: IPAddress) -> str:
    """The host as the worker wrote it, plus the address when that is not plain to see."""
    try:
        ip_address(host.strip("[]"))
    except ValueError:
        return f"{host} ({ip})"  # 2130706433, 127.1, 0x7f000001, ...
    return host


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _upstream_address(url: str) -> tuple[str, int]:
    """(host, port) of a policy ``upstream.url`` such as ``https://127.0.0.1:9443``."""
    scheme, _, hostport = url.partition("://")
    host, sep, port = hostport.partition(":")
    return host.lower(), int(port) if sep else (443 if scheme == "https" else 80)
