"""A webhook receiver for the alert tests: a real HTTP(S) server on loopback that records
every request it gets and can be told to fail (``500``), to time out (answer after a delay
longer than the sender waits) and to recover.

    with WebhookReceiver(tls=fake_tls) as rx:  # tls=None for plain http
        rx.mode = "fail"        # answer 500 (recorded all the same)
        rx.mode = "timeout"     # hold each request ``hang_seconds`` before answering 200
        rx.mode = "redirect"    # answer 307 to ``redirect_to``
        rx.mode = "ok"          # recover
        rx.wait_for(lambda got: len(rx.accepted()) >= 1)
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self

from tests.fakes.tls import FakeTLS

__all__ = ["Received", "WebhookReceiver"]

Mode = Literal["ok", "fail", "timeout", "redirect"]


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as it arrived, and what the receiver answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # 0: the sender gave up before the answer (timeout mode)
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, tls: FakeTLS | None = None, hang_seconds: float = 8.0) -> None:
        self.tls = tls
        self.mode: Mode = "ok"
        # Where "redirect" mode sends the sender (307); a sender must not follow it.
        self.redirect_to = ""
        self.hang_seconds = hang_seconds
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def accepted(self) -> list[Received]:
        """Requests answered 2xx (what the sender counts as delivered)."""
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met in {timeout}s; got {self.all()}")

    def __enter__(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                mode = receiver.mode
                status = {"fail": 500, "redirect": 307}.get(mode, 200)
                if mode == "timeout":
                    time.sleep(receiver.hang_seconds)
                    status = 0
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, dict(self.headers.items()), body, status, time.time())
                    )
                payload = b'{"ok": true}' if status == 200 else b'{"error": "down"}'
                try:
                    self.send_response(status or 200)
                    self.send_header("Content-Type", "application/json")
                    if status == 307:
                        self.send_header("Location", receiver.redirect_to)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the sender gave up (timeout mode)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.server_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
