"""Pricing is a closed world, and stays closed as the vendors' SDKs grow.

Every request parameter the official SDKs can send to a state-changing endpoint of the
shipped policies is classified: listed under ``params`` (priced, or known not to change the
cost) or under ``refused`` (with the reason the refusal gives). A new SDK release that adds a
parameter fails this test until someone decides which it is. Nested parameters are
classified by their top-level name here; the policy's patterns decide the nested ones.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
from tests.vendors.conftest import price_call

from keybrake.core.errors import Refusal
from keybrake.core.policy import EndpointPolicy, PolicySet

# RequestOptions the stripe SDK mixes into every params TypedDict: never sent as parameters.
REQUEST_OPTIONS = {
    "api_key",
    "stripe_version",
    "stripe_account",
    "stripe_context",
    "max_network_retries",
    "idempotency_key",
    "content_type",
    "headers",
}
STRIPE_PARAMS = {
    "POST /v1/payment_intents": "_payment_intent_create_params.PaymentIntentCreateParams",
    "POST /v1/payment_intents/{id}": ("_payment_intent_update_params.PaymentIntentUpdateParams"),
    "POST /v1/payment_intents/{id}/confirm": (
        "_payment_intent_confirm_params.PaymentIntentConfirmParams"
    ),
    "POST /v1/payment_intents/{id}/capture": (
        "_payment_intent_capture_params.PaymentIntentCaptureParams"
    ),
    "POST /v1/payment_intents/{id}/increment_authorization": (
        "_payment_intent_increment_authorization_params.PaymentIntentIncrementAuthorizationParams"
    ),
    "POST /v1/payment_intents/{id}/cancel": (
        "_payment_intent_cancel_params.PaymentIntentCancelParams"
    ),
    "POST /v1/charges": "_charge_create_params.ChargeCreateParams",
    "POST /v1/charges/{id}/capture": "_charge_capture_params.ChargeCaptureParams",
    "POST /v1/refunds": "_refund_create_params.RefundCreateParams",
    "POST /v1/transfers": "_transfer_create_params.TransferCreateParams",
    "POST /v1/payouts": "_payout_create_params.PayoutCreateParams",
    "POST /v1/topups": "_topup_create_params.TopupCreateParams",
    "POST /v1/customers": "_customer_create_params.CustomerCreateParams",
    "POST /v1/invoiceitems": "_invoice_item_create_params.InvoiceItemCreateParams",
    "POST /v1/invoices": "_invoice_create_params.InvoiceCreateParams",
    "POST /v1/invoices/{id}/pay": "_invoice_pay_params.InvoicePayParams",
    "POST /v1/products": "_product_create_params.ProductCreateParams",
    "POST /v1/prices": "_price_create_params.PriceCreateParams",
    "POST /v1/checkout/sessions": "checkout._session_create_params.SessionCreateParams",
    "POST /v1/checkout/sessions/{id}/expire": "checkout._session_expire_params.SessionExpireParams",
    "POST /v1/subscriptions": "_subscription_create_params.SubscriptionCreateParams",
    "DELETE /v1/subscriptions/{id}": "_subscription_cancel_params.SubscriptionCancelParams",
}


def sdk_params(dotted: str) -> set[str]:
    module, _, cls = dotted.rpartition(".")
    params = getattr(importlib.import_module(f"stripe.params.{module}"), cls)
    names = set()
    for klass in params.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    return names - REQUEST_OPTIONS


def endpoint(policies: PolicySet, vendor: str, match: str) -> EndpointPolicy:
    return next(ep for ep in policies.vendors[vendor].endpoints if ep.match == match)


def classified(ep: EndpointPolicy) -> set[str]:
    assert ep.params is not None, f"{ep.match} declares no params"
    return {p.split(".")[0] for p in ep.params} | set(ep.refused)


@pytest.mark.parametrize("match", sorted(STRIPE_PARAMS))
def test_every_stripe_sdk_parameter_is_classified(shipped: PolicySet, match: str) -> None:
    unclassified = sdk_params(STRIPE_PARAMS[match]) - classified(endpoint(shipped, "stripe", match))
    assert not unclassified, f"{match}: classify {sorted(unclassified)} in policies/stripe.yaml"


def test_every_state_changing_stripe_endpoint_is_checked_here(shipped: PolicySet) -> None:
    changing = {
        ep.match for ep in shipped.vendors["stripe"].endpoints if ep.pattern.method != "GET"
    }
    assert changing - {"DELETE /v1/invoiceitems/{id}"} == set(STRIPE_PARAMS)


def test_every_twilio_sdk_parameter_is_classified(shipped: PolicySet) -> None:
    from twilio.rest.api.v2010.account.message import MessageList

    sent = set(re.findall(r'"([A-Z][A-Za-z]+)": ', inspect.getsource(MessageList._create)))
    ep = endpoint(shipped, "twilio", "POST /2010-04-01/Accounts/{AccountSid}/Messages.json")
    assert sent and not sent - classified(ep)


@pytest.mark.parametrize(
    ("target", "raw", "named"),
    [
        ("/v1/payment_intents", b"amount=100&currency=usd&brand_new_param=1", "brand_new_param"),
        (
            "/v1/payment_intents",
            b"amount=100&currency=usd&hooks[inputs][tax][calculation]=x",
            "hooks",
        ),
        (
            "/v1/payment_intents",
            b"amount=100&currency=usd&amount_details[tip][amount]=900",
            "amount_details",
        ),
        ("/v1/customers", b"email=a%40x.io&balance=50000", "balance"),
        ("/v1/refunds", b"charge=ch_1&refund_application_fee=true", "refund_application_fee"),
        ("/v1/payouts", b"amount=100&currency=usd&method=instant", "method"),
        (
            "/v1/subscriptions",
            b"customer=c&pending_invoice_item_interval[interval]=day",
            "pending_invoice_item_interval",
        ),
        (
            "/v1/checkout/sessions",
            b"mode=payment&optional_items[0][price]=price_1",
            "optional_items",
        ),
    ],
)
async def test_unlisted_or_refused_parameters_are_named_in_the_refusal(
    shipped: PolicySet, target: str, raw: bytes, named: str
) -> None:
    policy = shipped.vendors["stripe"]
    for ep in policy.endpoints:
        if ep.pattern.match("POST", tuple(target.strip("/").split("/"))) is not None:
            break
    from keybrake.pricing import Body, check_parameters, parse_body

    body: Body = parse_body(("form",), ["application/x-www-form-urlencoded"], raw)
    with pytest.raises(Refusal) as e:
        check_parameters(ep, body)
    assert e.value.code == "unpriced_parameter"
    assert e.value.message.startswith(named)


async def test_the_parameters_an_sdk_sends_for_a_plain_charge_pass(shipped: PolicySet) -> None:
    raw = (
        b"amount=2000&currency=usd&confirm=true&payment_method=pm_card_visa"
        b"&metadata[order_id]=7&expand[0]=latest_charge&payment_method_options[card][request_three_d_secure]=any"
    )
    e = await price_call(shipped, "stripe", "POST", "/v1/payment_intents", raw)
    assert e.micros == 20_000_000


AI_PARAMS = {
    ("openai", "POST /v1/chat/completions"): (
        "openai.types.chat.completion_create_params.CompletionCreateParamsBase"
    ),
    ("openai", "POST /v1/responses"): (
        "openai.types.responses.response_create_params.ResponseCreateParamsBase"
    ),
    ("openai", "POST /v1/embeddings"): "openai.types.embedding_create_params.EmbeddingCreateParams",
    ("anthropic", "POST /v1/messages"): (
        "anthropic.types.message_create_params.MessageCreateParamsBase"
    ),
}


def typed_dict_keys(dotted: str) -> set[str]:
    module, _, cls = dotted.rpartition(".")
    params = getattr(importlib.import_module(module), cls)
    names: set[str] = set()
    for klass in params.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    return names


@pytest.mark.parametrize(("vendor", "match"), sorted(AI_PARAMS))
def test_every_ai_sdk_parameter_is_classified(shipped: PolicySet, vendor: str, match: str) -> None:
    # `stream` lives in the SDKs' streaming/non-streaming subclasses of these bases.
    sent = typed_dict_keys(AI_PARAMS[(vendor, match)]) | (
        {"stream"} if "embeddings" not in match else set()
    )
    unclassified = sent - classified(endpoint(shipped, vendor, match))
    assert not unclassified, f"{match}: classify {sorted(unclassified)} in policies/{vendor}.yaml"


def test_every_state_changing_ai_endpoint_is_checked_here(shipped: PolicySet) -> None:
    changing = {
        (vendor, ep.match)
        for vendor in ("openai", "anthropic")
        for ep in shipped.vendors[vendor].endpoints
        if ep.pattern.method != "GET"
    }
    assert changing == set(AI_PARAMS)
