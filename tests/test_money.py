"""Tests for keybrake.core.money: exact micro-USD parsing, formatting and conversion."""

from __future__ import annotations

import doctest
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keybrake.core.money
from keybrake.core.money import (
    MAX_MICROS,
    MICROS_PER_USD,
    BadAmount,
    MoneyError,
    UnknownCurrency,
    decimal_to_micro_usd,
    format_usd,
    minor_to_micro_usd,
    minor_unit_exponent,
    parse_usd,
)

# fmt: off
STRIPE_ZERO_DECIMAL = (
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga",
    "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
)
# fmt: on
STRIPE_THREE_DECIMAL = ("bhd", "jod", "kwd", "omr", "tnd")


def test_docstring_examples() -> None:
    result = doctest.testmod(keybrake.core.money, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_all_is_sorted_and_complete() -> None:
    names = keybrake.core.money.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    for name in names:
        assert hasattr(keybrake.core.money, name)


# --- minor_unit_exponent -------------------------------------------------------------------


@pytest.mark.parametrize("code", STRIPE_ZERO_DECIMAL)
def test_stripe_zero_decimal_currencies(code: str) -> None:
    assert minor_unit_exponent(code) == 0
    assert minor_unit_exponent(code.upper()) == 0


@pytest.mark.parametrize("code", STRIPE_THREE_DECIMAL)
def test_stripe_three_decimal_currencies(code: str) -> None:
    assert minor_unit_exponent(code) == 3
    assert minor_unit_exponent(code.upper()) == 3


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        pytest.param("usd", 2, id="usd"),
        pytest.param("USD", 2, id="usd-upper"),
        pytest.param("Eur", 2, id="eur-mixed-case"),
        pytest.param("gbp", 2, id="gbp"),
        pytest.param("inr", 2, id="inr"),
        pytest.param("idr", 2, id="idr"),
        # Stripe's special cases (see the _money module docstring for the reasoning).
        pytest.param("isk", 2, id="isk-two-decimal-for-backwards-compatibility"),
        pytest.param("huf", 2, id="huf-two-decimal-charges"),
        pytest.param("twd", 2, id="twd-two-decimal-charges"),
        pytest.param("ugx", 0, id="ugx-conservative-zero-decimal"),
    ],
)
def test_minor_unit_exponent(code: str, exponent: int) -> None:
    assert minor_unit_exponent(code) == exponent


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("xyz", id="unknown"),
        pytest.param("iqd", id="iso-three-decimal-not-on-stripe"),
        pytest.param("lyd", id="iso-three-decimal-not-on-stripe-2"),
        pytest.param("clf", id="iso-four-decimal"),
        pytest.param("", id="empty"),
        pytest.param("us", id="too-short"),
        pytest.param("usdd", id="too-long"),
        pytest.param("u$d", id="punctuation"),
        pytest.param(" usd", id="whitespace"),
        pytest.param("\uff35\uff33\uff24", id="fullwidth-letters"),
        pytest.param("usd\n", id="trailing-newline"),
    ],
)
def test_unknown_currency(code: str) -> None:
    with pytest.raises(UnknownCurrency) as info:
        minor_unit_exponent(code)
    assert info.value.currency == code
    assert isinstance(info.value, MoneyError)
    assert isinstance(info.value, ValueError)


def test_unknown_currency_non_string() -> None:
    with pytest.raises(UnknownCurrency):
        minor_unit_exponent(840)  # type: ignore[arg-type]


