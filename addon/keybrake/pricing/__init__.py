"""Cost estimation before forwarding, and the actual cost read from the vendor's answer.

Declarative rules come from the vendor YAML (`keybrake.core.policy`); the counters, cost
functions and usage readers that YAML can name are in `REGISTRY`, which this module fills by
calling each vendor module's ``register`` (`keybrake.pricing.vendors.register_all`). Every doubt
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
import functools
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from keybrake.core.errors import Refusal
from keybrake.core.money import (
    BadAmount,
    MoneyError,
    UnknownCurrency,
    decimal_to_micro_usd,
    minor_to_micro_usd,
)
from keybrake.core.policy import (
    ActualRule,
    AmountFieldCost,
    EndpointPolicy,
    FixedCost,
    HoldRule,
    KnownObjectCost,
    PerUnitCost,
    VendorPolicy,
)
from keybrake.pricing.bodies import AmbiguousField
from keybrake.pricing.model import (
    MEDIA_TYPES,
    Actual,
    Body,
    Estimate,
    Registry,
    StoreLookup,
    media_type,
    parse_body,
)
from keybrake.pricing.sms import calling_code_price
from keybrake.pricing.vendors import register_all

__all__ = [
    "ASYNC_COST_FUNCTIONS",
    "COST_FUNCTIONS",
    "COUNTERS",
    "MEDIA_TYPES",
    "REGISTRY",
    "STREAMS",
    "USAGE_READERS",
    "Actual",
    "Body",
    "Estimate",
    "actual_cost",
    "check_parameters",
    "estimate_cost",
    "hold_amount",
    "media_type",
    "parse_body",
    "releases_hold",
    "values_at",
]

REGISTRY: Registry = Registry()
"""The vendor code policy YAML can name; filled once, here, from `keybrake.pricing.vendors`."""
register_all(REGISTRY)
COUNTERS = REGISTRY.counters
COST_FUNCTIONS = REGISTRY.cost_functions
ASYNC_COST_FUNCTIONS = REGISTRY.async_cost_functions
USAGE_READERS = REGISTRY.usage_readers
STREAMS = REGISTRY.streams


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
            micros = fn(body, params, rule, policy)
            # A vendor priced per model: the actual is read with the model the request names.
            model = body.get("model") if policy.models else None
            return Estimate(
                micros,
                basis=f"function:{rule.name}",
                model=model if isinstance(model, str) else None,
            )
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
    object_ids = _named_objects(rule.known_object, rule.known_object_fields, body, params)
    if amount is not None and object_ids:
        # An amount without currency is in the currency of the object it acts on (a
        # capture's amount_to_capture, a refund's amount). Bounded both ways: by the whole
        # amount the proxy saw for the object, and by the amount in the dearest currency the
        # policy knows (it can exceed the object's amount: over-capture).
        # The object must be known: its currency is then one the policy has a rate for.
        found = await _recall_largest(object_ids, recall)
        dearest = _dearest(amount, policy)
        if found is not None and found[1] >= dearest:
            return Estimate(found[1], amount, None, f"known:{found[0]}")
        if found is not None:
            return Estimate(dearest, amount, None, "amount in the dearest currency")
    if amount is None or object_ids or rule.known_object_fields:
        # No amount: the whole amount of the object the proxy saw earlier bounds it.
        found = await _recall_largest(object_ids, recall)
        if found is not None:
            return Estimate(found[1], None, None, f"known:{found[0]}")
        raise Refusal(
            "unpriced_endpoint",
            f"{endpoint.match} without {rule.amount!r} and its currency needs the amount of "
            f"{_describe(object_ids)}, which the proxy has not seen: retrieve it through the "
            "proxy first",
        )
    raise Refusal("unknown_currency", "request names an amount but no currency")


def _dearest(amount: int, policy: VendorPolicy) -> int:
    """``amount`` minor units in whichever currency of the policy makes it worth the most."""
    return max(_minor_to_micros(amount, currency, policy) for currency in policy.fx_to_usd)


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
    if rule.price_list:
        return Actual(estimate.micros, estimate.amount_minor, estimate.currency, "price list")
    data: Any = body
    if isinstance(body, bytes):
        try:
            data = json.loads(body, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            return Actual(None, note="response body unreadable: estimate kept")
    if not isinstance(data, dict):
        return Actual(None, note="response body not an object: estimate kept")
    if rule.usage is not None:
        reader = USAGE_READERS.get(rule.usage)
        if reader is None:
            return Actual(None, note=f"no usage reader {rule.usage!r}: estimate kept")
        return reader(policy, data, estimate)
    resp = Body("json", data)
    for field, values in rule.charged_when.items():
        if _text(resp.get(field)) not in values:
            return Actual(0, note=f"{field}={resp.get(field)!r}: not charged", charged=False)
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


def _text(value: Any) -> str:
    """A response value as policy files write it (JSON booleans as ``true``/``false``)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _covers(pattern: str, path: list[str]) -> bool:
    """``*`` matches one segment, a final ``**`` any number (none included)."""
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part == "**" and i == len(parts) - 1:
            return True
        if i >= len(path) or (part != "*" and part != path[i]):
            return False
    return len(parts) == len(path)


