"""Unit tests of the egress rules (`keybrake.proxy._addresses`, `keybrake.proxy.egress`,
`keybrake.proxy._resolver`).

The address rule is a table: every row is an address and whether the proxy may ever connect
to it. Then passthrough patterns, name-server entries, and the `Egress` addon's hooks in a
``taddons`` context with a resolver stub (no network at all: the end-to-end tests with a real
proxy are in ``tests/security/``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import connection, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow, tutils
from tests.conftest import ROOT, free_port

from keybrake.proxy._addresses import (
    IPAddress,
    is_local_address,
    parse_ip_host,
    refusal_reason,
    why_forbidden,
)
from keybrake.proxy._resolver import (
    NameServerResolver,
    ResolveError,
    SystemResolver,
    parse_name_server,
)
from keybrake.proxy.calls import CallState, call_of, track
from keybrake.proxy.core import Core, Runtime
from keybrake.proxy.egress import Egress, PassthroughRule, VendorPin, parse_passthrough

# (address, reachable?) — the whole rule in one table.
ADDRESSES: list[tuple[str, bool]] = [
    # IPv4: only global unicast
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("192.88.99.2", True),  # deprecated 6to4 relay anycast: global to Python (the netns tests)
    ("127.0.0.1", False),
    ("127.0.0.2", False),
    ("127.255.255.254", False),
    ("0.0.0.0", False),
    ("0.1.2.3", False),
    ("10.0.0.1", False),
    ("172.16.0.1", False),
    ("172.31.255.255", False),
    ("192.168.1.1", False),
    ("100.64.0.1", False),  # RFC 6598 shared
    ("100.127.255.254", False),
    ("169.254.169.254", False),  # cloud metadata
    ("169.254.0.1", False),
    ("224.0.0.1", False),  # multicast (Python calls some of it global)
    ("233.252.0.1", False),
    ("239.255.255.250", False),
    ("255.255.255.255", False),
    ("240.0.0.1", False),
    ("192.0.2.1", False),  # documentation
    ("198.51.100.7", False),
    ("203.0.113.9", False),
    ("198.18.0.1", False),  # benchmarking
    ("192.0.0.8", False),  # IETF protocol assignments (older Pythons call it global)
    ("192.0.0.170", False),
    # IPv6
    ("2606:4700::1", True),
    ("2001:4860:4860::8888", True),
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fe80::1%1", False),
    ("fc00::1", False),
    ("fd12:3456::1", False),
    ("fec0::1", False),
    ("ff02::1", False),
    ("ff0e::1", False),  # global-scope multicast: is_global, still refused
    ("2001:db8::1", False),
    ("3fff::1", False),  # documentation (RFC 9637), global to older Pythons
    ("5f00::1", False),  # SRv6 SIDs
    ("100::1", False),  # discard-only
    ("2001:2::1", False),  # benchmarking
    # IPv6 forms that carry an IPv4 address: judged by it
    ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False),
    ("::ffff:10.0.0.1", False),
    ("::ffff:8.8.8.8", True),
    ("::127.0.0.1", False),  # IPv4-compatible: Python calls it global!
    ("::10.0.0.1", False),
    ("::8.8.8.8", True),
    ("::ffff:0:127.0.0.1", False),  # SIIT IPv4-translated
    ("64:ff9b::127.0.0.1", False),  # NAT64
    ("64:ff9b::a9fe:a9fe", False),
    ("64:ff9b::8.8.8.8", True),
    ("64:ff9b:1::8.8.8.8", False),  # local-use NAT64: never
    ("64:ff9b:1:7f00:1::", False),
    ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", False),
    ("2002:808:808::1", True),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ("2001:0:0808:0808:0:0:80ff:fffe", False),  # Teredo whose client is 127.0.0.1
]


@pytest.mark.parametrize(("address", "reachable"), ADDRESSES)
def test_address_rule(address: str, reachable: bool) -> None:
    reason = why_forbidden(ip_address(address))
    assert (reason is None) == reachable, (address, reason)
    if reason is not None:
        assert reason.strip()


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "RFC 1918"),
        ("100.64.1.1", "100.64.0.0/10"),
        ("::ffff:127.0.0.1", "IPv4 127.0.0.1"),
        ("fd00::1", "unique-local"),
        ("0.0.0.0", "0.0.0.0/8"),
    ],
)
def test_reasons_say_what_the_address_is(address: str, words: str) -> None:
    assert words in (why_forbidden(ip_address(address)) or "")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("[::127.0.0.1]", "::127.0.0.1"),
        ("2852039166", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("api.stripe.com", None),
        ("storage.googleapis.com", None),
        ("deadbeef", None),
        ("1.2.3.4.5", None),
        ("", None),
        ("127.0.0.1 x", None),
        ("localhost", None),
    ],
)
def test_hosts_are_read_as_the_os_reads_them(host: str, expected: str | None) -> None:
    got = parse_ip_host(host)
    assert got == (ip_address(expected) if expected is not None else None)


def test_addresses_of_this_host_are_local() -> None:
    assert is_local_address(ip_address("127.0.0.1"))
    assert is_local_address(ip_address("127.0.0.2"))
    assert not is_local_address(ip_address("192.0.2.55"))  # not assigned here
    # The pure rule says nothing about local addresses; refusal_reason does.
    assert refusal_reason(ip_address("127.0.0.1")) == "loopback"
    assert refusal_reason(ip_address("8.8.8.8")) is None


# -- passthrough patterns ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ("storage.googleapis.com", PassthroughRule("storage.googleapis.com", None, None)),
        ("*.googleapis.com", PassthroughRule("*.googleapis.com", None, None)),
        ("*.GoogleAPIs.COM:443", PassthroughRule("*.googleapis.com", 443, None)),
        ("  pypi.org.  ", PassthroughRule("pypi.org", None, None)),
        ("files-*.example.net:8443", PassthroughRule("files-*.example.net", 8443, None)),
        ("8.8.8.8", PassthroughRule("8.8.8.8", None, ip_address("8.8.8.8"))),
        ("[2606:4700::1]:443", PassthroughRule("2606:4700::1", 443, ip_address("2606:4700::1"))),
    ],
)
def test_passthrough_entries(entry: str, rule: PassthroughRule) -> None:
    assert parse_passthrough(entry) == rule


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("", "host name or glob"),
        ("*", "last label"),
        ("*.*", "last label"),
        ("example.*", "last label"),
        ("10.0.*.1", "last label"),
        ("a..b", "host name or glob"),
        ("exa mple.com", "host name or glob"),
        ("http://example.com", "port"),
        ("example.com/path", "host name or glob"),
        ("example.com:0", "port"),
        ("example.com:99999", "port"),
        ("example.com:https", "port"),
        ("ex?mple.com", "host name or glob"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254:80", "link-local"),
        ("10.0.0.1", "RFC 1918"),
        ("[::1]:443", "loopback"),
        ("2130706433", "write the address as 127.0.0.1"),
    ],
)
def test_bad_passthrough_entries_are_named(entry: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_passthrough(entry)
    assert repr(entry.strip().lower()) in str(e.value) or repr(entry) in str(e.value)
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("pattern", "host", "port", "matches"),
    [
        ("*.googleapis.com", "storage.googleapis.com", 443, True),
        ("*.googleapis.com", "a.b.googleapis.com", 443, True),
        ("*.googleapis.com", "googleapis.com", 443, False),
        ("*.googleapis.com", "evilgoogleapis.com", 443, False),
        ("*.googleapis.com", "googleapis.com.evil.example", 443, False),
        ("storage.googleapis.com:443", "storage.googleapis.com", 443, True),
        ("storage.googleapis.com:443", "storage.googleapis.com", 80, False),
        ("8.8.8.8", "8.8.8.8", 53, True),
        ("8.8.8.8:443", "8.8.8.8", 80, False),
    ],
)
def test_passthrough_matching(pattern: str, host: str, port: int, matches: bool) -> None:
    rule = parse_passthrough(pattern)
    assert rule.matches(host, parse_ip_host(host), port) is matches


def test_a_name_pattern_never_matches_an_address() -> None:
    rule = parse_passthrough("*.example.com")
    assert not rule.matches("1.2.3.4", ip_address("1.2.3.4"), 443)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_name_servers(entry: str, expected: tuple[str, int]) -> None:
    assert parse_name_server(entry) == expected


@pytest.mark.parametrize("entry", ["dns.google", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", ""])
def test_bad_name_servers(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_name_server(entry)


async def test_the_system_resolver_reads_etc_hosts() -> None:
    assert ip_address("127.0.0.1") in await SystemResolver().addresses("localhost")
    with pytest.raises(ResolveError):
        await SystemResolver().addresses("no-such-name.invalid")


async def test_a_name_server_that_does_not_answer_is_a_resolve_error() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        resolver = NameServerResolver([("127.0.0.1", silent.getsockname()[1])])
        resolver._resolver.lifetime = 0.5
        with pytest.raises(ResolveError):
            await resolver.addresses("anything.test")


# -- the addon -----------------------------------------------------------------------------------
class FakeResolver:
    """Answers from a table and counts the questions."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def addresses(self, host: str) -> list[IPAddress]:
        self.asked.append(host)
        if host not in self.table:
            raise ResolveError("no such name")
        return [ip_address(a) for a in self.table[host]]


