"""End to end: Stripe's money endpoints through the real stripe SDK, a real ``keybrake run`` and
the fake Stripe. The key's spend must equal the money the fake moved, and what is counted
(spent + held) must cover everything that can still move later out of the proxy's sight.

What counts (policies/stripe.yaml): money moved, read from Stripe's answer — captures, not
authorizations; refunds (by default); a subscription's first invoice. Held until an answer
settles or releases them: intents not yet succeeded, Checkout Sessions (the customer pays out
of the proxy's sight), trialing or incomplete subscriptions, pending invoice items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import yaml
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS

from keybrake.core.money import format_usd, minor_to_micro_usd
from keybrake.core.policy import load_policy_file

pytestmark = pytest.mark.e2e

FX = load_policy_file(ROOT / "policies" / "stripe.yaml").fx_to_usd

PI = [
    "POST /v1/payment_intents",
    "GET /v1/payment_intents/{id}",
    "POST /v1/payment_intents/{id}/confirm",
    "POST /v1/payment_intents/{id}/capture",
    "POST /v1/payment_intents/{id}/increment_authorization",
]


@pytest.fixture(scope="module")
def _proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[tuple[KeybrakeProcess, FakeStripe]]:
    """One fake Stripe and one proxy for the module: every test issues its own key."""
    with FakeStripe(fake_tls) as fake:
        workdir = tmp_path_factory.mktemp("kb-stripe-money")
        proc = KeybrakeProcess(workdir, keybrake_certs, {"stripe": fake}, fake_tls).start()
        try:
            yield proc, fake
        finally:
            proc.stop()


@pytest.fixture
def fake(_proxy: tuple[KeybrakeProcess, FakeStripe]) -> FakeStripe:
    _proxy[1].reset()
    return _proxy[1]


@pytest.fixture
def kb(
    monkeypatch: pytest.MonkeyPatch, _proxy: tuple[KeybrakeProcess, FakeStripe], fake: FakeStripe
) -> KeybrakeProcess:
    # The stripe SDK ignores REQUESTS_CA_BUNDLE; a worker sets ca_bundle_path.
    monkeypatch.setattr(stripe, "ca_bundle_path", str(_proxy[0].bundle))
    return _proxy[0]


def issue(kb: KeybrakeProcess, endpoints: list[str], cap: str = "300") -> dict[str, Any]:
    return kb.issue_key(daily_usd_cap=cap, allowed_endpoints=endpoints)


def client(kb: KeybrakeProcess, key: dict[str, Any]) -> stripe.StripeClient:
    return stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)


def counted(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    """Today's spend of the key including what is reserved or held."""
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return str(detail["spent_today_usd"])


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    """Today's settled spend of the key: money the vendor said it moved."""
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return str(detail["budgets"][0]["spent_usd"])


def moved(fake: FakeStripe, *, refunds: bool = True) -> str:
    """Dollars the fake moved, converted with the policy's FX table like the proxy does."""
    total = 0
    for e in fake.ledger:
        if e.amount_charged_minor:
            total += minor_to_micro_usd(e.amount_charged_minor, e.currency or "", FX)
        if refunds and e.amount_refunded_minor:
            total += minor_to_micro_usd(e.amount_refunded_minor, e.currency or "", FX)
    return format_usd(total)


