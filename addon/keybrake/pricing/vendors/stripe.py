"""Stripe cost functions for calls whose price is a sum over line items, or nothing at all.

Named from ``policies/stripe.yaml``:

- ``stripe_checkout_session`` (``POST /v1/checkout/sessions``): Σ ``unit_amount * quantity``
  over ``line_items``. An item with ``adjustable_quantity[enabled]=true`` is counted at its
  ``maximum`` (Stripe's default 99): the customer picks the quantity later.
- ``stripe_subscription`` (``POST /v1/subscriptions``): the first invoice, Σ over ``items``
  and ``add_invoice_items``.
- ``stripe_invoice`` (``POST /v1/invoices``) and ``stripe_invoice_item``
  (``POST /v1/invoiceitems``) cost nothing, but refuse what would let money move out of the
  proxy's sight: an invoice created with ``auto_advance=true`` (Stripe finalizes and charges it
  by itself about an hour later) and an item added straight to an existing invoice (the amount
  the proxy remembered for that invoice would be stale when it is paid).

A line item is priced from ``price_data`` (``unit_amount`` or ``unit_amount_decimal``, in
the ``currency`` minor unit, converted with the policy's FX table) or from a ``price`` id
(``plan`` for subscriptions) whose ``unit_amount`` the proxy remembered from an earlier
``POST /v1/prices`` or ``GET /v1/prices/{id}`` (the largest of its ``currency_options``);
anything else is refused.

Every estimate is the most the call can make Stripe charge, now or later out of the proxy's
sight: discounts are ignored, the dearest shipping option counts, and what cannot be bounded
is refused (automatic tax and tax rates added on top, Checkout in subscription mode, a
subscription that renews without end, a backdated one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from keybrake.core.errors import Refusal
from keybrake.core.money import MoneyError, UnknownCurrency, minor_to_micro_usd
from keybrake.core.policy import FunctionCost, VendorPolicy
from keybrake.pricing.model import Body, Registry, StoreLookup

__all__ = [
    "checkout_session_cost",
    "invoice_cost",
    "invoice_item_cost",
    "line_items_cost",
    "payment_intent_update_cost",
    "subscription_cost",
]

ADJUSTABLE_QUANTITY_MAX: Final = 99
"""Stripe's default ``adjustable_quantity[maximum]`` for Checkout line items."""
_MAX_QUANTITY: Final = 10**9