UPSTREAM = ("127.0.0.1", 9443)


@pytest.fixture
def egress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Egress]:
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", "kba_egress_unit_test_token_0123456789abcdef")
    monkeypatch.delenv("KEYBRAKE_PASSTHROUGH", raising=False)
    policies = tmp_path / "policies"
    policies.mkdir()
    for f in (ROOT / "policies").glob("*.yaml"):
        data = yaml.safe_load(f.read_text())
        if data["vendor"] == "twilio":
            data["upstream"] = {"url": f"https://{UPSTREAM[0]}:{UPSTREAM[1]}"}
        (policies / f.name).write_text(yaml.safe_dump(data, sort_keys=False))
    runtime = Runtime()
    core, egress = Core(runtime), Egress(runtime)
    with taddons.context(core, egress) as tctx:
        tctx.configure(
            core,
            keybrake_data_dir=str(tmp_path / "data"),
            keybrake_policies=str(policies),
            keybrake_store=f"sqlite:///{tmp_path / 'kb.db'}",
        )
        tctx.configure(
            egress, keybrake_passthrough=["*.googleapis.com", "pypi.org:443", "*.test", "8.8.8.8"]
        )
        egress.resolver = FakeResolver(
            {
                "storage.googleapis.com": ["192.88.99.2", "2606:4700::1"],
                "metadata.test": ["169.254.169.254"],
                "mixed.test": ["10.0.0.1", "192.88.99.3"],
                "api.stripe.com": ["192.88.99.9"],
                "api.resend.com": ["127.0.0.1"],
            }
        )
        yield egress


