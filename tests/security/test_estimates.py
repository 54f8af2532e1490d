"""Class 3 of *The cap is a bound*: every estimate is an upper bound, and an overrun is
never silent.

Before, the cap was checked against an estimate that left out what a request sets up
without naming it (the dearest Checkout shipping option, tax Stripe adds on top, a capture
above the authorization), and a larger actual was booked with no consequence. Now each of
those is in the estimate or refused, and an actual above its estimate is booked, audited as
``overrun``, counted in ``keybrake_estimate_overruns_total``, and suspends the key
(``403 key_suspended``) until an operator resumes it: a pricing gap cannot be used twice.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import yaml
from tests.conftest import KEYBRAKE, ROOT, KeybrakeProcess
from tests.fakes import FakeStripe
from tests.security.conftest import audit_rows, counted_usd, error_code, key_detail, sdk

pytestmark = pytest.mark.e2e

SESSION = {
    "mode": "payment",
    "success_url": "https://example.com/ok",
    "line_items": [
        {"price_data": {"currency": "usd", "unit_amount": 500, "product_data": {"name": "Mug"}}}
    ],
}


def shipping(cents: int) -> dict[str, Any]:
    return {
        "shipping_rate_data": {
            "display_name": "Courier",
            "type": "fixed_amount",
            "fixed_amount": {"amount": cents, "currency": "usd"},
        }
    }


def test_the_dearest_shipping_option_is_in_a_checkout_estimate(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="10", allowed_endpoints=["POST /v1/checkout/sessions"])
    client = sdk(kb, key, monkeypatch)
    # $5 of goods and a $500 courier the customer may pick on Stripe's page.
    with pytest.raises(stripe.RateLimitError) as e:
        client.v1.checkout.sessions.create(
            params={**SESSION, "shipping_options": [shipping(300), shipping(50_000)]}
        )
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "cap_exhausted"
    assert e.value.json_body["error"]["needed_usd"] == "505.00"
    assert stripe_fake.ledger == []
    # With a shipping option the cap covers, the session is made and its maximum held.
    client.v1.checkout.sessions.create(params={**SESSION, "shipping_options": [shipping(300)]})
    assert counted_usd(kb, key) == "8.00"


def test_a_price_is_remembered_at_its_dearest_currency_option(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(
        daily_usd_cap="10", allowed_endpoints=["POST /v1/prices", "POST /v1/checkout/sessions"]
    )
    client = sdk(kb, key, monkeypatch)
    # $1.00, or £10.00 for a customer who pays in pounds on Stripe's page.
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 100,
            "product_data": {"name": "Poster"},
            "currency_options": {"gbp": {"unit_amount": 1000}},
        }
    )
    with pytest.raises(stripe.RateLimitError) as e:
        client.v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "success_url": "https://example.com/ok",
                "line_items": [{"price": price.id, "quantity": 1}],
            }
        )
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["needed_usd"] == "14.00"
    assert [x.route for x in stripe_fake.ledger] == ["/v1/prices"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"automatic_tax": {"enabled": True}}, "automatic tax"),
        ({"shipping_options": [{"shipping_rate": "shr_made_elsewhere"}]}, "shipping_rate"),
        ({"mode": "subscription"}, "subscription"),
    ],
)
def test_what_stripe_adds_without_a_bound_is_refused(
    kb_sqlite: KeybrakeProcess,
    stripe_fake: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, Any],
    message: str,
) -> None:
    key = kb_sqlite.issue_key(
        daily_usd_cap="1000", allowed_endpoints=["POST /v1/checkout/sessions"]
    )
    with pytest.raises(stripe.PermissionError) as e:
        sdk(kb_sqlite, key, monkeypatch).v1.checkout.sessions.create(params={**SESSION, **extra})
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "unpriced_endpoint"
    assert message in e.value.json_body["error"]["message"]
    assert stripe_fake.ledger == []


def test_a_capture_above_the_authorization_is_priced_at_most(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(
        daily_usd_cap="12",
        allowed_endpoints=[
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/{id}/capture",
        ],
    )
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    auth = pis.create(
        params={
            "amount": 1000,
            "currency": "usd",
            "capture_method": "manual",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )
    assert auth.status == "requires_capture"
    before = len(stripe_fake.ledger)
    # amount_to_capture has no currency: 2,000 minor units are worth at most $28 (GBP).
    with pytest.raises(stripe.RateLimitError) as e:
        pis.capture(auth.id, params={"amount_to_capture": 2000})
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "cap_exhausted"
    assert len(stripe_fake.ledger) == before
    assert pis.capture(auth.id, params={"amount_to_capture": 800}).amount_received == 800
    detail = key_detail(kb, key)
    assert detail["budgets"][0]["spent_usd"] == detail["spent_today_usd"] == "8.00"


@pytest.fixture
def underpriced(keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path) -> KeybrakeProcess:
    """A proxy whose Stripe policy prices a PaymentIntent at a flat $1: a pricing gap."""
    policy = yaml.safe_load((ROOT / "policies" / "stripe.yaml").read_text())
    for endpoint in policy["endpoints"]:
        if endpoint["match"] == "POST /v1/payment_intents":
            endpoint["cost"] = {"kind": "fixed_usd", "usd": 1}
    src = tmp_path / "underpriced"
    src.mkdir()
    (src / "stripe.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, policies_src=src)
    return kb


def test_an_overrun_is_booked_audited_and_suspends_the_key(
    underpriced: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = underpriced
    key = kb.issue_key(daily_usd_cap="100", allowed_endpoints=["POST /v1/payment_intents"])
    pis = sdk(kb, key, monkeypatch).v1.payment_intents
    charge = {"amount": 4000, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}
    assert pis.create(params=charge).status == "succeeded"
    # Booked as charged, not as estimated.
    assert key_detail(kb, key)["budgets"][0]["spent_usd"] == "40.00"
    assert key_detail(kb, key)["status"] == "suspended"
    assert "overrun" in key_detail(kb, key)["suspended_reason"]
    (row,) = audit_rows(kb, key, 1)
    assert row["outcome"] == "overrun"
    assert (row["estimate_micros"], row["actual_micros"]) == (1_000_000, 40_000_000)

    # The gap cannot be used a second time: refused before Stripe, on the very next call.
    before = len(fake_stripe.ledger)
    with pytest.raises(stripe.PermissionError) as e:
        pis.create(params=charge)
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "key_suspended"
    assert len(fake_stripe.ledger) == before

    metrics = httpx.get(
        f"{kb.admin_url}/metrics", headers={"Authorization": f"Bearer {kb.admin_token}"}
    ).text
    assert 'keybrake_estimate_overruns_total{label="test/run",vendor="stripe"} 1.0' in metrics

    # An operator resumes it (admin API), suspends it again and resumes it (CLI).
    r = kb.admin("POST", f"/vault/keys/{key['key_id']}/resume")
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert pis.create(params={**charge, "amount": 100}).status == "succeeded"
    cli = [str(KEYBRAKE), "keys", "--help"]
    assert "suspend" in subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    for command in (
        ["suspend", key["key_id"], "--reason", "looking into it"],
        ["resume", key["key_id"]],
    ):
        done = subprocess.run(
            [str(KEYBRAKE), "keys", *command, "--data-dir", str(kb.data_dir)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        if command[0] == "suspend":
            with pytest.raises(stripe.PermissionError):
                pis.create(params=charge)
            assert key_detail(kb, key)["suspended_reason"] == "looking into it"
    assert key_detail(kb, key)["status"] == "active"


def test_suspension_is_shared_by_every_replica(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    one: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    two: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = one.issue_key(allowed_endpoints=["POST /v1/payment_intents"])
    assert (
        one.admin("POST", f"/vault/keys/{key['key_id']}/suspend", {"reason": "x"}).status_code
        == 200
    )
    with pytest.raises(stripe.PermissionError) as e:
        sdk(two, key, monkeypatch).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd"}
        )
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "key_suspended"
    assert fake_stripe.ledger == []
    assert (
        error_code(
            httpx.post(
                f"{two.admin_url}/vault/keys/key_nope/suspend",
                headers={"Authorization": f"Bearer {two.admin_token}"},
            )
        )
        == "not_found"
    )
