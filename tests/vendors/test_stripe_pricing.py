"""The shipped Stripe policy and keybrake.pricing.vendors.stripe, priced without a proxy."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from tests.vendors.conftest import price_call, refusal_of

from keybrake.core.policy import PolicySet


def form(**fields: object) -> bytes:
    """A Stripe-style form body; keys use brackets, e.g. ``line_items[0][quantity]``."""
    return urlencode({k.replace("__", "]["): v for k, v in fields.items()}).encode()


def items(*lines: dict[str, object], field: str = "line_items") -> bytes:
    pairs: list[tuple[str, object]] = []
    for i, line in enumerate(lines):
        for key, value in line.items():
            path = "".join(f"[{part}]" for part in key.split("."))
            pairs.append((f"{field}[{i}]{path}", value))
    return urlencode(pairs).encode()


def pd(unit: object, currency: str = "usd", **more: object) -> dict[str, object]:
    return {"price_data.currency": currency, "price_data.unit_amount": unit, **more}


CHECKOUT = ("POST", "/v1/checkout/sessions")
SUBSCRIPTION = ("POST", "/v1/subscriptions")


# -- money endpoints priced by amount fields and remembered objects -------------------------------
@pytest.mark.parametrize(
    ("method", "target", "raw", "known", "micros"),
    [
        ("POST", "/v1/payment_intents", b"amount=2000&currency=usd", {}, 20_000_000),
        ("POST", "/v1/payment_intents", b"amount=5000&currency=jpy", {}, 37_500_000),
        ("POST", "/v1/payment_intents", b"amount=1000&currency=kwd", {}, 3_400_000),
        ("POST", "/v1/payment_intents/pi_1/confirm", b"", {"pi_1": 20_000_000}, 20_000_000),
        (
            "POST",
            "/v1/payment_intents/pi_1/confirm",
            b"payment_method=pm_card_visa",
            {"pi_1": 20_000_000},
            20_000_000,  # confirm takes no amount: the intent's own is the price
        ),
        ("POST", "/v1/payment_intents/pi_1/capture", b"", {"pi_1": 9}, 9),
        # amount_to_capture is in the intent's currency: bounded by the dearest one (GBP)
        # when that is more than the intent's amount (over-capture)
        ("POST", "/v1/payment_intents/pi_1/capture", b"amount_to_capture=5", {"pi_1": 9}, 70_000),
        (
            "POST",
            "/v1/payment_intents/pi_1/capture",
            b"amount_to_capture=5",
            {"pi_1": 90_000},
            90_000,
        ),
        # the new authorized amount, in the intent's currency: the dearest one bounds it
        (
            "POST",
            "/v1/payment_intents/pi_1/increment_authorization",
            b"amount=900",
            {"pi_1": 4},
            12_600_000,
        ),
        ("POST", "/v1/charges", b"amount=1500&currency=eur&source=tok_visa", {}, 18_000_000),
        ("POST", "/v1/charges/ch_1/capture", b"", {"ch_1": 15_000_000}, 15_000_000),
        ("POST", "/v1/charges/ch_1/capture", b"amount=100", {"ch_1": 15_000_000}, 15_000_000),
        ("POST", "/v1/refunds", b"charge=ch_1", {"ch_1": 15_000_000}, 15_000_000),
        ("POST", "/v1/refunds", b"payment_intent=pi_1&amount=300", {"pi_1": 8_000_000}, 8_000_000),
        ("POST", "/v1/refunds", b"charge=ch_x&amount=300&currency=usd", {}, 3_000_000),
        ("POST", "/v1/transfers", b"amount=700&currency=usd&destination=acct_1", {}, 7_000_000),
        ("POST", "/v1/payouts", b"amount=800&currency=usd", {}, 8_000_000),
        ("POST", "/v1/topups", b"amount=900&currency=usd", {}, 9_000_000),
        ("POST", "/v1/invoices/in_1/pay", b"", {"in_1": 12_340_000}, 12_340_000),
        ("POST", "/v1/invoices", b"customer=cus_1", {}, 0),
        ("POST", "/v1/invoices", b"customer=cus_1&auto_advance=false", {}, 0),
        # a pending invoice item is priced (and held): Stripe may collect it out of sight
        ("POST", "/v1/invoiceitems", b"customer=cus_1&amount=500&currency=usd", {}, 5_000_000),
        (
            "POST",
            "/v1/invoiceitems",
            b"customer=cus_1&price_data[unit_amount]=250&price_data[currency]=eur"
            b"&price_data[product]=prod_1&quantity=2",
            {},
            6_000_000,
        ),
        (
            "POST",
            "/v1/invoiceitems",
            b"customer=cus_1&price=price_1&quantity=3",
            {"price_1": 7},
            21,
        ),
        ("POST", "/v1/customers", b"email=a%40example.com", {}, 0),
        ("POST", "/v1/prices", b"unit_amount=500&currency=usd&product=prod_1", {}, 0),
        # an update sets what a later confirm charges: priced at the new amount, in the
        # intent's currency (the dearest one bounds it), or free when it names no amount
        ("POST", "/v1/payment_intents/pi_1", b"amount=700", {"pi_1": 1}, 9_800_000),
        ("POST", "/v1/payment_intents/pi_1", b"amount=700&currency=usd", {}, 7_000_000),
        ("POST", "/v1/payment_intents/pi_1", b"description=x", {}, 0),
        ("GET", "/v1/payment_intents/pi_1", b"", {}, 0),
        ("GET", "/v1/invoices/in_1", b"", {}, 0),
        ("GET", "/v1/balance", b"", {}, 0),
    ],
)
async def test_stripe_endpoint_estimates(
    shipped: PolicySet,
    method: str,
    target: str,
    raw: bytes,
    known: dict[str, int],
    micros: int,
) -> None:
    e = await price_call(shipped, "stripe", method, target, raw, known=known)
    assert e.micros == micros


@pytest.mark.parametrize(
    ("method", "target", "raw", "code", "message"),
    [
        ("POST", "/v1/payment_intents/pi_x/confirm", b"", "unpriced_endpoint", "has not seen"),
        ("POST", "/v1/payment_intents/pi_x/capture", b"", "unpriced_endpoint", "has not seen"),
        (
            "POST",
            "/v1/payment_intents/pi_x/capture",
            b"amount_to_capture=50",
            "unpriced_endpoint",
            "has not seen",
        ),
        ("POST", "/v1/charges/ch_x/capture", b"", "unpriced_endpoint", "has not seen"),
        ("POST", "/v1/refunds", b"charge=ch_x", "unpriced_endpoint", "has not seen"),
        ("POST", "/v1/refunds", b"amount=100&charge=ch_x", "unpriced_endpoint", "has not seen"),
        ("POST", "/v1/refunds", b"amount=100", "unpriced_endpoint", "has not seen"),
        ("POST", "/v1/invoices/in_x/pay", b"", "unpriced_endpoint", "has not seen"),
        (
            "POST",
            "/v1/payment_intents",
            b"amount=100&amount=100000&currency=usd",
            "ambiguous_amount",
            "more than once",
        ),
        (
            "POST",
            "/v1/payment_intents",
            b"amount=100&amount%5B0%5D=1&currency=usd",
            "ambiguous_amount",
            "nested fields",
        ),
        (
            "POST",
            "/v1/transfers",
            b"amount=100&currency=usd&currency=jpy&destination=acct_1",
            "ambiguous_amount",
            "currency",
        ),
        ("POST", "/v1/payouts", b"amount=100&currency=thb", "unknown_currency", "thb"),
        ("POST", "/v1/topups", b"amount=12.50&currency=usd", "invalid_request", "integer"),
        ("POST", "/v1/invoices", b"customer=c&auto_advance=true", "unpriced_endpoint", "auto_adv"),
        ("POST", "/v1/invoices", b"customer=c&auto_advance=True", "unpriced_endpoint", "auto_adv"),
        ("POST", "/v1/invoiceitems", b"customer=c&invoice=in_1", "unpriced_endpoint", "pending"),
        ("POST", "/v1/invoiceitems", b"customer=c", "unpriced_endpoint", "an amount or a price"),
        ("POST", "/v1/payment_intents/pi_x", b"amount=700", "unpriced_endpoint", "currency"),
        ("POST", "/v1/payment_intents/pi_1", b"currency=gbp", "unpriced_endpoint", "no upper"),
    ],
)
async def test_stripe_endpoint_refusals(
    shipped: PolicySet, method: str, target: str, raw: bytes, code: str, message: str
) -> None:
    r = await refusal_of(shipped, "stripe", method, target, raw)
    assert r.code == code
    assert message in r.message


# -- checkout sessions ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "known", "micros"),
    [
        (items(pd(1500, quantity=2)), {}, 30_000_000),
        (items(pd(1500)), {}, 15_000_000),  # quantity defaults to 1
        (items(pd(1500, quantity=2), pd(250, quantity=4)), {}, 40_000_000),
        (items(pd(1000, "jpy", quantity=3)), {}, 22_500_000),  # 3,000 yen x 0.0075
        (items(pd(1000, "kwd")), {}, 3_400_000),  # 1.000 KWD x 3.40
        (items(pd(1000, "eur"), pd(100)), {}, 13_000_000),  # mixed currencies each converted
        (
            items(
                {
                    "price_data.currency": "usd",
                    "price_data.unit_amount_decimal": "1.5",
                    "quantity": 3,
                }
            ),
            {},
            50_000,  # 4.5 cents rounds up to 5
        ),
        (items({"price": "price_1", "quantity": 2}), {"price_1": 12_000_000}, 24_000_000),
        (items({"price": "price_1"}, pd(100)), {"price_1": 5}, 1_000_005),
        # adjustable quantities: the customer may buy up to the maximum (default 99)
        (items(pd(100, **{"adjustable_quantity.enabled": "true"})), {}, 99_000_000),
        (
            items(
                pd(
                    100,
                    quantity=2,
                    **{"adjustable_quantity.enabled": "true", "adjustable_quantity.maximum": 5},
                )
            ),
            {},
            5_000_000,
        ),
        (items(pd(100, quantity=2, **{"adjustable_quantity.enabled": "false"})), {}, 2_000_000),
        (form(currency="usd"), {}, 0),
        (items(pd(100, quantity=0)), {}, 0),
        (items(pd(0, quantity=5)), {}, 0),
    ],
)
async def test_checkout_session_sums_line_items(
    shipped: PolicySet, raw: bytes, known: dict[str, int], micros: int
) -> None:
    e = await price_call(shipped, "stripe", *CHECKOUT, raw + b"&mode=payment", known=known)
    assert e.micros == micros
    assert e.basis == "function:stripe_checkout_session"


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (items({"price": "price_unknown"}), "unpriced_endpoint", "has not seen"),
        (items({"quantity": 2}), "unpriced_endpoint", "neither price_data nor a price"),
        (items({"price_data.currency": "usd", "quantity": 2}), "unpriced_endpoint", "unit_amount"),
        (items({"price_data.unit_amount": 5}), "unknown_currency", "currency is missing"),
        (items(pd(5, "xyz")), "unknown_currency", "xyz"),
        (items(pd(5, "thb")), "unknown_currency", "thb"),
        (items(pd(5, quantity="1.5")), "invalid_request", "quantity"),
        (items(pd(5, quantity="-1")), "invalid_request", "quantity"),
        (items(pd("5x")), "invalid_request", "unit_amount"),
        (
            items({"price_data.currency": "usd", "price_data.unit_amount_decimal": "NaN"}),
            "invalid_request",
            "unit_amount_decimal",
        ),
        (
            items({"price_data.currency": "usd", "price_data.unit_amount_decimal": "x"}),
            "invalid_request",
            "unit_amount_decimal",
        ),
        (items(pd(5, quantity=10**12)), "invalid_request", "absurdly"),
        (
            items(pd(100)) + b"&line_items[0][quantity]=1&line_items[0][quantity]=50",
            "ambiguous_amount",
            "quantity",
        ),
        (
            items(pd(100)) + b"&line_items[0][price_data][unit_amount]=9999",
            "ambiguous_amount",
            "unit_amount",
        ),
        (b"line_items=x", "invalid_request", "must be an object"),
    ],
)
async def test_checkout_session_refusals(
    shipped: PolicySet, raw: bytes, code: str, message: str
) -> None:
    r = await refusal_of(shipped, "stripe", *CHECKOUT, raw + b"&mode=payment")
    assert r.code == code
    assert message in r.message


def shipping(i: int, amount: object, currency: str = "usd", **more: object) -> bytes:
    fields = {"amount": amount, "currency": currency, **more}
    return form(
        **{
            f"shipping_options[{i}][shipping_rate_data][fixed_amount][{k}]": v
            for k, v in fields.items()
        }
    )


@pytest.mark.parametrize(
    ("extra", "micros"),
    [
        # the customer picks a shipping option on Stripe's page: the dearest one counts
        (shipping(0, 500), 15_000_000),
        (shipping(0, 500) + b"&" + shipping(1, 2500), 35_000_000),
        (shipping(0, 1000, "eur"), 22_000_000),
        # in any of the option's currencies
        (
            shipping(0, 500, **{"currency_options][gbp][amount": 1000}),
            24_000_000,
        ),
    ],
)
async def test_checkout_session_counts_the_dearest_shipping(
    shipped: PolicySet, extra: bytes, micros: int
) -> None:
    raw = items(pd(1000)) + b"&" + extra + b"&mode=payment"
    e = await price_call(shipped, "stripe", *CHECKOUT, raw)
    assert e.micros == micros


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (b"&mode=payment&automatic_tax[enabled]=true", "automatic tax"),
        (b"&mode=payment&line_items[0][tax_rates][0]=txr_1", "tax rates"),
        (b"&mode=payment&line_items[0][dynamic_tax_rates][0]=txr_1", "tax rates"),
        (b"&mode=payment&shipping_options[0][shipping_rate]=shr_1", "shipping_rate"),
        (b"&mode=subscription", "subscription"),
    ],
)
async def test_unbounded_checkout_sessions_are_refused(
    shipped: PolicySet, extra: bytes, message: str
) -> None:
    r = await refusal_of(shipped, "stripe", *CHECKOUT, items(pd(1000)) + extra)
    assert r.code == "unpriced_endpoint"
    assert message in r.message


async def test_checkout_session_in_setup_mode_costs_nothing(shipped: PolicySet) -> None:
    e = await price_call(shipped, "stripe", *CHECKOUT, form(mode="setup", currency="usd"))
    assert e.micros == 0


# -- subscriptions --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "known", "micros"),
    [
        (
            items(pd(2000, **{"price_data.recurring.interval": "month"}), field="items"),
            {},
            20_000_000,
        ),
        (items(pd(2000, quantity=3), field="items"), {}, 60_000_000),
        (
            items({"price": "price_m", "quantity": 2}, field="items"),
            {"price_m": 900_000},
            1_800_000,
        ),
        (items({"plan": "plan_m"}, field="items"), {"plan_m": 900_000}, 900_000),
        (
            items(pd(2000), field="items") + b"&" + items(pd(500), field="add_invoice_items"),
            {},
            25_000_000,
        ),
        (
            items(pd(2000), field="items")
            + b"&"
            + items({"price": "price_setup"}, field="add_invoice_items"),
            {"price_setup": 7},
            20_000_007,
        ),
        # A trial is still estimated at the first paid invoice: conservative.
        (items(pd(2000), field="items") + b"&trial_period_days=7", {}, 20_000_000),
    ],
)
async def test_subscription_first_invoice(
    shipped: PolicySet, raw: bytes, known: dict[str, int], micros: int
) -> None:
    e = await price_call(
        shipped,
        "stripe",
        *SUBSCRIPTION,
        raw + b"&customer=cus_1&cancel_at_period_end=true",
        known=known,
    )
    assert e.micros == micros


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (items({"price": "price_unknown"}, field="items"), "has not seen"),
        (items({"plan": "plan_unknown"}, field="items"), "has not seen"),
        (items({"quantity": 1}, field="items"), "neither price_data nor a price/plan"),
        (
            items(pd(100), field="items") + b"&" + items({"price": "p"}, field="add_invoice_items"),
            "has not seen",
        ),
    ],
)
async def test_subscription_refusals(shipped: PolicySet, raw: bytes, message: str) -> None:
    r = await refusal_of(
        shipped, "stripe", *SUBSCRIPTION, raw + b"&customer=cus_1&cancel_at_period_end=true"
    )
    assert r.code == "unpriced_endpoint"
    assert message in r.message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # Stripe charges every renewal by itself, out of the proxy's sight: no upper bound.
        (b"", "cancel_at_period_end=true"),
        (b"&cancel_at_period_end=false", "cancel_at_period_end=true"),
        (b"&cancel_at_period_end=true&backdate_start_date=1600000000", "backdate"),
        (b"&cancel_at_period_end=true&automatic_tax[enabled]=true", "automatic tax"),
        (b"&cancel_at_period_end=true&default_tax_rates[0]=txr_1", "default_tax_rates"),
        (b"&cancel_at_period_end=true&items[0][tax_rates][0]=txr_1", "tax rates"),
    ],
)
async def test_unbounded_subscriptions_are_refused(
    shipped: PolicySet, extra: bytes, message: str
) -> None:
    raw = items(pd(100), field="items") + b"&customer=cus_1" + extra
    r = await refusal_of(shipped, "stripe", *SUBSCRIPTION, raw)
    assert r.code == "unpriced_endpoint"
    assert message in r.message


# -- the shipped policy itself --------------------------------------------------------------------
def test_every_money_endpoint_has_an_actual_rule(shipped: PolicySet) -> None:
    """Money-moving endpoints settle at what Stripe reports, not at the estimate."""
    stripe = shipped.vendors["stripe"]
    actual = {ep.match for ep in stripe.endpoints if ep.actual is not None}
    assert {
        "POST /v1/payment_intents",
        "POST /v1/payment_intents/{id}/confirm",
        "POST /v1/payment_intents/{id}/capture",
        "POST /v1/payment_intents/{id}/increment_authorization",
        "POST /v1/charges",
        "POST /v1/charges/{id}/capture",
        "POST /v1/refunds",
        "POST /v1/transfers",
        "POST /v1/payouts",
        "POST /v1/topups",
        "POST /v1/invoices/{id}/pay",
        "POST /v1/checkout/sessions",
        "GET /v1/checkout/sessions/{id}",
        "POST /v1/subscriptions",
        "GET /v1/subscriptions/{id}",
        "GET /v1/payment_intents/{id}",
    } == actual
    # What can charge later, out of the proxy's sight, is held (and the calls that act on it
    # use the hold): intents, Checkout sessions, subscriptions, pending invoice items.
    held = {ep.match for ep in stripe.endpoints if ep.hold is not None}
    assert {
        "POST /v1/payment_intents",
        "POST /v1/payment_intents/{id}",
        "POST /v1/payment_intents/{id}/confirm",
        "POST /v1/payment_intents/{id}/capture",
        "POST /v1/checkout/sessions",
        "POST /v1/subscriptions",
        "POST /v1/invoiceitems",
    } <= held
    remembered = {ep.match: ep.remember_amount for ep in stripe.endpoints if ep.remember_amount}
    assert remembered["GET /v1/invoices/{id}"] == "amount_due"
    assert remembered["POST /v1/invoices"] == "amount_due"
    assert remembered["GET /v1/prices/{id}"] == "unit_amount"
    assert remembered["POST /v1/payment_intents/{id}/increment_authorization"] == "amount"


async def test_a_confirm_with_an_amount_is_refused(shipped: PolicySet) -> None:
    """Confirm takes no amount: one in the body would not be the price, so it is refused."""
    r = await refusal_of(
        shipped,
        "stripe",
        "POST",
        "/v1/payment_intents/pi_1/confirm",
        b"amount=1&currency=usd",
        known={"pi_1": 20_000_000},
    )
    assert r.code == "unpriced_parameter" and r.message.startswith("amount is a parameter")