def _integer(value: Any, where: str) -> int:
    """A non-negative integer sent as form text (``"2"``) or JSON (``2``)."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        number = int(value)
    else:
        raise ValueError(f"{where} must be a plain non-negative integer")
    if number < 0:
        raise ValueError(f"{where} must not be negative")
    return number


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _quantity(item: Mapping[str, Any], where: str, *, adjustable: bool) -> int:
    raw = item.get("quantity")
    quantity = 1 if raw in (None, "") else _integer(raw, f"{where}.quantity")
    adjust = item.get("adjustable_quantity")
    if adjustable and isinstance(adjust, Mapping) and _is_true(adjust.get("enabled")):
        raw_max = adjust.get("maximum")
        maximum = (
            ADJUSTABLE_QUANTITY_MAX
            if raw_max in (None, "")
            else _integer(raw_max, f"{where}.adjustable_quantity.maximum")
        )
        quantity = max(quantity, maximum)
    if quantity > _MAX_QUANTITY:
        raise ValueError(f"{where}.quantity is absurdly large")
    return quantity


def _unit_amount_minor(data: Mapping[str, Any], where: str) -> Decimal:
    """``price_data[unit_amount]``, or ``unit_amount_decimal`` (fractions of a minor unit)."""
    if data.get("unit_amount") not in (None, ""):
        return Decimal(_integer(data["unit_amount"], f"{where}.unit_amount"))
    raw = data.get("unit_amount_decimal")
    if raw in (None, "") or isinstance(raw, bool | float):
        raise Refusal(
            "unpriced_endpoint",
            f"{where} has neither unit_amount nor unit_amount_decimal: it cannot be priced",
        )
    try:
        amount = Decimal(str(raw))
    except InvalidOperation:
        raise ValueError(f"{where}.unit_amount_decimal must be a decimal number") from None
    if not amount.is_finite() or amount < 0 or amount.adjusted() > 18:
        raise ValueError(f"{where}.unit_amount_decimal must be a non-negative decimal")
    return amount


def _price_data_micros(
    data: Mapping[str, Any], quantity: int, where: str, policy: VendorPolicy
) -> int:
    currency = data.get("currency")
    if not isinstance(currency, str) or not currency:
        raise Refusal("unknown_currency", f"{where}.currency is missing")
    minor = math.ceil(_unit_amount_minor(data, where) * quantity)
    try:
        return minor_to_micro_usd(minor, currency.lower(), policy.fx_to_usd)
    except UnknownCurrency:
        raise Refusal(
            "unknown_currency",
            f"currency {currency!r} has no USD rate in the {policy.vendor} policy",
        ) from None
    except MoneyError as e:
        raise ValueError(f"{where}: {e}") from None


async def line_items_cost(
    body: Body,
    field: str,
    policy: VendorPolicy,
    recall: StoreLookup,
    *,
    price_keys: tuple[str, ...] = ("price",),
    adjustable: bool = False,
) -> int:
    """Micro-USD of Σ ``unit_amount * quantity`` over the items of list field ``field``."""
    total = 0
    for i, item in enumerate(body.get_list(field)):
        where = f"{field}.{i}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be an object of price fields")
        quantity = _quantity(item, where, adjustable=adjustable)
        data = item.get("price_data")
        if isinstance(data, Mapping):
            total += _price_data_micros(data, quantity, f"{where}.price_data", policy)
            continue
        price_id = next(
            (item[k] for k in price_keys if isinstance(item.get(k), str) and item[k]), None
        )
        if price_id is None:
            raise Refusal(
                "unpriced_endpoint",
                f"{where} names neither price_data nor a {'/'.join(price_keys)}",
            )
        unit = await recall(price_id)
        if unit is None:
            raise Refusal(
                "unpriced_endpoint",
                f"{where} uses price {price_id[:64]!r}, whose unit_amount the proxy has not "
                "seen: create or retrieve the price through the proxy first, or use price_data",
            )
        total += unit * quantity
    return total


def _unbounded(what: str, how: str) -> Refusal:
    return Refusal("unpriced_endpoint", f"{what} has no upper bound the proxy can price: {how}")


def _refuse_added_tax(body: Body, field: str) -> None:
    """Tax computed by Stripe on top of the prices has no bound in the request."""
    automatic = body.get_node("automatic_tax")
    if isinstance(automatic, Mapping) and _is_true(automatic.get("enabled")):
        raise _unbounded(
            "automatic tax", "Stripe adds it on top of the prices; use tax-inclusive prices"
        )
    for i, item in enumerate(body.get_list(field)):
        if isinstance(item, Mapping) and (item.get("tax_rates") or item.get("dynamic_tax_rates")):
            raise _unbounded(f"{field}.{i} tax rates", "use tax-inclusive prices")
    if body.get_node("default_tax_rates"):
        raise _unbounded("default_tax_rates", "use tax-inclusive prices")


def _amount_micros(amount: Any, currency: Any, where: str, policy: VendorPolicy) -> int:
    if not isinstance(currency, str) or not currency:
        raise Refusal("unknown_currency", f"{where}.currency is missing")
    try:
        return minor_to_micro_usd(
            _integer(amount, f"{where}.amount"), currency.lower(), policy.fx_to_usd
        )
    except UnknownCurrency:
        raise Refusal(
            "unknown_currency",
            f"currency {currency!r} has no USD rate in the {policy.vendor} policy",
        ) from None
    except MoneyError as e:
        raise ValueError(f"{where}: {e}") from None


def _shipping_cost(body: Body, policy: VendorPolicy) -> int:
    """The dearest shipping option (the customer picks one on Stripe's page), in any of its
    currencies; a shipping rate given by id is refused (its amount is not in the request)."""
    dearest = 0
    for i, option in enumerate(body.get_list("shipping_options")):
        where = f"shipping_options.{i}"
        if not isinstance(option, Mapping):
            raise ValueError(f"{where} must be an object")
        data = option.get("shipping_rate_data")
        if not isinstance(data, Mapping):
            raise _unbounded(f"{where}.shipping_rate", "give shipping_rate_data[fixed_amount]")
        fixed = data.get("fixed_amount")
        if not isinstance(fixed, Mapping):
            raise _unbounded(f"{where}.shipping_rate_data", "give a fixed_amount")
        if data.get("tax_behavior") == "exclusive":
            raise _unbounded(f"{where} exclusive tax", "use inclusive or unspecified")
        where = f"{where}.shipping_rate_data.fixed_amount"
        amounts = [_amount_micros(fixed.get("amount"), fixed.get("currency"), where, policy)]
        options = fixed.get("currency_options")
        if isinstance(options, Mapping):
            for code, opt in options.items():
                if isinstance(opt, Mapping):
                    amounts.append(
                        _amount_micros(opt.get("amount"), code, f"{where}.{code}", policy)
                    )
        dearest = max(dearest, *amounts)
    return dearest


async def checkout_session_cost(
    body: Body,
    params: Mapping[str, str],
    rule: FunctionCost,
    policy: VendorPolicy,
    recall: StoreLookup,
) -> int:
    """``POST /v1/checkout/sessions``: the most the session can collect (module doc)."""
    mode = body.get_node("mode") or "payment"
    if mode == "setup":
        return 0
    if mode != "payment":
        raise _unbounded(
            f"a Checkout session in {str(mode)[:20]!r} mode",
            "the subscription it starts renews out of the proxy's sight; use mode=payment",
        )
    _refuse_added_tax(body, "line_items")
    items = await line_items_cost(body, "line_items", policy, recall, adjustable=True)
    return items + _shipping_cost(body, policy)


async def subscription_cost(
    body: Body,
    params: Mapping[str, str],
    rule: FunctionCost,
    policy: VendorPolicy,
    recall: StoreLookup,
) -> int:
    """``POST /v1/subscriptions``: its first period (recurring items + one-off items).

    Only a subscription that ends after that period is bounded (``cancel_at_period_end``:
    after a trial, it ends without charging); every later renewal would be charged by Stripe
    out of the proxy's sight. A backdated start bills the periods already past at once.
    """
    if not _is_true(body.get("cancel_at_period_end")):
        raise _unbounded(
            "a subscription that renews",
            "Stripe charges every renewal out of the proxy's sight; create it with "
            "cancel_at_period_end=true",
        )
    if body.get("backdate_start_date") not in (None, ""):
        raise _unbounded("backdate_start_date", "it bills every period since that date at once")
    _refuse_added_tax(body, "items")
    recurring = await line_items_cost(body, "items", policy, recall, price_keys=("price", "plan"))
    one_off = await line_items_cost(body, "add_invoice_items", policy, recall)
    return recurring + one_off


async def payment_intent_update_cost(
    body: Body,
    params: Mapping[str, str],
    rule: FunctionCost,
    policy: VendorPolicy,
    recall: StoreLookup,
) -> int:
    """``POST /v1/payment_intents/{id}``: what the intent can charge after the update.

    No amount: the update changes nothing a confirm would charge (0). An amount with its
    currency is priced as it is; an amount alone is in the intent's own currency, so the
    intent must be known and the dearest currency of the policy bounds it. A new currency
    without an amount changes what the old amount is worth: refused.
    """
    amount, currency = body.get_int("amount"), body.get("currency")
    if amount is None:
        if currency not in (None, ""):
            raise _unbounded("a new currency without an amount", "send the amount with it")
        return 0
    if currency not in (None, ""):
        return _amount_micros(amount, currency, "payment_intent", policy)
    known = await recall(params.get("id", ""))
    if known is None:
        raise Refusal(
            "unpriced_endpoint",
            "an amount without currency needs the intent's currency: create or retrieve the "
            "intent through the proxy first, or send currency",
        )
    return max(
        known, *(minor_to_micro_usd(amount, code, policy.fx_to_usd) for code in policy.fx_to_usd)
    )


def invoice_cost(
    body: Body, params: Mapping[str, str], rule: FunctionCost, policy: VendorPolicy
) -> int:
    """``POST /v1/invoices``: free, unless Stripe would collect it by itself later."""
    if _is_true(body.get("auto_advance")):
        raise Refusal(
            "unpriced_endpoint",
            "an invoice with auto_advance=true is finalized and charged by Stripe later, out "
            "of the proxy's sight: create it with auto_advance=false and pay it through the "
            "proxy (POST /v1/invoices/{id}/pay)",
        )
    return 0


async def invoice_item_cost(
    body: Body,
    params: Mapping[str, str],
    rule: FunctionCost,
    policy: VendorPolicy,
    recall: StoreLookup,
) -> int:
    """``POST /v1/invoiceitems``: the item's amount. A pending item is swept into the
    customer's next invoice, which Stripe may collect out of the proxy's sight (a renewal):
    it is held until an invoice paid through the proxy includes it, or it is deleted. Added
    straight to an existing invoice it is refused (the amount the proxy remembered for that
    invoice would be stale when it is paid)."""
    if body.get("invoice") not in (None, ""):
        raise Refusal(
            "unpriced_endpoint",
            "adding an item to an existing invoice would change its amount after the proxy "
            "priced it: create pending items, then the invoice with "
            "pending_invoice_items_behavior=include",
        )
    if body.get("amount") not in (None, ""):
        return _amount_micros(body.get("amount"), body.get("currency"), "invoice item", policy)
    pricing = body.get_node("pricing")
    price_id = body.get_node("price") or (
        pricing.get("price") if isinstance(pricing, Mapping) else None
    )
    item: dict[str, Any] = {"quantity": body.get_node("quantity")}
    if isinstance(body.get_node("price_data"), Mapping):
        item["price_data"] = body.get_node("price_data")
    elif isinstance(price_id, str) and price_id:
        item["price"] = price_id
    elif body.get("unit_amount") not in (None, "") or body.get("unit_amount_decimal"):
        item["price_data"] = {
            "currency": body.get("currency"),
            "unit_amount": body.get("unit_amount"),
            "unit_amount_decimal": body.get("unit_amount_decimal"),
        }
    else:
        raise Refusal("unpriced_endpoint", "an invoice item needs an amount or a price")
    return await line_items_cost(Body("json", {"items": [item]}), "items", policy, recall)


def register(registry: Registry) -> None:
    """Put this module's pricing code into ``registry`` under the names policy YAML uses."""
    registry.async_cost_functions["stripe_checkout_session"] = checkout_session_cost
    registry.async_cost_functions["stripe_subscription"] = subscription_cost
    registry.async_cost_functions["stripe_payment_intent_update"] = payment_intent_update_cost
    registry.async_cost_functions["stripe_invoice_item"] = invoice_item_cost
    registry.cost_functions["stripe_invoice"] = invoice_cost
