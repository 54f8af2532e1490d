"""Class 2 of *Keys are tenants*: pricing knows every parameter it lets through, and the
actual is always learned.

Before, cost rules named the fields they priced and ignored the rest: ``SendAsMms=true`` made
a text billed 2.4 times its estimate on every call; a Stripe subscription created with
``backdate_start_date`` charged 26 periods at once, and since the answer showed the charge
only when the worker asked for ``latest_invoice``, the proxy kept its estimate as the actual
and never learned it had been exceeded. Now each endpoint lists the parameters its price
understands, anything else is refused (``unpriced_parameter``, naming it) before the vendor,
the proxy asks for what states the charge itself (collapsing it back for the worker), and a
Twilio message, whose price is stated only once sent, stays held until the proxy reads it.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe, FakeTwilio
from tests.security.conftest import audit_rows, counted_usd, error_code, key_detail, sdk

pytestmark = pytest.mark.e2e

SMS = {"To": "+14155550123", "From": "+15017122661", "Body": "hello"}


@pytest.fixture
def twilio_kb(keybrake_factory: Any, fake_twilio: FakeTwilio) -> KeybrakeProcess:
    kb: KeybrakeProcess = keybrake_factory(
        {"twilio": fake_twilio}, extra_args=["--set", "keybrake_followup_delays=0.3,0.6,1,2"]
    )
    return kb


def send(
    kb: KeybrakeProcess, fake: FakeTwilio, key: dict[str, Any], data: dict[str, str]
) -> httpx.Response:
    return httpx.post(
        f"https://api.twilio.com/2010-04-01/Accounts/{fake.account_sid}/Messages.json",
        data=data,
        auth=(fake.account_sid, key["vault_key"]),
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
    )


def twilio_key(kb: KeybrakeProcess, fake: FakeTwilio, cap: str = "1") -> dict[str, Any]:
    path = f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json"
    return kb.issue_key(vendor="twilio", daily_usd_cap=cap, allowed_endpoints=[f"POST {path}"])


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"SendAsMms": "true"}, "SendAsMms"), ({"ShortenUrls": "true"}, "ShortenUrls"),
     ({"Surprise": "1"}, "Surprise")],
)  # fmt: skip
def test_a_parameter_that_changes_the_price_is_refused(
    twilio_kb: KeybrakeProcess, fake_twilio: FakeTwilio, extra: dict[str, str], named: str
) -> None:
    key = twilio_key(twilio_kb, fake_twilio)
    r = send(twilio_kb, fake_twilio, key, {**SMS, **extra})
    assert r.status_code == 403, r.text
    assert error_code(r) == "unpriced_parameter"
    assert r.json()["error"]["message"].startswith(named)
    assert fake_twilio.ledger == []


def test_a_message_is_held_until_the_proxy_reads_its_price(
    twilio_kb: KeybrakeProcess, fake_twilio: FakeTwilio
) -> None:
    key = twilio_key(twilio_kb, fake_twilio)
    r = send(twilio_kb, fake_twilio, key, SMS)
    assert r.status_code == 201 and r.json()["price"] is None
    # Held at the estimate (one US segment, $0.0083): not "estimate kept" as a charge.
    detail = key_detail(twilio_kb, key)
    assert detail["budgets"][0]["spent_usd"] == "0.00"
    assert detail["spent_today_usd"] == "0.0083"
    fake_twilio.deliver()  # Twilio prices it once sent ($0.0079 a segment here)
    deadline = time.monotonic() + 15
    while key_detail(twilio_kb, key)["budgets"][0]["spent_usd"] == "0.00":
        assert time.monotonic() < deadline, "the proxy never read the price"
        time.sleep(0.2)
    detail = key_detail(twilio_kb, key)
    assert detail["budgets"][0]["spent_usd"] == detail["spent_today_usd"]
    assert detail["spent_today_usd"] == f"{fake_twilio.charged_usd_micros() / 1e6:.4f}".rstrip("0")
    rows = audit_rows(twilio_kb, key, 2)
    assert [r["outcome"] for r in rows] == ["held", "ok"]
    assert rows[1]["actor"] == "keybrake" and rows[1]["method"] == "GET"
    # The proxy's reads carried the real credentials, never the vault key.
    reads = [e for e in fake_twilio.ledger if e.method == "GET"]
    assert reads and all(key["vault_key"] not in str(e.headers) for e in reads)


def test_a_subscription_answer_is_made_to_state_its_charge(
    keybrake_factory: Any, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    key = kb.issue_key(
        daily_usd_cap="100", allowed_endpoints=["POST /v1/customers", "POST /v1/subscriptions"]
    )
    client = sdk(kb, key, monkeypatch)
    cus = client.v1.customers.create(
        params={"invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )
    sub = client.v1.subscriptions.create(
        params={
            "customer": cus.id,
            "cancel_at_period_end": True,
            "items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 1500,
                        "product_data": {"name": "Plan"},
                        "recurring": {"interval": "month"},
                    }
                }
            ],
        }
    )
    # The worker did not ask for latest_invoice: it gets the id, as Stripe would answer it.
    assert isinstance(sub.latest_invoice, str)
    (entry,) = [e for e in fake_stripe.ledger if e.route == "/v1/subscriptions"]
    assert b"expand" in entry.body  # the proxy asked for it
    rows = audit_rows(kb, key, 2)
    assert rows[-1]["outcome"] == "ok" and rows[-1]["actual_micros"] == 15_000_000
    assert counted_usd(kb, key) == "15.00" == f"{fake_stripe.charged_usd_micros() / 1e6:.2f}"
    # A backdated subscription (26 periods at once) is refused before Stripe.
    before = len(fake_stripe.ledger)
    with pytest.raises(stripe.PermissionError):
        client.v1.subscriptions.create(
            params={
                "customer": cus.id,
                "cancel_at_period_end": True,
                "backdate_start_date": 1_700_000_000,
                "items": [
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": 100,
                            "product_data": {"name": "x"},
                            "recurring": {"interval": "month"},
                        }
                    }
                ],
            }
        )
    assert len(fake_stripe.ledger) == before
