"""Tests for keybrake.core.keys: vault key format, hashing and ``expires_in`` durations."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import string
from collections import Counter

import pytest
from tests.conftest import ROOT

from keybrake.core.keys import (
    MAX_EXPIRES_IN,
    VAULT_KEY_PREFIX,
    generate_key_id,
    generate_vault_key,
    hash_vault_key,
    looks_like_vault_key,
    parse_duration,
)
from keybrake.core.policy import load_policy_file

H = dt.timedelta(hours=1)


# -- durations ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", dt.timedelta(minutes=30)),
        ("2h", 2 * H),
        ("7d", dt.timedelta(days=7)),
        ("1w", dt.timedelta(weeks=1)),
        ("90s", dt.timedelta(seconds=90)),
        ("1s", dt.timedelta(seconds=1)),
        (" 2h ", 2 * H),
        ("PT2H", 2 * H),
        ("P1D", dt.timedelta(days=1)),
        ("pt2h", 2 * H),
        ("PT1H30M", dt.timedelta(minutes=90)),
        ("PT45S", dt.timedelta(seconds=45)),
        ("P1DT12H", dt.timedelta(days=1, hours=12)),
        ("P2W", dt.timedelta(weeks=2)),
        ("90d", MAX_EXPIRES_IN),
        ("P90D", MAX_EXPIRES_IN),
        ("2160h", MAX_EXPIRES_IN),
        ("7776000s", MAX_EXPIRES_IN),
    ],
)
def test_parse_duration_accepts(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0m", "positive"),
        ("0s", "positive"),
        ("PT0S", "positive"),
        ("P0D", "positive"),
        ("91d", "at most 90 days"),
        ("P91D", "at most 90 days"),
        ("13w", "at most 90 days"),
        ("7776001s", "at most 90 days"),
        ("9999999d", "at most 90 days"),
        ("", "not a duration"),
        ("2", "not a duration"),
        ("h", "not a duration"),
        ("2 h", "not a duration"),
        ("2H", "not a duration"),  # short forms are lowercase; 'H' only in ISO form
        ("1.5h", "not a duration"),
        ("-1h", "not a duration"),
        ("+1h", "not a duration"),
        ("2h30m", "not a duration"),
        ("1y", "not a duration"),
        ("P", "not a duration"),
        ("PT", "not a duration"),
        ("P1DT", "not a duration"),
        ("P1M", "not a duration"),  # months are ambiguous: refused
        ("P1Y", "not a duration"),
        ("PT0.5H", "not a duration"),
        ("T2H", "not a duration"),
        ("2h\nx", "not a duration"),
        ("\u0663h", "not a duration"),  # Arabic-Indic digit three
        ("\uff12h", "not a duration"),  # fullwidth digit two
        ("P\u0663D", "not a duration"),
        ("12345678h", "not a duration"),
        ("1" * 1000 + "h", "not a duration"),
    ],
)
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


def test_parse_duration_error_is_short_for_huge_input() -> None:
    with pytest.raises(ValueError) as e:
        parse_duration("x" * 10_000)
    assert len(str(e.value)) < 200


# -- vault keys --------------------------------------------------------------------------------
def _stripe_raw_secret_patterns() -> list[re.Pattern[str]]:
    policy = load_policy_file(ROOT / "policies" / "stripe.yaml")
    return [re.compile(p) for p in policy.auth.raw_secret_patterns]


@pytest.mark.parametrize("vendor", ["stripe", "twilio", "resend", "my-vendor_2"])
def test_vault_key_format(vendor: str) -> None:
    key = generate_vault_key(vendor)
    assert key.startswith(f"{VAULT_KEY_PREFIX}{vendor}_")
    body = key[len(f"{VAULT_KEY_PREFIX}{vendor}_") :]
    assert len(body) == 43  # 32 random bytes, url-safe base64 without padding
    assert set(body) <= set(string.ascii_letters + string.digits + "-_")
    assert looks_like_vault_key(key)
    assert key.isascii() and key.isprintable()


def test_vault_keys_are_unique_and_random() -> None:
    keys = [generate_vault_key("stripe") for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    # Shannon entropy of the random part's characters is close to log2(64) = 6 bits.
    chars = Counter(c for k in keys for c in k[len("kbv_stripe_") :])
    total = sum(chars.values())
    entropy = -sum(n / total * math.log2(n / total) for n in chars.values())
    assert entropy > 5.9
    assert len(chars) == 64


def test_vault_key_cannot_be_mistaken_for_a_real_vendor_key() -> None:
    stripe_patterns = _stripe_raw_secret_patterns()
    vendor_prefixes = ("sk_", "rk_", "pk_", "re_", "whsec_", "AC", "SK")
    for vendor in ("stripe", "twilio", "resend"):
        for _ in range(200):
            key = generate_vault_key(vendor)
            assert not key.startswith(vendor_prefixes)
            assert not any(p.match(key) for p in stripe_patterns)
            # Twilio auth tokens and Account SIDs are 32 hex characters (SIDs with AC/SK).
            assert not re.fullmatch(r"(AC|SK)?[0-9a-fA-F]{32}", key)
            assert not re.fullmatch(r"[0-9a-fA-F]+", key)


@pytest.mark.parametrize(
    "value",
    [
        "sk_live_" + "a" * 24,
        "sk_test_" + "a" * 24,
        "rk_live_" + "a" * 24,
        "pk_live_" + "a" * 24,
        "re_" + "a" * 32,
        "0123456789abcdef0123456789abcdef",
        "kbv_stripe_" + "A" * 42,  # one short
        "kbv_stripe_" + "A" * 44,  # one long
        "kbv_stripe_" + "A" * 42 + "=",
        "kbv_stripe_" + "A" * 42 + "+",
        "kbv_stripe_" + "A" * 43 + "\n",
        "\nkbv_stripe_" + "A" * 43,
        " kbv_stripe_" + "A" * 43,
        "KBV_stripe_" + "A" * 43,
        "kbv_Stripe_" + "A" * 43,
        "kbv__" + "A" * 43,
        "kbv_stripe" + "A" * 43,
        "kbv_stripe_" + "A" * 42 + "\u0410",  # Cyrillic A look-alike
        "",
    ],
)
def test_looks_like_vault_key_rejects(value: str) -> None:
    assert not looks_like_vault_key(value)


def test_hash_vault_key_is_sha256_hex() -> None:
    key = generate_vault_key("stripe")
    digest = hash_vault_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key not in digest
    assert hash_vault_key(key) == digest
    assert hash_vault_key(key + "x") != digest


def test_hash_vault_key_never_raises_on_undecodable_header_bytes() -> None:
    # mitmproxy decodes header bytes it cannot read as UTF-8 into lone surrogates.
    weird = b"kbv_stripe_\xff\xfe".decode("utf-8", "surrogateescape")
    assert re.fullmatch(r"[0-9a-f]{64}", hash_vault_key(weird))


def test_key_id_is_public_and_distinct_from_vault_key() -> None:
    ids = {generate_key_id() for _ in range(500)}
    assert len(ids) == 500
    for key_id in ids:
        assert re.fullmatch(r"key_[0-9a-f]{16}", key_id)
        assert not looks_like_vault_key(key_id)
