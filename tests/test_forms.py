"""Tests for keybrake.pricing.bodies: form and JSON bodies read the way the vendor reads them."""

from __future__ import annotations

import contextlib
import doctest
import json
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keybrake.pricing.bodies
from keybrake.pricing.bodies import (
    MAX_BODY_BYTES,
    MAX_FORM_DEPTH,
    MAX_FORM_FIELDS,
    MAX_JSON_DEPTH,
    AmbiguousField,
    BadField,
    FormError,
    FormTree,
    FormValue,
    parse_json_body,
    parse_stripe_form,
)


def test_docstring_examples() -> None:
    result = doctest.testmod(keybrake.pricing.bodies, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_all_is_sorted_and_complete() -> None:
    names = keybrake.pricing.bodies.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    for name in names:
        assert hasattr(keybrake.pricing.bodies, name)


# --- parse_stripe_form: what a body means --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"", [], id="empty"),
        pytest.param(
            b"amount=500&currency=usd", [("amount", "500"), ("currency", "usd")], id="flat"
        ),
        pytest.param(b"metadata[order_id]=1", [("metadata", {"order_id": "1"})], id="nested"),
        pytest.param(
            b"metadata%5Border_id%5D=1&metadata%5bsku%5d=2",
            [("metadata", {"order_id": "1", "sku": "2"})],
            id="percent-encoded-brackets",
        ),
        pytest.param(
            b"line_items[0][price_data][unit_amount]=500&line_items[0][quantity]=2",
            [("line_items", {"0": {"price_data": {"unit_amount": "500"}, "quantity": "2"}})],
            id="indexed-line-items",
        ),
        pytest.param(b"expand[]=a&expand[]=b", [("expand", ["a", "b"])], id="append-array"),
        pytest.param(
            b"items[][price]=p1&items[][quantity]=1&items[][price]=p2",
            [("items", [{"price": "p1", "quantity": "1"}, {"price": "p2"}])],
            id="rack-array-of-objects",
        ),
        pytest.param(b"a[][]=1&a[][]=2", [("a", [["1"], ["2"]])], id="array-of-arrays"),
        pytest.param(b"description=two+words", [("description", "two words")], id="plus-is-space"),
        pytest.param(b"a+b=c", [("a b", "c")], id="plus-in-name"),
        pytest.param(b"email=a%2Bb%40x.com", [("email", "a+b@x.com")], id="encoded-plus"),
        pytest.param(b"name=Jos%C3%A9", [("name", "José")], id="percent-utf8"),
        pytest.param("name=José".encode(), [("name", "José")], id="raw-utf8"),
        pytest.param(b"a=b=c", [("a", "b=c")], id="equals-in-value"),
        pytest.param(b"flag&x=", [("flag", ""), ("x", "")], id="no-value"),
        pytest.param(b"&&a=1&&", [("a", "1")], id="empty-pairs-skipped"),
        pytest.param(b"a=1&  b=2", [("a", "1"), ("b", "2")], id="rack-skips-spaces-after-amp"),
        pytest.param(b"to[007]=x", [("to", {"7": "x"})], id="index-leading-zeros"),
        pytest.param(b"a[%20]=1", [("a", {" ": "1"})], id="space-key"),
    ],
)
def test_parse_stripe_form(body: bytes, expected: list[tuple[str, FormValue]]) -> None:
    tree = parse_stripe_form(body)
    assert tree.items() == expected
    assert tree.ambiguous_paths == ()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param("amount", "500", id="flat"),
        pytest.param("metadata.order_id", "42", id="nested"),
        pytest.param("line_items.0.price_data.unit_amount", "700", id="deep-indexed"),
        pytest.param("line_items.1.quantity", "3", id="second-item"),
        pytest.param("line_items.01.quantity", "3", id="index-with-leading-zero"),
        pytest.param("expand.1", "b", id="append-array-index"),
        pytest.param("missing", None, id="absent"),
        pytest.param("metadata.missing", None, id="absent-nested"),
        pytest.param("expand.2", None, id="index-out-of-range"),
        pytest.param("expand.x", None, id="non-index-on-array"),
        pytest.param("expand.99999999999999999999", None, id="huge-index"),
        pytest.param("line_items.5.quantity", None, id="absent-item"),
    ],
)
def test_get(path: str, value: str | None) -> None:
    tree = parse_stripe_form(
        b"amount=500&metadata[order_id]=42&expand[]=a&expand[]=b"
        b"&line_items[0][price_data][unit_amount]=700&line_items[1][quantity]=3"
    )
    assert tree.get(path) == value


