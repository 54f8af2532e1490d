"""Ctrl-C and SIGTERM on a running ``keybrake run``: a clean stop, exit 0, no traceback, and
every answered call's audit row in the audit log.

mitmproxy treats both signals alike (exit 0). Connections a worker keeps open are cancelled
by the final ``asyncio.run`` clean-up; asyncio would print a ``CancelledError`` traceback for
each, which ``keybrake run`` leaves out. Rows still in the store's outbox are moved to the
audit log before the store closes.
"""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess, audit_query
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

PI = "https://api.stripe.com/v1/payment_intents"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_with_a_connection_open_is_clean_and_flushes_the_audit_log(
    keybrake_factory: Any, fake_stripe: FakeStripe, sig: signal.Signals
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    # A fresh data dir: the banner says its store is new, and where the CA is.
    banner = kb.log().split("Loading script", 1)[0]
    assert "(new, empty: created just now)" in banner
    assert f"CA: {kb.certs.resolve()}\n" in banner
    key = kb.issue_key()
    with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context(), timeout=15) as worker:
        r = worker.post(
            PI,
            data={"amount": "100", "currency": "usd"},
            headers={"Authorization": f"Bearer {key['vault_key']}"},
        )
        assert r.status_code == 200, r.text
        # The worker keeps its connection to the proxy open (keep-alive) while it stops.
        assert kb.stop(sig) == 0
    log = kb.log()
    assert "Traceback" not in log, log
    assert "CancelledError" not in log, log
    assert "audit flushed" in log
    # No reader moved the outbox: the stopping proxy did.
    rows = audit_query(kb.data_dir / "audit.db")
    assert [(row["outcome"], row["vendor_request_id"]) for row in rows] == [
        ("held", fake_stripe.ledger[0].request_id)  # a PaymentIntent not yet paid
    ]