def connect_flow(authority: str) -> http.HTTPFlow:
    host, _, port = authority.rpartition(":")
    req = tutils.treq(
        method=b"CONNECT",
        scheme=b"",
        host=host.strip("[]"),
        port=int(port),
        authority=authority.encode(),
        path=b"",
        headers=http.Headers(),
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    f.client_conn.sni = None
    return f


def plain_flow(url_host: str, port: int, *, sni: str | None = None) -> http.HTTPFlow:
    req = tutils.treq(
        method=b"GET",
        scheme=b"http",
        host=url_host,
        port=port,
        path=b"/latest/meta-data?x=1",
        headers=http.Headers([(b"Host", url_host.encode())]),
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    f.client_conn.sni = sni
    return f


def egress_denied(f: http.HTTPFlow) -> CallState:
    assert f.response is not None, "expected a refusal"
    body = json.loads(f.response.content or b"")
    assert (f.response.status_code, body["error"]["code"]) == (403, "egress_denied"), body
    assert body["error"]["type"] == "keybrake_error" and body["error"]["message"]
    assert f.response.headers["X-Keybrake-Error"] == "egress_denied"
    call = call_of(f)
    assert isinstance(call, CallState)
    assert (call.vendor, call.outcome, call.code, call.status) == (
        "",
        "refused",
        "egress_denied",
        403,
    )
    return call


async def gate(egress: Egress, client: connection.Client, address: tuple[str, int]) -> Any:
    server = connection.Server(address=address)
    await egress.server_connect(ServerConnectionHookData(server=server, client=client))
    return server


def test_options_are_registered_with_help(egress: Egress) -> None:
    from mitmproxy import ctx

    for name in ("keybrake_passthrough", "keybrake_dns_servers"):
        assert ctx.options._options[name].help


def test_a_bad_passthrough_entry_stops_the_proxy_naming_it(egress: Egress) -> None:
    from mitmproxy import ctx

    with pytest.raises(exceptions.OptionsError, match=r"keybrake_passthrough: '10\.0\.0\.1'"):
        ctx.options.update(keybrake_passthrough=["pypi.org", "10.0.0.1"])
    with pytest.raises(exceptions.OptionsError, match=r"keybrake_dns_servers: 'dns\.google'"):
        ctx.options.update(keybrake_dns_servers=["dns.google"])


async def test_connect_to_loopback_is_refused_without_a_lookup(egress: Egress) -> None:
    f = connect_flow("127.0.0.1:6379")
    await egress.http_connect(f)
    call = egress_denied(f)
    assert (call.method, call.path) == ("CONNECT", "127.0.0.1:6379")
    assert f.response is not None
    assert "loopback" in json.loads(f.response.content or b"")["message"]
    assert egress.resolver.asked == []  # type: ignore[attr-defined]


async def test_an_unlisted_name_is_refused_by_name(egress: Egress) -> None:
    f = connect_flow("internal.example:443")
    await egress.http_connect(f)
    egress_denied(f)
    assert egress.resolver.asked == []  # type: ignore[attr-defined]


async def test_a_listed_name_is_resolved_checked_and_pinned(egress: Egress) -> None:
    f = connect_flow("storage.googleapis.com:443")
    await egress.http_connect(f)
    assert f.response is None
    assert f.request.host == "192.88.99.2"  # the checked address, where mitmproxy connects
    server = await gate(egress, f.client_conn, ("192.88.99.2", 443))
    assert server.error is None and server.address == ("192.88.99.2", 443)
    # Another client connection did not get this approval.
    other = await gate(egress, tflow.tclient_conn(), ("192.88.99.2", 443))
    assert other.error


async def test_a_listed_name_resolving_inward_is_refused(egress: Egress) -> None:
    f = connect_flow("metadata.test:80")
    await egress.http_connect(f)
    egress_denied(f)
    assert f.response is not None
    assert "169.254.169.254" in json.loads(f.response.content or b"")["message"]


async def test_the_first_reachable_answer_is_used(egress: Egress) -> None:
    f = connect_flow("mixed.test:443")
    await egress.http_connect(f)
    assert f.response is None and f.request.host == "192.88.99.3"


async def test_a_listed_address_and_a_port_limited_name(egress: Egress) -> None:
    ok = connect_flow("8.8.8.8:853")
    await egress.http_connect(ok)
    assert ok.response is None and ok.request.host == "8.8.8.8"
    wrong_port = connect_flow("pypi.org:22")
    await egress.http_connect(wrong_port)
    egress_denied(wrong_port)


async def test_vendor_connects_are_left_to_the_guard(egress: Egress) -> None:
    f = connect_flow("api.stripe.com:443")
    await egress.http_connect(f)
    assert f.response is None and f.request.host == "api.stripe.com"
    assert "keybrake" not in f.metadata


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "2130706433", "169.254.169.254", "::ffff:127.0.0.1", "metadata.test"]
)
async def test_absolute_form_requests_are_judged_too(egress: Egress, host: str) -> None:
    f = plain_flow(host, 80)
    await egress.request(f)
    call = egress_denied(f)
    assert call.method == "GET" and call.path.startswith("http://") and "?" not in call.path


