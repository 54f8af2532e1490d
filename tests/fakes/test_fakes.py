"""The fakes themselves, called directly (no proxy) with the real SDKs and plain HTTP clients."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import resend
import stripe
from resend.exceptions import (
    InvalidApiKeyError,
    MissingRequiredFieldsError,
    RateLimitError,
    ResendError,
    ValidationError,
)
from tests.fakes import (
    FakeResend,
    FakeStripe,
    FakeTLS,
    FakeTwilio,
    LedgerEntry,
    make_fake_ca,
    mask_key,
    parse_stripe_form,
    sms_encoding,
    sms_segments,
)
from tests.fakes.serve import fetch_ledger, remote_fault, remote_reset
from twilio.base.exceptions import TwilioRestException  # type: ignore[import-untyped]
from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.rest import Client as TwilioClient  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> FakeTLS:
    return make_fake_ca(tmp_path_factory.mktemp("fakes-ca"))


@pytest.fixture(scope="module")
def _stripe_server(tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(tls) as fake:
        yield fake


@pytest.fixture
def sfake(_stripe_server: FakeStripe) -> FakeStripe:
    _stripe_server.reset()
    return _stripe_server


@pytest.fixture
def sclient(
    sfake: FakeStripe, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> stripe.StripeClient:
    # The stripe SDK ignores REQUESTS_CA_BUNDLE: it passes verify=stripe.ca_bundle_path.
    monkeypatch.setattr(stripe, "ca_bundle_path", str(tls.ca_pem))
    return stripe.StripeClient(
        sfake.secret, base_addresses={"api": sfake.url}, max_network_retries=0
    )


@pytest.fixture(scope="module")
def _twilio_server(tls: FakeTLS) -> Iterator[FakeTwilio]:
    with FakeTwilio(tls, api_keys={"SK" + "ab" * 16: "api-key-secret"}) as fake:
        yield fake


@pytest.fixture
def tfake(_twilio_server: FakeTwilio) -> FakeTwilio:
    _twilio_server.reset()
    return _twilio_server


def twilio_client(fake: FakeTwilio, tls: FakeTLS, **kw: Any) -> TwilioClient:
    http = TwilioHttpClient()
    assert http.session is not None
    # TwilioHttpClient passes verify=None, so REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE (set on these
    # machines to the system bundle) would override session.verify: switch env lookup off.
    http.session.trust_env = False
    http.session.verify = str(tls.ca_pem)
    client = TwilioClient(
        kw.pop("username", fake.account_sid),
        kw.pop("password", fake.auth_token),
        account_sid=kw.pop("account_sid", fake.account_sid),
        http_client=http,
        environment={},
    )
    client.api.base_url = fake.url  # ApiBase hard-codes https://api.twilio.com
    return client


@pytest.fixture
def tclient(tfake: FakeTwilio, tls: FakeTLS) -> TwilioClient:
    return twilio_client(tfake, tls)


@pytest.fixture(scope="module")
def _resend_server(tls: FakeTLS) -> Iterator[FakeResend]:
    with FakeResend(tls) as fake:
        yield fake


@pytest.fixture
def rfake(_resend_server: FakeResend, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch) -> FakeResend:
    _resend_server.reset()
    monkeypatch.setattr(resend, "api_key", _resend_server.api_key)
    monkeypatch.setattr(resend, "api_url", _resend_server.url)
    # resend's RequestsClient calls requests.request(), which honours REQUESTS_CA_BUNDLE.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca_pem))
    return _resend_server


def only(entries: list[LedgerEntry]) -> LedgerEntry:
    assert len(entries) == 1, entries
    return entries[0]


# --------------------------------------------------------------------------- TLS & HTTP


def test_tls_material(tls: FakeTLS) -> None:
    assert tls.ca_pem.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert tls.cert_pem.exists() and tls.key_pem.exists()
    for name in ("api.stripe.com", "api.twilio.com", "api.resend.com", "localhost", "127.0.0.1"):
        assert name in tls.sans


@pytest.mark.parametrize("sni", ["api.stripe.com", "api.twilio.com", "api.resend.com", "localhost"])
def test_cert_verifies_for_vendor_hostnames(sfake: FakeStripe, tls: FakeTLS, sni: str) -> None:
    ctx = tls.client_context()
    with (
        socket.create_connection(("127.0.0.1", sfake.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as s,
    ):
        assert s.version() is not None
        assert s.selected_alpn_protocol() in (None, "http/1.1")


def test_untrusted_client_is_rejected(sfake: FakeStripe) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(sfake.url + "/v1/balance", verify=ssl.create_default_context())


def test_keep_alive_and_content_length(sfake: FakeStripe, tls: FakeTLS) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", sfake.port, context=tls.client_context())
    try:
        bodies = []
        for _ in range(3):
            conn.request("GET", "/v1/balance", headers={"Authorization": f"Bearer {sfake.secret}"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200
            assert resp.version == 11
            assert int(resp.headers["Content-Length"]) == len(body)
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["Request-Id"].startswith("req_")
            bodies.append(json.loads(body))
            sock = conn.sock
        assert conn.sock is sock  # same connection reused for all three requests
    finally:
        conn.close()
    assert [b["object"] for b in bodies] == ["balance"] * 3
    assert len(sfake.ledger) == 3


def test_plain_http_mode() -> None:
    with FakeStripe(None) as fake:
        assert fake.url.startswith("http://127.0.0.1:")
        r = httpx.get(fake.url + "/v1/balance", headers={"Authorization": f"Bearer {fake.secret}"})
        assert r.status_code == 200


def test_chunked_request_body(sfake: FakeStripe, tls: FakeTLS) -> None:
    def gen() -> Iterator[bytes]:
        yield b"amount=1500&"
        yield b"currency=usd"

    with httpx.Client(verify=tls.client_context()) as c:
        r = c.post(
            sfake.url + "/v1/topups",
            content=gen(),
            headers={
                "Authorization": f"Bearer {sfake.secret}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["amount"] == 1500
    assert only(sfake.ledger).amount_charged_minor == 1500


# --------------------------------------------------------------------------- Stripe: units


def test_parse_stripe_form() -> None:
    body = (
        "amount=2000&currency=usd&metadata[order]=42&expand[]=latest_charge&expand[]=customer"
        "&line_items[0][price_data][currency]=usd&line_items[0][price_data][unit_amount]=500"
        "&line_items[0][quantity]=2&line_items[1][price]=price_123&payment_method_types[0]=card"
    )
    assert parse_stripe_form(body) == {
        "amount": "2000",
        "currency": "usd",
        "metadata": {"order": "42"},
        "expand": ["latest_charge", "customer"],
        "line_items": [
            {"price_data": {"currency": "usd", "unit_amount": "500"}, "quantity": "2"},
            {"price": "price_123"},
        ],
        "payment_method_types": ["card"],
    }
    assert parse_stripe_form("items[][price]=a&items[][price]=b") == {
        "items": [{"price": "a"}, {"price": "b"}]
    }
    assert parse_stripe_form("") == {}


def test_mask_key() -> None:
    key = "sk_test_51Habcdefghijklmnopqrstuvwxyz1234"
    masked = mask_key(key)
    assert masked.startswith("sk_test_") and masked.endswith("1234")
    assert "abcdefgh" not in masked
    assert len(masked) == len(key)
    assert "secret" not in mask_key("kb_secretvaultkey_wxyz")
    assert mask_key("short") == "*****"


# --------------------------------------------------------------------------- Stripe: SDK


def test_stripe_payment_intent_confirm_charges(
    sclient: stripe.StripeClient, sfake: FakeStripe
) -> None:
    pi = sclient.v1.payment_intents.create(
        params={"amount": 2000, "currency": "usd", "metadata": {"order": "A1"}}
    )
    assert isinstance(pi, stripe.PaymentIntent)
    assert pi.id.startswith("pi_") and pi.status == "requires_payment_method"
    assert pi.client_secret and pi.client_secret.startswith(pi.id + "_secret_")
    assert pi.metadata["order"] == "A1"
    pi = sclient.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert pi.status == "succeeded" and pi.amount_received == 2000
    assert isinstance(pi.latest_charge, str) and pi.latest_charge.startswith("ch_")
    assert pi.last_response is not None
    rid = pi.last_response.headers["Request-Id"]

    got = sclient.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge"]})
    assert isinstance(got.latest_charge, stripe.Charge)
    assert got.latest_charge.amount_captured == 2000 and got.latest_charge.paid

    create, confirm, retrieve = sfake.ledger
    assert create.amount_charged_minor == 0 and create.object_id == pi.id
    assert confirm.amount_charged_minor == 2000 and confirm.currency == "usd"
    assert confirm.charged_usd_micros == 20_000_000
    assert confirm.request_id == rid and rid.startswith("req_")
    assert confirm.header("Authorization") == f"Bearer {sfake.secret}"
    assert confirm.idempotency_key  # the SDK sends one on every POST
    assert confirm.path == f"/v1/payment_intents/{pi.id}/confirm"
    assert b"payment_method=pm_card_visa" in confirm.body
    assert retrieve.method == "GET" and "expand" in retrieve.path
    assert sfake.charged_minor("usd") == 2000
    assert not sfake.errors


def test_stripe_create_with_confirm_true(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    pi = sclient.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "payment_method": "pm_card_mastercard",
            "confirm": True,
        }
    )
    assert pi.status == "succeeded"
    ch = sclient.v1.charges.retrieve(str(pi.latest_charge))
    assert ch.payment_method_details is not None
    assert ch.payment_method_details.card is not None
    assert ch.payment_method_details.card.last4 == "4444"
    assert sfake.ledger[0].amount_charged_minor == 1234


def test_stripe_decline(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    with pytest.raises(stripe.CardError) as ei:
        sclient.v1.payment_intents.create(
            params={
                "amount": 5000,
                "currency": "usd",
                "payment_method": "pm_card_chargeDeclined",
                "confirm": True,
            }
        )
    err = ei.value
    assert err.http_status == 402 and err.code == "card_declined"
    assert err.error is not None
    assert err.error.decline_code == "generic_decline"
    assert err.error.payment_intent is not None
    assert err.error.payment_intent.status == "requires_payment_method"
    assert err.headers is not None and err.headers["Request-Id"].startswith("req_")
    entry = only(sfake.ledger)
    assert entry.status == 402 and entry.amount_charged_minor == 0


def test_stripe_amount_too_small(sclient: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.payment_intents.create(params={"amount": 10, "currency": "usd"})
    assert ei.value.code == "amount_too_small" and ei.value.param == "amount"


def test_stripe_manual_capture_flow(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    pi = sclient.v1.payment_intents.create(
        params={
            "amount": 2000,
            "currency": "usd",
            "capture_method": "manual",
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    assert pi.status == "requires_capture" and pi.amount_capturable == 2000
    pi = sclient.v1.payment_intents.increment_authorization(pi.id, params={"amount": 3000})
    assert pi.amount == 3000 and pi.amount_capturable == 3000
    pi = sclient.v1.payment_intents.capture(pi.id, params={"amount_to_capture": 2500})
    assert pi.status == "succeeded" and pi.amount_received == 2500
    ch = sclient.v1.charges.retrieve(str(pi.latest_charge))
    assert ch.amount_captured == 2500 and ch.captured
    charged = [e.amount_charged_minor for e in sfake.ledger]
    assert charged == [0, 0, 2500, 0]
    assert sfake.ledger[0].extra["authorized_minor"] == 2000
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.payment_intents.capture(pi.id)
    assert ei.value.code == "payment_intent_unexpected_state"


def test_stripe_charges_and_refunds(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    ch = sclient.v1.charges.create(
        params={"amount": 3000, "currency": "usd", "source": "tok_visa", "capture": False}
    )
    assert ch.id.startswith("ch_") and not ch.captured
    ch = sclient.v1.charges.capture(ch.id, params={"amount": 2000})
    assert ch.captured and ch.amount_captured == 2000
    re1 = sclient.v1.refunds.create(params={"charge": ch.id, "amount": 500})
    assert re1.id.startswith("re_") and re1.amount == 500 and re1.status == "succeeded"
    re2 = sclient.v1.refunds.create(params={"charge": ch.id})  # the rest of the captured 2000
    assert re2.amount == 1500
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.refunds.create(params={"charge": ch.id})
    assert ei.value.code == "charge_already_refunded"
    with pytest.raises(stripe.CardError):
        sclient.v1.charges.create(
            params={"amount": 3000, "currency": "usd", "source": "tok_chargeDeclined"}
        )
    entries = sfake.ledger
    assert [e.amount_charged_minor for e in entries] == [0, 2000, 0, 0, 0, 0]
    assert [e.amount_refunded_minor for e in entries] == [0, 0, 500, 1500, 0, 0]
    assert [e.status for e in entries] == [200, 200, 200, 200, 400, 402]


def test_stripe_refund_by_payment_intent(sclient: stripe.StripeClient) -> None:
    pi = sclient.v1.payment_intents.create(
        params={
            "amount": 4200,
            "currency": "eur",
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    refund = sclient.v1.refunds.create(params={"payment_intent": pi.id})
    assert refund.amount == 4200 and refund.payment_intent == pi.id and refund.currency == "eur"


def test_stripe_money_movement(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    tr = sclient.v1.transfers.create(
        params={"amount": 700, "currency": "usd", "destination": "acct_1Fake"}
    )
    po = sclient.v1.payouts.create(params={"amount": 800, "currency": "usd"})
    tu = sclient.v1.topups.create(params={"amount": 900, "currency": "eur"})
    assert tr.id.startswith("tr_") and tr.object == "transfer"
    assert po.id.startswith("po_") and po.status == "pending"
    assert tu.id.startswith("tu_") and tu.object == "topup"
    t, p, u = sfake.ledger
    assert (t.amount_charged_minor, t.charged_usd_micros) == (700, 7_000_000)
    assert (p.amount_charged_minor, p.charged_usd_micros) == (800, 8_000_000)
    assert (u.amount_charged_minor, u.currency, u.charged_usd_micros) == (900, "eur", None)
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.transfers.create(params={"amount": 1, "currency": "usd", "destination": "x"})
    assert ei.value.http_status == 404


def test_stripe_invoice_flows(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    cus = sclient.v1.customers.create(params={"email": "a@example.com"})
    # Recipe 1: draft invoice, then items attached to it.
    inv = sclient.v1.invoices.create(params={"customer": cus.id, "description": "Widgets"})
    assert inv.status == "draft" and inv.amount_due == 0
    sclient.v1.invoice_items.create(
        params={"customer": cus.id, "invoice": inv.id, "amount": 1000, "currency": "usd"}
    )
    sclient.v1.invoice_items.create(
        params={
            "customer": cus.id,
            "invoice": inv.id,
            "price_data": {"currency": "usd", "product": "prod_X", "unit_amount": 250},
            "quantity": 2,
        }
    )
    inv = sclient.v1.invoices.retrieve(inv.id)
    assert inv.amount_due == 1500 and len(inv.lines.data) == 2
    inv = sclient.v1.invoices.pay(inv.id, params={"payment_method": "pm_card_visa"})
    assert inv.status == "paid" and inv.amount_paid == 1500 and inv.number
    assert sfake.ledger[-1].amount_charged_minor == 1500

    # Recipe 2: pending items first, then an invoice that includes them; a declined payment.
    sclient.v1.invoice_items.create(params={"customer": cus.id, "amount": 999, "currency": "usd"})
    inv2 = sclient.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "include"}
    )
    assert inv2.amount_due == 999
    with pytest.raises(stripe.CardError):
        sclient.v1.invoices.pay(inv2.id, params={"payment_method": "pm_card_chargeDeclined"})
    inv2 = sclient.v1.invoices.retrieve(inv2.id)
    assert inv2.status == "open" and inv2.attempt_count == 1
    assert sfake.charged_minor("usd") == 1500


def test_stripe_checkout_session(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    price = sclient.v1.prices.create(
        params={"currency": "usd", "unit_amount": 300, "product_data": {"name": "Pen"}}
    )
    cs = sclient.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "success_url": "https://example.com/ok",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 1500,
                        "product_data": {"name": "T-shirt"},
                    },
                    "quantity": 2,
                },
                {"price": price.id, "quantity": 3},
            ],
        }
    )
    assert isinstance(cs, stripe.checkout.Session)
    assert cs.id.startswith("cs_test_") and cs.amount_total == 3900 and cs.currency == "usd"
    assert cs.url and cs.payment_status == "unpaid"
    entry = sfake.ledger[-1]
    assert entry.amount_charged_minor == 0 and entry.extra["amount_total"] == 3900


def test_stripe_subscription(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    cus = sclient.v1.customers.create(params={"name": "Sub Scriber"})
    items: Any = [
        {
            "price_data": {
                "currency": "usd",
                "product": "prod_Gold",
                "unit_amount": 1200,
                "recurring": {"interval": "month"},
            },
            "quantity": 2,
        }
    ]
    sub = sclient.v1.subscriptions.create(
        params={
            "customer": cus.id,
            "items": items,
            "default_payment_method": "pm_card_visa",
            "expand": ["latest_invoice"],
        }
    )
    assert sub.id.startswith("sub_") and sub.status == "active"
    assert isinstance(sub.latest_invoice, stripe.Invoice)
    assert sub.latest_invoice.amount_due == 2400 and sub.latest_invoice.status == "paid"
    assert sub["items"].data[0].price.unit_amount == 1200
    assert sfake.ledger[-1].amount_charged_minor == 2400

    sub2 = sclient.v1.subscriptions.create(params={"customer": cus.id, "items": items})
    assert sub2.status == "incomplete"  # no payment method known: nothing charged
    inv = sclient.v1.invoices.retrieve(str(sub2.latest_invoice))
    assert inv.amount_due == 2400 and inv.status == "open"
    assert sfake.ledger[-2].amount_charged_minor == 0


# --------------------------------------------------------------------------- Stripe: out of band


def pk_client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(
        fake.publishable, base_addresses={"api": fake.url}, max_network_retries=0
    )


def test_stripe_publishable_key_client_side_confirm(
    sclient: stripe.StripeClient, sfake: FakeStripe
) -> None:
    assert sfake.publishable.startswith("pk_test_fake") and len(sfake.publishable) == 36
    pi = sclient.v1.payment_intents.create(
        params={"amount": 2000, "currency": "usd", "metadata": {"order": "B7"}}
    )
    assert pi.client_secret
    pk = pk_client(sfake)
    got = pk.v1.payment_intents.retrieve(pi.id, params={"client_secret": pi.client_secret})
    assert got.status == "requires_payment_method" and got.amount == 2000
    assert got.client_secret == pi.client_secret
    assert "metadata" not in got and "customer" not in got  # the publishable subset
    with pytest.raises(stripe.InvalidRequestError) as ei:
        pk.v1.payment_intents.retrieve(pi.id)
    assert ei.value.http_status == 400 and ei.value.code == "parameter_missing"
    assert ei.value.param == "client_secret"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        pk.v1.payment_intents.retrieve(pi.id, params={"client_secret": pi.id + "_secret_nope"})
    assert ei.value.http_status == 400 and ei.value.code == "payment_intent_invalid_parameter"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        pk.v1.payment_intents.retrieve("pi_missing", params={"client_secret": pi.client_secret})
    assert ei.value.http_status == 404 and ei.value.code == "resource_missing"
    for call in (
        pk.v1.balance.retrieve,
        lambda: pk.v1.payment_intents.list(),
        lambda: pk.v1.payment_intents.create(params={"amount": 999, "currency": "usd"}),
        lambda: pk.v1.payment_intents.capture(pi.id),
        lambda: pk.v1.refunds.create(params={"payment_intent": pi.id}),
    ):
        with pytest.raises(stripe.AuthenticationError) as ai:
            call()
        assert ai.value.http_status == 401
        assert "cannot be made with a publishable API key" in str(ai.value)
    assert sfake.charged_minor("usd") == 0

    done = sfake.confirm_in_browser(pi.id)
    assert done["status"] == "succeeded" and done["id"] == pi.id
    assert "amount_received" not in done and "metadata" not in done
    entry = sfake.ledger[-1]
    assert entry.method == "POST" and entry.route == f"/v1/payment_intents/{pi.id}/confirm"
    assert entry.header("Authorization") == f"Bearer {sfake.publishable}"
    assert entry.status == 200 and entry.extra["client_side"] is True
    assert entry.amount_charged_minor == 2000 and entry.charged_usd_micros == 20_000_000
    assert sfake.charged_usd_micros() == 20_000_000
    seen = sclient.v1.payment_intents.retrieve(pi.id)  # the secret key sees everything
    assert seen.amount_received == 2000 and seen.metadata["order"] == "B7"

    again = sfake.confirm_in_browser(pi.id)
    assert again["error"]["code"] == "payment_intent_unexpected_state"
    pi2 = sclient.v1.payment_intents.create(params={"amount": 700, "currency": "usd"})
    bad = sfake.confirm_in_browser(pi2.id, client_secret=pi.client_secret)
    assert bad["error"]["code"] == "payment_intent_invalid_parameter"
    assert bad["error"]["param"] == "client_secret"
    assert sfake.ledger[-1].status == 400 and sfake.charged_minor("usd") == 2000
    assert not sfake.errors


def test_stripe_browser_confirm_manual_capture_decline_and_key_param(
    sclient: stripe.StripeClient, sfake: FakeStripe, tls: FakeTLS
) -> None:
    pi = sclient.v1.payment_intents.create(
        params={"amount": 5000, "currency": "usd", "capture_method": "manual"}
    )
    held = sfake.confirm_in_browser(pi.id, "pm_card_mastercard")
    assert held["status"] == "requires_capture" and held["capture_method"] == "manual"
    auth = sfake.ledger[-1]
    assert auth.amount_charged_minor == 0 and auth.extra["authorized_minor"] == 5000
    captured = sclient.v1.payment_intents.capture(pi.id, params={"amount_to_capture": 4000})
    assert captured.status == "succeeded" and sfake.charged_minor("usd") == 4000

    pi = sclient.v1.payment_intents.create(
        params={"amount": 1500, "currency": "usd", "metadata": {"secret": "x"}}
    )
    declined = sfake.confirm_in_browser(pi.id, "pm_card_chargeDeclined")
    err = declined["error"]
    assert err["type"] == "card_error" and err["decline_code"] == "generic_decline"
    assert err["payment_intent"]["status"] == "requires_payment_method"
    assert "metadata" not in err["payment_intent"]
    assert sfake.ledger[-1].status == 402 and sfake.ledger[-1].amount_charged_minor == 0

    # Stripe.js sends the publishable key as a `key` parameter rather than a header.
    with httpx.Client(verify=tls.client_context()) as c:
        r = c.get(
            f"{sfake.url}/v1/payment_intents/{pi.id}",
            params={"key": sfake.publishable, "client_secret": pi.client_secret},
        )
        assert r.status_code == 200 and r.json()["id"] == pi.id
        r = c.post(
            f"{sfake.url}/v1/payment_intents/{pi.id}/confirm",
            data={
                "key": sfake.publishable,
                "client_secret": pi.client_secret,
                "payment_method": "pm_card_visa",
            },
        )
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        r = c.get(f"{sfake.url}/v1/balance", params={"key": sfake.publishable})
        assert r.status_code == 401
    assert sfake.charged_minor("usd") == 4000 + 1500

    manual = sclient.v1.payment_intents.create(
        params={"amount": 900, "currency": "usd", "confirmation_method": "manual"}
    )
    refused = sfake.confirm_in_browser(manual.id)
    assert refused["error"]["type"] == "invalid_request_error"
    assert sclient.v1.payment_intents.retrieve(manual.id).status == "requires_payment_method"
    assert not sfake.errors


def shipping_option(amount: int, name: str, currency: str = "usd") -> dict[str, Any]:
    return {
        "shipping_rate_data": {
            "type": "fixed_amount",
            "display_name": name,
            "fixed_amount": {"amount": amount, "currency": currency},
        }
    }


def test_stripe_checkout_shipping_and_complete(
    sclient: stripe.StripeClient, sfake: FakeStripe, tls: FakeTLS
) -> None:
    line: Any = {
        "price_data": {"currency": "usd", "unit_amount": 1000, "product_data": {"name": "Mug"}},
        "quantity": 2,
    }
    params: Any = {
        "mode": "payment",
        "success_url": "https://example.com/ok",
        "line_items": [line],
        "shipping_options": [shipping_option(500, "Ground"), shipping_option(1500, "Express")],
    }
    cs = sclient.v1.checkout.sessions.create(params=params)
    assert cs.amount_total == 2000 and cs.amount_subtotal == 2000  # shipping not chosen yet
    assert cs.shipping_cost is None and cs.total_details is not None
    assert cs.total_details.amount_shipping == 0
    opts = cs.shipping_options
    assert [o.shipping_amount for o in opts] == [500, 1500]
    rate = sclient.v1.shipping_rates.retrieve(str(opts[1].shipping_rate))
    assert rate.id.startswith("shr_") and rate.display_name == "Express"
    assert rate.fixed_amount is not None and rate.fixed_amount.amount == 1500
    create = sfake.ledger[-2]  # then the shipping rate retrieve
    assert create.amount_charged_minor == 0 and create.extra["shipping_amounts"] == [500, 1500]

    paid = sfake.complete_checkout(cs.id, shipping_option=1)
    assert paid["status"] == "complete" and paid["payment_status"] == "paid"
    assert paid["amount_total"] == 3500 and paid["amount_subtotal"] == 2000
    assert paid["total_details"]["amount_shipping"] == 1500
    assert paid["shipping_cost"]["amount_total"] == 1500
    assert paid["shipping_cost"]["shipping_rate"] == opts[1].shipping_rate
    assert paid["payment_intent"].startswith("pi_") and paid["url"] is None
    got = sclient.v1.checkout.sessions.retrieve(cs.id)
    assert got.status == "complete" and got.amount_total == 3500
    assert got.payment_intent == paid["payment_intent"]
    pi = sclient.v1.payment_intents.retrieve(paid["payment_intent"])
    assert pi.status == "succeeded" and pi.amount_received == 3500

    entry = sfake.ledger[-3]  # the two retrieves came after it
    assert (entry.method, entry.path, entry.status) == ("BROWSER", f"/checkout/pay/{cs.id}", 200)
    assert entry.object_id == cs.id and entry.currency == "usd"
    assert entry.amount_charged_minor == 3500 and entry.charged_usd_micros == 35_000_000
    assert entry.extra["out_of_band"] is True and entry.extra["shipping_amount"] == 1500
    assert entry.extra["payment_intent"] == paid["payment_intent"]
    assert sfake.charged_usd_micros() == 35_000_000 and sfake.charged_minor("usd") == 3500
    with httpx.Client(verify=tls.client_context()) as c:  # survives the JSON ledger too
        remote = [LedgerEntry.from_json(d) for d in c.get(sfake.url + "/__fake__/ledger").json()]
    assert remote == sfake.ledger

    with pytest.raises(ValueError, match="only an open session"):
        sfake.complete_checkout(cs.id)
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.checkout.sessions.expire(cs.id)
    assert ei.value.http_status == 400 and "has a status of `complete`" in str(ei.value)

    # Default: the first (preselected) option; a bad index is refused.
    cs2 = sclient.v1.checkout.sessions.create(params=params)
    with pytest.raises(ValueError, match="out of range"):
        sfake.complete_checkout(cs2.id, shipping_option=2)
    assert sfake.complete_checkout(cs2.id)["amount_total"] == 2500
    # No shipping options: items only.
    plain = sclient.v1.checkout.sessions.create(
        params={"mode": "payment", "success_url": "https://x", "line_items": [line]}
    )
    done = sfake.complete_checkout(plain.id)
    assert done["amount_total"] == 2000 and done["shipping_cost"] is None
    assert sfake.charged_minor("usd") == 3500 + 2500 + 2000

    # A declined card: the session stays open, nothing moves.
    cs3 = sclient.v1.checkout.sessions.create(params=params)
    still = sfake.complete_checkout(cs3.id, payment_method="pm_card_chargeDeclined")
    assert still["status"] == "open" and still["payment_status"] == "unpaid"
    assert sfake.ledger[-1].status == 402 and sfake.ledger[-1].amount_charged_minor == 0

    euro: Any = {**params, "shipping_options": [shipping_option(500, "Euro", "eur")]}
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.checkout.sessions.create(params=euro)
    assert ei.value.param == "shipping_options[0]"
    no_amount: Any = {**params, "shipping_options": [{"shipping_rate_data": {"display_name": "x"}}]}
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.checkout.sessions.create(params=no_amount)
    assert ei.value.code == "parameter_missing"
    assert not sfake.errors


def test_stripe_checkout_expire(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    cs = sclient.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "success_url": "https://example.com/ok",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 800,
                        "product_data": {"name": "Cap"},
                    },
                    "quantity": 1,
                }
            ],
        }
    )
    expired = sclient.v1.checkout.sessions.expire(cs.id)
    assert expired.status == "expired" and expired.payment_status == "unpaid"
    assert expired.url is None
    assert sclient.v1.checkout.sessions.retrieve(cs.id).status == "expired"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.checkout.sessions.expire(cs.id)
    assert "Only Checkout Sessions with a status in" in str(ei.value)
    with pytest.raises(ValueError, match="expired"):
        sfake.complete_checkout(cs.id)
    with pytest.raises(ValueError, match="no such checkout session"):
        sfake.complete_checkout("cs_test_nope")
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.checkout.sessions.expire("cs_test_nope")
    assert ei.value.http_status == 404
    assert sfake.charged_minor("usd") == 0 and sfake.charged_usd_micros() == 0


def test_stripe_checkout_manual_capture_and_subscription_mode(
    sclient: stripe.StripeClient, sfake: FakeStripe
) -> None:
    one_off: Any = [
        {
            "price_data": {"currency": "usd", "unit_amount": 4000, "product_data": {"name": "X"}},
            "quantity": 1,
        }
    ]
    cs = sclient.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "success_url": "https://x",
            "line_items": one_off,
            "payment_intent_data": {"capture_method": "manual"},
        }
    )
    held = sfake.complete_checkout(cs.id)
    assert held["status"] == "complete" and held["payment_status"] == "unpaid"
    pi = sclient.v1.payment_intents.retrieve(held["payment_intent"])
    assert pi.status == "requires_capture" and pi.amount_capturable == 4000
    entry = sfake.ledger[-2]
    assert entry.method == "BROWSER" and entry.amount_charged_minor == 0
    assert entry.extra["authorized_minor"] == 4000
    sclient.v1.payment_intents.capture(pi.id)
    assert sfake.charged_minor("usd") == 4000

    monthly: Any = [
        {
            "price_data": {
                "currency": "usd",
                "unit_amount": 1200,
                "product_data": {"name": "Gold"},
                "recurring": {"interval": "month"},
            },
            "quantity": 1,
        }
    ]
    sub_cs = sclient.v1.checkout.sessions.create(
        params={"mode": "subscription", "success_url": "https://x", "line_items": monthly}
    )
    done = sfake.complete_checkout(sub_cs.id)
    assert done["status"] == "complete" and done["payment_status"] == "paid"
    assert done["subscription"].startswith("sub_") and done["customer"].startswith("cus_")
    sub = sclient.v1.subscriptions.retrieve(done["subscription"])
    assert sub.status == "active" and sub.default_payment_method
    assert sfake.ledger[-2].amount_charged_minor == 1200
    assert sfake.ledger[-2].extra["subscription"] == sub.id

    trial_cs = sclient.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "success_url": "https://x",
            "line_items": monthly,
            "subscription_data": {"trial_period_days": 14},
        }
    )
    trial = sfake.complete_checkout(trial_cs.id)
    assert trial["payment_status"] == "no_payment_required" and trial["amount_total"] == 0
    assert sfake.ledger[-1].amount_charged_minor == 0
    tsub = sclient.v1.subscriptions.retrieve(trial["subscription"])
    assert tsub.status == "trialing"
    ended = sfake.end_trial(tsub.id)  # the card saved by Checkout pays the first period
    assert ended["status"] == "active"
    assert sfake.ledger[-1].amount_charged_minor == 1200
    assert sfake.charged_minor("usd") == 4000 + 1200 + 1200

    setup = sclient.v1.checkout.sessions.create(
        params={"mode": "setup", "success_url": "https://x", "currency": "usd"}
    )
    saved = sfake.complete_checkout(setup.id)
    assert saved["status"] == "complete" and saved["payment_status"] == "no_payment_required"
    seti = sclient.v1.setup_intents.retrieve(saved["setup_intent"])
    assert seti.status == "succeeded"
    assert sfake.ledger[-2].amount_charged_minor == 0
    assert not sfake.errors


def trial_sub(
    sclient: stripe.StripeClient, *, pm: str | None = "pm_card_visa", **extra: Any
) -> stripe.Subscription:
    cus = sclient.v1.customers.create(params={"name": "Trial User"})
    params: Any = {
        "customer": cus.id,
        "items": [
            {
                "price_data": {
                    "currency": "usd",
                    "product": "prod_Gold",
                    "unit_amount": 1200,
                    "recurring": {"interval": "month"},
                },
                "quantity": 2,
            }
        ],
        "trial_period_days": 7,
        **extra,
    }
    if pm:
        params["default_payment_method"] = pm
    return sclient.v1.subscriptions.create(params=params)


def test_stripe_subscription_trials_and_cancel(
    sclient: stripe.StripeClient, sfake: FakeStripe
) -> None:
    sub = trial_sub(sclient, cancel_at_period_end=True)
    assert sub.status == "trialing" and sub.cancel_at_period_end is True
    assert sub.cancel_at == sub.trial_end and sub.cancellation_details is not None
    assert sub.cancellation_details.reason == "cancellation_requested"
    ended = sfake.end_trial(sub.id)
    assert ended["status"] == "canceled" and ended["canceled_at"] and ended["ended_at"]
    entry = sfake.ledger[-1]
    assert (entry.method, entry.path) == ("STRIPE", f"/subscriptions/{sub.id}/trial_end")
    assert entry.amount_charged_minor == 0 and entry.extra["subscription_status"] == "canceled"
    assert sclient.v1.subscriptions.retrieve(sub.id).status == "canceled"

    sub = trial_sub(sclient)
    assert sub.cancel_at_period_end is False and sub.cancel_at is None
    ended = sfake.end_trial(sub.id)
    assert ended["status"] == "active" and ended["latest_invoice"] != sub.latest_invoice
    inv = sclient.v1.invoices.retrieve(str(ended["latest_invoice"]))
    assert inv.status == "paid" and inv.amount_paid == 2400
    assert inv.billing_reason == "subscription_cycle"
    entry = sfake.ledger[-2]
    assert entry.amount_charged_minor == 2400 and entry.charged_usd_micros == 24_000_000
    assert entry.object_id == sub.id and entry.extra["invoice"] == inv.id
    assert sfake.charged_usd_micros() == 24_000_000
    with pytest.raises(ValueError, match="not trialing"):
        sfake.end_trial(sub.id)

    broke = trial_sub(sclient, pm=None)  # no payment method anywhere: past_due, no money
    assert sfake.end_trial(broke.id)["status"] == "past_due"
    assert sfake.ledger[-1].amount_charged_minor == 0 and sfake.ledger[-1].status == 400
    declined = trial_sub(sclient, pm="pm_card_chargeDeclined")
    assert sfake.end_trial(declined.id)["status"] == "past_due"
    assert sfake.ledger[-1].status == 402

    # Through the API: cancel_at_period_end on/off, trial_end=now charges at once, cancel.
    live = trial_sub(sclient)
    live = sclient.v1.subscriptions.update(live.id, params={"cancel_at_period_end": True})
    assert live.cancel_at_period_end is True and live.cancel_at == live.trial_end
    live = sclient.v1.subscriptions.update(live.id, params={"cancel_at_period_end": False})
    assert live.cancel_at is None
    live = sclient.v1.subscriptions.update(live.id, params={"trial_end": "now"})
    assert live.status == "active"
    assert sfake.ledger[-1].method == "POST" and sfake.ledger[-1].amount_charged_minor == 2400
    gone = sclient.v1.subscriptions.cancel(
        live.id, params={"cancellation_details": {"comment": "bye"}}
    )
    assert gone.status == "canceled" and gone.canceled_at and gone.ended_at
    assert gone.cancellation_details is not None and gone.cancellation_details.comment == "bye"
    assert sfake.ledger[-1].method == "DELETE" and sfake.ledger[-1].route.endswith(live.id)
    assert sclient.v1.subscriptions.retrieve(live.id).status == "canceled"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.subscriptions.cancel(live.id)
    assert ei.value.http_status == 404 and ei.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.subscriptions.update(live.id, params={"cancel_at_period_end": True})
    assert "canceled subscription can only update" in str(ei.value)
    assert sfake.charged_minor("usd") == 4800
    assert not sfake.errors


def test_stripe_subscription_add_invoice_items_and_shipping_rates(
    sclient: stripe.StripeClient, sfake: FakeStripe
) -> None:
    sub = trial_sub(
        sclient,
        cancel_at_period_end=True,
        add_invoice_items=[
            {"price_data": {"currency": "usd", "product": "prod_Setup", "unit_amount": 900}}
        ],
    )
    assert sub.status == "trialing"  # the one-off item is charged now, the trial stays
    inv = sclient.v1.invoices.retrieve(str(sub.latest_invoice))
    assert inv.amount_paid == 900 and inv.status == "paid" and len(inv.lines.data) == 2
    assert sfake.ledger[-2].amount_charged_minor == 900
    assert sfake.end_trial(sub.id)["status"] == "canceled"
    assert sfake.charged_minor("usd") == 900

    rate = sclient.v1.shipping_rates.create(
        params={
            "display_name": "Courier",
            "type": "fixed_amount",
            "fixed_amount": {
                "amount": 700,
                "currency": "usd",
                "currency_options": {"eur": {"amount": 650}},
            },
        }
    )
    assert rate.fixed_amount is not None and rate.fixed_amount.amount == 700
    assert rate.fixed_amount["currency_options"]["eur"]["amount"] == 650
    params: Any = {
        "mode": "payment",
        "success_url": "https://x",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 100,
                    "product_data": {"name": "A"},
                },
                "quantity": 1,
            }
        ],
        "shipping_options": [{"shipping_rate": rate.id}],
    }
    cs = sclient.v1.checkout.sessions.create(params=params)
    assert cs.shipping_options[0].shipping_rate == rate.id
    assert sfake.complete_checkout(cs.id)["amount_total"] == 800


def test_stripe_invoiceitem_delete(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    cus = sclient.v1.customers.create(params={"email": "ii@example.com"})
    pending = sclient.v1.invoice_items.create(
        params={"customer": cus.id, "amount": 700, "currency": "usd"}
    )
    deleted = sclient.v1.invoice_items.delete(pending.id)
    assert deleted.id == pending.id and deleted.deleted is True
    assert sfake.ledger[-1].method == "DELETE" and sfake.ledger[-1].object_id == pending.id
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.invoice_items.retrieve(pending.id)
    assert ei.value.http_status == 404
    # A deleted pending item is no longer swept into the next invoice.
    inv = sclient.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "include"}
    )
    assert inv.amount_due == 0

    a = sclient.v1.invoice_items.create(
        params={"customer": cus.id, "invoice": inv.id, "amount": 1000, "currency": "usd"}
    )
    sclient.v1.invoice_items.create(
        params={"customer": cus.id, "invoice": inv.id, "amount": 300, "currency": "usd"}
    )
    sclient.v1.invoice_items.delete(a.id)  # a draft invoice is still editable
    inv = sclient.v1.invoices.retrieve(inv.id)
    assert inv.amount_due == 300 and len(inv.lines.data) == 1
    sclient.v1.invoices.finalize_invoice(inv.id)
    stuck = sclient.v1.invoice_items.list(params={"customer": cus.id}).data[0]
    with pytest.raises(stripe.InvalidRequestError) as ei:
        sclient.v1.invoice_items.delete(stuck.id)
    assert ei.value.http_status == 400 and ei.value.code == "invoice_not_editable"
    assert sclient.v1.invoices.retrieve(inv.id).amount_due == 300


def test_stripe_connect_account_header(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    pi = sclient.v1.payment_intents.create(
        params={
            "amount": 1100,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
        },
        options={"stripe_account": "acct_1Connected"},
    )
    assert pi.status == "succeeded"
    assert pi.last_response is not None
    assert pi.last_response.headers["Stripe-Account"] == "acct_1Connected"
    entry = only(sfake.ledger)
    assert entry.header("Stripe-Account") == "acct_1Connected"
    assert entry.extra["stripe_account"] == "acct_1Connected"
    assert entry.amount_charged_minor == 1100 and entry.extra["charge"]
    with pytest.raises(stripe.InvalidRequestError):
        sclient.v1.payment_intents.retrieve("pi_nope", options={"stripe_account": "acct_1Other"})
    assert sfake.ledger[-1].extra["stripe_account"] == "acct_1Other"
    sclient.v1.balance.retrieve()
    assert "stripe_account" not in sfake.ledger[-1].extra


def test_stripe_out_of_band_control_endpoints(
    sclient: stripe.StripeClient, sfake: FakeStripe, tls: FakeTLS
) -> None:
    params: Any = {
        "mode": "payment",
        "success_url": "https://x",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 600,
                    "product_data": {"name": "Pin"},
                },
                "quantity": 1,
            }
        ],
        "shipping_options": [shipping_option(250, "Post")],
    }
    cs = sclient.v1.checkout.sessions.create(params=params)
    sub = trial_sub(sclient)
    with httpx.Client(verify=tls.client_context()) as c:
        r = c.post(sfake.url + "/__fake__/stripe/complete_checkout", json={"session": cs.id})
        assert r.status_code == 200 and r.json()["amount_total"] == 850
        r = c.post(sfake.url + "/__fake__/stripe/complete_checkout", json={"session": cs.id})
        assert r.status_code == 400 and "only an open session" in r.json()["error"]
        r = c.post(sfake.url + "/__fake__/stripe/end_trial", json={"subscription": sub.id})
        assert r.status_code == 200 and r.json()["status"] == "active"
    assert [e.method for e in sfake.ledger[-2:]] == ["BROWSER", "STRIPE"]
    assert sfake.charged_minor("usd") == 850 + 2400


def test_stripe_auth(sclient: stripe.StripeClient, sfake: FakeStripe, tls: FakeTLS) -> None:
    bad = "sk_test_51WrongKeyWrongKeyWrongKey9876"
    client = stripe.StripeClient(bad, base_addresses={"api": sfake.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError) as ei:
        client.v1.balance.retrieve()
    assert ei.value.http_status == 401
    assert bad not in str(ei.value) and "9876" in str(ei.value)
    assert "Invalid API Key provided: sk_test_" in str(ei.value)

    ctx = tls.client_context()
    with httpx.Client(verify=ctx) as c:
        r = c.get(sfake.url + "/v1/balance")
        assert r.status_code == 401 and "did not provide an API key" in r.json()["error"]["message"]
        r = c.get(sfake.url + "/v1/balance", auth=(sfake.secret, ""))  # Basic "key:"
        assert r.status_code == 200
        r = c.get(sfake.url + "/v1/nope", headers={"Authorization": f"Bearer {sfake.secret}"})
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "Unrecognized request URL" in r.json()["error"]["message"]
        assert r.headers["Request-Id"].startswith("req_")
    statuses = [e.status for e in sfake.ledger]
    assert statuses == [401, 401, 200, 404]
    assert sfake.ledger[0].header("Authorization") == f"Bearer {bad}"

    with pytest.raises(stripe.InvalidRequestError) as ei2:
        sclient.v1.payment_intents.retrieve("pi_doesnotexist")
    assert ei2.value.code == "resource_missing" and ei2.value.http_status == 404


def test_stripe_list(sclient: stripe.StripeClient) -> None:
    ids = [
        sclient.v1.payment_intents.create(params={"amount": 100 + i, "currency": "usd"}).id
        for i in range(3)
    ]
    page = sclient.v1.payment_intents.list(params={"limit": 2})
    assert [pi.id for pi in page.data] == ids[::-1][:2] and page.has_more
    assert [pi.id for pi in page.auto_paging_iter()] == ids[::-1]


def test_stripe_global_config_style(
    sfake: FakeStripe, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe, "api_key", sfake.secret)
    monkeypatch.setattr(stripe, "api_base", sfake.url)
    monkeypatch.setattr(stripe, "ca_bundle_path", str(tls.ca_pem))
    monkeypatch.setattr(stripe, "max_network_retries", 0)
    pi = stripe.PaymentIntent.create(
        amount=999, currency="usd", payment_method="pm_card_visa", confirm=True
    )
    assert pi.status == "succeeded"
    assert sfake.ledger[0].amount_charged_minor == 999


def test_stripe_idempotency(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    params: Any = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa"}
    params["confirm"] = True
    opts: Any = {"idempotency_key": "order-1"}
    a = sclient.v1.payment_intents.create(params=params, options=opts)
    b = sclient.v1.payment_intents.create(params=params, options=opts)
    assert a.id == b.id
    assert b.last_response is not None
    assert b.last_response.headers["Idempotent-Replayed"] == "true"
    assert a.last_response is not None
    assert b.last_response.headers["Original-Request"] == a.last_response.request_id
    with pytest.raises(stripe.IdempotencyError):
        sclient.v1.payment_intents.create(
            params={**params, "amount": 2001},  # type: ignore[typeddict-item]
            options={"idempotency_key": "order-1"},
        )
    first, replay, mismatch = sfake.ledger
    assert (first.amount_charged_minor, first.replayed) == (2000, False)
    assert (replay.amount_charged_minor, replay.replayed, replay.object_id) == (0, True, a.id)
    assert mismatch.status == 400
    assert sfake.charged_minor() == 2000


def test_stripe_idempotency_declines_are_replayed(sclient: stripe.StripeClient) -> None:
    params: Any = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_chargeDeclined"}
    params["confirm"] = True
    for _ in range(2):
        with pytest.raises(stripe.CardError) as ei:
            sclient.v1.payment_intents.create(params=params, options={"idempotency_key": "d-1"})
    assert ei.value.headers is not None and ei.value.headers.get("Idempotent-Replayed") == "true"


def test_stripe_idempotency_in_flight_409(sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.delay_seconds = 0.4
    headers = {"Authorization": f"Bearer {sfake.secret}", "Idempotency-Key": "same"}
    results: list[int] = []

    def post() -> None:
        r = httpx.post(
            sfake.url + "/v1/topups",
            data={"amount": "100", "currency": "usd"},
            headers=headers,
            verify=tls.client_context(),
        )
        results.append(r.status_code)

    t = threading.Thread(target=post)
    t.start()
    time.sleep(0.15)
    post()
    t.join()
    assert sorted(results) == [200, 409]
    assert sfake.charged_minor() == 100


def test_stripe_concurrent_requests(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            sclient.v1.payment_intents.create(
                params={
                    "amount": 100,
                    "currency": "usd",
                    "payment_method": "pm_card_visa",
                    "confirm": True,
                }
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(sfake.ledger) == 20 and sfake.charged_minor() == 2000
    assert len({e.request_id for e in sfake.ledger}) == 20


# --------------------------------------------------------------------------- Twilio


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [
        ("hello", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension chars take two septets: 160
        ("€" * 81, "GSM-7", 2),
        ("a" * 152 + "€" + "a" * 10, "GSM-7", 2),  # escape pair is not split
        ("é" * 160, "GSM-7", 1),
        ("ó", "UCS-2", 1),
        ("😀" * 35, "UCS-2", 1),  # surrogate pairs: 70 code units
        ("😀" * 36, "UCS-2", 2),
        ("ж" * 70, "UCS-2", 1),
        ("ж" * 71, "UCS-2", 2),
        ("ж" * 134, "UCS-2", 2),
        ("ж" * 135, "UCS-2", 3),
    ],
)
def test_sms_segments(body: str, encoding: str, segments: int) -> None:
    assert sms_encoding(body) == encoding
    assert sms_segments(body) == segments


def test_twilio_create_fetch(tclient: TwilioClient, tfake: FakeTwilio) -> None:
    msg = tclient.messages.create(to="+15558675310", from_="+15017122661", body="a" * 161)
    assert msg.sid is not None and msg.sid.startswith("SM") and len(msg.sid) == 34
    assert msg.status == "queued" and msg.num_segments == "2" and msg.price is None
    assert msg.account_sid == tfake.account_sid and msg.direction == "outbound-api"
    assert msg.date_created is not None  # RFC 2822 parsed into a datetime by the SDK
    assert msg.uri == f"/2010-04-01/Accounts/{tfake.account_sid}/Messages/{msg.sid}.json"
    assert msg.subresource_uris is not None and "media" in msg.subresource_uris
    got = tclient.messages(msg.sid).fetch()
    assert got.body == "a" * 161
    create, fetch = tfake.ledger
    assert create.status == 201 and create.segments == 2 and create.charged_usd_micros == 15_800
    assert create.request_id is not None and create.request_id.startswith("RQ")
    assert len(create.request_id) == 34
    assert (create.header("Authorization") or "").startswith("Basic ")
    assert create.object_id == msg.sid
    assert fetch.method == "GET" and fetch.charged_usd_micros == 0


def test_twilio_via_requests_ca_bundle_env(
    tfake: FakeTwilio, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other supported way: the default TwilioHttpClient honours REQUESTS_CA_BUNDLE.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca_pem))
    client = TwilioClient(tfake.account_sid, tfake.auth_token, environment={})
    client.api.base_url = tfake.url
    msg = client.messages.create(to="+15558675310", from_="+15017122661", body="env")
    assert msg.status == "queued"


def test_twilio_messaging_service_and_mms(tclient: TwilioClient, tfake: FakeTwilio) -> None:
    svc = "MG" + "1" * 32
    msg = tclient.messages.create(to="+15558675310", messaging_service_sid=svc, body="ж" * 71)
    assert msg.status == "accepted" and msg.num_segments == "0"
    assert msg.from_ is None and msg.messaging_service_sid == svc
    mms = tclient.messages.create(
        to="+15558675310", from_="+15017122661", media_url=["https://example.com/a.png"]
    )
    assert mms.sid is not None and mms.sid.startswith("MM") and mms.num_media == "1"
    a, b = tfake.ledger
    assert a.segments == 2 and a.extra["encoding"] == "UCS-2"
    assert b.segments == 1 and b.charged_usd_micros == 20_000


def test_twilio_list_paging(tclient: TwilioClient, tfake: FakeTwilio) -> None:
    sent = [
        tclient.messages.create(to="+15558675310", from_="+15017122661", body=f"m{i}").sid
        for i in range(5)
    ]
    got = [m.sid for m in tclient.messages.list(page_size=2)]
    assert got == list(reversed(sent))
    gets = [e for e in tfake.ledger if e.method == "GET"]
    assert len(gets) == 3
    assert "PageToken=PA" in gets[1].path and "Page=1" in gets[1].path
    page = httpx.get(
        f"{tfake.url}/2010-04-01/Accounts/{tfake.account_sid}/Messages.json?PageSize=2",
        auth=(tfake.account_sid, tfake.auth_token),
        verify=tls_ctx(tfake),
    ).json()
    assert page["next_page_uri"].startswith(f"/2010-04-01/Accounts/{tfake.account_sid}/")
    assert page["page"] == 0 and page["page_size"] == 2 and len(page["messages"]) == 2


def tls_ctx(fake: FakeTwilio | FakeStripe | FakeResend) -> ssl.SSLContext:
    assert fake.tls is not None
    return fake.tls.client_context()


def test_twilio_auth_and_errors(tfake: FakeTwilio, tls: FakeTLS) -> None:
    bad = twilio_client(tfake, tls, password="0" * 32)
    with pytest.raises(TwilioRestException) as ei:
        bad.messages.create(to="+15558675310", from_="+15017122661", body="x")
    assert ei.value.status == 401 and ei.value.code == 20003
    with_key = twilio_client(tfake, tls, username="SK" + "ab" * 16, password="api-key-secret")
    ok = with_key.messages.create(to="+15558675310", from_="+15017122661", body="x")
    assert ok.sid is not None
    good = twilio_client(tfake, tls)
    with pytest.raises(TwilioRestException) as ei:
        good.messages.create(to="+15558675310", from_="+15017122661")
    assert ei.value.status == 400 and ei.value.code == 21602
    with pytest.raises(TwilioRestException) as ei:
        good.messages.create(to="", from_="+15017122661", body="x")
    assert ei.value.code == 21604
    with pytest.raises(TwilioRestException) as ei:
        good.messages("SM" + "0" * 32).fetch()
    assert ei.value.status == 404 and ei.value.code == 20404

    auth = (tfake.account_sid, tfake.auth_token)
    other = "AC" + "f" * 32
    with httpx.Client(verify=tls.client_context(), auth=auth) as c:
        r = c.post(f"{tfake.url}/2010-04-01/Accounts/{other}/Messages.json", data={"To": "+1"})
        assert r.status_code == 401 and r.json()["code"] == 20003
        assert r.json()["more_info"] == "https://www.twilio.com/docs/errors/20003"
        r = c.get(f"{tfake.url}/2010-04-01/Accounts/{tfake.account_sid}/Calls.json")
        assert r.status_code == 404 and r.json() == {
            "code": 20404,
            "message": f"The requested resource /2010-04-01/Accounts/{tfake.account_sid}"
            "/Calls.json was not found",
            "more_info": "https://www.twilio.com/docs/errors/20404",
            "status": 404,
        }
        assert r.headers["Twilio-Request-Id"].startswith("RQ")
    assert not tfake.errors


# --------------------------------------------------------------------------- Resend


def test_resend_send_get_batch(rfake: FakeResend) -> None:
    sent = resend.Emails.send(
        {
            "from": "Acme <onboarding@resend.dev>",
            "to": ["a@example.com", "b@example.com"],
            "cc": "c@example.com",
            "bcc": ["d@example.com"],
            "subject": "hi",
            "html": "<p>hi</p>",
        }
    )
    assert len(sent["id"]) == 36
    email: dict[str, Any] = dict(resend.Emails.get(sent["id"]))
    assert email["object"] == "email" and email["to"] == ["a@example.com", "b@example.com"]
    assert email["last_event"] == "delivered"
    batch = resend.Batch.send(
        [
            {"from": "x@acme.dev", "to": "y@example.com", "subject": "1", "text": "t"},
            {"from": "x@acme.dev", "to": ["y@example.com", "z@example.com"], "subject": "2"},
        ]
    )
    assert len(batch["data"]) == 2 and all(len(d["id"]) == 36 for d in batch["data"])
    one, get, many = rfake.ledger
    assert one.recipients == 4 and one.charged_usd_micros == 1600 and one.object_id == sent["id"]
    assert one.request_id is not None and one.header("Authorization") == f"Bearer {rfake.api_key}"
    assert get.method == "GET" and get.recipients == 0
    assert many.recipients == 3 and many.extra["recipients_per_email"] == [1, 2]


def test_resend_idempotency(rfake: FakeResend) -> None:
    params: Any = {"from": "x@acme.dev", "to": "y@example.com", "subject": "s", "text": "t"}
    a = resend.Emails.send(params, {"idempotency_key": "welcome-1"})
    b = resend.Emails.send(params, {"idempotency_key": "welcome-1"})
    assert a["id"] == b["id"]
    with pytest.raises(ResendError) as ei:
        other: Any = {**params, "subject": "other"}
        resend.Emails.send(other, {"idempotency_key": "welcome-1"})
    assert str(ei.value.code) == "409" and ei.value.error_type == "invalid_idempotent_request"
    first, replay, conflict = rfake.ledger
    assert (first.recipients, first.replayed) == (1, False)
    assert (replay.recipients, replay.replayed, replay.charged_usd_micros) == (0, True, 0)
    assert conflict.status == 409


def test_resend_errors(rfake: FakeResend, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingRequiredFieldsError):
        resend.Emails.send({"from": "x@acme.dev", "subject": "s", "to": []})
    with pytest.raises(ValidationError) as ei:
        resend.Emails.send({"from": "x@acme.dev", "to": "not-an-email", "subject": "s"})
    assert str(ei.value.code) == "422"
    with pytest.raises(ValidationError):
        resend.Batch.send([{"from": "x@acme.dev", "to": "y@example.com", "subject": "s"}] * 101)
    res = resend.Batch.send(
        [
            {"from": "x@acme.dev", "to": "y@example.com", "subject": "ok"},
            {"from": "x@acme.dev", "to": "bad", "subject": "bad"},
        ],
        {"batch_validation": "permissive"},
    )
    assert len(res["data"]) == 1 and res.get("errors", [])[0]["index"] == 1
    with pytest.raises(ResendError) as ei2:
        resend.Emails.get("0b1d2c3e-0000-4000-8000-000000000000")
    assert str(ei2.value.code) == "404"
    monkeypatch.setattr(resend, "api_key", "re_wrong")
    with pytest.raises(InvalidApiKeyError):
        resend.Emails.send({"from": "x@acme.dev", "to": "y@example.com", "subject": "s"})
    r = httpx.post(rfake.url + "/emails", json={}, verify=tls.client_context())
    assert r.status_code == 401 and r.json()["name"] == "missing_api_key"
    assert r.json()["statusCode"] == 401
    assert [e.recipients for e in rfake.ledger] == [0, 0, 0, 1, 0, 0, 0]


# --------------------------------------------------------------------------- faults


def test_fail_next_vendor_formats(
    sfake: FakeStripe, tfake: FakeTwilio, rfake: FakeResend, tls: FakeTLS
) -> None:
    ctx = tls.client_context()
    sfake.fail_next(1)
    r = httpx.get(sfake.url + "/v1/balance", verify=ctx, auth=(sfake.secret, ""))
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert r.headers["Request-Id"].startswith("req_")
    sfake.fail_next(1, status=502)
    r = httpx.get(sfake.url + "/v1/balance", verify=ctx, auth=(sfake.secret, ""))
    assert r.status_code == 502 and "Bad Gateway" in r.text
    r = httpx.get(sfake.url + "/v1/balance", verify=ctx, auth=(sfake.secret, ""))
    assert r.status_code == 200
    assert [(e.status, e.fault, e.processed) for e in sfake.ledger] == [
        (500, "fail", False),
        (502, "fail", False),
        (200, None, True),
    ]

    tfake.fail_next(1)
    r = httpx.get(tfake.url + "/x", verify=ctx)
    assert r.status_code == 500 and r.json()["code"] == 20500
    rfake.fail_next(1)
    r = httpx.get(rfake.url + "/emails", verify=ctx)
    assert r.status_code == 500 and r.json()["name"] == "application_error"


def test_fail_next_processed_charges(sclient: stripe.StripeClient, sfake: FakeStripe) -> None:
    sfake.fail_next(1, processed=True)
    with pytest.raises(stripe.APIError):
        sclient.v1.topups.create(params={"amount": 500, "currency": "usd"})
    entry = only(sfake.ledger)
    assert entry.status == 500 and entry.processed and entry.amount_charged_minor == 500


def test_stripe_sdk_retry_replays_after_500(
    sfake: FakeStripe, tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(tls.ca_pem))
    client = stripe.StripeClient(
        sfake.secret, base_addresses={"api": sfake.url}, max_network_retries=1
    )
    # The vendor executed the request but answered 500: the SDK retries with the same
    # Idempotency-Key and gets the stored result back - one charge in total.
    sfake.fail_next(1, processed=True)
    monkeypatch.setattr(
        stripe._http_client.HTTPClient,
        "_sleep_time_seconds",
        lambda self, *a, **k: 0.0,
    )
    tu = client.v1.topups.create(params={"amount": 700, "currency": "usd"})
    first, retry = sfake.ledger
    assert first.idempotency_key == retry.idempotency_key
    assert retry.replayed and retry.object_id == tu.id
    assert sfake.charged_minor() == 700


def test_rate_limit_next(
    sclient: stripe.StripeClient,
    sfake: FakeStripe,
    tclient: TwilioClient,
    tfake: FakeTwilio,
    rfake: FakeResend,
) -> None:
    sfake.rate_limit_next(1)
    with pytest.raises(stripe.RateLimitError) as ei:
        sclient.v1.topups.create(params={"amount": 500, "currency": "usd"})
    assert ei.value.http_status == 429
    body: Any = ei.value.json_body
    assert body["error"]["code"] == "rate_limit"
    tfake.rate_limit_next(1)
    with pytest.raises(TwilioRestException) as ei2:
        tclient.messages.create(to="+15558675310", from_="+15017122661", body="x")
    assert ei2.value.status == 429 and ei2.value.code == 20429
    rfake.rate_limit_next(1)
    with pytest.raises(RateLimitError) as ei3:
        resend.Emails.send({"from": "x@acme.dev", "to": "y@example.com", "subject": "s"})
    assert ei3.value.headers.get("retry-after") == "1"
    for fake in (sfake, tfake, rfake):
        entry = only(fake.ledger)
        assert (entry.status, entry.fault, entry.processed) == (429, "rate_limit", False)
        assert entry.charged_usd_micros == 0


def test_reset_connection_next(sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.reset_connection_next(1, processed=True)
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        requests.post(
            sfake.url + "/v1/topups",
            data={"amount": "600", "currency": "usd"},
            auth=(sfake.secret, ""),
            verify=str(tls.ca_pem),
            timeout=5,
        )
    sfake.reset_connection_next(1)
    with pytest.raises(httpx.TransportError):
        httpx.post(
            sfake.url + "/v1/topups",
            data={"amount": "600", "currency": "usd"},
            auth=(sfake.secret, ""),
            verify=tls.client_context(),
        )
    a, b = sfake.ledger
    assert (a.fault, a.processed, a.amount_charged_minor) == ("reset", True, 600)
    assert (b.fault, b.processed, b.amount_charged_minor) == ("reset", False, 0)


def test_garbage_next(sclient: stripe.StripeClient, sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.garbage_next(1)
    r = httpx.get(sfake.url + "/v1/balance", auth=(sfake.secret, ""), verify=tls.client_context())
    assert r.status_code == 200
    with pytest.raises(ValueError):  # JSONDecodeError / UnicodeDecodeError
        json.loads(r.content)
    sfake.garbage_next(1, processed=True)
    with pytest.raises(stripe.APIError):
        sclient.v1.topups.create(params={"amount": 500, "currency": "usd"})
    assert [e.amount_charged_minor for e in sfake.ledger] == [0, 500]


def test_truncate_next(sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.truncate_next(1)
    with pytest.raises(httpx.TransportError):
        httpx.get(sfake.url + "/v1/balance", auth=(sfake.secret, ""), verify=tls.client_context())
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        sfake.truncate_next(1)
        requests.get(
            sfake.url + "/v1/balance", auth=(sfake.secret, ""), verify=str(tls.ca_pem), timeout=5
        )
    assert [e.fault for e in sfake.ledger] == ["truncate", "truncate"]
    r = httpx.get(sfake.url + "/v1/balance", auth=(sfake.secret, ""), verify=tls.client_context())
    assert r.status_code == 200  # server healthy afterwards


def test_faults_are_fifo(sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.fail_next(1)
    sfake.rate_limit_next(1)
    statuses = []
    with httpx.Client(verify=tls.client_context(), auth=(sfake.secret, "")) as c:
        for _ in range(3):
            statuses.append(c.get(sfake.url + "/v1/balance").status_code)
    assert statuses == [500, 429, 200]
    assert sfake.pending_faults == 0


def test_delay(sfake: FakeStripe, tls: FakeTLS) -> None:
    sfake.delay_seconds = 0.5
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(
            sfake.url + "/v1/balance",
            auth=(sfake.secret, ""),
            verify=tls.client_context(),
            timeout=0.15,
        )
    sfake.delay_seconds = 0.0
    t0 = time.monotonic()
    r = httpx.get(sfake.url + "/v1/balance", auth=(sfake.secret, ""), verify=tls.client_context())
    assert r.status_code == 200 and time.monotonic() - t0 < 0.5


# --------------------------------------------------------------------------- control & serve


def test_control_endpoints(sfake: FakeStripe, tls: FakeTLS) -> None:
    with httpx.Client(verify=tls.client_context(), auth=(sfake.secret, "")) as c:
        c.post(sfake.url + "/v1/topups", data={"amount": "321", "currency": "usd"})
        entries = [LedgerEntry.from_json(d) for d in c.get(sfake.url + "/__fake__/ledger").json()]
        assert len(entries) == 1
        assert entries[0] == sfake.ledger[0]
        c.post(sfake.url + "/__fake__/faults", json={"kind": "fail", "n": 1, "status": 503})
        assert c.get(sfake.url + "/v1/balance").status_code == 503
        c.post(sfake.url + "/__fake__/reset", json={})
    assert sfake.ledger == []


def test_env_helpers(sfake: FakeStripe, tfake: FakeTwilio, rfake: FakeResend) -> None:
    assert sfake.env() == {"STRIPE_SECRET_KEY": sfake.secret}
    assert tfake.env()["TWILIO_AUTH_TOKEN"] == tfake.auth_token
    assert rfake.env() == {"RESEND_API_KEY": rfake.api_key}


def _serve(vendor: str, cert_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.fakes.serve", vendor),
            *("--port", "0", "--cert-dir", str(cert_dir), *extra),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_serve_subprocess(tmp_path: Path) -> None:
    from tests.fakes.twilio import DEFAULT_ACCOUNT_SID

    # Two fakes in two processes sharing one cert dir end up trusting the same ca.pem.
    procs = [_serve("twilio", tmp_path, "--secret", "tok" * 8), _serve("stripe", tmp_path)]
    try:
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            urls.append(proc.stdout.readline().strip())
        url, stripe_url = urls
        assert url.startswith("https://127.0.0.1:") and stripe_url.startswith("https://")
        ca = str(tmp_path / "ca.pem")
        r = requests.post(
            f"{url}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json",
            data={"To": "+15558675310", "From": "+15017122661", "Body": "hi"},
            auth=(DEFAULT_ACCOUNT_SID, "tok" * 8),
            verify=ca,
            timeout=10,
        )
        assert r.status_code == 201, r.text
        entry = only(fetch_ledger(url, ca))
        assert entry.segments == 1 and entry.object_id == r.json()["sid"]
        remote_fault(url, ca, kind="rate_limit", n=1)
        r = requests.get(f"{url}/2010-04-01/Accounts/x/Messages.json", verify=ca, timeout=10)
        assert r.status_code == 429
        remote_reset(url, ca)
        assert fetch_ledger(url, ca) == []
        r = requests.get(f"{stripe_url}/v1/balance", verify=ca, timeout=10)
        assert r.status_code == 401 and r.headers["Request-Id"].startswith("req_")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    assert [p.returncode for p in procs] == [0, 0]
