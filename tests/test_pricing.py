"""Tests for keybrake.pricing: every declarative cost rule and how the actual cost is read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from keybrake.core.errors import Refusal
from keybrake.core.policy import ActualRule, KnownObjectCost, PerUnitCost, VendorPolicy
from keybrake.pricing import (
    ASYNC_COST_FUNCTIONS,
    COST_FUNCTIONS,
    COUNTERS,
    Body,
    Estimate,
    actual_cost,
    estimate_cost,
    parse_body,
)

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def make_policy(endpoint: dict[str, Any], **extra: Any) -> VendorPolicy:
    return VendorPolicy.model_validate(
        {
            "vendor": "acme",
            "hosts": ["api.acme.test"],
            "auth": {"schemes": ["bearer"], "secret_env": "ACME_KEY"},
            "fx_to_usd": {"usd": 1, "eur": "1.20", "jpy": "0.0075", "kwd": "3.40"},
            "endpoints": [endpoint],
            **extra,
        }
    )


async def estimate(
    cost: dict[str, Any] | None,
    raw: bytes = b"",
    *,
    content_type: str = FORM,
    params: Mapping[str, str] | None = None,
    known: Mapping[str, int] | None = None,
    free: bool = False,
) -> Estimate:
    endpoint: dict[str, Any] = {"match": "POST /v1/things/{id}"}
    if free:
        endpoint["free"] = True
    elif cost is not None:
        endpoint["cost"] = cost
    policy = make_policy(endpoint)
    body = parse_body(("form", "json"), [content_type] if content_type else [], raw)
    remembered = dict(known or {})

    async def recall(object_id: str) -> int | None:
        return remembered.get(object_id)

    return await estimate_cost(policy, policy.endpoints[0], body, params or {}, recall)


async def refusal(cost: dict[str, Any] | None, raw: bytes = b"", **kw: Any) -> Refusal:
    with pytest.raises(Refusal) as e:
        await estimate(cost, raw, **kw)
    return e.value


AMOUNT = {"kind": "amount_field", "amount": "amount", "currency": "currency"}


# -- parse_body -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "raw", "path", "value"),
    [
        (FORM, b"amount=500&currency=usd", "amount", "500"),
        (FORM, b"a%5Bb%5D%5Bc%5D=1", "a.b.c", "1"),
        (JSON, b'{"a": {"b": [1, {"c": "x"}]}}', "a.b.1.c", "x"),
        (JSON, b'{"a": [1, 2]}', "a.5", None),
        ("application/json; charset=utf-8", b"[]", "0", None),
        ("Application/X-WWW-Form-Urlencoded; Charset=UTF-8", b"amount=7", "amount", "7"),
        # The media type alone picks the parser: a parameter that says "json" changes nothing.
        (
            "application/x-www-form-urlencoded; x=json",
            b'{"amount": 100, "x": "&amount=99999&currency=usd"}',
            "amount",
            "99999",
        ),
    ],
)
def test_parse_body_reads_by_dotted_path(
    content_type: str, raw: bytes, path: str, value: str | None
) -> None:
    body = parse_body(("form", "json"), [content_type], raw)
    assert body.get(path) == value


def test_parse_body_empty_body_is_empty_parameters() -> None:
    assert parse_body(("json",), [], b"").root == {}
    assert parse_body(("form",), [FORM], b"").get("amount") is None


@pytest.mark.parametrize(
    ("accepted", "content_types", "raw", "code"),
    [
        (("form", "json"), [JSON], b'{"amount": 1, "amount": 2}', "ambiguous_amount"),
        (("form", "json"), [JSON], b"{not json", "invalid_request"),
        (("json",), [JSON], b"  ", "invalid_request"),
        (("form", "json"), [FORM], b"a=%zz", "invalid_request"),
        (("form", "json"), [FORM], b"a=1;b=2", "invalid_request"),
        # Not a type the endpoint takes, no type at all, two types, a charset the vendor
        # might decode differently: refused before anything is parsed.
        (("form",), [JSON], b'{"amount": 1}', "unsupported_media_type"),
        (("json",), [FORM], b"amount=1", "unsupported_media_type"),
        (("form",), ["text/plain"], b"amount=1", "unsupported_media_type"),
        (("form",), ["application/vnd.api+json"], b"{}", "unsupported_media_type"),
        (("form",), [], b"amount=1", "unsupported_media_type"),
        (("form",), [FORM, FORM], b"amount=1", "unsupported_media_type"),
        (("form",), [f"{FORM}; charset=utf-16"], b"amount=1", "unsupported_media_type"),
        (("form",), [JSON], b"", "unsupported_media_type"),
    ],
)
def test_parse_body_refusals(
    accepted: tuple[str, ...], content_types: list[str], raw: bytes, code: str
) -> None:
    with pytest.raises(Refusal) as e:
        parse_body(accepted, content_types, raw)
    assert e.value.code == code


def test_body_get_int_and_list_on_json() -> None:
    body = Body(
        "json",
        {"n": "12", "d": Decimal("3"), "f": Decimal("1.5"), "to": "a", "m": {"1": "y", "0": "x"}},
    )
    assert body.get_int("n") == 12 and body.get_int("d") == 3 and body.get_int("missing") is None
    for bad in ("f",):
        with pytest.raises(ValueError):
            body.get_int(bad)
    assert body.get_list("to") == ["a"] and body.get_list("m") == ["x", "y"]
    assert body.get_list("missing") == []


# -- free, unpriced, fixed ------------------------------------------------------------------------
async def test_free_endpoint_costs_nothing() -> None:
    assert (await estimate(None, free=True)) == Estimate(0, basis="free")


async def test_endpoint_without_rule_is_refused() -> None:
    assert (await refusal(None)).code == "unpriced_endpoint"


@pytest.mark.parametrize(("usd", "micros"), [("0.25", 250_000), (0.0083, 8_300), (2, 2_000_000)])
async def test_fixed_price(usd: Any, micros: int) -> None:
    e = await estimate({"kind": "fixed_usd", "usd": usd})
    assert (e.micros, e.basis) == (micros, "fixed")


# -- amount_field ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cost", "raw", "micros", "amount", "currency"),
    [
        (AMOUNT, b"amount=1999&currency=usd", 19_990_000, 1999, "usd"),
        (AMOUNT, b"amount=1999&currency=USD", 19_990_000, 1999, "usd"),
        (AMOUNT, b"amount=1000&currency=eur", 12_000_000, 1000, "eur"),
        # zero-decimal: 1,333 whole yen x 0.0075
        (AMOUNT, b"amount=1333&currency=jpy", 9_997_500, 1333, "jpy"),
        # three-decimal: 2,340 fils = 2.340 KWD x 3.40
        (AMOUNT, b"amount=2340&currency=kwd", 7_956_000, 2340, "kwd"),
        (AMOUNT, b"amount=0&currency=usd", 0, 0, "usd"),
        (AMOUNT, b"amount=0500&currency=usd", 5_000_000, 500, "usd"),
        (AMOUNT, b"amount%5B%5D=5&currency=usd&amount_x=1", None, None, None),
        (
            {**AMOUNT, "currency": None, "default_currency": "eur"},
            b"amount=100",
            1_200_000,
            100,
            "eur",
        ),
        ({**AMOUNT, "default_currency": "usd"}, b"amount=100&currency=jpy", 750_000, 100, "jpy"),
        (
            {"kind": "amount_field", "amount": "data.value", "currency": "data.currency"},
            b"data[value]=250&data[currency]=usd",
            2_500_000,
            250,
            "usd",
        ),
    ],
)
async def test_amount_field(
    cost: dict[str, Any], raw: bytes, micros: int | None, amount: int | None, currency: str | None
) -> None:
    if micros is None:
        assert (await refusal(cost, raw)).code == "invalid_request"
        return
    e = await estimate(cost, raw)
    assert (e.micros, e.amount_minor, e.currency, e.basis) == (
        micros,
        amount,
        currency,
        "amount_field",
    )


async def test_amount_field_json_body() -> None:
    e = await estimate(AMOUNT, b'{"amount": 250, "currency": "usd"}', content_type=JSON)
    assert e.micros == 2_500_000


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"amount=100&amount=5000&currency=usd", "ambiguous_amount"),
        (b"amount=100&currency=usd&currency=jpy", "ambiguous_amount"),
        (b"amount=100&amount%5Bx%5D=1&currency=usd", "ambiguous_amount"),
        (b"amount=100&currency=xyz", "unknown_currency"),
        (b"amount=100&currency=chf", "unknown_currency"),  # a real currency without a rate
        (b"amount=-1&currency=usd", "invalid_request"),
        (b"amount=1e3&currency=usd", "invalid_request"),
        (b"amount=1.5&currency=usd", "invalid_request"),
        (b"amount=9999999999999999999&currency=usd", "invalid_request"),
        (b"amount=100", "unknown_currency"),
        (b"currency=usd", "unpriced_endpoint"),
        (b"", "unpriced_endpoint"),
    ],
)
async def test_amount_field_refusals(raw: bytes, code: str) -> None:
    assert (await refusal(AMOUNT, raw)).code == code


async def test_amount_field_json_duplicate_is_ambiguous() -> None:
    r = await refusal(AMOUNT, b'{"amount": 1, "currency": "usd", "amount": 900}', content_type=JSON)
    assert r.code == "ambiguous_amount" and r.status == 403


KNOWN_PARAM = {**AMOUNT, "amount": "amount_to_capture", "known_object": "id"}
KNOWN_FIELDS = {**AMOUNT, "known_object_fields": ["charge", "payment_intent"]}


@pytest.mark.parametrize(
    ("cost", "raw", "params", "known", "micros", "basis"),
    [
        # no amount: the remembered amount of the object in the path
        (KNOWN_PARAM, b"", {"id": "pi_1"}, {"pi_1": 5_000_000}, 5_000_000, "known:pi_1"),
        # an amount without currency is in the object's currency: bounded by the remembered
        # amount of the object, or by the amount in the dearest currency (EUR) if that is more
        (
            KNOWN_PARAM,
            b"amount_to_capture=100",
            {"id": "pi_1"},
            {"pi_1": 9_000_000},
            9_000_000,
            "known:pi_1",
        ),
        (
            KNOWN_PARAM,
            b"amount_to_capture=100",
            {"id": "pi_1"},
            {"pi_1": 7},
            1_200_000,
            "amount in the dearest currency",
        ),
        # amount and currency in the body win
        (KNOWN_PARAM, b"amount_to_capture=100&currency=usd", {"id": "pi_1"}, {}, 1_000_000, None),
        # body fields naming the object (refunds)
        (KNOWN_FIELDS, b"charge=ch_1", {}, {"ch_1": 3_000_000}, 3_000_000, "known:ch_1"),
        (KNOWN_FIELDS, b"payment_intent=pi_2", {}, {"pi_2": 9}, 9, "known:pi_2"),
        (KNOWN_FIELDS, b"amount=50&charge=ch_1", {}, {"ch_1": 3_000_000}, 3_000_000, "known:ch_1"),
        (KNOWN_FIELDS, b"amount=50&currency=usd&charge=ch_x", {}, {}, 500_000, None),
        # several named: the largest remembered one
        (
            KNOWN_FIELDS,
            b"charge=ch_1&payment_intent=pi_2",
            {},
            {"ch_1": 4, "pi_2": 8},
            8,
            "known:pi_2",
        ),
        (KNOWN_FIELDS, b"charge=ch_x&payment_intent=pi_2", {}, {"pi_2": 8}, 8, "known:pi_2"),
    ],
)
async def test_amount_field_known_object(
    cost: dict[str, Any],
    raw: bytes,
    params: dict[str, str],
    known: dict[str, int],
    micros: int,
    basis: str | None,
) -> None:
    e = await estimate(cost, raw, params=params, known=known)
    assert e.micros == micros
    assert e.basis == (basis or "amount_field")


@pytest.mark.parametrize(
    ("cost", "raw", "params"),
    [
        (KNOWN_PARAM, b"", {"id": "pi_unknown"}),
        (KNOWN_PARAM, b"amount_to_capture=100", {"id": "pi_unknown"}),
        (KNOWN_FIELDS, b"charge=ch_unknown", {}),
        (KNOWN_FIELDS, b"amount=100&charge=ch_unknown", {}),
        (KNOWN_FIELDS, b"amount=100", {}),
        (KNOWN_FIELDS, b"", {}),
    ],
)
async def test_amount_field_unknown_object_is_refused(
    cost: dict[str, Any], raw: bytes, params: dict[str, str]
) -> None:
    r = await refusal(cost, raw, params=params)
    assert r.code == "unpriced_endpoint"
    assert "has not seen" in r.message


# -- known_object ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cost", "raw", "params", "known", "expected"),
    [
        ({"kind": "known_object", "param": "id"}, b"", {"id": "in_1"}, {"in_1": 12}, 12),
        # a body amount is ignored: the object's own amount is what the call moves
        (
            {"kind": "known_object", "param": "id"},
            b"amount=1&currency=usd",
            {"id": "pi_1"},
            {"pi_1": 99_000_000},
            99_000_000,
        ),
        ({"kind": "known_object", "fields": ["a", "b"]}, b"b=x_2", {}, {"x_2": 5}, 5),
        (
            {"kind": "known_object", "fields": ["a", "b"]},
            b"a=x_1&b=x_2",
            {},
            {"x_1": 6, "x_2": 5},
            6,
        ),
        ({"kind": "known_object", "param": "id"}, b"", {"id": "in_1"}, {}, "has not seen"),
        ({"kind": "known_object", "fields": ["a"]}, b"", {}, {"x": 1}, "names none of a"),
        ({"kind": "known_object", "fields": ["a"]}, b"a=", {}, {"": 1}, "names none of a"),
    ],
)
async def test_known_object(
    cost: dict[str, Any],
    raw: bytes,
    params: dict[str, str],
    known: dict[str, int],
    expected: int | str,
) -> None:
    if isinstance(expected, int):
        assert (await estimate(cost, raw, params=params, known=known)).micros == expected
    else:
        r = await refusal(cost, raw, params=params, known=known)
        assert r.code == "unpriced_endpoint" and expected in r.message


@pytest.mark.parametrize("fields", [{}, {"param": "id", "fields": ["a"]}, {"fields": []}])
def test_known_object_names_the_object_exactly_one_way(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        KnownObjectCost.model_validate({"kind": "known_object", **fields})


# -- per_unit -------------------------------------------------------------------------------------
LIST = {"kind": "per_unit", "counter": "list_items", "fields": ["to"], "unit_usd": "0.0009"}
TABLE = {
    "kind": "per_unit",
    "counter": "list_items",
    "fields": ["n"],
    "prefix_field": "To",
    "unit_usd": "0.50",
    "by_prefix": {1: "0.0083", "1876": "0.15", 44: "0.06"},
}


@pytest.mark.parametrize(
    ("cost", "raw", "micros"),
    [
        (LIST, b'{"to": ["a", "b", "c"]}', 2_700),
        (LIST, b'{"to": "a"}', 900),
        (LIST, b'{"to": []}', 0),
        (LIST, b"{}", 0),
        (TABLE, b'{"To": "+14155550123", "n": [1, 2]}', 16_600),
        (TABLE, b'{"To": "+18765550123", "n": [1]}', 150_000),  # longest prefix wins
        (TABLE, b'{"To": "+447700900123", "n": [1]}', 60_000),
        (TABLE, b'{"To": "+33612345678", "n": [1]}', 500_000),  # unlisted: unit_usd
        ({**TABLE, "refuse_unlisted": True}, b'{"To": "+447700900123", "n": [1]}', 60_000),
        ({**LIST, "min_usd_when_present": {"media": "0.02"}}, b'{"to": "a", "media": "u"}', 20_000),
        ({**LIST, "min_usd_when_present": {"media": "0.02"}}, b'{"to": "a", "media": ""}', 900),
        ({**LIST, "min_usd_when_present": {"media": "0.02"}}, b'{"to": "a", "media": []}', 900),
        (
            {**LIST, "min_usd_when_present": {"media": "0.0001"}},
            b'{"to": ["a", "b"], "media": ["u"]}',
            1_800,  # the per-unit price is higher than the minimum
        ),
    ],
)
async def test_per_unit(cost: dict[str, Any], raw: bytes, micros: int) -> None:
    assert (await estimate(cost, raw, content_type=JSON)).micros == micros


async def test_per_unit_form_repeated_field_counts_as_present() -> None:
    cost = {**LIST, "fields": ["To"], "min_usd_when_present": {"MediaUrl": "0.02"}}
    e = await estimate(cost, b"To=a&MediaUrl=x&MediaUrl=y")
    assert (e.micros, e.basis) == (20_000, "minimum:MediaUrl")


@pytest.mark.parametrize(
    ("cost", "raw", "code"),
    [
        (
            {**TABLE, "refuse_unlisted": True},
            b'{"To": "+33612345678", "n": [1]}',
            "unpriced_endpoint",
        ),
        (TABLE, b'{"n": [1]}', "invalid_request"),
        (TABLE, b'{"To": "4155550123", "n": [1]}', "invalid_request"),
        (TABLE, b'{"To": 14155550123, "n": [1]}', "invalid_request"),
        ({**LIST, "counter": "no_such_counter"}, b"{}", "unpriced_endpoint"),
        ({**LIST, "fields": []}, b'{"to": "a"}', "unpriced_endpoint"),
    ],
)
async def test_per_unit_refusals(cost: dict[str, Any], raw: bytes, code: str) -> None:
    assert (await refusal(cost, raw, content_type=JSON)).code == code


async def test_refused_destination_message_does_not_echo_the_number() -> None:
    r = await refusal({**TABLE, "refuse_unlisted": True}, b"To=%2B33612345678&n=1")
    assert "33612345678" not in r.message and "by_prefix" in r.message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prefix_field": None, "refuse_unlisted": True}, "needs a by_prefix"),
        ({"by_prefix": {}, "refuse_unlisted": True}, "needs a by_prefix"),
        ({"by_prefix": {"+44": "0.1"}}, "must be digits"),
        ({"min_usd_when_present": {"media": "-1"}}, "must not be negative"),
        ({"min_usd_when_present": ["media"]}, "mapping of body field"),
    ],
)
def test_per_unit_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PerUnitCost.model_validate({**TABLE, **change})


# -- functions ------------------------------------------------------------------------------------
async def test_sync_and_async_cost_functions_are_found_by_name() -> None:
    assert "stripe_invoice" in COST_FUNCTIONS
    assert "stripe_checkout_session" in ASYNC_COST_FUNCTIONS
    assert {"list_items", "sms_segments", "email_recipients"} <= set(COUNTERS)
    e = await estimate({"kind": "function", "name": "stripe_invoice"}, b"customer=cus_1")
    assert (e.micros, e.basis) == (0, "function:stripe_invoice")
    form = (
        b"line_items[0][price]=price_1&line_items[0][quantity]=3"
        b"&line_items[1][price_data][currency]=usd&line_items[1][price_data][unit_amount]=250"
    )
    e = await estimate(
        {"kind": "function", "name": "stripe_checkout_session"}, form, known={"price_1": 1_000}
    )
    assert (e.micros, e.basis) == (3_000 + 2_500_000, "function:stripe_checkout_session")


async def test_unknown_cost_function_is_refused() -> None:
    assert (await refusal({"kind": "function", "name": "nope"})).code == "unpriced_endpoint"


# -- actual_cost ----------------------------------------------------------------------------------
POLICY = make_policy({"match": "GET /x", "free": True})
EST = Estimate(5_000_000, 500, "usd")
PI_RULE = ActualRule(amount="amount", charged_when={"status": ("succeeded", "processing")})
TWILIO_RULE = ActualRule(price="price", currency="price_unit")


@pytest.mark.parametrize(
    ("rule", "response", "micros", "note"),
    [
        (None, {"id": "x"}, None, "estimate kept"),
        (ActualRule(), {"amount": 1}, None, "estimate kept"),
        (PI_RULE, {"status": "succeeded", "amount": 300, "currency": "usd"}, 3_000_000, ""),
        (PI_RULE, {"status": "processing", "amount": 300, "currency": "eur"}, 3_600_000, ""),
        (
            PI_RULE,
            {"status": "requires_capture", "amount": 300, "currency": "usd"},
            0,
            "not charged",
        ),
        (PI_RULE, {"amount": 300, "currency": "usd"}, 0, "not charged"),
        (PI_RULE, {"status": "succeeded", "currency": "usd"}, None, "amount missing"),
        (PI_RULE, {"status": "succeeded", "amount": "300", "currency": None}, None, "missing"),
        (PI_RULE, {"status": "succeeded", "amount": 3, "currency": "chf"}, None, "unknown"),
        (PI_RULE, {"status": "succeeded", "amount": 1.5, "currency": "usd"}, None, "missing"),
        (
            ActualRule(amount="latest_invoice.amount_due", charged_when={"status": ("active",)}),
            {"status": "active", "latest_invoice": {"amount_due": 1200}, "currency": "usd"},
            12_000_000,
            "",
        ),
        (
            ActualRule(amount="latest_invoice.amount_due", charged_when={"status": ("active",)}),
            {"status": "active", "latest_invoice": "in_1", "currency": "usd"},
            None,
            "amount missing",
        ),
        (
            ActualRule(charged_when={"captured": ("true",)}),
            {"captured": True},
            None,
            "estimate kept",
        ),
        # Twilio: a price only once the message is sent; null at creation keeps the estimate
        (TWILIO_RULE, {"price": None, "price_unit": "USD"}, None, "price is null"),
        (TWILIO_RULE, {"price_unit": "USD"}, None, "price is null"),
        (TWILIO_RULE, {"price": "-0.00790", "price_unit": "USD"}, 7_900, "price read"),
        (TWILIO_RULE, {"price": "0.0166", "price_unit": "usd"}, 16_600, "price read"),
        (TWILIO_RULE, {"price": "-0.05", "price_unit": "EUR"}, 60_000, "price read"),
        (TWILIO_RULE, {"price": "abc", "price_unit": "USD"}, None, "unreadable"),
        (TWILIO_RULE, {"price": "-0.0079", "price_unit": "XYZ"}, None, "unreadable"),
        (TWILIO_RULE, {"price": "-0.0079", "price_unit": None}, None, "unreadable"),
        (TWILIO_RULE, {"price": True, "price_unit": "USD"}, None, "unreadable"),
    ],
)
def test_actual_cost(
    rule: ActualRule | None, response: dict[str, Any], micros: int | None, note: str
) -> None:
    actual = actual_cost(POLICY, rule, json.dumps(response).encode(), EST)
    assert actual.micros == micros
    assert note in actual.note


def test_actual_cost_from_decimal_json_price() -> None:
    actual = actual_cost(POLICY, TWILIO_RULE, b'{"price": -0.0083, "price_unit": "USD"}', EST)
    assert actual.micros == 8_300 and actual.currency == "usd"


@pytest.mark.parametrize("raw", [b"<html>", b"[1, 2]", b"\xff", b""])
def test_actual_cost_unreadable_body_keeps_the_estimate(raw: bytes) -> None:
    assert actual_cost(POLICY, PI_RULE, raw, EST).micros is None


def test_actual_rule_reads_amount_or_price_not_both() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ActualRule(amount="amount", price="price")
