"""A call the vendor got is never released, however its answer was lost (DESIGN §2).

A call that never left the proxy is released (``502 upstream_unreachable``); one that did is
counted (``502 upstream_failed``, ``unknown``). A worker that could make a charged call look
"never sent" would get it for free, so these tests try:

- the vendor reads the whole request, charges, and then drops the connection without a byte
  of answer, resets it mid-answer, or truncates the answer; on a fresh upstream connection
  and on one an earlier call opened (mitmproxy reuses it);
- the worker hangs up at random moments around the time its request is forwarded.

Whatever happens, what the key has spent is never less than what the vendor charged it, and
no released call is in the vendor's ledger.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import time
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.reliability.conftest import USD, usd_micros, wait_for

pytestmark = pytest.mark.e2e

FORM = {"amount": "100", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"}
BODY = urlencode(FORM).encode()
SPENT_OUTCOMES = {"ok", "unknown", "vendor_error", "overrun"}


def rows_of(kb: KeybrakeProcess, key_id: str) -> list[dict[str, Any]]:
    r = kb.admin("GET", f"/vault/audit?key={key_id}&limit=1000")
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["data"]))


def spent(kb: KeybrakeProcess, key_id: str) -> int:
    return usd_micros(kb.admin("GET", f"/vault/keys/{key_id}").json()["spent_today_usd"])


def arm(fake: FakeStripe, shape: str) -> None:
    {
        "drop": fake.drop_connection_next,
        "reset": fake.reset_connection_next,
        "truncate": fake.truncate_next,
    }[shape](1, processed=True)


@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_a_charge_whose_answer_is_lost_is_never_released(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, reused: bool
) -> None:
    kb = keybrake_stripe
    for shape in ("drop", "reset", "truncate"):
        key = kb.issue_key(daily_usd_cap=10, agent_run_label=f"lost/{shape}")
        charged_before = fake_stripe.charged_usd_micros()
        headers = {"Authorization": f"Bearer {key['vault_key']}"}
        with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context(), timeout=20) as client:
            url = "https://api.stripe.com/v1/payment_intents"
            calls = 1
            if reused:  # an answered call first: its upstream connection carries the next
                assert client.post(url, data=FORM, headers=headers).status_code == 200
                calls = 2
            arm(fake_stripe, shape)
            r = client.post(url, data=FORM, headers=headers)
        assert (r.status_code, r.headers.get("x-keybrake-error")) == (502, "upstream_failed"), (
            shape,
            r.text,
        )
        assert r.headers["stripe-should-retry"] == "false"
        charged = fake_stripe.charged_usd_micros() - charged_before
        assert charged == calls * USD, shape
        wait_for(lambda k=key, n=calls: len(rows_of(kb, k["key_id"])) == n, 10, "audit rows")
        last = rows_of(kb, key["key_id"])[-1]
        assert (last["outcome"], last["code"], last["actual_micros"]) == (
            "unknown",
            "upstream_failed",
            USD,
        ), (shape, last)
        assert spent(kb, key["key_id"]) == charged, shape


def hang_up_after_sending(kb: KeybrakeProcess, vault_key: str, after: float) -> None:
    """A worker that sends a whole charge and closes the connection (RST) ``after`` seconds
    later, without reading any answer."""
    raw = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=10)
    raw.sendall(b"CONNECT api.stripe.com:443 HTTP/1.1\r\nHost: api.stripe.com:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(kb.bundle))
    tls = ctx.wrap_socket(raw, server_hostname="api.stripe.com")
    tls.sendall(
        b"POST /v1/payment_intents HTTP/1.1\r\nHost: api.stripe.com\r\n"
        + f"Authorization: Bearer {vault_key}\r\n".encode()
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )
    time.sleep(after)
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()


def test_a_worker_hanging_up_never_gets_a_charge_for_free(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=100, agent_run_label="hang-up")
    fake_stripe.delay_seconds = 0.03  # the vendor reads the request, then charges a bit later
    rng = random.Random(7)
    attempts = 24
    for _ in range(attempts):
        hang_up_after_sending(kb, key["vault_key"], rng.uniform(0, 0.08))
    # Let every call finish: rows and charges stop changing.
    seen: list[tuple[int, int]] = []

    def settled() -> bool:
        seen.append((len(rows_of(kb, key["key_id"])), len(fake_stripe.ledger)))
        return len(seen) >= 4 and len(set(seen[-4:])) == 1

    wait_for(settled, 20, "every call settled")
    fake_stripe.delay_seconds = 0
    rows = rows_of(kb, key["key_id"])
    charged = fake_stripe.charged_usd_micros()
    assert charged == len(fake_stripe.ledger) * USD
    released = [r for r in rows if r["outcome"] not in SPENT_OUTCOMES]
    counted = [r for r in rows if r["outcome"] in SPENT_OUTCOMES]
    for row in released:
        assert (row["outcome"], row["code"], row["actual_micros"]) == (
            "refused",
            "client_closed",
            0,
        ), row
    assert len(rows) <= attempts
    # Never less than the vendor charged: each charged call is one of the counted ones.
    assert spent(kb, key["key_id"]) == sum(r["actual_micros"] for r in counted) >= charged
    assert len(released) + len(fake_stripe.ledger) <= attempts, (len(released), charged)
