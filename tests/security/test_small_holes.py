"""Class 6 of *The cap is a bound*: the smaller holes found the same way.

- ``Stripe-Account`` / ``Stripe-Context`` (Connect) made a key act on any connected account:
  refused unless the vault key lists the account.
- Thirty bogus keys from one address blocked the *valid* keys of that address (shared NAT,
  a sidecar, a load balancer) for a minute: only requests whose key does not verify are
  limited now.
- ``POST /stripe?x`` on the admin listener was claimed by neither the admin API nor the
  base-URL route and went to the listener's placeholder upstream: anything unclaimed there
  is a JSON 404 and forwards nothing.
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.security.conftest import error_code, raw_post, sdk

pytestmark = pytest.mark.e2e

CHARGE = {"amount": 500, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- Connect accounts -----------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["Stripe-Account", "Stripe-Context"])
def test_a_key_acts_only_on_the_accounts_it_lists(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, header: str
) -> None:
    plain = kb.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    connect = kb.issue_key(
        allowed_endpoints=["POST /v1/payment_intents"], allowed_accounts=["acct_1Listed"]
    )
    body = b"amount=500&currency=usd"
    for key, account in [(plain, "acct_1Listed"), (connect, "acct_1Other"), (connect, "")]:
        r = raw_post(kb, key, "/v1/payment_intents", body, {**FORM, header: account})
        assert r.status_code == 403, (key["key_id"], account, r.text)
        assert error_code(r) == "account_mismatch"
    # Twice the header, once listed: refused (the vendor might read either).
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        content=body,
        headers=[
            ("Authorization", f"Bearer {connect['vault_key']}"),
            ("Content-Type", FORM["Content-Type"]),
            (header, "acct_1Listed"),
            (header, "acct_1Other"),
        ],
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
    )
    assert r.status_code == 403 and error_code(r) == "account_mismatch"
    assert stripe_fake.ledger == []

    ok = raw_post(kb, connect, "/v1/payment_intents", body, {**FORM, header: "acct_1Listed"})
    assert ok.status_code == 200, ok.text
    (entry,) = stripe_fake.ledger
    assert entry.header(header) == "acct_1Listed"


def test_the_admin_api_validates_allowed_accounts(kb_sqlite: KeybrakeProcess) -> None:
    r = kb_sqlite.admin(
        "POST",
        "/vault/keys",
        {
            "vendor": "stripe",
            "daily_usd_cap": 10,
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "agent_run_label": "x",
            "allowed_accounts": ["acct_1 ok?"],
        },
    )
    assert r.status_code == 422 and "allowed_accounts" in r.json()["error"]["fields"]


# -- the invalid-key limiter ----------------------------------------------------------------------
def test_bogus_keys_from_an_address_do_not_block_its_valid_keys(
    keybrake_factory: Any, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy of its own: the limiter it fills is per process.
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    stripe_fake = fake_stripe
    key = kb.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    bogus = {"vault_key": "kbv_stripe_" + "B" * 43}
    codes = [
        error_code(raw_post(kb, bogus, "/v1/payment_intents", b"amount=1&currency=usd", FORM))
        for _ in range(35)
    ]
    assert codes[:30] == ["vault_key_unknown"] * 30
    assert set(codes[30:]) == {"rate_limited"}  # guessing from this address is slowed down
    # The same address with a key that verifies is served as usual.
    pi = sdk(kb, key, monkeypatch).v1.payment_intents.create(params=CHARGE)
    assert pi.status == "succeeded"
    assert len(stripe_fake.ledger) == 1


# -- the admin listener ---------------------------------------------------------------------------
def listener_request(kb: KeybrakeProcess, request_line: str) -> bytes:
    with socket.create_connection(("127.0.0.1", kb.admin_port), timeout=10) as sock:
        sock.sendall(
            f"{request_line}\r\nHost: 127.0.0.1:{kb.admin_port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n"
            "Connection: close\r\n\r\na=1".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "target",
    ["/stripe?x", "/stripe", "/STRIPE/v1/payment_intents", "/nothing-here", "//", "/stripe%2Fv1"],
)
def test_nothing_unclaimed_on_the_admin_listener_is_forwarded(
    kb_sqlite: KeybrakeProcess, stripe_fake: FakeStripe, target: str
) -> None:
    kb = kb_sqlite
    reply = listener_request(kb, f"POST {target} HTTP/1.1")
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status in (401, 403, 404), reply[:300]
    assert b"X-Keybrake-Error" in head or b"x-keybrake-error" in head.lower()
    assert b'"code"' in body  # the JSON error contract, not mitmproxy's page
    assert stripe_fake.ledger == []
    # Forwarded to the listener's placeholder upstream, it would have been mitmproxy's 502.
    assert b"server connect 127.0.0.1:1" not in kb.log().encode()


def test_the_base_url_route_still_works(
    kb_sqlite: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    key: dict[str, Any] = kb_sqlite.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    client = stripe.StripeClient(
        key["vault_key"],
        base_addresses={"api": f"{kb_sqlite.admin_url}/stripe"},
        max_network_retries=0,
    )
    assert client.v1.payment_intents.create(params=CHARGE).status == "succeeded"
