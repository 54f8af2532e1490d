"""Run one fake vendor in the foreground (for tests that need it in another process).

    python -m tests.fakes.serve stripe --port 0 --secret sk_test_x --cert-dir /tmp/fake-tls

Writes ``ca.pem`` (+ ``server.pem``/``server.key``) into ``--cert-dir`` — or reuses them if
they are already there, so several fakes can share one dir/CA —, then prints one line,
the base URL (``https://127.0.0.1:PORT``), to stdout (flushed) once the server accepts
connections, and serves until SIGINT/SIGTERM. ``--no-tls`` serves plain HTTP.
Control it over HTTP: ``GET <url>/__fake__/ledger``, ``POST <url>/__fake__/reset``,
``POST <url>/__fake__/faults`` ``{"kind": "fail", "n": 1, "status": 500}``,
``POST <url>/__fake__/delay`` ``{"seconds": 2}``. :func:`fetch_ledger` reads the ledger.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from tests.fakes.base import FakeVendor, LedgerEntry
from tests.fakes.resend import DEFAULT_API_KEY, FakeResend
from tests.fakes.stripe import DEFAULT_SECRET, FakeStripe
from tests.fakes.tls import load_or_make_fake_ca
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilio


def build_fake(
    vendor: str,
    *,
    cert_dir: str | Path | None,
    port: int = 0,
    host: str = "127.0.0.1",
    secret: str | None = None,
    account_sid: str | None = None,
) -> FakeVendor:
    tls = load_or_make_fake_ca(cert_dir) if cert_dir is not None else None
    if vendor == "stripe":
        return FakeStripe(tls, secret or DEFAULT_SECRET, host=host, port=port)
    if vendor == "twilio":
        return FakeTwilio(
            tls,
            account_sid or DEFAULT_ACCOUNT_SID,
            secret or DEFAULT_AUTH_TOKEN,
            host=host,
            port=port,
        )
    if vendor == "resend":
        return FakeResend(tls, secret or DEFAULT_API_KEY, host=host, port=port)
    raise ValueError(f"unknown vendor {vendor!r}")


def _control(url: str, path: str, cafile: str | None, data: Any = None) -> Any:
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=body,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.loads(resp.read().decode())


def fetch_ledger(url: str, cafile: str | None = None) -> list[LedgerEntry]:
    """Read ``/__fake__/ledger`` of a fake running elsewhere."""
    return [LedgerEntry.from_json(d) for d in _control(url, "/__fake__/ledger", cafile)]


def remote_reset(url: str, cafile: str | None = None) -> None:
    _control(url, "/__fake__/reset", cafile, {})


def remote_fault(url: str, cafile: str | None = None, **spec: Any) -> None:
    """E.g. ``remote_fault(url, ca, kind="fail", n=2, status=502)``."""
    _control(url, "/__fake__/faults", cafile, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakes.serve")
    ap.add_argument("vendor", choices=["stripe", "twilio", "resend"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--secret", help="stripe secret / twilio auth token / resend api key")
    ap.add_argument("--account-sid", help="twilio Account SID")
    ap.add_argument("--cert-dir", help="directory for ca.pem/server.pem/server.key")
    ap.add_argument("--no-tls", action="store_true", help="serve plain HTTP")
    args = ap.parse_args(argv)
    if not args.no_tls and not args.cert_dir:
        ap.error("--cert-dir is required unless --no-tls")

    fake = build_fake(
        args.vendor,
        cert_dir=None if args.no_tls else args.cert_dir,
        port=args.port,
        host=args.host,
        secret=args.secret,
        account_sid=args.account_sid,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    fake.start()
    print(fake.url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