async def test_plain_request_to_a_listed_name_is_pinned_at_connect(egress: Egress) -> None:
    f = plain_flow("storage.googleapis.com", 80)
    await egress.request(f)
    assert f.response is None and f.request.host == "storage.googleapis.com"
    server = await gate(egress, f.client_conn, ("storage.googleapis.com", 80))
    assert server.error is None and server.address == ("192.88.99.2", 80)


async def test_requests_naming_a_vendor_anywhere_are_the_guards(egress: Egress) -> None:
    for f in (
        plain_flow("127.0.0.1", 443, sni="api.stripe.com"),
        plain_flow("api.stripe.com", 443),
    ):
        await egress.request(f)
        assert f.response is None and "keybrake" not in f.metadata


async def test_the_admin_listener_is_not_judged(egress: Egress) -> None:
    f = plain_flow("127.0.0.1", 1)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:1@8081")
    await egress.request(f)
    assert f.response is None


@pytest.mark.parametrize(
    ("address", "allowed", "pinned_to"),
    [
        (UPSTREAM, True, UPSTREAM),  # a vendor upstream override, exactly
        (("127.0.0.1", 9444), False, None),
        (("127.0.0.1", 1), False, None),  # the admin listener's placeholder upstream
        (("api.stripe.com", 443), True, ("192.88.99.9", 443)),  # resolved, checked, pinned
        (("api.stripe.com", 6379), False, None),
        (("api.resend.com", 443), False, None),  # a vendor name resolving to loopback
        (("api.twilio.com", 443), False, None),  # does not resolve
        (("192.88.99.2", 443), False, None),  # global, but never approved
        (("storage.googleapis.com", 443), False, None),  # listed, but never approved
    ],
)
async def test_the_last_gate(
    egress: Egress,
    address: tuple[str, int],
    allowed: bool,
    pinned_to: tuple[str, int] | None,
) -> None:
    server = await gate(egress, tflow.tclient_conn(), address)
    assert (server.error is None) is allowed, server.error
    if allowed:
        assert server.address == pinned_to


