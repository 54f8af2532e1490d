"""Class 4 of *The cap is a bound*: charges that happen later, outside the proxy, count now.

Before: a PaymentIntent created without ``confirm`` was booked at $0 and then confirmed in a
browser with its ``client_secret``, straight at Stripe: five $10 intents on a $10 key moved
$50. Trials, Checkout sessions and pending invoice items had the same shape. Now whatever
can still move money later keeps its maximum reserved as a *hold* until an answer through the
proxy shows the money moved (settled) or that it cannot any more (released), and a confirm,
capture or pay through the proxy uses that hold instead of counting the money twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import stripe
from tests.conftest import REDIS_URL, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS
from tests.security.conftest import audit_rows, counted_usd, key_detail, sdk

pytestmark = pytest.mark.e2e

PI = [
    "POST /v1/payment_intents",
    "GET /v1/payment_intents/{id}",
    "POST /v1/payment_intents/{id}/confirm",
    "POST /v1/payment_intents/{id}/cancel",
]


def spent_usd(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    return str(key_detail(kb, key)["budgets"][0]["spent_usd"])


def test_unconfirmed_intents_cannot_move_more_than_the_cap(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="10", allowed_endpoints=PI)
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    made, refused = [], 0
    for _ in range(5):
        try:
            made.append(pis.create(params={"amount": 1000, "currency": "usd"}))
        except stripe.RateLimitError as e:
            assert e.json_body is not None and e.json_body["error"]["code"] == "cap_exhausted"
            refused += 1
    assert (len(made), refused) == (1, 4)
    assert counted_usd(kb, key) == "10.00" and spent_usd(kb, key) == "0.00"
    # Each made intent is confirmed in a browser with its client_secret, straight at Stripe.
    for pi in made:
        assert stripe_fake.confirm_in_browser(pi.id)["status"] == "succeeded"
    assert stripe_fake.charged_usd_micros() == 10_000_000  # never more than the cap
    # A read through the proxy learns it succeeded: the hold becomes spend, counted once.
    assert pis.retrieve(made[0].id).status == "succeeded"
    assert spent_usd(kb, key) == counted_usd(kb, key) == "10.00"
    rows = audit_rows(kb, key, 6)
    assert [r["outcome"] for r in rows] == ["held", *["refused"] * 4, "ok"]


def test_a_confirm_through_the_proxy_uses_the_hold(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="10", allowed_endpoints=PI)
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    pi = pis.create(params={"amount": 1000, "currency": "usd"})
    done = pis.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert done.status == "succeeded"
    assert spent_usd(kb, key) == counted_usd(kb, key) == "10.00"
    assert stripe_fake.charged_usd_micros() == 10_000_000


def test_canceling_through_the_proxy_releases_the_hold(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="10", allowed_endpoints=PI)
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    pi = pis.create(params={"amount": 1000, "currency": "usd"})
    with pytest.raises(stripe.RateLimitError):
        pis.create(params={"amount": 100, "currency": "usd"})
    assert pis.cancel(pi.id).status == "canceled"
    assert counted_usd(kb, key) == "0.00"
    # Canceled: a browser can no longer confirm it, and the cap is free again.
    assert "error" in stripe_fake.confirm_in_browser(pi.id)
    pis.create(params={"amount": 1000, "currency": "usd"})
    assert stripe_fake.charged_usd_micros() == 0


def test_an_update_that_raises_the_amount_raises_the_hold_within_the_cap(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="10", allowed_endpoints=[*PI, "POST /v1/payment_intents/{id}"])
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    pi = pis.create(params={"amount": 500, "currency": "usd"})
    with pytest.raises(stripe.RateLimitError):
        pis.update(pi.id, params={"amount": 5000, "currency": "usd"})
    assert pis.update(pi.id, params={"amount": 900, "currency": "usd"}).amount == 900
    assert counted_usd(kb, key) == "9.00"
    assert stripe_fake.confirm_in_browser(pi.id)["status"] == "succeeded"
    assert stripe_fake.charged_usd_micros() == 9_000_000


def checkout(kb: KeybrakeProcess, key: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    return sdk(kb, key, monkeypatch).v1.checkout.sessions


def session_params(shipping_cents: int) -> dict[str, Any]:
    return {
        "mode": "payment",
        "success_url": "https://example.com/ok",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 600,
                    "product_data": {"name": "Book"},
                },
            }
        ],
        "shipping_options": [
            {
                "shipping_rate_data": {
                    "display_name": "Courier",
                    "type": "fixed_amount",
                    "fixed_amount": {"amount": shipping_cents, "currency": "usd"},
                }
            }
        ],
    }


def test_a_checkout_session_is_held_until_it_is_seen_paid_or_expired(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(
        daily_usd_cap="10",
        allowed_endpoints=[
            "POST /v1/checkout/sessions",
            "GET /v1/checkout/sessions/{id}",
            "POST /v1/checkout/sessions/{id}/expire",
        ],
    )
    sessions = checkout(kb, key, monkeypatch)
    paid = sessions.create(params=session_params(300))
    assert counted_usd(kb, key) == "9.00"  # goods and the shipping the customer may pick
    with pytest.raises(stripe.RateLimitError):
        sessions.create(params=session_params(300))
    stripe_fake.complete_checkout(paid.id, shipping_option=0)
    assert stripe_fake.charged_usd_micros() == 9_000_000
    assert sessions.retrieve(paid.id).status == "complete"
    assert spent_usd(kb, key) == counted_usd(kb, key) == "9.00"

    other = kb.issue_key(
        daily_usd_cap="10",
        allowed_endpoints=["POST /v1/checkout/sessions", "POST /v1/checkout/sessions/{id}/expire"],
    )
    sessions = checkout(kb, other, monkeypatch)
    unpaid = sessions.create(params=session_params(100))
    assert counted_usd(kb, other) == "7.00"
    assert sessions.expire(unpaid.id).status == "expired"
    assert counted_usd(kb, other) == "0.00"


def test_a_trial_is_held_until_it_ends_without_charging(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(
        daily_usd_cap="30",
        allowed_endpoints=[
            "POST /v1/customers",
            "POST /v1/subscriptions",
            "GET /v1/subscriptions/{id}",
            "DELETE /v1/subscriptions/{id}",
        ],
    )
    client = sdk(kb, key, monkeypatch)
    cus = client.v1.customers.create(
        params={"invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )
    item = {
        "price_data": {
            "currency": "usd",
            "unit_amount": 2000,
            "product_data": {"name": "Plan"},
            "recurring": {"interval": "month"},
        }
    }

    def trial() -> Any:
        return client.v1.subscriptions.create(
            params={
                "customer": cus.id,
                "items": [item],
                "trial_period_days": 7,
                "cancel_at_period_end": True,
            }
        )

    sub = trial()
    assert sub.status == "trialing" and counted_usd(kb, key) == "20.00"
    with pytest.raises(stripe.RateLimitError):
        trial()  # the first trial may still charge $20: no room for a second one
    ended = stripe_fake.end_trial(sub.id)
    assert ended["status"] == "canceled" and stripe_fake.charged_usd_micros() == 0
    assert client.v1.subscriptions.retrieve(sub.id).status == "canceled"
    assert counted_usd(kb, key) == "0.00"
    again = trial()
    assert client.v1.subscriptions.cancel(again.id).status == "canceled"
    assert counted_usd(kb, key) == spent_usd(kb, key) == "0.00"


def test_a_pending_invoice_item_is_held_until_deleted(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(
        daily_usd_cap="10",
        allowed_endpoints=[
            "POST /v1/customers",
            "POST /v1/invoiceitems",
            "DELETE /v1/invoiceitems/{id}",
        ],
    )
    client = sdk(kb, key, monkeypatch)
    cus = client.v1.customers.create(params={"email": "a@example.com"})
    item = client.v1.invoice_items.create(
        params={"customer": cus.id, "amount": 800, "currency": "usd"}
    )
    assert counted_usd(kb, key) == "8.00"
    with pytest.raises(stripe.RateLimitError):
        client.v1.invoice_items.create(
            params={"customer": cus.id, "amount": 800, "currency": "usd"}
        )
    assert client.v1.invoice_items.delete(item.id).deleted
    assert counted_usd(kb, key) == "0.00"


def test_holds_are_shared_by_replicas_and_survive_a_restart(
    tmp_path: Path,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = f"{REDIS_URL}?prefix={redis_prefix}"
    replicas = [
        KeybrakeProcess(
            tmp_path / f"r{i}", keybrake_certs, {"stripe": fake_stripe}, fake_tls, store=store
        )
        for i in range(2)
    ]
    for r in replicas:
        r.start()
    try:
        one, two = replicas
        key = one.issue_key(daily_usd_cap="10", allowed_endpoints=PI)
        pi = sdk(one, key, monkeypatch).v1.payment_intents.create(
            params={"amount": 1000, "currency": "usd"}
        )
        with pytest.raises(stripe.RateLimitError):
            sdk(two, key, monkeypatch).v1.payment_intents.create(
                params={"amount": 100, "currency": "usd"}
            )
        one.stop()
        one.start()  # a restart (crash recovery runs at start) keeps the hold
        with pytest.raises(stripe.RateLimitError):
            sdk(one, key, monkeypatch).v1.payment_intents.create(
                params={"amount": 100, "currency": "usd"}
            )
        done = sdk(two, key, monkeypatch).v1.payment_intents.confirm(
            pi.id, params={"payment_method": "pm_card_visa"}
        )
        assert done.status == "succeeded"
        assert counted_usd(one, key) == "10.00"
        assert fake_stripe.charged_usd_micros() == 10_000_000
    finally:
        for r in replicas:
            r.stop()