@pytest.mark.parametrize(
    ("path", "named"),
    [
        pytest.param("metadata", "metadata", id="object-is-not-a-value"),
        pytest.param("expand", "expand", id="list-is-not-a-value"),
        pytest.param("amount.x", "amount", id="value-has-no-fields"),
        pytest.param("", "", id="empty-path"),
        pytest.param("a..b", "a..b", id="empty-segment"),
        pytest.param(".amount", ".amount", id="leading-dot"),
    ],
)
def test_get_bad_field(path: str, named: str) -> None:
    tree = parse_stripe_form(b"amount=500&metadata[k]=v&expand[]=a")
    with pytest.raises(BadField) as info:
        tree.get(path)
    assert info.value.path == named


# --- ambiguity: a field the vendor could read differently ----------------------------------


@pytest.mark.parametrize(
    ("body", "read", "named"),
    [
        pytest.param(b"amount=100&amount=5000", "amount", "amount", id="scalar-twice"),
        pytest.param(b"amount=5000&amount=100", "amount", "amount", id="scalar-twice-reversed"),
        pytest.param(b"amount=100&amount=100", "amount", "amount", id="same-value-twice"),
        pytest.param(b"a=1&a[b]=2", "a.b", "a", id="value-then-object"),
        pytest.param(b"a[b]=2&a=1", "a", "a", id="object-then-value"),
        pytest.param(b"a[b]=2&a=1", "a.b", "a", id="object-then-value-read-inside"),
        pytest.param(b"a[0]=x&a[]=y", "a.0", "a", id="object-then-array"),
        pytest.param(b"a[]=x&a=y", "a", "a", id="array-then-value"),
        pytest.param(b"a[]=x&a[k]=y", "a.k", "a", id="array-then-object"),
        pytest.param(
            b"line_items[0][price_data][unit_amount]=500&line_items[00][price_data][unit_amount]=9",
            "line_items.0.price_data.unit_amount",
            "line_items.0.price_data.unit_amount",
            id="index-spelled-two-ways",
        ),
        pytest.param(
            b"metadata[k]=1&metadata%5Bk%5D=2", "metadata.k", "metadata.k", id="encoded-twice"
        ),
        pytest.param(b"amount=100& amount=5000", "amount", "amount", id="rack-space-after-amp"),
        pytest.param(b"am%6Funt=100&amount=5000", "amount", "amount", id="encoded-name-letter"),
        pytest.param(b"x[a]=1&x[a]=2&x[a][b]=3", "x.a", "x.a", id="repeated-then-reshaped"),
    ],
)
def test_ambiguous_field_raises_when_read(body: bytes, read: str, named: str) -> None:
    tree = parse_stripe_form(body + b"&currency=usd")
    with pytest.raises(AmbiguousField) as info:
        tree.get(read)
    assert info.value.path == named
    assert named in str(info.value)
    assert named in tree.ambiguous_paths
    # Everything else stays readable.
    assert tree.get("currency") == "usd"
    with pytest.raises(AmbiguousField):
        tree.items()


def test_ambiguous_field_raises_through_get_int() -> None:
    tree = parse_stripe_form(b"amount=100&amount=5000")
    with pytest.raises(AmbiguousField):
        tree.get_int("amount")


def test_repeated_scalar_reads_as_list() -> None:
    # Twilio's SDK sends lists as repeated names; asking for a list is not ambiguous.
    tree = parse_stripe_form(b"MediaUrl=a&MediaUrl=b&MediaUrl=c")
    assert tree.get_list("MediaUrl") == ["a", "b", "c"]
    with pytest.raises(AmbiguousField):
        tree.get("MediaUrl")


def test_shape_conflict_is_ambiguous_even_as_list() -> None:
    tree = parse_stripe_form(b"to=a&to[x]=b")
    with pytest.raises(AmbiguousField):
        tree.get_list("to")


def test_list_holding_an_ambiguous_field_raises() -> None:
    tree = parse_stripe_form(b"line_items[0][quantity]=1&line_items[0][quantity]=9")
    with pytest.raises(AmbiguousField) as info:
        tree.get_list("line_items")
    assert info.value.path == "line_items.0.quantity"