def vendor_call(host: str, client: connection.Client | None = None) -> http.HTTPFlow:
    """A vendor call as VaultGuard leaves it when it forwards: checked, host chosen."""
    req = tutils.treq(
        method=b"POST",
        scheme=b"https",
        host=host,
        port=443,
        path=b"/v1/payment_intents",
        headers=http.Headers([(b"Host", host.encode())]),
        content=b"amount=100&currency=usd",
    )
    f = tflow.tflow(req=req)
    if client is not None:
        f.client_conn = client
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    track(f, CallState(vendor="stripe", outcome="forwarded"))
    return f


async def test_a_vendor_call_is_pinned_and_its_connection_names_the_vendor(
    egress: Egress,
) -> None:
    pin = VendorPin(egress)
    first = vendor_call("api.stripe.com")
    await pin.request(first)
    assert first.request.host == "192.88.99.9"  # where mitmproxy will connect
    assert first.request.headers["Host"] == "api.stripe.com"  # what the vendor sees
    server = connection.Server(address=("192.88.99.9", 443), sni="192.88.99.9")
    hook = ServerConnectionHookData(server=server, client=first.client_conn)
    await egress.server_connect(hook)
    assert server.error is None and server.address == ("192.88.99.9", 443)
    assert server.sni == "api.stripe.com"  # TLS and its certificate check name the vendor
    # The next call on this client connection goes to the same address, without a lookup,
    # so mitmproxy reuses the vendor connection.
    second = vendor_call("api.stripe.com", first.client_conn)
    await pin.request(second)
    assert second.request.host == "192.88.99.9"
    assert egress.resolver.asked == ["api.stripe.com"]  # type: ignore[attr-defined]


async def test_a_vendor_host_resolving_inward_is_not_pinned_and_is_killed(egress: Egress) -> None:
    f = vendor_call("api.resend.com")
    await VendorPin(egress).request(f)
    assert f.request.host == "api.resend.com"
    server = await gate(egress, f.client_conn, ("api.resend.com", 443))
    assert server.error and "loopback" in server.error


async def test_two_vendor_hosts_on_one_address_never_share_a_connection(egress: Egress) -> None:
    egress.resolver.table["api.twilio.com"] = ["192.88.99.9"]  # type: ignore[attr-defined]
    pin = VendorPin(egress)
    stripe = vendor_call("api.stripe.com")
    await pin.request(stripe)
    twilio = vendor_call("api.twilio.com", stripe.client_conn)
    await pin.request(twilio)
    assert stripe.request.host == "192.88.99.9"
    assert twilio.request.host == "api.twilio.com"  # left to server_connect: its own connection


