"""Cost estimation before forwarding, and the actual cost read from the vendor's answer.

Declarative rules come from the vendor YAML (`keybrake.policy`); counters and cost functions
that YAML can name are registered here (`keybrake.vendors` fills them on import). Every doubt
refuses (`Refusal`), never guesses: an unknown currency, an ambiguous amount field, an
amount-less call on an unknown object, a destination with no price.

Rule kinds: ``fixed_usd`` (a price per call); ``amount_field`` (the body's minor-unit amount
and currency, else the remembered amount of the object it acts on); ``known_object`` (only the
remembered amount); ``per_unit`` (units from a named counter x a price, optionally by
calling-code prefix of a destination field, with a minimum when a field is present);
``function`` (a named Python function, sync or with access to remembered amounts).

The actual cost of a 2xx answer comes from its ``actual`` rule: a minor-unit ``amount`` (with
``charged_when`` conditions) or a decimal ``price``; when the answer does not say, the
estimate stands and the note says why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from keybrake._forms import AmbiguousField, FormError, parse_json_body, parse_stripe_form
from keybrake._money import (
    BadAmount,
    MoneyError,
    UnknownCurrency,
    decimal_to_micro_usd,
    minor_to_micro_usd,
)
from keybrake._sms import calling_code_price
from keybrake.errors import Refusal
from keybrake.policy import (
    ActualRule,
    AmountFieldCost,
    EndpointPolicy,
    FixedCost,
    FunctionCost,
    KnownObjectCost,
    PerUnitCost,
    VendorPolicy,
)

__all__ = [
    "ASYNC_COST_FUNCTIONS",
    "COST_FUNCTIONS",
    "COUNTERS",
    "Actual",
    "Body",
    "Estimate",
    "actual_cost",
    "estimate_cost",
    "parse_body",
]


class Body:
    """Read-only access to a request body by dotted path, for form and JSON bodies alike."""

    def __init__(self, kind: str, data: Any) -> None:
        self.kind = kind
        self._data = data

    @property
    def root(self) -> Any:
        """The whole parsed body: a JSON value, or the `FormTree` of a form body."""
        return self._data

    def get(self, path: str) -> Any:
        """The value at ``path`` (``line_items.0.price_data.unit_amount``) or None."""
        if self.kind == "form":
            return self._data.get(path)
        node = self._data
        for part in path.split("."):
            if isinstance(node, dict):
                node = node.get(part)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def get_int(self, path: str) -> int | None:
        """A non-negative integer field; anything else refuses rather than guessing."""
        if self.kind == "form":
            value = self._data.get_int(path)
            return int(value) if value is not None else None
        v = self.get(path)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | str | Decimal):
            raise ValueError(f"{path} must be an integer")
        if isinstance(v, Decimal):
            if v != v.to_integral_value():
                raise ValueError(f"{path} must be an integer")
            v = int(v)
        if isinstance(v, str):
            if not v.isdigit() or len(v) > 18:
                raise ValueError(f"{path} must be an integer")
            v = int(v)
        number = int(v)
        if number < 0:
            raise ValueError(f"{path} must not be negative")
        return number

    def get_list(self, path: str) -> list[Any]:
        """The list at ``path`` (a lone value is a one-item list), or []."""
        if self.kind == "form":
            return list(self._data.get_list(path))
        v = self.get(path)
        if v is None:
            return []
        if isinstance(v, list):
            return v
        if isinstance(v, dict) and all(k.isdigit() for k in v):
            return [v[k] for k in sorted(v, key=int)]
        return [v]


def parse_body(policy: VendorPolicy, content_type: str, raw: bytes) -> Body:
    """Parse a request body the way the vendor would; malformed bodies refuse."""
    try:
        if "json" in content_type or (policy.body == "json" and "form" not in content_type):
            return Body("json", parse_json_body(raw) if raw.strip() else {})
        return Body("form", parse_stripe_form(raw))
    except AmbiguousField as e:
        raise Refusal("ambiguous_amount", f"request body is ambiguous: {e}") from None
    except (FormError, ValueError) as e:
        raise Refusal("invalid_request", f"request body cannot be parsed: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    """What a call may cost, in micro-USD, plus the vendor-side amount it came from."""

    micros: int
    amount_minor: int | None = None
    currency: str | None = None
    basis: str = "rule"


@dataclasses.dataclass(frozen=True, slots=True)
class Actual:
    """What the vendor reports it charged; ``micros`` None means keep the estimate."""

    micros: int | None
    amount_minor: int | None = None
    currency: str | None = None
    note: str = ""


StoreLookup = Callable[[str], Awaitable[int | None]]
Counter = Callable[[Body, PerUnitCost], int]
CostFunction = Callable[[Body, Mapping[str, str], FunctionCost, VendorPolicy], int]
AsyncCostFunction = Callable[
    [Body, Mapping[str, str], FunctionCost, VendorPolicy, StoreLookup], Awaitable[int]
]

COUNTERS: dict[str, Counter] = {}
"""Counters for ``per_unit`` rules: how many units (recipients, segments) a call uses."""
COST_FUNCTIONS: dict[str, CostFunction] = {}
"""Cost functions for ``function`` rules: micro-USD from the body and path parameters."""
ASYNC_COST_FUNCTIONS: dict[str, AsyncCostFunction] = {}
"""Cost functions that may also look up amounts the proxy remembered (Stripe price ids)."""


def _minor_to_micros(amount: int, currency: str, policy: VendorPolicy) -> int:
    try:
        return minor_to_micro_usd(amount, currency, policy.fx_to_usd)
    except UnknownCurrency:
        raise Refusal(
            "unknown_currency",
            f"currency {currency!r} has no USD rate in the {policy.vendor} policy",
        ) from None
    except (BadAmount, MoneyError) as e:
        raise Refusal("invalid_request", f"bad amount: {e}") from None


async def estimate_cost(
    policy: VendorPolicy,
    endpoint: EndpointPolicy,
    body: Body,
    params: Mapping[str, str],
    recall: StoreLookup,
) -> Estimate:
    """The estimated cost of a call, or a `Refusal` when it cannot be priced safely."""
    rule = endpoint.cost
    if endpoint.free:
        return Estimate(0, basis="free")
    if rule is None:
        raise Refusal(
            "unpriced_endpoint",
            f"{endpoint.match} has no cost rule in the {policy.vendor} policy",
        )
    try:
        if isinstance(rule, FixedCost):
            return Estimate(rule.usd, basis="fixed")
        if isinstance(rule, AmountFieldCost):
            return await _estimate_amount_field(policy, endpoint, rule, body, params, recall)
        if isinstance(rule, KnownObjectCost):
            return await _estimate_known_object(policy, endpoint, rule, body, params, recall)
        if isinstance(rule, PerUnitCost):
            return _estimate_per_unit(policy, rule, body)
        fn = COST_FUNCTIONS.get(rule.name)
        if fn is not None:
            return Estimate(fn(body, params, rule, policy), basis=f"function:{rule.name}")
        async_fn = ASYNC_COST_FUNCTIONS.get(rule.name)
        if async_fn is None:
            raise Refusal("unpriced_endpoint", f"unknown cost function {rule.name!r}")
        micros = await async_fn(body, params, rule, policy, recall)
        return Estimate(micros, basis=f"function:{rule.name}")
    except AmbiguousField as e:
        raise Refusal("ambiguous_amount", f"ambiguous field in request: {e}") from None
    except ValueError as e:
        if isinstance(e, Refusal):
            raise
        raise Refusal("invalid_request", f"cannot price request: {e}") from None


async def _estimate_amount_field(
    policy: VendorPolicy,
    endpoint: EndpointPolicy,
    rule: AmountFieldCost,
    body: Body,
    params: Mapping[str, str],
    recall: StoreLookup,
) -> Estimate:
    amount = body.get_int(rule.amount)
    currency = body.get(rule.currency) if rule.currency else None
    if currency is None:
        currency = rule.default_currency
    if amount is not None and isinstance(currency, str) and currency:
        currency = currency.lower()
        micros = _minor_to_micros(amount, currency, policy)
        return Estimate(micros, amount, currency, "amount_field")
    # No amount, or an amount without currency (a capture's amount_to_capture): the whole
    # amount of the object the proxy saw earlier is a safe upper bound.
    object_ids = _named_objects(rule.known_object, rule.known_object_fields, body, params)
    found = await _recall_largest(object_ids, recall)
    if found is not None:
        return Estimate(found[1], amount, None, f"known:{found[0]}")
    if amount is None or object_ids or rule.known_object_fields:
        raise Refusal(
            "unpriced_endpoint",
            f"{endpoint.match} without {rule.amount!r} and its currency needs the amount of "
            f"{_describe(object_ids)}, which the proxy has not seen: retrieve it through the "
            "proxy first",
        )
    raise Refusal("unknown_currency", "request names an amount but no currency")


def _named_objects(
    param: str | None, fields: tuple[str, ...], body: Body, params: Mapping[str, str]
) -> list[str]:
    """Ids of the objects a call names: a path placeholder, or body fields."""
    ids: list[str] = []
    if param and params.get(param):
        ids.append(params[param])
    for name in fields:
        value = body.get(name)
        if isinstance(value, str) and value:
            ids.append(value)
    return ids


async def _recall_largest(object_ids: list[str], recall: StoreLookup) -> tuple[str, int] | None:
    """The object with the largest remembered amount, or None when none is remembered."""
    best: tuple[str, int] | None = None
    for object_id in object_ids:
        known = await recall(object_id)
        if known is not None and (best is None or known > best[1]):
            best = (object_id, known)
    return best


def _describe(object_ids: list[str]) -> str:
    return " or ".join(repr(i[:64]) for i in object_ids) if object_ids else "the object it names"


async def _estimate_known_object(
    policy: VendorPolicy,
    endpoint: EndpointPolicy,
    rule: KnownObjectCost,
    body: Body,
    params: Mapping[str, str],
    recall: StoreLookup,
) -> Estimate:
    object_ids = _named_objects(rule.param, rule.fields, body, params)
    if not object_ids:
        raise Refusal(
            "unpriced_endpoint",
            f"{endpoint.match} names none of {', '.join(rule.fields)}: nothing to price it by",
        )
    found = await _recall_largest(object_ids, recall)
    if found is None:
        raise Refusal(
            "unpriced_endpoint",
            f"{endpoint.match} is priced by the amount of {_describe(object_ids)}, which the "
            f"proxy has not seen: create or retrieve it through the proxy first",
        )
    return Estimate(found[1], basis=f"known:{found[0]}")


def _estimate_per_unit(policy: VendorPolicy, rule: PerUnitCost, body: Body) -> Estimate:
    counter = COUNTERS.get(rule.counter)
    if counter is None:
        raise Refusal("unpriced_endpoint", f"unknown counter {rule.counter!r}")
    units = counter(body, rule)
    micros = units * _unit_price(policy, rule, body)
    basis = f"counter:{rule.counter}={units}"
    for name, minimum in rule.min_usd_when_present.items():
        if minimum > micros and any(v not in ("", None) for v in body.get_list(name)):
            micros, basis = minimum, f"minimum:{name}"
    return Estimate(micros, basis=basis)


def _unit_price(policy: VendorPolicy, rule: PerUnitCost, body: Body) -> int:
    """The price of one unit: by destination prefix when the rule has a table."""
    if rule.prefix_field is None:
        return rule.unit_usd
    destination = body.get(rule.prefix_field)
    if not isinstance(destination, str):
        raise ValueError(f"{rule.prefix_field} is missing: the destination sets the price")
    price = calling_code_price(destination, rule.by_prefix, -1)
    if price >= 0:
        return price
    if rule.refuse_unlisted:
        raise Refusal(
            "unpriced_endpoint",
            f"the {rule.prefix_field} destination's calling code has no price in the "
            f"{policy.vendor} policy (by_prefix); add it there to allow it",
        )
    return rule.unit_usd


def actual_cost(
    policy: VendorPolicy,
    rule: ActualRule | None,
    body: bytes | dict[str, Any],
    estimate: Estimate,
) -> Actual:
    """The cost a successful response reports. Without a rule (or when the body does not
    say), the estimate stands: conservative, never zero by accident.

    ``body`` is the raw response, or its JSON object when the caller parsed it already.
    """
    if rule is None:
        return Actual(None, estimate.amount_minor, estimate.currency, "estimate kept")
    data: Any = body
    if isinstance(body, bytes):
        try:
            data = json.loads(body, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            return Actual(None, note="response body unreadable: estimate kept")
    if not isinstance(data, dict):
        return Actual(None, note="response body not an object: estimate kept")
    resp = Body("json", data)
    for field, values in rule.charged_when.items():
        if str(resp.get(field)) not in values:
            return Actual(0, note=f"{field}={resp.get(field)!r}: not charged")
    if rule.price is not None:
        return _actual_price(policy, rule, rule.price, resp, estimate)
    if rule.amount is None:
        return Actual(None, estimate.amount_minor, estimate.currency, "estimate kept")
    try:
        amount = resp.get_int(rule.amount)
    except ValueError:
        amount = None
    currency = resp.get(rule.currency) if rule.currency else estimate.currency
    if amount is None or not isinstance(currency, str):
        return Actual(None, note="amount missing in response: estimate kept")
    try:
        micros = minor_to_micro_usd(amount, currency.lower(), policy.fx_to_usd)
    except MoneyError:
        return Actual(None, note=f"currency {currency!r} unknown in response: estimate kept")
    return Actual(micros, amount, currency.lower())


def _actual_price(
    policy: VendorPolicy, rule: ActualRule, path: str, resp: Body, estimate: Estimate
) -> Actual:
    """A decimal major-unit price (Twilio ``"price": "-0.00790"``), or the estimate if null."""
    kept = Actual(None, estimate.amount_minor, estimate.currency)
    value = resp.get(path)
    if value is None:
        return dataclasses.replace(
            kept, note=f"{path} is null in the response (not priced yet): estimate kept"
        )
    currency = resp.get(rule.currency) if rule.currency else "usd"
    if not isinstance(currency, str) or isinstance(value, bool | float):
        return dataclasses.replace(kept, note=f"{path} unreadable in the response: estimate kept")
    try:
        micros = decimal_to_micro_usd(value, currency.lower(), policy.fx_to_usd)
    except (MoneyError, TypeError):
        return dataclasses.replace(kept, note=f"{path} unreadable in the response: estimate kept")
    return Actual(micros, None, currency.lower(), f"{path} read from the response")


# Vendor counters and cost functions register themselves on import.
import keybrake.vendors  # noqa: E402, F401