# --- get_int -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("0", 0, id="zero"),
        pytest.param("500", 500, id="plain"),
        pytest.param("0500", 500, id="leading-zero-read-as-decimal"),
        pytest.param("9" * 18, 10**18 - 1, id="eighteen-digits"),
    ],
)
def test_get_int(text: str, value: int) -> None:
    assert parse_stripe_form(urlencode({"amount": text}).encode()).get_int("amount") == value


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="plus"),
        pytest.param(" 1", id="leading-space"),
        pytest.param("1 ", id="trailing-space"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1.0", id="decimal-point"),
        pytest.param("0x10", id="hex"),
        pytest.param("1_000", id="underscore"),
        pytest.param("\u0661\u0662", id="arabic-indic-digits"),
        pytest.param("\u00b2", id="superscript"),
        pytest.param("9" * 19, id="nineteen-digits"),
        pytest.param("1" * 5000, id="very-long"),
    ],
)
def test_get_int_rejects(text: str) -> None:
    tree = parse_stripe_form(urlencode({"amount": text}).encode())
    with pytest.raises(BadField) as info:
        tree.get_int("amount")
    assert info.value.path == "amount"


def test_get_int_absent() -> None:
    assert parse_stripe_form(b"currency=usd").get_int("amount") is None


# --- get_list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "items"),
    [
        pytest.param(b"", [], id="absent"),
        pytest.param(b"to=a", ["a"], id="lone-value"),
        pytest.param(b"to[]=a&to[]=b", ["a", "b"], id="append-array"),
        pytest.param(b"to[1]=b&to[0]=a", ["a", "b"], id="indexed-in-index-order"),
        pytest.param(b"to[10]=k&to[2]=c&to[0]=a", ["a", "c", "k"], id="indexes-sort-numerically"),
        pytest.param(
            b"to[0][email]=a&to[1][email]=b",
            [{"email": "a"}, {"email": "b"}],
            id="indexed-objects",
        ),
    ],
)
def test_get_list(body: bytes, items: list[FormValue]) -> None:
    assert parse_stripe_form(body).get_list("to") == items


def test_get_list_of_named_object_is_bad_field() -> None:
    with pytest.raises(BadField):
        parse_stripe_form(b"to[email]=a").get_list("to")


def test_returned_values_are_copies() -> None:
    tree = parse_stripe_form(b"to[]=a")
    tree.get_list("to").append("b")
    items = tree.items()
    items[0][1].append("c")  # type: ignore[union-attr]
    assert tree.get_list("to") == ["a"]


def test_stripe_sdk_encoding_is_read_back() -> None:
    encode = pytest.importorskip("stripe._encode")._api_encode
    params = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "jpy",
                    "unit_amount": 1000,
                    "product_data": {"name": "Ticket & [VIP]", "metadata": {"a.b": "1"}},
                },
                "quantity": 2,
            },
            {"price": "price_123", "quantity": 1},
        ],
        "metadata": {"order_id": "42"},
        "expand": ["payment_intent", "customer"],
        "automatic_tax": {"enabled": True},
    }
    tree = parse_stripe_form(urlencode(list(encode(params))).encode())
    assert tree.ambiguous_paths == ()
    assert tree.get_int("line_items.0.price_data.unit_amount") == 1000
    assert tree.get("line_items.0.price_data.currency") == "jpy"
    assert tree.get("line_items.0.price_data.product_data.name") == "Ticket & [VIP]"
    assert tree.get_int("line_items.1.quantity") == 1
    assert tree.get_list("expand") == ["payment_intent", "customer"]
    assert tree.get("automatic_tax.enabled") == "true"
    assert len(tree.get_list("line_items")) == 2


