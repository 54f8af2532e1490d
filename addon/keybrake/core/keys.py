"""Vault keys: generation, hashing and ``expires_in`` durations.

A vault key looks like ``kbv_stripe_<43 url-safe characters>``: 256 bits from
`secrets.token_urlsafe`, a prefix no vendor uses (Stripe keys start ``sk_``/``rk_``/``pk_``,
Twilio tokens are hex, Resend keys ``re_``). Only its SHA-256 is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

__all__ = [
    "MAX_EXPIRES_IN",
    "VAULT_KEY_PREFIX",
    "generate_key_id",
    "generate_vault_key",
    "hash_vault_key",
    "looks_like_vault_key",
    "parse_duration",
]

VAULT_KEY_PREFIX = "kbv_"
MAX_EXPIRES_IN = dt.timedelta(days=90)
# Used with fullmatch and ASCII digits only: "$" would accept a trailing newline and "\d"
# Arabic-Indic or other Unicode digits.
_KEY_RE = re.compile(r"kbv_[a-z][a-z0-9_-]{0,31}_[A-Za-z0-9_-]{43}")
_SHORT = re.compile(r"([0-9]{1,7})([smhdw])")
_ISO = re.compile(
    r"P(?!$)([0-9]{1,7}W)?([0-9]{1,7}D)?(?:T(?=[0-9])([0-9]{1,7}H)?([0-9]{1,7}M)?([0-9]{1,7}S)?)?"
)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def generate_vault_key(vendor: str) -> str:
    """A new vault key for ``vendor``.

    >>> generate_vault_key("stripe").startswith("kbv_stripe_")
    True
    """
    return f"{VAULT_KEY_PREFIX}{vendor}_{secrets.token_urlsafe(32)}"


def generate_key_id() -> str:
    """A public, non-secret key id such as ``key_3f9a1c2b7d4e8f60``."""
    return f"key_{secrets.token_hex(8)}"


def hash_vault_key(vault_key: str) -> str:
    """SHA-256 hex digest: the only form in which a vault key is stored."""
    return hashlib.sha256(vault_key.encode("utf-8", "surrogateescape")).hexdigest()


def looks_like_vault_key(value: str) -> bool:
    """True for strings shaped like a vault key (any vendor)."""
    return _KEY_RE.fullmatch(value) is not None


def parse_duration(value: str) -> dt.timedelta:
    """Parse ``30m``, ``2h``, ``7d``, ``1w``, ``90s`` or an ISO-8601 duration (``PT2H``, ``P1D``).

    >>> parse_duration("2h")
    datetime.timedelta(seconds=7200)

    Raises ValueError for anything else, for zero, and above `MAX_EXPIRES_IN`.
    """
    text = value.strip()
    seconds: int
    if m := _SHORT.fullmatch(text):
        seconds = int(m.group(1)) * _UNIT[m.group(2)]
    elif m := _ISO.fullmatch(text.upper()):
        w, d, h, mi, s = (int(x[:-1]) if x else 0 for x in m.groups())
        seconds = w * 604800 + d * 86400 + h * 3600 + mi * 60 + s
    else:
        shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
        raise ValueError(f"{shown} is not a duration like '30m', '2h', '7d' or 'PT2H'")
    if seconds <= 0:
        raise ValueError("duration must be positive")
    delta = dt.timedelta(seconds=seconds)
    if delta > MAX_EXPIRES_IN:
        raise ValueError(f"duration must be at most {MAX_EXPIRES_IN.days} days")
    return delta
