"""The forward proxy is not a way into its own host's network (DESIGN §1, egress).

A worker holding a vault key once ran ``CONNECT 127.0.0.1:6379`` through Keybrake and
rewrote its own budget in the proxy's Redis. These tests drive a real ``keybrake run``:

- Every attempt at a loopback, private or link-local destination, however it is spelled
  (``2130706433``, ``0x7f000001``, ``127.1``, ``[::ffff:127.0.0.1]``, ``[::127.0.0.1]``, a
  listed name whose DNS answer points inward), is answered ``403 egress_denied`` in the JSON
  error contract, gets an audit row, and connects nowhere: a listener the test owns sits on
  the address and port the attacker names and must accept nothing.
- Names are resolved by a stub name server on a loopback UDP port (``keybrake_dns_servers``):
  ``metadata.test`` resolves to 169.254.169.254 and is refused on that answer, so no packet
  is ever sent towards it. No test sends anything anywhere but loopback or namespaces it made.
- What needs a reachable (global) address runs in network namespaces (``tests/netns.py``):
  DNS rebinding, the proxy's own non-loopback address, and a vendor host that is resolved,
  checked and pinned.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from tests.conftest import KEYBRAKE, KeybrakeProcess, audit_query
from tests.dns_stub import StubDNS
from tests.fakes import FakeStripe, FakeTLS
from tests.netns import HOST_A, HOST_B, Netns, Tripwire, netns_unusable, two_hosts

pytestmark = pytest.mark.e2e

FORM = b"amount=100&currency=usd&confirm=true&payment_method=pm_card_visa"
PASSTHROUGH = ["metadata.test", "internal.test", "*.loop.test", "listed.test", "*.example"]
NAMES = {
    "metadata.test": ["169.254.169.254"],
    "internal.test": ["10.0.0.1"],
    "db.loop.test": ["127.0.0.1"],
    "v6.loop.test": ["::1"],
    "mapped.loop.test": ["::ffff:127.0.0.1"],
}


# -- helpers --------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 answer with a Content-Length (what the proxy's refusals carry)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return Answer(int(lines[0].split(" ", 2)[1]), headers, body)


def send(
    proxy: tuple[str, int], raw: bytes, connect: Callable[..., socket.socket] | None = None
) -> tuple[Answer, socket.socket]:
    make = connect or (lambda addr: socket.create_connection(addr, timeout=10))
    sock = make(proxy)
    sock.settimeout(10)
    sock.sendall(raw)
    return read_answer(sock), sock


def connect_request(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def assert_egress_denied(answer: Answer) -> str:
    """The error contract of an egress refusal; returns the message."""
    assert answer.status == 403, answer
    body = answer.json()
    assert body["error"]["code"] == "egress_denied", body
    assert body["error"]["type"] == "keybrake_error"
    assert answer.headers["x-keybrake-error"] == "egress_denied"
    assert answer.headers["stripe-should-retry"] == "false"
    message: str = body["error"]["message"]
    assert message
    return message


def audit_row(data_dir: Path, method: str, path: str, timeout: float = 10) -> dict[str, Any]:
    """The audit row of one refused attempt (rows are written in batches: wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [
            r
            for r in audit_query(data_dir / "audit.db")
            if (r["method"], r["path"]) == (method, path)
        ]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) == 1, (method, path, rows)
    row = rows[0]
    assert (row["vendor"], row["outcome"], row["code"], row["status"]) == (
        "",
        "refused",
        "egress_denied",
        403,
    ), row
    return row


def untouched(*wires: Tripwire) -> None:
    time.sleep(0.3)  # anything the proxy might still have started would have arrived by now
    for w in wires:
        assert w.accepted == 0, f"{w.host}:{w.port} was connected to"


def no_server_connect(kb: KeybrakeProcess, needle: str) -> None:
    lines = [line for line in kb.log().splitlines() if "server connect" in line and needle in line]
    assert lines == [], lines


# -- one proxy for the refusals on loopback -------------------------------------------------------
@dataclass
class Proxy:
    kb: KeybrakeProcess
    dns: StubDNS
    stripe: FakeStripe

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.kb.proxy_port)


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("egress")
    with StubDNS(dict(NAMES)) as dns, FakeStripe(fake_tls) as stripe:
        args = ["--set", f"keybrake_dns_servers={dns.address}"]
        # The list as operators give it to `keybrake run`: one comma-separated variable.
        env = {"KEYBRAKE_PASSTHROUGH": ",".join(PASSTHROUGH)}
        kb = KeybrakeProcess(
            workdir, keybrake_certs, {"stripe": stripe}, fake_tls, env=env, extra_args=args
        )
        try:
            yield Proxy(kb.start(), dns, stripe)
        finally:
            kb.stop()