# --- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"a=1;b=2", id="raw-semicolon"),
        pytest.param(b"amount=100;amount=5000", id="semicolon-smuggling"),
        pytest.param(b"a=%zz", id="bad-escape-letters"),
        pytest.param(b"a=%", id="bare-percent"),
        pytest.param(b"a=%4", id="short-escape"),
        pytest.param(b"a%=1", id="bad-escape-in-name"),
        pytest.param(b"a=%ff", id="escaped-invalid-utf8"),
        pytest.param(b"a=%C3%28", id="escaped-bad-continuation"),
        pytest.param(b"a=%ED%A0%80", id="escaped-surrogate"),
        pytest.param(b"a=%C0%AF", id="escaped-overlong"),
        pytest.param(b"\xff=1", id="raw-invalid-utf8"),
        pytest.param(b"[amount]=5", id="leading-bracket"),
        pytest.param(b"amount]=5", id="stray-close-bracket"),
        pytest.param(b"a[b=1", id="unclosed-bracket"),
        pytest.param(b"a[b]c=1", id="text-after-bracket"),
        pytest.param(b"a[[b]]=1", id="nested-brackets"),
        pytest.param(b"=1", id="empty-name"),
        pytest.param(b"[]=1", id="only-brackets"),
        pytest.param(b"a" + b"[x]" * (MAX_FORM_DEPTH + 1) + b"=1", id="too-deep"),
        pytest.param(b"a" + b"[]" * 100_000 + b"=1", id="far-too-deep"),
        pytest.param(b"&".join(b"f%d=1" % i for i in range(MAX_FORM_FIELDS + 1)), id="too-many"),
        pytest.param(b"a=" + b"x" * MAX_BODY_BYTES, id="too-large"),
    ],
)
def test_parse_stripe_form_refuses(body: bytes) -> None:
    with pytest.raises(FormError):
        parse_stripe_form(body)


def test_limits_are_inclusive() -> None:
    deep = parse_stripe_form(b"a" + b"[x]" * MAX_FORM_DEPTH + b"=1")
    assert deep.get("a" + ".x" * MAX_FORM_DEPTH) == "1"
    many = parse_stripe_form(b"&".join(b"f%d=1" % i for i in range(MAX_FORM_FIELDS)))
    assert len(many.items()) == MAX_FORM_FIELDS
    # Empty pairs are not fields.
    assert parse_stripe_form(b"&" * 5000 + b"a=1").get("a") == "1"


# --- properties ----------------------------------------------------------------------------

FORM_TOKENS = st.sampled_from(
    [b"a", b"b", b"0", b"00", b"1", b"=", b"&", b"[", b"]", b"[]", b"%5B", b"%5D", b"%", b"%2",
     b"%zz", b"%C3%A9", b"%FF", b"+", b" ", b";", b".", b"\xc3", b"\xa9", b"\x00", b"amount"]
)  # fmt: skip
FORMISH = st.lists(FORM_TOKENS, max_size=40).map(b"".join)


def _read_everything(tree: FormTree) -> None:
    """Every read of a parsed tree either works or raises a named-field error."""
    tree.ambiguous_paths  # noqa: B018 - exercised for crashes
    for path in ("a", "b", "amount", "a.b", "a.0", "0", "a.0.b"):
        for read in (tree.get, tree.get_int, tree.get_list):
            with contextlib.suppress(AmbiguousField, BadField):
                read(path)
    with contextlib.suppress(AmbiguousField):
        tree.items()


@given(st.one_of(st.binary(max_size=300), FORMISH))
def test_arbitrary_bytes_only_raise_form_errors(body: bytes) -> None:
    try:
        tree = parse_stripe_form(body)
    except FormError:
        return
    _read_everything(tree)


NAMES = st.text(
    st.characters(codec="utf-8", exclude_characters="[]"), min_size=1, max_size=8
).filter(lambda s: not (s.isascii() and s.isdigit()) and not s.startswith(" "))
VALUES = st.text(st.characters(codec="utf-8"), max_size=10)
TREES = st.recursive(
    VALUES,
    lambda children: st.one_of(
        st.lists(VALUES, min_size=1, max_size=3),
        st.dictionaries(NAMES, children, min_size=1, max_size=3),
    ),
    max_leaves=12,
)


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(prefix, value)]
    if isinstance(value, list):
        return [(f"{prefix}[]", item) for item in value]
    return [pair for key, child in value.items() for pair in _flatten(f"{prefix}[{key}]", child)]


@given(st.dictionaries(NAMES, TREES, max_size=4))
def test_urlencoded_nested_round_trip(data: dict[str, Any]) -> None:
    pairs = [pair for key, value in data.items() for pair in _flatten(key, value)]
    tree = parse_stripe_form(urlencode(pairs).encode())
    assert tree.ambiguous_paths == ()
    assert dict(tree.items()) == data


@given(
    st.dictionaries(NAMES.filter(lambda s: "." not in s), VALUES, min_size=1, max_size=5),
    st.data(),
)
def test_any_field_given_twice_is_ambiguous(data: dict[str, str], draw: st.DataObject) -> None:
    name = draw.draw(st.sampled_from(sorted(data)))
    second = draw.draw(VALUES)
    pairs = [*data.items(), (name, second)]
    pairs = draw.draw(st.permutations(pairs))
    tree = parse_stripe_form(urlencode(pairs).encode())
    with pytest.raises(AmbiguousField):
        tree.get(name)
    assert tree.ambiguous_paths == (name,)
    for other in set(data) - {name}:
        assert tree.get(other) == data[other]