def direct(fake: FakeStripe, path: str, data: dict[str, str]) -> dict[str, Any]:
    """Set-up done with the real key straight at Stripe, out of the proxy's sight."""
    assert fake.tls is not None
    r = httpx.post(
        fake.url + path, data=data, auth=(fake.secret, ""), verify=fake.tls.client_context()
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def code_of(e: pytest.ExceptionInfo[stripe.StripeError]) -> str:
    assert e.value.json_body is not None
    return str(e.value.json_body["error"]["code"])


def test_payment_intents_count_captures_not_authorizations(
    kb: KeybrakeProcess, fake: FakeStripe
) -> None:
    key = issue(kb, PI)
    sc = client(kb, key)
    pis = sc.v1.payment_intents
    done = pis.create(
        params={
            "amount": 2500,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )
    assert done.status == "succeeded"
    assert spent(kb, key) == moved(fake) == "25.00"

    # Manual capture: the confirm only authorizes (nothing spent yet, but the intent stays
    # held: it can still be captured), the capture is counted and the rest released.
    manual = pis.create(params={"amount": 5000, "currency": "usd", "capture_method": "manual"})
    assert spent(kb, key) == moved(fake) == "25.00"
    assert counted(kb, key) == "75.00"
    auth = pis.confirm(manual.id, params={"payment_method": "pm_card_visa"})
    assert auth.status == "requires_capture"
    assert spent(kb, key) == moved(fake) == "25.00"
    assert counted(kb, key) == "75.00"
    captured = pis.capture(manual.id, params={"amount_to_capture": 3000})
    assert captured.amount_received == 3000
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "55.00"

    # An incremented authorization is captured at its new amount, counted once.
    inc = pis.create(
        params={
            "amount": 2000,
            "currency": "usd",
            "capture_method": "manual",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )
    assert inc.status == "requires_capture"
    assert counted(kb, key) == "75.00"
    bigger = pis.increment_authorization(inc.id, params={"amount": 3500})
    assert bigger.amount == 3500 and bigger.status == "requires_capture"
    assert spent(kb, key) == "55.00"
    assert counted(kb, key) == "90.00"  # the hold follows the authorization
    pis.capture(inc.id)
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "90.00"


def test_charges_and_refunds(kb: KeybrakeProcess, fake: FakeStripe) -> None:
    key = issue(
        kb,
        [
            "POST /v1/charges",
            "POST /v1/charges/{id}/capture",
            "POST /v1/refunds",
            "POST /v1/payment_intents",
        ],
    )
    sc = client(kb, key)
    paid = sc.v1.charges.create(params={"amount": 1200, "currency": "usd", "source": "tok_visa"})
    held = sc.v1.charges.create(
        params={"amount": 800, "currency": "usd", "source": "tok_visa", "capture": False}
    )
    assert spent(kb, key) == "12.00"  # the uncaptured charge is only an authorization
    sc.v1.charges.capture(held.id, params={"amount": 500})
    assert spent(kb, key) == moved(fake) == "17.00"
    # An amount-less refund is priced at the charge the proxy saw, settled at the refund.
    refund = sc.v1.refunds.create(params={"charge": paid.id})
    assert refund.amount == 1200
    pi = sc.v1.payment_intents.create(
        params={
            "amount": 2000,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )
    partial = sc.v1.refunds.create(params={"payment_intent": pi.id, "amount": 300})
    assert partial.amount == 300
    # Refunds count as spend: 12 + 5 + 20 charged, 12 + 3 refunded.
    assert spent(kb, key) == moved(fake) == "52.00"
    assert moved(fake, refunds=False) == "37.00"

    # A charge the proxy never saw cannot bound an amount-less refund: refused.
    unseen = direct(fake, "/v1/charges", {"amount": "999", "currency": "usd", "source": "tok_visa"})
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.refunds.create(params={"charge": unseen["id"]})
    assert code_of(e) == "unpriced_endpoint"
    assert not [
        x for x in fake.ledger if x.route == "/v1/refunds" and unseen["id"] in x.body.decode()
    ]


def test_refunds_can_be_configured_not_to_count(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = yaml.safe_load((ROOT / "policies" / "stripe.yaml").read_text())
    for ep in policy["endpoints"]:
        if ep["match"] == "POST /v1/refunds":
            ep.pop("cost"), ep.pop("actual")
            ep["free"] = True
    src = tmp_path / "policies-src"
    src.mkdir()
    (src / "stripe.yaml").write_text(yaml.safe_dump(policy))
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, policies_src=src)
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    key = issue(kb, ["POST /v1/charges", "POST /v1/refunds"])
    sc = client(kb, key)
    ch = sc.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": "tok_visa"})
    sc.v1.refunds.create(params={"charge": ch.id})
    assert spent(kb, key) == moved(fake_stripe, refunds=False) == "10.00"


def test_transfers_payouts_topups_in_any_currency(kb: KeybrakeProcess, fake: FakeStripe) -> None:
    key = issue(kb, ["POST /v1/transfers", "POST /v1/payouts", "POST /v1/topups"])
    sc = client(kb, key)
    sc.v1.transfers.create(params={"amount": 700, "currency": "usd", "destination": "acct_1X"})
    sc.v1.payouts.create(params={"amount": 5000, "currency": "jpy"})  # zero-decimal yen
    sc.v1.topups.create(params={"amount": 2340, "currency": "kwd"})  # three-decimal fils
    # 7.00 + 5,000 x 0.0075 + 2.340 x 3.40
    assert spent(kb, key) == moved(fake) == "52.456"
    assert [(e.amount_charged_minor, e.currency) for e in fake.ledger] == [
        (700, "usd"),
        (5000, "jpy"),
        (2340, "kwd"),
    ]


def test_invoice_pay_uses_the_amount_due_the_proxy_saw(
    kb: KeybrakeProcess, fake: FakeStripe
) -> None:
    key = issue(
        kb,
        [
            "POST /v1/customers",
            "POST /v1/invoiceitems",
            "POST /v1/invoices",
            "GET /v1/invoices/{id}",
            "POST /v1/invoices/{id}/pay",
        ],
    )
    sc = client(kb, key)
    cus = sc.v1.customers.create(
        params={
            "email": "a@example.com",
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        }
    )
    sc.v1.invoice_items.create(params={"customer": cus.id, "amount": 4200, "currency": "usd"})
    # A pending item is held: Stripe could sweep it into an invoice it collects by itself.
    assert spent(kb, key) == "0.00" and counted(kb, key) == "42.00"
    inv = sc.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "include"}
    )
    assert inv.amount_due == 4200 and spent(kb, key) == "0.00"
    paid = sc.v1.invoices.pay(inv.id)
    assert paid.status == "paid" and paid.amount_paid == 4200
    # The payment includes the item: its hold is released, nothing is counted twice.
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "42.00"

    # An invoice made out of the proxy's sight is no object of this key's: refused.
    other = direct(fake, "/v1/invoices", {"customer": cus.id})
    direct(
        fake,
        "/v1/invoiceitems",
        {"customer": cus.id, "invoice": other["id"], "amount": "1500", "currency": "usd"},
    )
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.invoices.pay(other["id"])
    assert code_of(e) == "object_not_owned"
    # A key that may pay any invoice ("*") is refused until the proxy has read it.
    anyone = issue(kb, ["GET /v1/invoices/*", "POST /v1/invoices/*/pay"])
    sa = client(kb, anyone)
    with pytest.raises(stripe.PermissionError) as e:
        sa.v1.invoices.pay(other["id"])
    assert code_of(e) == "unpriced_endpoint"
    assert sa.v1.invoices.retrieve(other["id"]).amount_due == 1500
    sa.v1.invoices.pay(other["id"])
    assert spent(kb, anyone) == "15.00"
    assert spent(kb, key) == "42.00" and moved(fake) == "57.00"

    # What would let money move later, out of sight, is refused.
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.invoices.create(params={"customer": cus.id, "auto_advance": True})
    assert code_of(e) == "unpriced_endpoint"
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.invoice_items.create(
            params={"customer": cus.id, "invoice": other["id"], "amount": 1, "currency": "usd"}
        )
    assert code_of(e) == "unpriced_endpoint"


def test_checkout_sessions_count_their_total_when_created(
    kb: KeybrakeProcess, fake: FakeStripe
) -> None:
    key = issue(kb, ["POST /v1/checkout/sessions", "POST /v1/prices"])
    sc = client(kb, key)
    session = sc.v1.checkout.sessions.create(
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
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 500,
                        "product_data": {"name": "Sticker"},
                    },
                },
            ],
        }
    )
    assert session.amount_total == 3500
    # Held from creation: the customer pays on Stripe's page, which the proxy never sees
    # (the fake has moved nothing yet).
    assert counted(kb, key) == "35.00" and spent(kb, key) == "0.00"
    assert fake.charged_usd_micros() == 0

    price = sc.v1.prices.create(
        params={"currency": "usd", "unit_amount": 700, "product_data": {"name": "Mug"}}
    )
    sc.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "success_url": "https://example.com/ok",
            "line_items": [{"price": price.id, "quantity": 3}],
        }
    )
    totals = [
        e.extra.get("amount_total") for e in fake.ledger if e.route == "/v1/checkout/sessions"
    ]
    assert totals == [3500, 2100]
    assert counted(kb, key) == "56.00"

    # A price the proxy has never seen cannot be priced: refused, Stripe not contacted.
    unseen = direct(
        fake,
        "/v1/prices",
        {"currency": "usd", "unit_amount": "100", "product_data[name]": "X"},
    )
    before = len(fake.ledger)
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "success_url": "https://example.com/ok",
                "line_items": [{"price": unseen["id"], "quantity": 1}],
            }
        )
    assert code_of(e) == "unpriced_endpoint"
    assert len(fake.ledger) == before