@pytest.fixture
def wire() -> Iterator[Tripwire]:
    with Tripwire("127.0.0.1") as w:
        yield w


# Every way of writing a loopback address (and "this host") that the OS would connect to.
LOOPBACK_FORMS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "017700000001",
    "0177.0.0.1",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "127.0.0.1.",
    "0",
    "0.0.0.0",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "[::ffff:0:127.0.0.1]",
    "[64:ff9b::127.0.0.1]",
    "[2002:7f00:1::1]",
    "localhost",
]


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_connect_to_loopback_in_any_spelling_is_refused(
    proxy: Proxy, wire: Tripwire, host: str
) -> None:
    authority = f"{host}:{wire.port}"
    answer, sock = send(proxy.address, connect_request(authority))
    sock.close()
    assert_egress_denied(answer)
    untouched(wire)
    path = f"[{host.strip('[]')}]:{wire.port}" if ":" in host.strip("[]") else authority
    audit_row(proxy.kb.data_dir, "CONNECT", path)
    no_server_connect(proxy.kb, f":{wire.port}")


@pytest.mark.parametrize(("host", "bind"), [("127.0.0.2", "127.0.0.2"), ("[::1]", "::1")])
def test_other_loopback_addresses_are_refused(proxy: Proxy, host: str, bind: str) -> None:
    with Tripwire(bind) as w:
        answer, sock = send(proxy.address, connect_request(f"{host}:{w.port}"))
        sock.close()
        assert "loopback" in assert_egress_denied(answer)
        untouched(w)


def test_the_redis_port_is_refused(proxy: Proxy) -> None:
    answer, sock = send(proxy.address, connect_request("127.0.0.1:6379"))
    sock.close()
    assert "loopback" in assert_egress_denied(answer)
    audit_row(proxy.kb.data_dir, "CONNECT", "127.0.0.1:6379")
    no_server_connect(proxy.kb, ":6379")


def test_the_proxys_own_listeners_are_refused(proxy: Proxy) -> None:
    for port in (proxy.kb.admin_port, proxy.kb.proxy_port):
        answer, sock = send(proxy.address, connect_request(f"127.0.0.1:{port}"))
        sock.close()
        assert_egress_denied(answer)
        audit_row(proxy.kb.data_dir, "CONNECT", f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("name", "port", "address"),
    [("metadata.test", 80, "169.254.169.254"), ("internal.test", 443, "10.0.0.1")],
)
def test_a_listed_name_resolving_inward_is_refused_before_any_connect(
    proxy: Proxy, name: str, port: int, address: str
) -> None:
    before = proxy.dns.count(name)
    answer, sock = send(proxy.address, connect_request(f"{name}:{port}"))
    sock.close()
    assert address in assert_egress_denied(answer)
    assert proxy.dns.count(name) == before + 1  # decided on the one answer it got
    audit_row(proxy.kb.data_dir, "CONNECT", f"{name}:{port}")
    no_server_connect(proxy.kb, address)
    assert "killed a connection" not in proxy.kb.log()  # never even reached the last gate


@pytest.mark.parametrize(
    ("name", "bind"),
    [("db.loop.test", "127.0.0.1"), ("v6.loop.test", "::1"), ("mapped.loop.test", "127.0.0.1")],
)
def test_a_listed_pattern_resolving_to_loopback_is_still_refused(
    proxy: Proxy, name: str, bind: str
) -> None:
    with Tripwire(bind) as w:
        answer, sock = send(proxy.address, connect_request(f"{name}:{w.port}"))
        sock.close()
        assert "loopback" in assert_egress_denied(answer)
        untouched(w)
        audit_row(proxy.kb.data_dir, "CONNECT", f"{name}:{w.port}")


def test_an_unlisted_name_is_refused_without_a_lookup(proxy: Proxy) -> None:
    answer, sock = send(proxy.address, connect_request("unlisted.test:443"))
    sock.close()
    assert "passthrough" in assert_egress_denied(answer)
    assert not proxy.dns.asked("unlisted.test")
    audit_row(proxy.kb.data_dir, "CONNECT", "unlisted.test:443")


def test_a_listed_name_that_does_not_resolve_is_refused(proxy: Proxy) -> None:
    answer, sock = send(proxy.address, connect_request("listed.test:443"))
    sock.close()
    assert "could not be resolved" in assert_egress_denied(answer)
    assert proxy.dns.asked("listed.test")