# --- parse_usd -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        pytest.param("300", 300_000_000, id="whole-dollars"),
        pytest.param("0.0083", 8_300, id="fraction-of-a-cent"),
        pytest.param("12.50", 12_500_000, id="cents"),
        pytest.param("0", 0, id="zero"),
        pytest.param("0.000001", 1, id="one-micro"),
        pytest.param("1.5000000", 1_500_000, id="trailing-zeros-past-six-places"),
        pytest.param("-0", 0, id="negative-zero"),
        pytest.param("1000000000000", MAX_MICROS, id="limit-as-string"),
        pytest.param(Decimal("1.5"), 1_500_000, id="decimal"),
        pytest.param(Decimal("1E+2"), 100_000_000, id="decimal-exponent"),
        pytest.param(Decimal("0.00830000"), 8_300, id="decimal-trailing-zeros"),
        pytest.param(Decimal("-0.000"), 0, id="decimal-negative-zero"),
        pytest.param(7, 7_000_000, id="int"),
        pytest.param(10**12, MAX_MICROS, id="limit-as-int"),
    ],
)
def test_parse_usd(value: str | int | Decimal, micros: int) -> None:
    assert parse_usd(value) == micros


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("", "plain dollar amount", id="empty"),
        pytest.param(" 1", "plain dollar amount", id="leading-space"),
        pytest.param("1 ", "plain dollar amount", id="trailing-space"),
        pytest.param("1e3", "plain dollar amount", id="exponent"),
        pytest.param("+1", "plain dollar amount", id="plus-sign"),
        pytest.param("1_000", "plain dollar amount", id="underscore"),
        pytest.param("1,000", "plain dollar amount", id="comma"),
        pytest.param("$5", "plain dollar amount", id="dollar-sign"),
        pytest.param("\u0661", "plain dollar amount", id="arabic-indic-digit"),
        pytest.param("1.", "plain dollar amount", id="bare-point"),
        pytest.param(".5", "plain dollar amount", id="no-leading-digit"),
        pytest.param("NaN", "plain dollar amount", id="nan-string"),
        pytest.param("Infinity", "plain dollar amount", id="infinity-string"),
        pytest.param("9" * 100, "plain dollar amount", id="very-long"),
        pytest.param("-1", "negative", id="negative-string"),
        pytest.param("0.0000001", "more than 6 decimal places", id="seven-places"),
        pytest.param("1.0000001", "more than 6 decimal places", id="seven-places-2"),
        pytest.param("1000000000000.000001", "exceeds the limit", id="just-over-limit"),
        pytest.param("1000000000001", "exceeds the limit", id="over-limit"),
        pytest.param(10**12 + 1, "exceeds the limit", id="int-over-limit"),
        pytest.param(-1, "negative", id="negative-int"),
        pytest.param(True, "not a dollar amount", id="bool-true"),
        pytest.param(False, "not a dollar amount", id="bool-false"),
        pytest.param(Decimal("NaN"), "finite", id="decimal-nan"),
        pytest.param(Decimal("sNaN"), "finite", id="decimal-snan"),
        pytest.param(Decimal("Infinity"), "finite", id="decimal-infinity"),
        pytest.param(Decimal("-Infinity"), "finite", id="decimal-negative-infinity"),
        pytest.param(Decimal("-0.01"), "negative", id="decimal-negative"),
        pytest.param(Decimal("1E+100"), "out of range", id="decimal-huge"),
        pytest.param(Decimal("1E+999999999"), "out of range", id="decimal-enormous-exponent"),
        pytest.param(Decimal("1E-100"), "out of range", id="decimal-tiny"),
        pytest.param(Decimal("1E+13"), "exceeds the limit", id="decimal-over-limit"),
    ],
)
def test_parse_usd_rejects(value: Any, message: str) -> None:
    with pytest.raises(BadAmount, match=re.escape(message)):
        parse_usd(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(1.5, id="float"),
        pytest.param(0.0, id="float-zero"),
        pytest.param(float("nan"), id="float-nan"),
        pytest.param(None, id="none"),
        pytest.param(b"1", id="bytes"),
        pytest.param([1], id="list"),
    ],
)
def test_parse_usd_rejects_wrong_types(value: Any) -> None:
    with pytest.raises(TypeError):
        parse_usd(value)


# --- format_usd ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        pytest.param(0, "0.00", id="zero"),
        pytest.param(1, "0.000001", id="one-micro"),
        pytest.param(10, "0.00001", id="ten-micros"),
        pytest.param(8_300, "0.0083", id="fraction-of-a-cent"),
        pytest.param(10_000, "0.01", id="one-cent"),
        pytest.param(1_500_000, "1.50", id="pads-to-two-decimals"),
        pytest.param(300_000_000, "300.00", id="whole-dollars"),
        pytest.param(123_456_789, "123.456789", id="all-six-places"),
        pytest.param(MAX_MICROS, "1000000000000.00", id="limit-no-exponent"),
        pytest.param(10**30, "1000000000000000000000000.00", id="beyond-limit-no-exponent"),
        pytest.param(-1_500_000, "-1.50", id="negative"),
        pytest.param(-1, "-0.000001", id="negative-micro"),
    ],
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@pytest.mark.parametrize("value", [1.5, True, Decimal(1), "1"], ids=repr)
def test_format_usd_rejects_non_int(value: Any) -> None:
    with pytest.raises(TypeError):
        format_usd(value)


@given(st.integers(min_value=0, max_value=MAX_MICROS))
def test_parse_format_round_trip(micros: int) -> None:
    text = format_usd(micros)
    assert re.fullmatch(r"[0-9]+\.[0-9]{2,6}", text)
    assert parse_usd(text) == micros
    assert parse_usd(Decimal(text)) == micros


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=999_999))
def test_parse_usd_matches_integer_arithmetic(dollars: int, fraction: int) -> None:
    text = f"{dollars}.{fraction:06d}"
    expected = dollars * MICROS_PER_USD + fraction
    if expected > MAX_MICROS:
        with pytest.raises(BadAmount):
            parse_usd(text)
    else:
        assert parse_usd(text) == expected