@functools.lru_cache(maxsize=1024)
def _literal_params(params: tuple[str, ...]) -> frozenset[str]:
    """The ``params`` entries without wildcards (policies are loaded once: cached)."""
    return frozenset(p for p in params if "*" not in p)


def check_parameters(endpoint: EndpointPolicy, body: Body) -> None:
    """Pricing is a closed world: every parameter the request carries must be one the
    endpoint's rule understands (``params``: priced, or known not to change the cost).
    Anything else is refused (``unpriced_parameter``, naming it), never forwarded at the
    plain price; ``refused`` names parameters refused on purpose, with the reason."""
    if endpoint.params is None:
        return
    literal = _literal_params(tuple(endpoint.params))
    for path in body.leaf_paths():
        segments = path.split(".")
        top = segments[0]
        reason = endpoint.refused.get(top) or endpoint.refused.get(path)
        if reason is not None:
            raise Refusal("unpriced_parameter", f"{path[:100]} is refused: {reason}")
        if path not in literal and not any(
            _covers(pattern, segments) for pattern in endpoint.params
        ):
            raise Refusal(
                "unpriced_parameter",
                f"{path[:100]} is a parameter {endpoint.match} is not priced with; the "
                "policy can list it under params if it does not change the cost",
            )


def releases_hold(rule: HoldRule, data: dict[str, Any]) -> bool:
    """True when the answer proves the object cannot charge any more (``released_when``)."""
    resp = Body("json", data)
    return bool(rule.released_when) and all(
        _text(resp.get(field)) in values for field, values in rule.released_when.items()
    )


def values_at(data: Any, path: str) -> list[Any]:
    """Every value at a dotted ``path``, walking through lists on the way.

    >>> values_at({"lines": {"data": [{"x": 1}, {"x": 2}, {}]}}, "lines.data.x")
    [1, 2]
    """
    nodes = [data]
    for part in path.split("."):
        nxt: list[Any] = []
        for node in nodes:
            for item in node if isinstance(node, list) else [node]:
                if isinstance(item, dict) and item.get(part) is not None:
                    nxt.append(item[part])
        nodes = nxt
    return [v for node in nodes for v in (node if isinstance(node, list) else [node])]


def hold_amount(
    policy: VendorPolicy, rule: HoldRule, data: dict[str, Any], estimate: Estimate
) -> int:
    """What the object can still charge, in micro-USD: the answer's amount when the rule names
    one and it is readable (the vendor's word on the object), else the estimate."""
    if rule.amount is None:
        return estimate.micros
    resp = Body("json", data)
    try:
        amount = resp.get_int(rule.amount)
    except ValueError:
        return estimate.micros
    currency = resp.get(rule.currency) if rule.currency else estimate.currency
    if amount is None or not isinstance(currency, str):
        return estimate.micros
    try:
        return minor_to_micro_usd(amount, currency.lower(), policy.fx_to_usd)
    except MoneyError:
        return estimate.micros


# Vendor counters and cost functions register themselves on import.