@pytest.mark.parametrize(
    "request_line",
    [
        "GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}",
        "GET http://2130706433:{port}/ HTTP/1.1\r\nHost: 2130706433:{port}",
        "GET http://[::ffff:127.0.0.1]:{port}/x HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{port}",
        "GET http://db.loop.test:{port}/ HTTP/1.1\r\nHost: db.loop.test:{port}",
        # origin-form with a Host header: mitmproxy takes the destination from the header
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}",
    ],
)
def test_plain_http_through_the_proxy_is_judged_too(
    proxy: Proxy, wire: Tripwire, request_line: str
) -> None:
    raw = (request_line.format(port=wire.port) + "\r\nConnection: close\r\n\r\n").encode()
    answer, sock = send(proxy.address, raw)
    sock.close()
    assert_egress_denied(answer)
    untouched(wire)
    assert audited_get(proxy, wire.port)


def audited_get(proxy: Proxy, port: int) -> bool:
    """A refused plain request has its audit row (method GET, path = scheme://host:port/…)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for r in audit_query(proxy.kb.data_dir / "audit.db"):
            if r["method"] == "GET" and f":{port}/" in (r["path"] or ""):
                assert (r["code"], r["outcome"], r["vendor"]) == ("egress_denied", "refused", "")
                return True
        time.sleep(0.05)
    return False


def test_the_metadata_service_by_absolute_url_is_refused(proxy: Proxy) -> None:
    raw = b"GET http://metadata.test/latest/meta-data/ HTTP/1.1\r\nHost: metadata.test\r\n\r\n"
    answer, sock = send(proxy.address, raw)
    sock.close()
    assert "169.254.169.254" in assert_egress_denied(answer)
    audit_row(proxy.kb.data_dir, "GET", "http://metadata.test:80/latest/meta-data/")
    no_server_connect(proxy.kb, "169.254")


def h2_stream(proxy: Proxy, headers: list[tuple[str, str]]) -> tuple[int | None, bytes, bool]:
    """One HTTP/2 stream over TLS to the proxy itself (a "secure web proxy", ALPN h2 only).

    Returns (status, body, connection terminated by the proxy).
    """
    raw = socket.create_connection(proxy.address, timeout=10)
    ctx = ssl.create_default_context(cafile=str(proxy.kb.bundle))
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=headers[0] != (":method", "CONNECT"))
    tls.sendall(conn.data_to_send())
    status: int | None = None
    body, terminated, done = b"", False, False
    with tls:
        while not done and not terminated:
            data = tls.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    terminated = True
            if out := conn.data_to_send():
                tls.sendall(out)
    return status, body, terminated


@pytest.mark.parametrize("authority", ["127.0.0.1:{port}", "2130706433:{port}"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http2_streams_are_judged_like_http1(
    proxy: Proxy, wire: Tripwire, authority: str, scheme: str
) -> None:
    target = authority.format(port=wire.port)
    headers = [(":method", "GET"), (":scheme", scheme), (":authority", target), (":path", "/x")]
    status, body, _ = h2_stream(proxy, headers)
    assert status == 403, body
    assert json.loads(body)["error"]["code"] == "egress_denied"
    untouched(wire)
    audit_row(proxy.kb.data_dir, "GET", f"{scheme}://{target}/x")


def test_http2_connect_streams_never_tunnel(proxy: Proxy, wire: Tripwire) -> None:
    headers = [(":method", "CONNECT"), (":authority", f"127.0.0.1:{wire.port}")]
    status, _, terminated = h2_stream(proxy, headers)
    # mitmproxy's HTTP/2 server does not do CONNECT streams at all: a protocol error.
    assert status is None and terminated
    untouched(wire)


def test_vendor_calls_still_reach_the_vendor_upstream(proxy: Proxy) -> None:
    key = proxy.kb.issue_key()
    sock = socket.create_connection(proxy.address, timeout=10)
    sock.sendall(connect_request("api.stripe.com:443"))
    assert read_answer_head(sock).startswith(b"HTTP/1.1 200")
    with proxy.kb.ssl_context().wrap_socket(sock, server_hostname="api.stripe.com") as tls:
        tls.sendall(charge_request(key["vault_key"]))
        answer = read_answer(tls)
    assert answer.status == 200, answer.body[:300]
    assert any(e.route == "/v1/payment_intents" for e in proxy.stripe.ledger)


def read_answer_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    return head


def charge_request(vault_key: str) -> bytes:
    return (
        f"POST /v1/payment_intents HTTP/1.1\r\nHost: api.stripe.com\r\n"
        f"Authorization: Bearer {vault_key}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(FORM)}\r\n\r\n"
    ).encode() + FORM


def test_a_forbidden_passthrough_entry_stops_the_proxy(
    tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS
) -> None:
    kb = KeybrakeProcess(
        tmp_path,
        keybrake_certs,
        {},
        fake_tls,
        extra_args=["--set", "keybrake_passthrough=10.0.0.1"],
    )
    with pytest.raises(RuntimeError) as e:
        kb.start(timeout=120)
    assert "keybrake_passthrough: '10.0.0.1'" in str(e.value)
    assert "RFC 1918" in str(e.value)


# -- in network namespaces: addresses that pass the check ----------------------------------------
netns = pytest.mark.skipif(
    netns_unusable() is not None, reason=f"needs network namespaces: {netns_unusable()}"
)


@dataclass
class Hosts:
    """Namespace ``a`` (proxy, client, stub DNS) and ``b`` (the destination), linked."""

    a: Netns
    b: Netns
    dns: StubDNS
    started: list[KeybrakeProcess] = field(default_factory=list)

    def proxy(self, factory: Any, *patterns: str, fakes: Any = None, **kw: Any) -> KeybrakeProcess:
        """A proxy in namespace ``a``, resolving with the stub, ``patterns`` listed."""
        args = ["--set", f"keybrake_dns_servers={self.dns.address}", *kw.pop("extra_args", [])]
        for p in patterns:
            args += ["--set", f"keybrake_passthrough={p}"]
        kb: KeybrakeProcess = factory(fakes or {}, netns=self.a, extra_args=args, **kw)
        self.started.append(kb)
        return kb

    def send(self, kb: KeybrakeProcess, raw: bytes) -> tuple[Answer, socket.socket]:
        return send(("127.0.0.1", kb.proxy_port), raw, connect=self.a.connect)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with two_hosts() as (a, b):
        udp = a.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))
        with StubDNS({}, sock=udp) as dns:
            setup = Hosts(a, b, dns)
            try:
                yield setup
            finally:
                for kb in setup.started:  # before the namespaces go
                    kb.stop()


@netns
def test_dns_rebinding_never_reaches_the_second_answer(keybrake_factory: Any, hosts: Hosts) -> None:
    """The name is looked up once per decision and the tunnel goes to the address checked."""
    hosts.dns.answers["rebind.example"] = lambda n: [HOST_B] if n == 0 else ["127.0.0.1"]
    kb = hosts.proxy(keybrake_factory, "rebind.example")
    with (
        Tripwire(HOST_B, 443, ns=hosts.b, echo=True) as remote,
        Tripwire("127.0.0.1", 443, ns=hosts.a) as local,
    ):
        answer, sock = hosts.send(kb, connect_request("rebind.example:443"))
        assert answer.status == 200
        with sock:
            sock.sendall(b"bytes through the tunnel\n")
            assert sock.recv(100) == b"bytes through the tunnel\n"
        assert hosts.dns.count("rebind.example") == 1
        assert remote.accepted == 1
        # The next decision asks again, gets 127.0.0.1, and refuses it.
        answer, sock = hosts.send(kb, connect_request("rebind.example:443"))
        sock.close()
        assert "127.0.0.1" in assert_egress_denied(answer)
        assert hosts.dns.count("rebind.example") == 2
        untouched(local)
        assert remote.accepted == 1


@netns
def test_the_proxy_hosts_own_addresses_are_refused(keybrake_factory: Any, hosts: Hosts) -> None:
    """HOST_A is global to Python, but it belongs to the proxy's host: never reachable."""
    hosts.dns.answers["self.example"] = [HOST_A]
    kb = hosts.proxy(keybrake_factory, HOST_A, "self.example")
    with Tripwire(HOST_A, ns=hosts.a) as w:
        for authority in (f"{HOST_A}:{w.port}", f"self.example:{w.port}"):
            answer, sock = hosts.send(kb, connect_request(authority))
            sock.close()
            assert "proxy host itself" in assert_egress_denied(answer)
            audit_row(kb.data_dir, "CONNECT", authority)
        untouched(w)