# --- minor_to_micro_usd --------------------------------------------------------------------

FX = {
    "jpy": Decimal("0.0067"),
    "kwd": Decimal("3.25"),
    "eur": Decimal("1.08"),
    "ugx": Decimal("0.00027"),
    "isk": Decimal("0.0072"),
    "huf": Decimal("0.0028"),
}


@pytest.mark.parametrize(
    ("amount", "currency", "fx", "micros"),
    [
        pytest.param(1000, "jpy", FX, 6_700_000, id="jpy-1000-at-0.0067"),
        pytest.param(1000, "JPY", FX, 6_700_000, id="jpy-uppercase"),
        pytest.param(1, "jpy", FX, 6_700, id="jpy-1-exact"),
        pytest.param(1, "jpy", {"jpy": Decimal("0.00667123")}, 6_672, id="jpy-1-ceiling"),
        pytest.param(1000, "kwd", FX, 3_250_000, id="kwd-three-decimal-one-dinar"),
        pytest.param(1, "kwd", {"kwd": Decimal("3.2547")}, 3_255, id="kwd-one-fils-ceiling"),
        pytest.param(1999, "usd", {}, 19_990_000, id="usd-implicit-rate"),
        pytest.param(1, "usd", {}, 10_000, id="usd-one-cent"),
        pytest.param(1999, "USD", {"usd": Decimal(1)}, 19_990_000, id="usd-explicit-rate"),
        pytest.param(1250, "eur", FX, 13_500_000, id="eur-two-decimal"),
        pytest.param(1, "eur", {"eur": Decimal("1.0800001")}, 10_801, id="eur-ceiling"),
        pytest.param(0, "eur", FX, 0, id="zero"),
        pytest.param(1000, "ugx", FX, 270_000, id="ugx-as-whole-shillings"),
        pytest.param(500, "isk", FX, 36_000, id="isk-500-is-5-krona"),
        pytest.param(100, "huf", FX, 2_800, id="huf-100-is-1-forint"),
        pytest.param(100, "usd", {"usd": 2}, 2_000_000, id="int-rate"),
        pytest.param(10**14, "usd", {}, MAX_MICROS, id="at-limit"),
    ],
)
def test_minor_to_micro_usd(
    amount: int, currency: str, fx: dict[str, Decimal], micros: int
) -> None:
    assert minor_to_micro_usd(amount, currency, fx) == micros


def test_minor_to_micro_usd_unknown_code() -> None:
    with pytest.raises(UnknownCurrency) as info:
        minor_to_micro_usd(100, "xyz", {"xyz": Decimal(1)})
    assert info.value.currency == "xyz"


def test_minor_to_micro_usd_missing_rate() -> None:
    with pytest.raises(UnknownCurrency, match="no USD rate") as info:
        minor_to_micro_usd(100, "eur", {"jpy": Decimal("0.0067")})
    assert info.value.currency == "eur"