# --- parse_json_body -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "value"),
    [
        pytest.param(b'{"amount": 500}', {"amount": 500}, id="object"),
        pytest.param(b'{"price": 0.0079}', {"price": Decimal("0.0079")}, id="fraction-is-decimal"),
        pytest.param(b'{"price": 1e-3}', {"price": Decimal("0.001")}, id="exponent-is-decimal"),
        pytest.param(b'[1, "a", null, true]', [1, "a", None, True], id="array"),
        pytest.param(b'"\\u00e9"', "é", id="escaped-unicode"),
        pytest.param(b'"\\ud83d\\ude00"', "😀", id="surrogate-pair"),
        pytest.param(
            b'{"to": ["a@x.com", "b@x.com"], "tags": [{"name": "n"}]}',
            {"to": ["a@x.com", "b@x.com"], "tags": [{"name": "n"}]},
            id="nested",
        ),
        pytest.param(b" {} ", {}, id="whitespace"),
        pytest.param(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, None, id="max-depth"),
    ],
)
def test_parse_json_body(body: bytes, value: Any) -> None:
    parsed = parse_json_body(body)
    if value is not None:
        assert parsed == value
        assert type(parsed) is type(value)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param(b'{"amount": 100, "amount": 5000}', "amount", id="top-level"),
        pytest.param(b'{"a": {"b": 1, "b": 2}}', "a.b", id="nested"),
        pytest.param(b'{"items": [{}, {"price": 1, "price": 2}]}', "items.1.price", id="in-list"),
        pytest.param(b'[{"x": 1, "x": 1}]', "0.x", id="same-value"),
    ],
)
def test_parse_json_body_duplicate_keys(body: bytes, named: str) -> None:
    with pytest.raises(AmbiguousField) as info:
        parse_json_body(body)
    assert info.value.path == named


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"{} x", id="trailing-garbage"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b'{"a": Infinity}', id="infinity"),
        pytest.param(b"[-Infinity]", id="negative-infinity"),
        pytest.param(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), id="too-deep"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="far-too-deep"),
        pytest.param(b'{"a": "' + b"x" * MAX_BODY_BYTES + b'"}', id="too-large"),
        pytest.param(b'{"a": "\xff"}', id="invalid-utf8"),
        pytest.param(b"\xef\xbb\xbf{}", id="byte-order-mark"),
        pytest.param('{"a": 1}'.encode("utf-16"), id="utf16"),
        pytest.param(b'"\\ud800"', id="lone-surrogate-value"),
        pytest.param(b'{"\\udc00": 1}', id="lone-surrogate-key"),
        pytest.param(b"1" * 5000, id="huge-integer"),
        pytest.param(b"{'a': 1}", id="single-quotes"),
    ],
)
def test_parse_json_body_refuses(body: bytes) -> None:
    with pytest.raises(FormError):
        parse_json_body(body)


JSON_TOKENS = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"a"', b'"b"', b":", b",", b"1", b"1.5", b"-0", b"1e400", b"NaN",
     b"Infinity", b"null", b"true", b'"\\ud800"', b'"\\u00e9"', b" ", b"\xff", b'"']
)  # fmt: skip
JSONISH = st.lists(JSON_TOKENS, max_size=40).map(b"".join)


@given(st.one_of(st.binary(max_size=300), JSONISH))
def test_arbitrary_json_bytes_only_raise_form_errors(body: bytes) -> None:
    with contextlib.suppress(FormError, AmbiguousField):
        parse_json_body(body)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(codec="utf-8")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_json_round_trip(value: Any) -> None:
    assert parse_json_body(json.dumps(value).encode()) == value


@given(
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=5),
    st.data(),
)
def test_any_duplicate_json_key_is_found(obj: dict[str, int], draw: st.DataObject) -> None:
    key = draw.draw(st.sampled_from(sorted(obj)))
    members = [json.dumps(k) + ": " + json.dumps(v) for k, v in obj.items()]
    members.insert(draw.draw(st.integers(0, len(members))), json.dumps(key) + ": 0")
    body = ('{"wrapper": {' + ", ".join(members) + "}}").encode()
    with pytest.raises(AmbiguousField) as info:
        parse_json_body(body)
    assert info.value.path == f"wrapper.{key}"