@netns
def test_a_vendor_host_is_resolved_checked_and_pinned(
    keybrake_factory: Any, hosts: Hosts, fake_tls: FakeTLS, tmp_path: Path
) -> None:
    """Without an ``upstream`` override the proxy resolves the vendor host itself: the call
    goes to the checked address, and a later answer pointing at loopback is never used."""
    hosts.dns.answers["api.stripe.com"] = lambda n: [HOST_B] if n == 0 else ["127.0.0.1"]
    stripe = FakeStripe(fake_tls, host=HOST_B, port=443)
    hosts.b.call(stripe.start)
    try:
        kb = hosts.proxy(
            keybrake_factory,
            env=stripe.env(),
            extra_args=["--set", f"ssl_verify_upstream_trusted_ca={fake_tls.ca_pem}"],
        )
        vault_key = issue_key_offline(kb)
        with Tripwire("127.0.0.1", 443, ns=hosts.a) as local:
            assert charge_in(hosts, kb, vault_key).status == 200
            assert len(stripe.ledger) == 1
            second = charge_in(hosts, kb, vault_key)
            # The vendor host now "resolves" to loopback: the connection is killed at the
            # last gate, the call fails (502) and nothing reaches 127.0.0.1:443.
            assert second.status == 502, second
            assert len(stripe.ledger) == 1
            untouched(local)
        assert "killed a connection to api.stripe.com:443" in kb.log()
    finally:
        stripe.stop()


