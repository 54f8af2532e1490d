"""Common machinery for the fake vendor servers.

A :class:`FakeVendor` is a real HTTPS (or plain HTTP) server: stdlib
``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive and exact ``Content-Length``,
listening on ``127.0.0.1`` (port 0 = ephemeral) in a daemon thread. Subclasses implement
:meth:`FakeVendor.handle` and return a :class:`FakeResponse`; the base class records every
vendor request in a thread-safe ledger and implements the fault switches used by the
reliability tests.

Control endpoints (no auth, never recorded in the ledger), for fakes running in another
process (see ``tests/fakes/serve.py``):

* ``GET  /__fake__/health``  -> ``{"ok": true, "vendor": "stripe"}``
* ``GET  /__fake__/ledger``  -> JSON list of ledger entries (:meth:`LedgerEntry.to_json`)
* ``POST /__fake__/reset``   -> clears ledger, vendor state, faults, delay
* ``POST /__fake__/faults``  -> body ``{"kind": "fail"|"reset"|"drop"|"garbage"|"truncate"|
  "rate_limit", "n": 1, "status": 500, "processed": false}``
* ``POST /__fake__/delay``   -> body ``{"seconds": 1.5}``
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import socket
import ssl
import string
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from tests.fakes.tls import FakeTLS

log = logging.getLogger("tests.fakes")

FaultKind = Literal["fail", "reset", "drop", "garbage", "truncate", "rate_limit"]
FAULT_KINDS: tuple[str, ...] = ("fail", "reset", "drop", "garbage", "truncate", "rate_limit")

_ALNUM = string.ascii_letters + string.digits
_GATEWAY_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
DEFAULT_GARBAGE = b"<html><body><h1>Service temporarily unavailable</h1></body></html>\n"


def rand_alnum(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def rand_hex(n: int) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


# --------------------------------------------------------------------------- data types


@dataclass
class LedgerEntry:
    """One vendor request as the fake saw it, and what it did about it.

    ``amount_charged_minor``/``currency``: money actually moved by this call (minor units;
    0 for non-charging calls, failures, replays). ``charged_usd_micros``: the same in
    micro-USD when the fake can compute it (USD charges, priced SMS/e-mail), else ``None``
    (non-USD money) or 0 (nothing charged).
    ``processed`` is ``False`` when a fault switch answered without running vendor logic.
    """

    method: str
    path: str  # raw request target, with query string
    headers: dict[str, str]  # as received (incl. Authorization)
    body: bytes
    status: int  # status code the fake sent (or started sending)
    request_id: str | None
    object_id: str | None = None
    amount_charged_minor: int = 0
    currency: str | None = None
    charged_usd_micros: int | None = 0
    amount_refunded_minor: int = 0
    recipients: int = 0  # Resend: to+cc+bcc over all e-mails in the request
    segments: int = 0  # Twilio: billable segments
    replayed: bool = False  # idempotent replay (nothing executed)
    fault: str | None = None  # fault switch that shaped the response
    processed: bool = True
    idempotency_key: str | None = None
    timestamp: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return None

    @property
    def route(self) -> str:
        """Path without the query string."""
        return self.path.split("?", 1)[0]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["body"] = self.body.decode("utf-8", errors="replace")
        d["body_b64"] = base64.b64encode(self.body).decode("ascii")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LedgerEntry:
        d = dict(d)
        b64 = d.pop("body_b64", None)
        body = d.pop("body", "")
        d["body"] = base64.b64decode(b64) if b64 is not None else str(body).encode()
        return cls(**d)


@dataclass
class FakeRequest:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes
    request_id: str | None = None
    delayed: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.raw_path).path

    @property
    def query(self) -> str:
        return urlsplit(self.raw_path).query

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class FakeResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Ledger annotations (not sent on the wire).
    object_id: str | None = None
    amount_charged_minor: int = 0
    currency: str | None = None
    charged_usd_micros: int | None = 0
    amount_refunded_minor: int = 0
    recipients: int = 0
    segments: int = 0
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Server-sent events: the body is sent chunked, one event per chunk as it is "generated",
    # ``event_delay`` seconds apart; with ``cut_after`` the connection is aborted (TCP RST)
    # after that many events, without the terminating chunk.
    events: list[bytes] | None = None
    event_delay: float = 0.0
    cut_after: int | None = None

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None


def json_response(
    status: int,
    obj: Any,
    headers: Iterable[tuple[str, str]] = (),
    content_type: str = "application/json",
    **annotations: Any,
) -> FakeResponse:
    body = json.dumps(obj, indent=2).encode("utf-8") + b"\n"
    hdrs = [("Content-Type", content_type), *headers]
    return FakeResponse(status=status, body=body, headers=hdrs, **annotations)


@dataclass
class _Fault:
    kind: str
    status: int = 500
    processed: bool = False
    body: bytes | None = None
    content_type: str | None = None


# --------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are dropped after this
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.vendor.name, format % args)

    def version_string(self) -> str:
        return self.server.vendor.server_header

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        body = self._read_body()
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        req = FakeRequest(method=self.command, raw_path=self.path, headers=headers, body=body)
        self.server.vendor._serve(self, req)

    do_GET = _handle
    do_POST = _handle
    do_DELETE = _handle
    do_PUT = _handle
    do_PATCH = _handle

    # -- writers used by FakeVendor._serve

    def write_response(self, resp: FakeResponse) -> None:
        self.send_response(resp.status)
        has_ct = False
        for k, v in resp.headers:
            if k.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            has_ct = has_ct or k.lower() == "content-type"
            self.send_header(k, v)
        if not has_ct and resp.body:
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(resp.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # Head and body in one write (one TLS record, no Nagle/delayed-ACK stall).
        buf: list[bytes] = self._headers_buffer  # type: ignore[attr-defined]
        buf.append(b"\r\n")
        buf.append(resp.body)
        self.flush_headers()
        self.wfile.flush()

    def write_events(self, resp: FakeResponse) -> None:
        """A chunked stream of server-sent events, flushed one by one (see `FakeResponse`)."""
        assert resp.events is not None
        self.send_response(resp.status)
        for k, v in resp.headers:
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i, event in enumerate(resp.events):
            if resp.cut_after is not None and i >= resp.cut_after:
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True
                return
            if resp.event_delay and i:
                time.sleep(resp.event_delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _head_bytes(self, resp: FakeResponse, content_length: int) -> bytes:
        reason = self.responses.get(resp.status, ("",))[0]
        lines = [f"HTTP/1.1 {resp.status} {reason}"]
        lines.append(f"Server: {self.version_string()}")
        lines.append(f"Date: {self.date_time_string()}")
        for k, v in resp.headers:
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                lines.append(f"{k}: {v}")
        lines.append(f"Content-Length: {content_length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write_truncated(self, resp: FakeResponse) -> None:
        """Announce the full Content-Length (at least +64), send half of the body, close."""
        body = resp.body
        announced = max(len(body), len(body) // 2 + 64)
        self.wfile.write(self._head_bytes(resp, announced) + body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def write_nothing(self) -> None:
        """Answer nothing at all: abort the TCP connection (RST) once the request was read."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def write_reset(self, resp: FakeResponse) -> None:
        """Send the head and part of the body, then abort the TCP connection (RST)."""
        body = resp.body
        self.wfile.write(self._head_bytes(resp, len(body)) + body[: max(1, len(body) // 3)])
        self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        addr: tuple[str, int],
        vendor: FakeVendor,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.vendor = vendor
        self.ssl_context = ssl_context
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn: socket.socket = request
        try:
            if self.ssl_context is not None:
                request.settimeout(10)
                conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("%s: TLS handshake failed: %r", self.vendor.name, exc)
            with contextlib.suppress(OSError):
                request.close()
            return
        with self._conns_lock:
            self._conns.add(conn)
        try:
            _Handler(conn, client_address, self)
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError) as exc:
            log.debug("%s: connection error: %r", self.vendor.name, exc)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug(
            "%s: error serving %s\n%s",
            self.vendor.name,
            client_address,
            "".join(traceback.format_exc()),
        )

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- FakeVendor


class FakeVendor:
    """Base class of the fakes. Subclasses set ``name`` and implement :meth:`handle`.

    Fault switches (FIFO, one fault consumed per vendor request, thread-safe):

    * ``delay_seconds``: sleep this long before executing each vendor request.
    * :meth:`fail_next` ``(n, status=500)``: vendor-format 5xx (502 = nginx HTML page).
    * :meth:`reset_connection_next`: send head + part of the body, then TCP RST.
    * :meth:`drop_connection_next`: read the whole request, answer nothing, TCP RST.
    * :meth:`garbage_next`: ``200`` with a non-JSON body (Content-Type still JSON).
    * :meth:`truncate_next`: Content-Length larger than the body sent, then close.
    * :meth:`rate_limit_next`: the vendor's own 429 in its own format.

    Every switch takes ``processed``: if ``True`` the vendor logic runs first (the charge
    happens, the ledger records it) and only the response is lost/garbled — the
    "vendor did it but you never heard back" case. Default ``False`` (nothing executed).
    ``rate_limit_next`` is never processed.
    """

    name: ClassVar[str] = "vendor"
    request_id_header: ClassVar[str | None] = None
    server_header: ClassVar[str] = "nginx"

    def __init__(self, tls: FakeTLS | None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.tls = tls
        self.host = host
        self._requested_port = port
        self._lock = threading.RLock()
        self._ledger: list[LedgerEntry] = []
        self._faults: deque[_Fault] = deque()
        self.delay_seconds: float = 0.0
        self.errors: list[str] = []  # tracebacks of bugs inside the fake (should stay empty)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        ctx = self.tls.server_context if self.tls is not None else None
        self._server = _Server((self.host, self._requested_port), self, ctx)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"fake {self.name} is not started")
        return int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    # -- ledger

    @property
    def ledger(self) -> list[LedgerEntry]:
        """Snapshot (copy) of the ledger, oldest first."""
        with self._lock:
            return list(self._ledger)

    def charged_minor(self, currency: str = "usd") -> int:
        """Sum of ``amount_charged_minor`` over the ledger for one currency."""
        return sum(
            e.amount_charged_minor for e in self.ledger if (e.currency or "").lower() == currency
        )

    def charged_usd_micros(self) -> int:
        return sum(e.charged_usd_micros or 0 for e in self.ledger)

    def reset(self) -> None:
        """Clear ledger, vendor state (objects, idempotency cache), faults and delay."""
        with self._lock:
            self._ledger.clear()
            self._faults.clear()
            self.delay_seconds = 0.0
            self.errors.clear()
            self.reset_state()

    def reset_state(self) -> None:
        """Subclasses clear their objects here (called under the lock)."""

    def env(self) -> dict[str, str]:
        """Environment variables naming this fake's real secret(s), for a proxy process
        (e.g. ``{"STRIPE_SECRET_KEY": "sk_test_…"}``)."""
        return {}

    # -- fault switches

    def _add_fault(self, n: int, fault: _Fault) -> None:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        with self._lock:
            for _ in range(n):
                self._faults.append(_Fault(**asdict(fault)))

    def fail_next(self, n: int = 1, status: int = 500, *, processed: bool = False) -> None:
        self._add_fault(n, _Fault("fail", status=status, processed=processed))

    def reset_connection_next(self, n: int = 1, *, processed: bool = False) -> None:
        self._add_fault(n, _Fault("reset", processed=processed))

    def drop_connection_next(self, n: int = 1, *, processed: bool = False) -> None:
        self._add_fault(n, _Fault("drop", processed=processed))

    def garbage_next(
        self,
        n: int = 1,
        *,
        processed: bool = False,
        body: bytes = DEFAULT_GARBAGE,
        content_type: str = "application/json",
    ) -> None:
        self._add_fault(
            n,
            _Fault(
                "garbage", status=200, processed=processed, body=body, content_type=content_type
            ),
        )

    def truncate_next(self, n: int = 1, *, processed: bool = False) -> None:
        self._add_fault(n, _Fault("truncate", processed=processed))

    def rate_limit_next(self, n: int = 1) -> None:
        self._add_fault(n, _Fault("rate_limit", status=429))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _pop_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # -- hooks for subclasses

    def new_request_id(self) -> str:
        return "req_" + rand_alnum(14)

    def handle(self, req: FakeRequest) -> FakeResponse:  # pragma: no cover - abstract
        raise NotImplementedError

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        """Vendor-format server error for :meth:`fail_next`."""
        return json_response(status, {"error": "internal"})

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        return json_response(429, {"error": "rate limited"})

    def wait_delay(self, req: FakeRequest) -> None:
        """Apply ``delay_seconds`` once per request; handlers call it after auth checks."""
        if req.delayed:
            return
        req.delayed = True
        delay = self.delay_seconds
        if delay > 0:
            time.sleep(delay)

    # -- serving

    def _dispatch(self, req: FakeRequest) -> FakeResponse:
        try:
            resp = self.handle(req)
        except Exception:
            tb = traceback.format_exc()
            log.error("fake %s crashed on %s %s\n%s", self.name, req.method, req.raw_path, tb)
            with self._lock:
                self.errors.append(tb)
            resp = self.error_response(req, 500)
        self.wait_delay(req)
        return resp

    def _with_request_id(self, req: FakeRequest, resp: FakeResponse) -> FakeResponse:
        if self.request_id_header and req.request_id and not resp.header(self.request_id_header):
            resp.headers.append((self.request_id_header, req.request_id))
        return resp

    def _record(
        self,
        req: FakeRequest,
        sent_status: int,
        resp: FakeResponse | None,
        *,
        fault: str | None = None,
        request_id: str | None = None,
    ) -> None:
        entry = LedgerEntry(
            method=req.method,
            path=req.raw_path,
            headers=dict(req.headers),
            body=req.body,
            status=sent_status,
            request_id=request_id,
            fault=fault,
            processed=resp is not None,
            idempotency_key=req.header("Idempotency-Key"),
        )
        if resp is not None:
            entry.object_id = resp.object_id
            entry.amount_charged_minor = resp.amount_charged_minor
            entry.currency = resp.currency
            entry.charged_usd_micros = resp.charged_usd_micros
            entry.amount_refunded_minor = resp.amount_refunded_minor
            entry.recipients = resp.recipients
            entry.segments = resp.segments
            entry.replayed = resp.replayed
            entry.extra = dict(resp.extra)
        with self._lock:
            self._ledger.append(entry)

    def _serve(self, handler: _Handler, req: FakeRequest) -> None:
        if req.path.startswith("/__fake__/"):
            handler.write_response(self._control(req))
            return
        req.request_id = self.new_request_id() if self.request_id_header else None
        fault = self._pop_fault()
        if fault is None:
            resp = self._with_request_id(req, self._dispatch(req))
            self._record(req, resp.status, resp, request_id=req.request_id)
            if resp.events is not None:
                handler.write_events(resp)
            else:
                handler.write_response(resp)
            return

        if fault.kind == "rate_limit":
            self.wait_delay(req)
            resp = self._with_request_id(req, self.rate_limit_response(req))
            self._record(req, resp.status, None, fault="rate_limit", request_id=req.request_id)
            handler.write_response(resp)
            return

        done: FakeResponse | None = None
        if fault.processed:
            done = self._dispatch(req)
        else:
            self.wait_delay(req)

        if fault.kind == "fail":
            if fault.status == 502:
                out = FakeResponse(502, _GATEWAY_502, [("Content-Type", "text/html")])
                rid = None
            else:
                out = self._with_request_id(req, self.error_response(req, fault.status))
                rid = req.request_id
            self._record(req, out.status, done, fault="fail", request_id=rid)
            handler.write_response(out)
            return

        if fault.kind == "garbage":
            out = FakeResponse(
                200,
                fault.body if fault.body is not None else DEFAULT_GARBAGE,
                [("Content-Type", fault.content_type or "application/json")],
            )
            self._record(req, 200, done, fault="garbage")
            handler.write_response(out)
            return

        # reset / truncate: mangle the real response if processed, else a plausible one
        base = (
            done
            if done is not None
            else json_response(
                200, {"id": "obj_" + rand_alnum(24), "object": "unknown", "padding": "x" * 256}
            )
        )
        base = self._with_request_id(req, base)
        rid = req.request_id
        self._record(req, base.status, done, fault=fault.kind, request_id=rid)
        if fault.kind == "reset":
            handler.write_reset(base)
        elif fault.kind == "drop":
            handler.write_nothing()
        else:
            handler.write_truncated(base)

    # -- control endpoints

    def _control(self, req: FakeRequest) -> FakeResponse:
        path = req.path
        if req.method == "GET" and path == "/__fake__/health":
            return json_response(200, {"ok": True, "vendor": self.name})
        if req.method == "GET" and path == "/__fake__/ledger":
            return json_response(200, [e.to_json() for e in self.ledger])
        if req.method == "POST" and path == "/__fake__/reset":
            self.reset()
            return json_response(200, {"ok": True})
        if req.method == "POST" and path == "/__fake__/faults":
            spec = req.json() if req.body else {}
            kind = str(spec.get("kind", "fail"))
            n = int(spec.get("n", 1))
            processed = bool(spec.get("processed", False))
            if kind == "fail":
                self.fail_next(n, int(spec.get("status", 500)), processed=processed)
            elif kind == "reset":
                self.reset_connection_next(n, processed=processed)
            elif kind == "drop":
                self.drop_connection_next(n, processed=processed)
            elif kind == "garbage":
                self.garbage_next(n, processed=processed)
            elif kind == "truncate":
                self.truncate_next(n, processed=processed)
            elif kind == "rate_limit":
                self.rate_limit_next(n)
            else:
                return json_response(400, {"ok": False, "error": f"unknown kind {kind!r}"})
            return json_response(200, {"ok": True, "pending": self.pending_faults})
        if req.method == "POST" and path == "/__fake__/delay":
            spec = req.json() if req.body else {}
            self.delay_seconds = float(spec.get("seconds", 0))
            return json_response(200, {"ok": True, "delay_seconds": self.delay_seconds})
        return json_response(404, {"ok": False, "error": f"no control endpoint {path}"})
