"""End to end: the unmodified stripe SDK through a real ``keybrake run`` and a fake Stripe."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch, keybrake_stripe: KeybrakeProcess) -> KeybrakeProcess:
    """Module-style stripe configured the way a worker would be: proxy + CA bundle."""
    monkeypatch.setattr(stripe, "proxy", keybrake_stripe.proxy_url)
    monkeypatch.setattr(stripe, "ca_bundle_path", str(keybrake_stripe.bundle))
    monkeypatch.setattr(stripe, "max_network_retries", 2)
    monkeypatch.setattr(stripe, "default_http_client", None)
    return keybrake_stripe


def client(kb: KeybrakeProcess, vault_key: str, retries: int = 2) -> stripe.StripeClient:
    return stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=retries)


def test_module_style_create_swaps_in_real_secret(
    sdk: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = sdk.issue_key()
    monkeypatch.setattr(stripe, "api_key", key["vault_key"])
    pi = stripe.PaymentIntent.create(amount=1234, currency="usd")
    assert pi.id.startswith("pi_")
    assert pi.amount == 1234
    ledger = fake_stripe.ledger
    assert len(ledger) == 1
    assert ledger[0].headers["Authorization"] == f"Bearer {fake_stripe.secret}"
    assert key["vault_key"] not in str(ledger[0].headers)
    assert not any(h.lower().startswith("x-keybrake") for h in ledger[0].headers)


def test_stripe_client_create_confirm_and_spend_headers(
    sdk: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = sdk.issue_key(
        daily_usd_cap="50",
        allowed_endpoints=[
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/{id}/confirm",
            "GET /v1/payment_intents/{id}",
        ],
    )
    sc = client(sdk, key["vault_key"])
    pi = sc.v1.payment_intents.create(params={"amount": 2000, "currency": "usd"})
    assert pi.status == "requires_payment_method"
    got = sc.v1.payment_intents.retrieve(pi.id)
    assert got.id == pi.id
    confirmed = sc.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert confirmed.status == "succeeded"
    assert fake_stripe.charged_usd_micros() == 20_000_000
    detail = sdk.admin("GET", f"/vault/keys/{key['key_id']}").json()
    # Creation only reserved (no money moved); the confirm was priced from the remembered
    # amount and settled at what the fake charged.
    assert detail["spent_today_usd"] == "20.00"
    assert detail["remaining_usd"] == "30.00"
    for entry in fake_stripe.ledger:
        assert entry.headers["Authorization"] == f"Bearer {fake_stripe.secret}"


def test_spend_headers_on_success(keybrake_stripe: KeybrakeProcess) -> None:
    key = keybrake_stripe.issue_key(daily_usd_cap="10")
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={
            "amount": "250",
            "currency": "usd",
            "confirm": "true",
            "payment_method": "pm_card_visa",
        },
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        proxy=keybrake_stripe.proxy_url,
        verify=keybrake_stripe.ssl_context(),
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Keybrake-Spent-Usd"] == "2.50"
    assert r.headers["X-Keybrake-Remaining-Usd"] == "7.50"
    assert r.headers["Request-Id"].startswith("req_")


def test_disallowed_endpoint_raises_permission_error_one_attempt(
    sdk: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = sdk.issue_key()
    sc = client(sdk, key["vault_key"])
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.refunds.create(params={"payment_intent": "pi_123", "amount": 100})
    assert e.value.http_status == 403
    assert e.value.json_body["error"]["code"] == "endpoint_not_allowed"
    assert e.value.headers is not None
    assert e.value.headers.get("X-Keybrake-Error") == "endpoint_not_allowed"
    assert fake_stripe.ledger == []
    assert sdk.count_requests("POST", "/v1/refunds") == 1


def test_revoked_key_raises_authentication_error_one_attempt(
    sdk: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = sdk.issue_key()
    sc = client(sdk, key["vault_key"])
    sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert sdk.admin("DELETE", f"/vault/keys/{key['key_id']}").status_code == 200
    again = sdk.admin("DELETE", f"/vault/keys/{key['key_id']}")
    assert again.status_code == 200 and again.json()["status"] == "revoked"
    before = sdk.count_requests("POST", "/v1/payment_intents")
    with pytest.raises(stripe.AuthenticationError) as e:
        sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert e.value.json_body["error"]["code"] == "vault_key_revoked"
    assert len(fake_stripe.ledger) == 1
    assert sdk.count_requests("POST", "/v1/payment_intents") == before + 1


def test_expired_key_raises_authentication_error(
    sdk: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = sdk.issue_key(expires_in="1s")
    time.sleep(1.2)
    sc = client(sdk, key["vault_key"])
    with pytest.raises(stripe.AuthenticationError) as e:
        sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert e.value.json_body["error"]["code"] == "vault_key_expired"
    assert fake_stripe.ledger == []
    assert sdk.count_requests("POST", "/v1/payment_intents") == 1


def test_unknown_key_and_raw_secret(sdk: KeybrakeProcess, fake_stripe: FakeStripe) -> None:
    with pytest.raises(stripe.AuthenticationError) as e:
        client(sdk, "kbv_stripe_" + "A" * 43).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd"}
        )
    assert e.value.json_body["error"]["code"] == "vault_key_unknown"
    with pytest.raises(stripe.PermissionError) as e2:
        client(sdk, fake_stripe.secret).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd"}
        )
    assert e2.value.json_body["error"]["code"] == "raw_secret_refused"
    with pytest.raises(stripe.PermissionError) as e3:
        client(sdk, "sk_live_" + "x" * 24).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd"}
        )
    assert e3.value.json_body["error"]["code"] == "raw_secret_refused"
    assert fake_stripe.ledger == []
    log = sdk.log()
    assert fake_stripe.secret not in log


def test_basic_auth_form_is_accepted(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = keybrake_stripe.issue_key()
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        auth=(key["vault_key"], ""),
        proxy=keybrake_stripe.proxy_url,
        verify=keybrake_stripe.ssl_context(),
    )
    assert r.status_code == 200, r.text
    assert fake_stripe.ledger[0].headers["Authorization"].startswith("Basic ")
    import base64

    decoded = base64.b64decode(fake_stripe.ledger[0].headers["Authorization"][6:]).decode()
    assert decoded == f"{fake_stripe.secret}:"


def test_keybrake_headers_are_stripped(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = keybrake_stripe.issue_key()
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={
            "Authorization": f"Bearer {key['vault_key']}",
            "X-Keybrake-Actor": "charge_customer",
            "x-keybrake-anything": "1",
        },
        proxy=keybrake_stripe.proxy_url,
        verify=keybrake_stripe.ssl_context(),
    )
    assert r.status_code == 200
    assert not any(h.lower().startswith("x-keybrake") for h in fake_stripe.ledger[0].headers)


def test_refusal_body_follows_error_contract(keybrake_stripe: KeybrakeProcess) -> None:
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": "Bearer kbv_stripe_nope"},
        proxy=keybrake_stripe.proxy_url,
        verify=keybrake_stripe.ssl_context(),
    )
    assert r.status_code == 401
    body: dict[str, Any] = r.json()
    assert body["error"]["type"] == "keybrake_error"
    assert body["error"]["code"] == "vault_key_unknown"
    assert body["error"]["message"]
    assert r.headers["X-Keybrake-Error"] == "vault_key_unknown"
    assert r.headers["Stripe-Should-Retry"] == "false"
    assert r.headers["X-Should-Retry"] == "false"
    assert "Retry-After" not in r.headers


def test_missing_secret_env_refuses_with_503(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, start=False)
    kb.env.pop("STRIPE_SECRET_KEY")
    kb.start()
    key = kb.issue_key()
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
    )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "secret_unavailable"
    assert "STRIPE_SECRET_KEY" in r.json()["error"]["message"]
    assert "STRIPE_SECRET_KEY" in kb.log()
    assert fake_stripe.ledger == []