@netns
def test_vendor_calls_on_one_connection_share_one_pinned_vendor_connection(
    keybrake_factory: Any, hosts: Hosts, fake_tls: FakeTLS
) -> None:
    """Pinning keeps mitmproxy's connection reuse: one lookup, one vendor connection."""
    hosts.dns.answers["api.stripe.com"] = [HOST_B]
    stripe = FakeStripe(fake_tls, host=HOST_B, port=443)
    hosts.b.call(stripe.start)
    try:
        kb = hosts.proxy(
            keybrake_factory,
            env=stripe.env(),
            extra_args=["--set", f"ssl_verify_upstream_trusted_ca={fake_tls.ca_pem}"],
        )
        vault_key = issue_key_offline(kb)
        answer, sock = hosts.send(kb, connect_request("api.stripe.com:443"))
        assert answer.status == 200
        with kb.ssl_context().wrap_socket(sock, server_hostname="api.stripe.com") as tls:
            for _ in range(3):
                tls.sendall(charge_request(vault_key))
                assert read_answer(tls).status == 200
        assert len(stripe.ledger) == 3
        connects = [line for line in kb.log().splitlines() if "server connect" in line]
        assert len(connects) == 1 and f"{HOST_B}:443" in connects[0], connects
        assert hosts.dns.count("api.stripe.com") == 1
    finally:
        stripe.stop()


def issue_key_offline(kb: KeybrakeProcess) -> str:
    """A vault key written straight into the proxy's SQLite store (its admin API lives in a
    namespace the test process cannot reach with httpx)."""
    out = subprocess.run(
        [
            str(KEYBRAKE),
            *("keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "300"),
            *("--allow", "POST /v1/payment_intents", "--label", "test/egress"),
            *("--data-dir", str(kb.data_dir), "--policies", str(kb.policies), "--json"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=kb.env,
        timeout=60,
    )
    key: str = json.loads(out.stdout)["vault_key"]
    return key


def charge_in(hosts: Hosts, kb: KeybrakeProcess, vault_key: str) -> Answer:
    answer, sock = hosts.send(kb, connect_request("api.stripe.com:443"))
    assert answer.status == 200
    with kb.ssl_context().wrap_socket(sock, server_hostname="api.stripe.com") as tls:
        tls.sendall(charge_request(vault_key))
        return read_answer(tls)


@netns
def test_a_vendor_sni_inside_a_passthrough_tunnel_is_decrypted_and_refused(
    keybrake_factory: Any, hosts: Hosts, fake_tls: FakeTLS
) -> None:
    """A listed destination with ``api.stripe.com`` as SNI: the guard gets it (decrypted,
    ``host_mismatch``), and nothing is connected to the listed host either."""
    stripe = FakeStripe(fake_tls)
    kb = hosts.proxy(keybrake_factory, HOST_B, env=stripe.env())
    vault_key = issue_key_offline(kb)
    with Tripwire(HOST_B, 443, ns=hosts.b) as remote:
        answer, sock = hosts.send(kb, connect_request(f"{HOST_B}:443"))
        assert answer.status == 200
        with kb.ssl_context().wrap_socket(sock, server_hostname="api.stripe.com") as tls:
            tls.sendall(charge_request(vault_key))
            refused = read_answer(tls)
        assert refused.status == 403 and refused.json()["error"]["code"] == "host_mismatch"
        untouched(remote)
