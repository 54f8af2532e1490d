"""Exact money: dollar amounts as integer micro-USD, and vendor amounts converted to them.

Every amount the proxy reserves, settles or reports is an ``int`` of micro-USD
(``1 USD == 1_000_000``). Floats never enter: dollar strings are parsed digit by digit,
exchange rates are ``Decimal`` and conversions are exact rational arithmetic that rounds
*up*, so a cap can be overestimated by at most one micro-dollar per conversion, never
underestimated.

Minor units follow Stripe's rules (https://docs.stripe.com/currencies): an API ``amount``
is an integer in the currency's smallest unit, e.g. cents for USD, whole yen for JPY, fils
(1/1000) for KWD. Stripe's *special cases* and the reading chosen here:

- **ISK** became a zero-decimal currency, but for backwards compatibility the API keeps
  representing it as a two-decimal value whose decimal part is always ``00`` (to charge
  5 ISK, send ``amount=500``). Stripe gives only this one reading of the ``amount`` field,
  so ISK has exponent 2.
- **UGX** is listed among the zero-decimal currencies, yet the special-cases section gives
  it the same two-decimal backwards-compatibility rule as ISK (5 UGX is ``amount=500``,
  divisible by 100). The page offers two readings of the same field, so we take the
  conservative one: exponent 0, which can only *over*estimate a UGX amount (by at most
  100x), never under.
- **HUF** and **TWD** are two-decimal for charges. Stripe treats them as zero-decimal only
  for payouts, where the amount is still given in hundredths and must be divisible by 100
  (to pay out 10 HUF, send ``amount=1000``). Both readings agree on the unit, so exponent 2.
- Three-decimal currencies (BHD, JOD, KWD, OMR, TND) must also end in ``0`` for Stripe's
  payment partners; that constrains the value, not the unit, so exponent 3.

A code missing from the built-in table is refused (`UnknownCurrency`) rather than guessed:
ISO 4217 currencies with three or four decimals (IQD, LYD, CLF) would be misread as two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final

__all__ = [
    "MAX_MICROS",
    "MICROS_PER_USD",
    "BadAmount",
    "MoneyError",
    "UnknownCurrency",
    "decimal_to_micro_usd",
    "format_usd",
    "minor_to_micro_usd",
    "minor_unit_exponent",
    "parse_usd",
]

MICROS_PER_USD: Final = 1_000_000
"""Micro-USD in one US dollar."""

MAX_MICROS: Final = 10**12 * MICROS_PER_USD
"""The largest amount handled (10^12 USD): anything above is a typo or an attack, and stays
far inside a signed 64-bit store column."""


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


_ZERO_DECIMAL: Final = _codes("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf")
_THREE_DECIMAL: Final = _codes("bhd jod kwd omr tnd")
# Stripe's other presentment currencies, all two-decimal in the API (ISK, HUF, TWD included:
# see the module docstring). Retired codes Stripe still accepts (mro, std) are kept.
_TWO_DECIMAL: Final = _codes(
    """
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bmd bnd bob brl bsd bwp byn
    bzd cad cdf chf cny cop crc cve czk dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gtq
    gyd hkd hnl htg huf idr ils inr isk jmd kes kgs khr kyd kzt lak lbp lkr lrd lsl mad mdl
    mkd mmk mnt mop mro mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd pab pen pgk php pkr
    pln qar ron rsd rub sar sbd scr sek sgd shp sle sos srd std szl thb tjs top try ttd twd
    tzs uah uyu uzs wst xcd xcg yer zar zmw
    """
)

_CURRENCY_CODE: Final = re.compile(r"[A-Za-z]{3}")
_PLAIN_DOLLARS: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_SIGNED_DECIMAL: Final = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_MAX_TEXT: Final = 64
# Beyond these a Decimal is not a price or a rate, and exact arithmetic on it would build
# enormous integers (Decimal("1E+999999999") is finite).
_MAX_DIGITS: Final = 64
_MIN_ADJUSTED: Final = -40
_MAX_ADJUSTED: Final = 20


class MoneyError(ValueError):
    """An amount, rate or currency the money functions refuse; the message says why."""


class UnknownCurrency(MoneyError):
    """A currency code that is not in the table, or has no USD rate.

    >>> UnknownCurrency("xyz").currency
    'xyz'
    """

    def __init__(self, currency: str, message: str | None = None) -> None:
        self.currency = currency
        super().__init__(message or f"unknown currency {currency!r}")


class BadAmount(MoneyError):
    """An amount that is negative, not a number, too precise or absurdly large."""


def minor_unit_exponent(currency: str) -> int:
    """Decimal places of a currency's API minor unit, by Stripe's rules (any letter case).

    >>> minor_unit_exponent("usd"), minor_unit_exponent("JPY"), minor_unit_exponent("kwd")
    (2, 0, 3)
    >>> minor_unit_exponent("ugx"), minor_unit_exponent("isk")
    (0, 2)
    >>> minor_unit_exponent("xyz")
    Traceback (most recent call last):
    ...
    keybrake.core.money.UnknownCurrency: unknown currency 'xyz'
    """
    if not isinstance(currency, str) or not _CURRENCY_CODE.fullmatch(currency):
        raise UnknownCurrency(str(currency), f"{currency!r} is not a three-letter currency code")
    code = currency.lower()
    if code in _ZERO_DECIMAL:
        return 0
    if code in _THREE_DECIMAL:
        return 3
    if code in _TWO_DECIMAL:
        return 2
    raise UnknownCurrency(currency)


def _exact_ratio(value: Decimal, what: str, error: type[MoneyError] = BadAmount) -> tuple[int, int]:
    """``value`` as an exact fraction (numerator, denominator), refusing absurd magnitudes."""
    if not value.is_finite():
        raise error(f"{what} must be a finite number, not {value}")
    if value.is_zero():
        return 0, 1
    if len(value.as_tuple().digits) > _MAX_DIGITS:
        raise error(f"{what} has more than {_MAX_DIGITS} digits")
    if not _MIN_ADJUSTED <= value.adjusted() <= _MAX_ADJUSTED:
        raise error(f"{what} is out of range")
    return value.as_integer_ratio()


def _check_micros(micros: int, what: str) -> int:
    if micros > MAX_MICROS:
        raise BadAmount(f"{what} exceeds the limit of {format_usd(MAX_MICROS)} USD")
    return micros


def parse_usd(value: str | int | Decimal) -> int:
    """Dollars (a plain decimal string, an int or a Decimal) as exact micro-USD.

    Floats are refused with `TypeError`: their binary noise is exactly what this type keeps
    out (convert a YAML float with ``Decimal(repr(x))`` first). Digits past the sixth
    decimal place must be zero.

    >>> parse_usd("300"), parse_usd("0.0083"), parse_usd(Decimal("1.5")), parse_usd(2)
    (300000000, 8300, 1500000, 2000000)
    >>> parse_usd("0.0000001")
    Traceback (most recent call last):
    ...
    keybrake.core.money.BadAmount: '0.0000001' has more than 6 decimal places (finer than 1 ...
    """
    if isinstance(value, bool):
        raise BadAmount(f"{value!r} is not a dollar amount")
    if isinstance(value, float):
        raise TypeError("dollar amounts must be str, int or Decimal, never float")
    if isinstance(value, int):
        if value < 0:
            raise BadAmount(f"dollar amount {value} must not be negative")
        return _check_micros(value * MICROS_PER_USD, f"dollar amount {value}")
    if isinstance(value, str):
        if len(value) > _MAX_TEXT or not _PLAIN_DOLLARS.fullmatch(value):
            shown = value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
            raise BadAmount(f"{shown!r} is not a plain dollar amount such as '12.50' or '0.0083'")
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    else:
        raise TypeError(f"dollar amounts must be str, int or Decimal, not {type(value).__name__}")
    shown = repr(value) if isinstance(value, str) else str(value)
    numerator, denominator = _exact_ratio(number, f"dollar amount {shown}")
    if numerator < 0:
        raise BadAmount(f"dollar amount {shown} must not be negative")
    micros, remainder = divmod(numerator * MICROS_PER_USD, denominator)
    if remainder:
        raise BadAmount(f"{shown} has more than 6 decimal places (finer than 1 micro-USD)")
    return _check_micros(micros, f"dollar amount {shown}")


def format_usd(micros: int) -> str:
    """Micro-USD as a dollar string: at least two decimals, no trailing zeros past them.

    >>> format_usd(300_000_000), format_usd(8_300), format_usd(1_500_000), format_usd(1)
    ('300.00', '0.0083', '1.50', '0.000001')
    """
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise TypeError(f"micro-USD must be an int, not {type(micros).__name__}")
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    decimals = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


def _usd_rate(currency: str, fx_to_usd: Mapping[str, Decimal]) -> tuple[int, int]:
    """The USD-per-unit rate of a known currency as an exact fraction."""
    minor_unit_exponent(currency)
    code = currency.lower()
    rate = fx_to_usd.get(code)
    if rate is None and code == "usd":
        rate = Decimal(1)
    if rate is None:
        raise UnknownCurrency(currency, f"no USD rate for currency {code!r}")
    if isinstance(rate, bool) or not isinstance(rate, Decimal | int):
        raise MoneyError(f"USD rate for {code!r} must be a Decimal, not {type(rate).__name__}")
    numerator, denominator = _exact_ratio(Decimal(rate), f"USD rate for {code!r}", MoneyError)
    if numerator <= 0:
        raise MoneyError(f"USD rate for {code!r} must be positive, not {rate}")
    return numerator, denominator


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def minor_to_micro_usd(amount_minor: int, currency: str, fx_to_usd: Mapping[str, Decimal]) -> int:
    """A vendor amount in minor units (``amount=1000``, ``currency=jpy``) as micro-USD.

    ``fx_to_usd`` maps lowercase codes to USD per one major unit; ``usd`` defaults to 1.
    The result is rounded *up*: a cap may be overestimated by under one micro-dollar, never
    underestimated.

    >>> minor_to_micro_usd(1000, "jpy", {"jpy": Decimal("0.0067")})
    6700000
    >>> minor_to_micro_usd(1, "JPY", {"jpy": Decimal("0.00667123")})  # 6671.23, rounded up
    6672
    >>> minor_to_micro_usd(1999, "usd", {}), minor_to_micro_usd(1, "kwd", {"kwd": Decimal("3.25")})
    (19990000, 3250)
    """
    if isinstance(amount_minor, bool):
        raise BadAmount(f"{amount_minor!r} is not an amount")
    if not isinstance(amount_minor, int):
        raise TypeError(f"minor-unit amounts must be int, not {type(amount_minor).__name__}")
    rate_num, rate_den = _usd_rate(currency, fx_to_usd)
    if amount_minor < 0:
        raise BadAmount(f"amount {amount_minor} {currency} must not be negative")
    exponent = minor_unit_exponent(currency)
    micros = _ceil_div(amount_minor * rate_num * MICROS_PER_USD, rate_den * 10**exponent)
    return _check_micros(micros, f"amount {amount_minor} {currency}")


def decimal_to_micro_usd(
    amount: Decimal | int | str, currency: str, fx_to_usd: Mapping[str, Decimal]
) -> int:
    """A major-unit price (``Decimal("-0.00790")`` USD) as a micro-USD cost, rounded up.

    The sign is ignored: vendors disagree on whether a charge is positive (Stripe) or
    negative (Twilio's ``"price": "-0.00790"``), and a cost read from a vendor is never
    booked as a credit. Strings must be plain decimals (``"-0.00790"``, not ``"1e-3"``).

    >>> decimal_to_micro_usd(Decimal("-0.00790"), "usd", {})
    7900
    >>> decimal_to_micro_usd("0.0000001", "usd", {})  # a tenth of a micro-dollar, rounded up
    1
    >>> decimal_to_micro_usd(Decimal("12.5"), "eur", {"eur": Decimal("1.08")})
    13500000
    """
    if isinstance(amount, bool | float):
        raise TypeError("prices must be Decimal, int or str, never float or bool")
    if isinstance(amount, str):
        if len(amount) > _MAX_TEXT or not _SIGNED_DECIMAL.fullmatch(amount):
            raise BadAmount(f"{amount[:_MAX_TEXT]!r} is not a plain decimal price")
        amount = Decimal(amount)
    elif isinstance(amount, int):
        amount = Decimal(amount)
    elif not isinstance(amount, Decimal):
        raise TypeError(f"prices must be Decimal, int or str, not {type(amount).__name__}")
    rate_num, rate_den = _usd_rate(currency, fx_to_usd)
    numerator, denominator = _exact_ratio(abs(amount), f"price {amount} {currency}")
    micros = _ceil_div(numerator * rate_num * MICROS_PER_USD, denominator * rate_den)
    return _check_micros(micros, f"price {amount} {currency}")