def test_subscriptions_count_their_first_invoice(kb: KeybrakeProcess, fake: FakeStripe) -> None:
    key = issue(kb, ["POST /v1/customers", "POST /v1/products", "POST /v1/subscriptions"])
    sc = client(kb, key)
    product = sc.v1.products.create(params={"name": "Pro plan"})
    cus = sc.v1.customers.create(
        params={"invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )

    def item(unit: int, quantity: int = 1) -> dict[str, Any]:
        return {
            "price_data": {
                "currency": "usd",
                "unit_amount": unit,
                "product": product.id,
                "recurring": {"interval": "month"},
            },
            "quantity": quantity,
        }

    def create(**params: Any) -> Any:
        # One period only: renewals would be charged by Stripe out of the proxy's sight.
        return sc.v1.subscriptions.create(
            params={"customer": cus.id, "cancel_at_period_end": True, **params}
        )

    sub = create(items=[item(999, 2)])
    assert sub.status == "active"
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "19.98"
    # With latest_invoice expanded the settled cost is read from the invoice itself.
    expanded = create(items=[item(500)], expand=["latest_invoice"])
    assert expanded.status == "active"
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "24.98"
    # A trial charges nothing now, but Stripe charges when it ends, out of the proxy's sight:
    # held at the period it would charge.
    trial = create(items=[item(2000)], trial_period_days=14)
    assert trial.status == "trialing"
    assert spent(kb, key) == moved(fake) == "24.98"
    assert counted(kb, key) == "44.98"
    # default_incomplete: the customer may still pay the first invoice out of the proxy's
    # sight: held, although the fake has not moved the money yet.
    pending = create(items=[item(300)], payment_behavior="default_incomplete")
    assert pending.status == "incomplete"
    assert spent(kb, key) == moved(fake) == "24.98"
    assert counted(kb, key) == "47.98"

    with pytest.raises(stripe.PermissionError) as e:
        create(items=[{"price": "price_nope"}])
    assert code_of(e) == "unpriced_endpoint"
    # A subscription that renews has no bound the proxy could reserve: refused.
    before = len(fake.ledger)
    with pytest.raises(stripe.PermissionError) as e:
        sc.v1.subscriptions.create(params={"customer": cus.id, "items": [item(100)]})
    assert code_of(e) == "unpriced_endpoint"
    assert len(fake.ledger) == before


def test_ambiguous_amounts_are_refused_not_guessed(kb: KeybrakeProcess, fake: FakeStripe) -> None:
    key = issue(kb, ["POST /v1/payment_intents", "POST /v1/checkout/sessions"])
    post: Callable[..., httpx.Response] = httpx.Client(
        proxy=kb.proxy_url, verify=kb.ssl_context()
    ).post
    headers = {
        "Authorization": f"Bearer {key['vault_key']}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    for body in (
        b"amount=100&amount=500000&currency=usd",
        b"amount=100&amount%5B%5D=500000&currency=usd",
        b"amount=100&currency=usd&currency=jpy",
        b"mode=payment&line_items[0][price_data][currency]=usd"
        b"&line_items[0][price_data][unit_amount]=1&line_items[0][price_data][unit_amount]=99999",
        b"mode=payment&line_items%5B0%5D%5Bprice_data%5D%5Bcurrency%5D=usd"
        b"&line_items[0][price_data][unit_amount]=1&line_items[0][quantity]=1"
        b"&line_items%5B0%5D%5Bquantity%5D=900",
    ):
        path = "/v1/checkout/sessions" if body.startswith(b"mode") else "/v1/payment_intents"
        r = post(f"https://api.stripe.com{path}", content=body, headers=headers)
        assert r.status_code == 403, (body, r.text)
        assert r.json()["error"]["code"] == "ambiguous_amount"
        assert r.headers["X-Keybrake-Error"] == "ambiguous_amount"
    assert fake.ledger == []
    assert spent(kb, key) == "0.00"


def test_cap_refuses_money_calls_without_contacting_stripe(
    kb: KeybrakeProcess, fake: FakeStripe
) -> None:
    key = issue(kb, ["POST /v1/transfers", "POST /v1/payouts", *PI], cap="10")
    sc = client(kb, key)
    pi = sc.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})  # held $5
    sc.v1.transfers.create(params={"amount": 400, "currency": "usd", "destination": "acct_1X"})
    assert spent(kb, key) == "4.00" and counted(kb, key) == "9.00"
    before = len(fake.ledger)
    with pytest.raises(stripe.RateLimitError) as e:
        sc.v1.payouts.create(params={"amount": 200, "currency": "usd"})
    assert code_of(e) == "cap_exhausted"
    assert e.value.headers is not None and e.value.headers.get("X-Keybrake-Cap-Hit") == "true"
    with pytest.raises(stripe.RateLimitError) as e:
        sc.v1.payment_intents.create(params={"amount": 200, "currency": "usd"})
    assert code_of(e) == "cap_exhausted"
    assert len(fake.ledger) == before
    # The confirm is priced at the $5.00 the intent holds already: it needs no more room.
    done = sc.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert done.status == "succeeded"
    assert spent(kb, key) == counted(kb, key) == moved(fake) == "9.00"
