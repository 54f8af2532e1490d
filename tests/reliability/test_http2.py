"""HTTP/2 from the worker to the proxy gets exactly the checks HTTP/1.1 gets.

httpx offers ``http/1.1`` before ``h2`` through a proxy tunnel, and mitmproxy honours the
client's order, so httpx never speaks HTTP/2 to Keybrake. These tests use the ``h2`` protocol
stack directly over a CONNECT tunnel that offers only ``h2`` (as curl and browsers prefer it),
assert that HTTP/2 was negotiated, and send both well-formed and hostile requests: pseudo-header
and ``host`` mismatches, duplicate credentials, a vault key in the query, lying lengths and
many concurrent streams against one cap.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.reliability.conftest import healthy, key_detail, usd_micros

from .test_hostile import FORM, no_vault_key_reached_vendor

pytestmark = pytest.mark.e2e

Headers = list[tuple[str, str]]


@dataclass
class Answer:
    """What came back on one stream: a response, or a reset (``status`` is ``None``)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None

    def code(self) -> str:
        try:
            return str(json.loads(self.body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return f"http_{self.status}" if self.status else f"reset_{self.reset}"


class H2Tunnel:
    """One HTTP/2 connection to ``api.stripe.com`` through the proxy's CONNECT tunnel."""

    def __init__(self, kb: KeybrakeProcess, *, validate: bool = True) -> None:
        raw = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=15)
        raw.sendall(b"CONNECT api.stripe.com:443 HTTP/1.1\r\nHost: api.stripe.com:443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(kb.bundle))  # our own: ALPN changes
        ctx.set_alpn_protocols(["h2"])
        self.sock: ssl.SSLSocket = ctx.wrap_socket(raw, server_hostname="api.stripe.com")
        self.alpn = self.sock.selected_alpn_protocol()
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.answers: dict[int, Answer] = {}
        self.closed = False

    def send(self, headers: Headers, body: bytes = b"") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.answers[sid] = Answer()
        return sid

    def wait(self, *sids: int) -> list[Answer]:
        done: set[int] = set()
        while not done.issuperset(sids) and not self.closed:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                data = b""
            if not data:
                self.closed = True
                break
            for ev in self.conn.receive_data(data):
                done |= self._on(ev)
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
        return [self.answers[s] for s in sids]

    def _on(self, ev: Any) -> set[int]:
        if isinstance(ev, h2.events.ResponseReceived):
            a = self.answers[ev.stream_id]
            a.headers = {k: v for k, v in ev.headers}
            a.status = int(a.headers[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            self.answers[ev.stream_id].body += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            return {ev.stream_id}
        elif isinstance(ev, h2.events.StreamReset):
            self.answers[ev.stream_id].reset = int(ev.error_code)
            return {ev.stream_id}
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
        return set()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.sock.sendall(self.conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.sock.close()


def create(vk: str, *, path: str = "/v1/payment_intents", body: bytes = FORM) -> Headers:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "api.stripe.com"),
        (":path", path),
        ("authorization", f"Bearer {vk}"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-length", str(len(body))),
    ]


def test_http2_is_negotiated_and_a_call_is_forwarded_with_the_real_secret(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    t = H2Tunnel(kb)
    try:
        assert t.alpn == "h2"
        (a,) = t.wait(t.send(create(vk), FORM))
    finally:
        t.close()
    assert a.status == 200, a.body[:300]
    assert a.headers.get("request-id", "").startswith("req_")
    assert [e.route for e in fake_stripe.ledger] == ["/v1/payment_intents"]
    no_vault_key_reached_vendor(fake_stripe, vk)


def test_concurrent_streams_on_one_connection_share_the_cap_exactly(
    kb: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = kb.issue_key(daily_usd_cap=5)
    t = H2Tunnel(kb)
    try:
        sids = [t.send(create(key["vault_key"]), FORM) for _ in range(12)]  # $1 each
        answers = t.wait(*sids)
    finally:
        t.close()
    statuses = sorted(a.status or 0 for a in answers)
    assert statuses == [200] * 5 + [429] * 7, [a.code() for a in answers]
    for a in answers:
        if a.status == 429:
            assert a.headers.get("x-keybrake-cap-hit") == "true"
            assert a.code() == "cap_exhausted"
    assert len(fake_stripe.ledger) == 5
    assert usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"]) == 5_000_000


def _hostile(vk: str) -> dict[str, tuple[Headers, bytes]]:
    base = create(vk)

    def with_(name: str, value: str) -> Headers:
        return [(k, value if k == name else v) for k, v in base]

    return {
        "key_in_query": (with_(":path", f"/v1/payment_intents?k={vk}"), FORM),
        "endpoint_not_allowed": (with_(":path", "/v1/refunds"), FORM),
        "authority_elsewhere": (with_(":authority", "evil.example"), FORM),
        "authority_userinfo": (with_(":authority", "api.stripe.com@evil.example"), FORM),
        "host_header_elsewhere": ([*base, ("host", "evil.example")], FORM),
        "duplicate_authorization": ([*base, ("authorization", f"Bearer {vk}")], FORM),
        "encoded_path": (with_(":path", "/v1/%70ayment_intents%2F..%2Frefunds"), FORM),
        "absolute_path": (with_(":path", "https://evil.example/v1/payment_intents"), FORM),
        "short_content_length": (with_("content-length", "3"), FORM),
        "long_content_length": (with_("content-length", "9999"), FORM),
        "uppercase_header": ([*base, ("X-Evil", "1")], FORM),
        "connection_header": ([*base, ("transfer-encoding", "chunked")], FORM),
    }


# What each hostile shape gets: a refusal code from Keybrake, or "protocol" when mitmproxy's
# HTTP/2 stack rejects the stream or connection before any hook runs.
HOSTILE_OUTCOME = {
    "key_in_query": "vault_key_in_query",
    "endpoint_not_allowed": "endpoint_not_allowed",
    "authority_elsewhere": "host_mismatch",
    "authority_userinfo": "protocol",
    "host_header_elsewhere": "protocol",
    "duplicate_authorization": "credential_ambiguous",
    "encoded_path": "path_rejected",
    "absolute_path": "path_rejected",
    "short_content_length": "protocol",
    "long_content_length": "protocol",
    "uppercase_header": "protocol",
    "connection_header": "protocol",
}

assert set(HOSTILE_OUTCOME) == set(_hostile("kbv_x")), "every hostile shape needs an outcome"


@pytest.mark.parametrize("case", sorted(HOSTILE_OUTCOME))
def test_hostile_http2_requests_never_reach_the_vendor_unchecked(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe, case: str
) -> None:
    headers, body = _hostile(vk)[case]
    t = H2Tunnel(kb, validate=False)
    try:
        assert t.alpn == "h2"
        (a,) = t.wait(t.send(headers, body))
    finally:
        t.close()
    if HOSTILE_OUTCOME[case] == "protocol":
        assert a.status is None and (a.reset is not None or t.closed), (case, a)
    else:
        assert a.status is not None and 400 <= a.status < 500, (case, a.status, a.body[:300])
        assert a.code() == HOSTILE_OUTCOME[case]
    assert fake_stripe.ledger == [], case
    assert healthy(kb)


def test_a_huge_declared_upload_is_refused_before_its_body_is_read(
    kb: KeybrakeProcess, vk: str, fake_stripe: FakeStripe
) -> None:
    t = H2Tunnel(kb)
    try:
        headers = [(k, "20000000" if k == "content-length" else v) for k, v in create(vk)]
        sid = t.conn.get_next_available_stream_id()
        t.conn.send_headers(sid, headers)
        t.conn.send_data(sid, b"a" * 16_000)  # the first frame, never the rest
        t.sock.sendall(t.conn.data_to_send())
        t.answers[sid] = Answer()
        (a,) = t.wait(sid)
    finally:
        t.close()
    assert a.status == 413, (a.code(), t.closed)
    assert fake_stripe.ledger == []


def test_many_connections_in_parallel_keep_the_proxy_healthy(
    kb: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = kb.issue_key(daily_usd_cap=20)
    results: list[Answer] = []
    lock = threading.Lock()

    def worker() -> None:
        t = H2Tunnel(kb)
        try:
            got = t.wait(*[t.send(create(key["vault_key"]), FORM) for _ in range(6)])
        finally:
            t.close()
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 36
    assert sum(a.status == 200 for a in results) == 20
    assert sum(a.status == 429 for a in results) == 16
    assert len(fake_stripe.ledger) == 20
    assert healthy(kb)