async def test_calls_the_guard_did_not_forward_are_not_pinned(egress: Egress) -> None:
    f = vendor_call("api.stripe.com")
    track(f, CallState(vendor="stripe", outcome="refused"))
    await VendorPin(egress).request(f)
    assert f.request.host == "api.stripe.com"
    assert egress.resolver.asked == []  # type: ignore[attr-defined]


async def test_approvals_end_with_the_client_connection(egress: Egress) -> None:
    f = connect_flow("storage.googleapis.com:443")
    await egress.http_connect(f)
    egress.client_disconnected(f.client_conn)
    server = await gate(egress, f.client_conn, ("192.88.99.2", 443))
    assert server.error


async def test_an_internal_error_refuses(egress: Egress) -> None:
    class Broken:
        async def addresses(self, host: str) -> list[IPAddress]:
            raise RuntimeError("boom")

    egress.resolver = Broken()
    f = connect_flow("storage.googleapis.com:443")
    await egress.http_connect(f)
    assert f.response is not None and f.response.status_code == 503
    server = await gate(egress, f.client_conn, ("api.stripe.com", 443))
    assert server.error


# -- the command line ----------------------------------------------------------------------------
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> tuple[Any, list[str]]:
    """``keybrake run|web …`` with mitmproxy replaced by a recorder of its arguments."""
    import mitmproxy.tools.main
    from typer.testing import CliRunner

    from keybrake.cli import app

    seen: list[str] = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", lambda a: seen.extend(a))
    monkeypatch.setattr(mitmproxy.tools.main, "mitmweb", lambda a: seen.extend(a))
    common = ["--data-dir", str(tmp_path / "d"), "--certs-dir", str(tmp_path / "certs")]
    common += ["--policies", str(ROOT / "policies")]
    # The ports are checked before mitmproxy would start: free ones, not the defaults.
    for flag in ("--proxy-port", "--admin-port", "--web-port"):
        common += [flag, str(free_port())]
    result = CliRunner().invoke(app, [*args, *common])
    return result, seen


def passthrough_sets(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[1] for a in argv if a.startswith("keybrake_passthrough=")]


@pytest.mark.parametrize("command", ["run", "web"])
def test_passthrough_flags_become_the_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keybrake_certs: Path, command: str
) -> None:
    monkeypatch.setenv("KEYBRAKE_PASSTHROUGH", "ignored.example")
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", "kba_egress_cli_test_token_0123456789abcdef")
    monkeypatch.setattr("keybrake.cli._run.ensure_ca", lambda d: keybrake_certs / "bundle.pem")
    result, argv = run_cli(
        monkeypatch,
        tmp_path,
        command,
        "--passthrough",
        "*.googleapis.com",
        "--passthrough",
        "pypi.org:443",
    )
    assert result.exit_code == 0, result.output
    assert passthrough_sets(argv) == ["*.googleapis.com", "pypi.org:443"]
    assert "tunnelled if *.googleapis.com, pypi.org:443" in result.output


def test_passthrough_comes_from_the_environment_comma_separated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keybrake_certs: Path
) -> None:
    monkeypatch.setenv("KEYBRAKE_PASSTHROUGH", "*.googleapis.com, pypi.org")
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", "kba_egress_cli_test_token_0123456789abcdef")
    monkeypatch.setattr("keybrake.cli._run.ensure_ca", lambda d: keybrake_certs / "bundle.pem")
    result, argv = run_cli(monkeypatch, tmp_path, "run")
    assert result.exit_code == 0, result.output
    assert passthrough_sets(argv) == ["*.googleapis.com", "pypi.org"]


@pytest.mark.parametrize("bad", ["10.0.0.1", "*", "169.254.169.254:80"])
def test_a_bad_passthrough_flag_stops_before_starting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    monkeypatch.delenv("KEYBRAKE_PASSTHROUGH", raising=False)
    result, argv = run_cli(monkeypatch, tmp_path, "run", "--passthrough", bad)
    assert result.exit_code == 2
    assert f"--passthrough: {bad!r}" in result.output
    assert argv == []