@pytest.mark.parametrize(
    ("amount", "currency", "fx", "error"),
    [
        pytest.param(-1, "usd", {}, BadAmount, id="negative"),
        pytest.param(True, "usd", {}, BadAmount, id="bool"),
        pytest.param(1.0, "usd", {}, TypeError, id="float"),
        pytest.param("100", "usd", {}, TypeError, id="string"),
        pytest.param(10**14 + 1, "usd", {}, BadAmount, id="over-limit"),
        pytest.param(10**40, "jpy", FX, BadAmount, id="absurd"),
        pytest.param(1, "eur", {"eur": Decimal(0)}, MoneyError, id="zero-rate"),
        pytest.param(1, "eur", {"eur": Decimal(-1)}, MoneyError, id="negative-rate"),
        pytest.param(1, "eur", {"eur": Decimal("NaN")}, MoneyError, id="nan-rate"),
        pytest.param(1, "eur", {"eur": Decimal("Infinity")}, MoneyError, id="infinite-rate"),
        pytest.param(1, "eur", {"eur": Decimal("1E+50")}, MoneyError, id="absurd-rate"),
        pytest.param(1, "eur", {"eur": 1.08}, MoneyError, id="float-rate"),
    ],
)
def test_minor_to_micro_usd_rejects(
    amount: Any, currency: str, fx: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        minor_to_micro_usd(amount, currency, fx)


CURRENCIES = ["usd", "jpy", "kwd", "eur", "ugx", "isk"]
RATES = st.decimals(
    min_value=Decimal("0.00000001"),
    max_value=Decimal("1000"),
    places=8,
    allow_nan=False,
    allow_infinity=False,
)


def _exact_usd_micros(amount: Fraction, currency: str, rate: Decimal) -> Fraction:
    scale = Fraction(10) ** minor_unit_exponent(currency)
    return amount * Fraction(rate) * MICROS_PER_USD / scale


@given(st.integers(min_value=0, max_value=10**13), st.sampled_from(CURRENCIES), RATES)
def test_minor_to_micro_usd_is_the_exact_ceiling(amount: int, currency: str, rate: Decimal) -> None:
    exact = _exact_usd_micros(Fraction(amount), currency, rate)
    if exact > MAX_MICROS:
        with pytest.raises(BadAmount):
            minor_to_micro_usd(amount, currency, {currency: rate})
        return
    micros = minor_to_micro_usd(amount, currency, {currency: rate})
    assert micros >= exact  # never under the exact value
    assert micros - 1 < exact  # and by less than one micro-dollar over


@given(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.sampled_from(CURRENCIES),
    RATES,
)
def test_minor_to_micro_usd_is_monotonic(a: int, b: int, currency: str, rate: Decimal) -> None:
    low, high = sorted((a, b))
    fx = {currency: rate}
    assert minor_to_micro_usd(low, currency, fx) <= minor_to_micro_usd(high, currency, fx)


@given(st.integers(min_value=0, max_value=10**14))
def test_usd_cents_are_exact(cents: int) -> None:
    assert minor_to_micro_usd(cents, "usd", {}) == cents * 10_000


# --- decimal_to_micro_usd ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "fx", "micros"),
    [
        pytest.param(Decimal("-0.00790"), "usd", {}, 7_900, id="twilio-negative-price"),
        pytest.param("-0.00790", "usd", {}, 7_900, id="twilio-price-string"),
        pytest.param(Decimal("0.0079"), "usd", {}, 7_900, id="positive-price"),
        pytest.param(Decimal("0.0079000001"), "usd", {}, 7_901, id="ceiling"),
        pytest.param(Decimal("0.0000001"), "usd", {}, 1, id="sub-micro-rounds-up"),
        pytest.param(Decimal("12.5"), "eur", FX, 13_500_000, id="eur"),
        pytest.param(Decimal("150"), "JPY", FX, 1_005_000, id="jpy-major-units"),
        pytest.param(Decimal("0"), "usd", {}, 0, id="zero"),
        pytest.param(Decimal("-0"), "usd", {}, 0, id="negative-zero"),
        pytest.param(3, "usd", {}, 3_000_000, id="int"),
        pytest.param(Decimal("1E+3"), "usd", {}, 1_000_000_000, id="exponent"),
        pytest.param("+0.5", "usd", {}, 500_000, id="plus-sign-string"),
    ],
)
def test_decimal_to_micro_usd(
    amount: Decimal | int | str, currency: str, fx: dict[str, Decimal], micros: int
) -> None:
    assert decimal_to_micro_usd(amount, currency, fx) == micros


@pytest.mark.parametrize(
    ("amount", "currency", "fx", "error"),
    [
        pytest.param("abc", "usd", {}, BadAmount, id="not-a-number"),
        pytest.param("1e-3", "usd", {}, BadAmount, id="exponent-string"),
        pytest.param("", "usd", {}, BadAmount, id="empty-string"),
        pytest.param(Decimal("NaN"), "usd", {}, BadAmount, id="nan"),
        pytest.param(Decimal("-Infinity"), "usd", {}, BadAmount, id="infinity"),
        pytest.param(Decimal("1E+30"), "usd", {}, BadAmount, id="absurd"),
        pytest.param(Decimal("1E+13"), "usd", {}, BadAmount, id="over-limit"),
        pytest.param(0.1, "usd", {}, TypeError, id="float"),
        pytest.param(True, "usd", {}, TypeError, id="bool"),
        pytest.param(Decimal(1), "xyz", {}, UnknownCurrency, id="unknown-currency"),
        pytest.param(Decimal(1), "eur", {}, UnknownCurrency, id="missing-rate"),
    ],
)
def test_decimal_to_micro_usd_rejects(
    amount: Any, currency: str, fx: dict[str, Decimal], error: type[Exception]
) -> None:
    with pytest.raises(error):
        decimal_to_micro_usd(amount, currency, fx)


PRICES = st.decimals(
    min_value=Decimal("-100000"),
    max_value=Decimal("100000"),
    places=10,
    allow_nan=False,
    allow_infinity=False,
)


@given(PRICES, st.sampled_from(CURRENCIES), RATES)
def test_decimal_to_micro_usd_is_the_exact_ceiling_of_the_magnitude(
    price: Decimal, currency: str, rate: Decimal
) -> None:
    fx = {currency: rate}
    micros = decimal_to_micro_usd(price, currency, fx)
    exact = abs(Fraction(price)) * Fraction(rate) * MICROS_PER_USD
    assert micros >= exact
    assert micros - 1 < exact
    assert decimal_to_micro_usd(-price, currency, fx) == micros
