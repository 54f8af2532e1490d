"""A minimal, fast HTTPS stand-in for ``api.stripe.com`` for the benchmark.

The benchmark measures the proxy, so the vendor must not be the bottleneck: this is a plain
asyncio HTTP/1.1 keep-alive server over TLS (the fake vendors' certificate, whose SANs cover
``api.stripe.com`` and ``127.0.0.1``) that answers ``POST /v1/payment_intents`` with a
realistic, Stripe-shaped ``succeeded`` PaymentIntent (about 2 KB, like the real one) built
from the form's ``amount`` and ``currency``. Every other request gets the same shape.

    python bench/upstream.py --cert-dir /tmp/bench-tls      # prints the port, then serves
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def payment_intent(amount: int, currency: str) -> bytes:
    now = int(time.time())
    pid = "pi_" + secrets.token_hex(12)
    obj = {
        "id": pid,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": amount,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic_async",
        "client_secret": f"{pid}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic",
        "created": now,
        "currency": currency,
        "customer": None,
        "description": None,
        "last_payment_error": None,
        "latest_charge": "ch_" + secrets.token_hex(12),
        "livemode": False,
        "metadata": {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": "pm_" + secrets.token_hex(12),
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None,
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": None,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded",
        "transfer_data": None,
        "transfer_group": None,
    }
    return json.dumps(obj, indent=2).encode() + b"\n"


SEEN = {"connections": 0, "requests": 0}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    SEEN["connections"] += 1
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await reader.readexactly(length) if length else b""
            SEEN["requests"] += 1
            form = dict(parse_qsl(body.decode("latin-1")))
            try:
                amount = int(form.get("amount", "100"))
            except ValueError:
                amount = 100
            payload = payment_intent(amount, form.get("currency", "usd"))
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Server: nginx\r\n"
                b"Content-Type: application/json\r\n"
                b"Request-Id: req_" + secrets.token_hex(7).encode() + b"\r\n"
                b"Stripe-Version: 2026-10-28.endive\r\n"
                b"Content-Length: "
                + str(len(payload)).encode()
                + b"\r\n"
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
                + payload
            )
            await writer.drain()
            if close:
                return
    except (ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()


async def serve(port: int, cert_dir: Path) -> None:
    from tests.fakes.tls import load_or_make_fake_ca

    tls = load_or_make_fake_ca(cert_dir)
    server = await asyncio.start_server(
        handle, "127.0.0.1", port, ssl=tls.server_context, backlog=512
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    # How many TLS connections the proxies opened for how many calls (keep-alive check).
    print(f"served {SEEN['requests']} requests on {SEEN['connections']} connections", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert-dir", type=Path, required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.cert_dir))


if __name__ == "__main__":
    main()
